"""The learner's memory bounds: users (LRU histories), item tables, what checkpoints hold."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from recsys import checkpoint as ckpt
from recsys import metrics
from recsys.encoder.catalog import ItemCatalog
from recsys.errors import ConfigError
from recsys.events import ItemVector, RewardRecord
from recsys.history import PAD
from recsys.learner.config import LearnerConfig
from recsys.learner.online import OnlineLearner
from recsys.learner.sink import ITEM_CAPACITY, LearnerSink
from recsys.learner.trainer import HISTORY_CACHE, ITEM_TABLE, Learner
from recsys.model import ModelConfig


def make(**cfg: object) -> Learner:
    model = ModelConfig(text_dim=8, dim=8, max_history=4, item_capacity=4, adaptor_hidden=8,
                        num_heads=2, num_layers=1)  # fmt: skip
    return Learner(model, LearnerConfig(batch_size=4, device="cpu", **cfg), ItemCatalog(dim=8))  # type: ignore[arg-type]


def click(n: int, user: str, item: str, ts: int) -> RewardRecord:
    return RewardRecord(f"r{n}", user, item, 1.0, ts, "joined", 0.2, 0, "v1", f"q{n}")


def test_histories_hold_at_most_max_users_and_the_buffer_keeps_evicted_states() -> None:
    lr = make(max_users=2)
    lr.observe([click(0, "a", "i0", 10), click(1, "a", "i1", 20)])
    lr.observe([click(2, "b", "i2", 30), click(3, "c", "i3", 40)])
    assert len(lr.histories) == 2
    assert "a" not in lr.histories  # the least recently active user went first
    assert lr.histories.evictions == 1
    # a's second sample was buffered with its state as of then, eviction or not
    states = lr.buffer.sample(len(lr.buffer)).history.tolist()
    assert [PAD, PAD, PAD, lr.catalog.index_of("i0")] in states
    lr.observe([click(4, "a", "i2", 50)])  # a returns: an empty history, counted as a new user
    assert lr.histories.get("a") == [lr.catalog.index_of("i2")]
    assert metrics.CACHE_CAPACITY.labels(cache=HISTORY_CACHE)._value.get() == 2


def test_checkpoints_hold_the_bounded_set_and_settings_can_lower_it(tmp_path: Path) -> None:
    lr = make(max_users=3)
    lr.observe([click(n, f"u{n}", f"i{n % 3}", 100 + n) for n in range(10)])
    lr.step()
    path = lr.save_checkpoint(tmp_path, {"rw:0": 10})
    manifest = ckpt.read_manifest(path)
    saved = json.loads(ckpt.checkpoint_file(path, manifest, "histories.json").read_text())
    assert saved["users"] == ["u7", "u8", "u9"]  # 10 users seen, 3 held, 3 written
    restored, _ = Learner.load_checkpoint(path)
    assert restored.histories.users() == ["u7", "u8", "u9"]
    restored.set_memory_bounds(max_users=1, max_items=100)
    assert restored.histories.users() == ["u9"]
    assert restored.cfg.max_users == 1
    assert restored.histories.max_users == 1


def test_new_items_beyond_max_items_are_refused_and_tables_stay_within_it() -> None:
    lr = make(max_items=5)
    assert lr.observe([click(n, "u", f"i{n}", 10 + n) for n in range(8)]) == 5
    assert lr.items_refused == 3
    assert len(lr.catalog) == 5
    assert lr.observe([click(9, "v", "i0", 30)]) == 1  # a known item still trains
    lr.step()
    assert lr.model.items.capacity == 5  # doubling 4 -> 8 is capped at the bound
    assert lr.item_counts.shape[0] <= 5
    assert lr.admit_batch(["i1", "new"]) == [True, False]
    assert metrics.CACHE_ENTRIES.labels(cache=ITEM_TABLE)._value.get() == 5
    with pytest.raises(ConfigError, match="max_items"):
        LearnerConfig(max_items=1 << 30)


def test_sink_dead_letters_records_of_items_beyond_the_bound(tmp_path: Path) -> None:
    lr = make(max_items=2)
    sink = LearnerSink(OnlineLearner(lr, tmp_path), "rw", "vec", {})
    vec = ItemVector("i0", "m", "k0", (0.5,) * 8)
    raws = [("vec", vec.to_bytes())] + [
        ("rw", click(n, "u", f"i{n}", 10 + n).to_bytes()) for n in range(4)
    ]
    records = [
        SimpleNamespace(topic=t, partition=0, offset=k, key=b"u", value=raw, headers=[])
        for k, (t, raw) in enumerate(raws)
    ]
    counter = metrics.EVENTS_REJECTED.labels(reason=ITEM_CAPACITY, worker="learner")
    before = counter._value.get()
    sink.write(records)  # type: ignore[arg-type]
    assert counter._value.get() - before == 2  # i2 and i3: i0 (vector) and i1 fill the tables
    assert lr.catalog.ids == ["i0", "i1"]
    assert lr.histories.get("u") == [0, 1]  # the two fitting rewards were learned
