"""The S3 model store against a real S3-compatible server (moto_server on loopback).

The learner publishes checkpoints, the publisher's watcher syncs them into its own directory and
serves them; partial and tampered uploads are never synced; prune keeps the newest.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from recsys import checkpoint as ckpt
from recsys.config import load_settings
from recsys.errors import ConfigError, RecsysError
from recsys.learner.online import OnlineLearner
from recsys.learner.sink import restore_from_store
from recsys.model_store import ModelStore
from recsys.serving.model import load_serving_model
from recsys.serving.watcher import ModelWatcher
from tests.checkpoints import make_checkpoint, tiny_learner
from tests.integration.publisher_helpers import ITEMS

pytest.importorskip("boto3")


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials for moto, from the standard AWS variables (as a pod would get them)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture
def store(s3_endpoint: str, aws_env: None) -> ModelStore:
    """A store on a fresh bucket, built from settings as the workers build it."""
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    settings = load_settings(
        model_store={
            "url": f"s3://{bucket}/recsys/models",
            "endpoint_url": s3_endpoint,
            "region": "us-east-1",
            "addressing_style": "path",
        },
        learner={"keep_checkpoints": 3},
    )
    s = ModelStore.from_settings(settings)
    s.client.create_bucket(Bucket=bucket)
    return s


def remote_keys(store: ModelStore) -> list[str]:
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def watcher_for(root: Path, store: ModelStore) -> ModelWatcher:
    return ModelWatcher(
        root,
        lambda p: load_serving_model(p, {"device": "cpu"}),
        sync=functools.partial(store.sync, root),
    )


def test_publish_then_sync_serves_the_new_version(store: ModelStore, tmp_path: Path) -> None:
    learner_dir, publisher_dir = tmp_path / "learner", tmp_path / "publisher"
    watcher = watcher_for(publisher_dir, store)
    assert not watcher.poll()  # empty store: nothing to serve, no error
    assert watcher.current is None

    first = make_checkpoint(learner_dir, 1, ITEMS)
    assert store.publish(first) == "v000000000001"
    keys = remote_keys(store)
    assert "recsys/models/v000000000001/manifest.json" in keys
    assert all(k.startswith("recsys/models/v000000000001/") for k in keys)
    assert watcher.poll()
    assert watcher.current is not None
    assert watcher.current.version == "v000000000001"
    # The synced copy is byte-for-byte the learner's, verified by the same manifest.
    synced = publisher_dir / "v000000000001"
    assert ckpt.read_manifest(synced)["files"] == ckpt.read_manifest(first)["files"]

    second = make_checkpoint(learner_dir, 7, ITEMS, seed=1)
    store.publish(second)
    assert watcher.poll()
    assert watcher.current.version == "v000000000007"
    assert list(watcher.current.item_ids) == list(
        load_serving_model(second, {"device": "cpu"}).item_ids
    )
    assert not watcher.poll()  # nothing newer: no download, no swap
    assert [p.name for p in ckpt.list_checkpoints(publisher_dir)] == [
        "v000000000007",
        "v000000000001",
    ]


def test_the_online_learner_publishes_each_checkpoint(store: ModelStore, tmp_path: Path) -> None:
    """The wiring the learner worker uses: OnlineLearner(on_checkpoint=store.publish)."""
    learner = tiny_learner()
    for item in ITEMS:
        learner.catalog.index_of(item)
    learner.step_count = 42
    online = OnlineLearner(learner, tmp_path / "learner", on_checkpoint=store.publish)
    path = online.checkpoint({"rewards:0": 17})
    assert path is not None
    assert store.versions() == [path.name]
    watcher = watcher_for(tmp_path / "publisher", store)
    assert watcher.poll()
    assert watcher.current is not None
    assert watcher.current.version == path.name
    assert watcher.current.manifest["offsets"] == {"rewards:0": 17}


def test_a_failing_store_neither_stops_the_learner_nor_the_watcher(
    store: ModelStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    local = make_checkpoint(tmp_path / "publisher", 1, ITEMS)
    gone = ModelStore(store.client, f"missing-{uuid.uuid4().hex[:8]}", "x", keep=3)
    watcher = watcher_for(tmp_path / "publisher", gone)
    assert watcher.poll()  # the sync error is logged; what the directory holds is served
    assert watcher.current is not None
    assert watcher.current.version == local.name
    assert "syncing model versions failed" in caplog.text
    assert "testing" not in caplog.text  # no credential in any log line

    learner = tiny_learner()
    learner.catalog.index_of(ITEMS[0])
    learner.step_count = 3
    online = OnlineLearner(learner, tmp_path / "learner", on_checkpoint=gone.publish)
    path = online.checkpoint({})
    assert path is not None  # written locally; the upload error is logged only
    assert ckpt.read_manifest(path)
    assert "written but not published" in caplog.text


def _store_calls(op: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "recsys_model_store_operations_total", {"op": op, "result": result}
    )
    return value or 0.0


def test_a_learner_on_a_fresh_volume_resumes_from_the_store(
    store: ModelStore, tmp_path: Path
) -> None:
    """A rescheduled learner pod with an empty directory continues the published model and its
    offsets, and every store call is counted."""
    before = {op: _store_calls(op, "ok") for op in ("publish", "sync")}
    learner = tiny_learner()
    for item in ITEMS:
        learner.catalog.index_of(item)
    learner.step_count = 42
    OnlineLearner(learner, tmp_path / "old-pod", on_checkpoint=store.publish).checkpoint(
        {"rewards:0": 17}
    )

    fresh = tmp_path / "new-pod"
    restored = restore_from_store(store, str(fresh))
    assert [p.name for p in restored] == store.versions()
    online, offsets = OnlineLearner.resume(fresh, tiny_learner)
    assert online.version == 42
    assert offsets == {"rewards:0": 17}
    assert restore_from_store(store, str(fresh)) == []  # already there: nothing downloaded
    assert _store_calls("publish", "ok") == before["publish"] + 1
    assert _store_calls("sync", "ok") == before["sync"] + 2
    last = REGISTRY.get_sample_value(
        "recsys_model_store_last_success_timestamp_seconds", {"op": "sync"}
    )
    assert last is not None
    assert abs(last - time.time()) < 60


def test_an_unreachable_store_never_starts_a_learner_from_nothing(
    store: ModelStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = ModelStore(store.client, f"missing-{uuid.uuid4().hex[:8]}", "x", keep=3)
    errors = _store_calls("sync", "error")
    with pytest.raises(RecsysError, match="holds no checkpoint"):
        restore_from_store(gone, str(tmp_path / "empty"))
    # With local checkpoints the learner resumes from them and says why.
    make_checkpoint(tmp_path / "local", 5, ITEMS)
    assert restore_from_store(gone, str(tmp_path / "local")) == []
    assert "resuming from the local checkpoints" in caplog.text
    assert _store_calls("sync", "error") == errors + 2


def _upload_without_manifest(store: ModelStore, version_dir: Path, name: str) -> None:
    for f in sorted(version_dir.iterdir()):
        if f.name != ckpt.MANIFEST:
            store.client.upload_file(str(f), store.bucket, store._key(name, f.name))


def test_a_partial_upload_is_never_synced(store: ModelStore, tmp_path: Path) -> None:
    learner_dir, publisher_dir = tmp_path / "learner", tmp_path / "publisher"
    store.publish(make_checkpoint(learner_dir, 1, ITEMS))
    # An upload that died before its manifest: data files only, under a newer name.
    _upload_without_manifest(store, make_checkpoint(learner_dir, 2, ITEMS), "v000000000002")
    assert store.versions() == ["v000000000001"]
    watcher = watcher_for(publisher_dir, store)
    assert watcher.poll()
    assert watcher.current.version == "v000000000001"
    assert [p.name for p in ckpt.list_checkpoints(publisher_dir)] == ["v000000000001"]
    assert not [p for p in publisher_dir.iterdir() if p.name.startswith(".")]  # no leftovers


@pytest.mark.parametrize("tamper", ["data", "manifest_hash", "extra_file"])
def test_a_tampered_version_is_never_synced(
    store: ModelStore, tmp_path: Path, tamper: str, caplog: pytest.LogCaptureFixture
) -> None:
    learner_dir, publisher_dir = tmp_path / "learner", tmp_path / "publisher"
    store.publish(make_checkpoint(learner_dir, 1, ITEMS))
    bad = store.publish(make_checkpoint(learner_dir, 2, ITEMS, seed=1))
    manifest: dict[str, Any] = ckpt.read_manifest(learner_dir / bad)
    if tamper == "data":
        store.client.put_object(
            Bucket=store.bucket, Key=store._key(bad, "model.safetensors"), Body=b"tampered"
        )
    elif tamper == "manifest_hash":
        body = dict(manifest)
        body["files"] = {**manifest["files"], "model.safetensors": "0" * 64}
        store.client.put_object(
            Bucket=store.bucket, Key=store._key(bad, ckpt.MANIFEST), Body=json.dumps(body).encode()
        )
    else:  # a name walking out of the directory
        body = dict(manifest)
        body["files"] = {**manifest["files"], "../escape": "0" * 64}
        store.client.put_object(
            Bucket=store.bucket, Key=store._key(bad, ckpt.MANIFEST), Body=json.dumps(body).encode()
        )
    watcher = watcher_for(publisher_dir, store)
    assert watcher.poll()
    assert watcher.current.version == "v000000000001"  # the newest version that verifies
    assert [p.name for p in ckpt.list_checkpoints(publisher_dir)] == ["v000000000001"]
    assert not (tmp_path / "escape").exists()
    assert "not using version v000000000002" in caplog.text
    # Remembered: the next poll downloads nothing again.
    caplog.clear()
    assert store.sync(publisher_dir) == []
    assert "v000000000002" not in caplog.text


def test_prune_keeps_the_newest_and_clears_dead_uploads(store: ModelStore, tmp_path: Path) -> None:
    learner_dir = tmp_path / "learner"
    _upload_without_manifest(store, make_checkpoint(learner_dir, 1, ITEMS), "v000000000001")
    for step in (2, 3, 4, 5):
        store.publish(make_checkpoint(learner_dir, step, ITEMS))  # keep=3 prunes after each
    assert store.versions() == ["v000000000005", "v000000000004", "v000000000003"]
    assert {k.split("/")[2] for k in remote_keys(store)} == {
        "v000000000005",
        "v000000000004",
        "v000000000003",
    }  # v2 pruned whole, the dead upload v1 too
    # An upload in progress (newer than every complete version) is left alone.
    _upload_without_manifest(store, make_checkpoint(learner_dir, 9, ITEMS), "v000000000009")
    assert store.prune(1) == ["v000000000004", "v000000000003"]
    assert store.versions() == ["v000000000005"]
    assert any(k.split("/")[2] == "v000000000009" for k in remote_keys(store))
    # The publisher's directory is pruned to keep as well.
    publisher_dir = tmp_path / "publisher"
    for step in (10, 11, 12, 13):
        store.publish(make_checkpoint(learner_dir, step, ITEMS))
        store.sync(publisher_dir)
    assert [p.name for p in ckpt.list_checkpoints(publisher_dir)] == [
        "v000000000013",
        "v000000000012",
        "v000000000011",
    ]
    # A learner whose steps restarted below the stored versions keeps what it just published.
    assert store.publish(make_checkpoint(tmp_path / "restarted", 2, ITEMS)) == "v000000000002"
    assert store.versions() == ["v000000000013", "v000000000012", "v000000000011", "v000000000002"]


def test_a_republished_step_never_overwrites_a_version(store: ModelStore, tmp_path: Path) -> None:
    """A learner that lost its local directory writes step 5 again: a new name, not an
    overwrite of the version readers may be downloading."""
    first = store.publish(make_checkpoint(tmp_path / "a", 5, ITEMS))
    again = store.publish(make_checkpoint(tmp_path / "b", 5, ITEMS, seed=1))
    assert (first, again) == ("v000000000005", "v000000000005-1")
    watcher = watcher_for(tmp_path / "publisher", store)
    assert watcher.poll()
    assert watcher.current.version == "v000000000005-1"


def test_settings_refuse_credentials_in_urls() -> None:
    with pytest.raises(ConfigError, match="RECSYS_MODEL_STORE__URL"):
        load_settings(model_store={"url": "https://bucket/prefix"})
    with pytest.raises(ConfigError, match="RECSYS_MODEL_STORE__ENDPOINT_URL") as exc:
        load_settings(model_store={"url": "s3://bkt", "endpoint_url": "http://key:hunter22@h:9000"})
    assert "hunter22" not in str(exc.value)
    with pytest.raises(ConfigError, match="empty"):
        ModelStore.from_settings(load_settings())


@pytest.mark.slow
def test_learner_and_publisher_workers_hand_models_over_through_s3(
    store: ModelStore, kafka_settings, topic_prefix: str, tmp_path: Path
) -> None:
    """The Kubernetes situation: learner and publisher as real worker processes, each with its
    own checkpoint directory, sharing only the S3 model store. The publisher serves what the
    learner trains."""
    from recsys.demo.supervisor import WorkerProcess, wait_for
    from recsys.events import Event, RewardRecord, Slate
    from recsys.kafka import create_topics, make_producer
    from tests.integration.publisher_helpers import read_topic

    p = topic_prefix
    topics = {name: f"{p}.{name}" for name in ("events", "rewards", "vectors", "recs", "dlq")}
    create_topics(kafka_settings, list(topics.values()), partitions=2)
    env = {
        "RECSYS_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "RECSYS_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "RECSYS_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "RECSYS_TOPICS__EVENTS": topics["events"],
        "RECSYS_TOPICS__REWARDS": topics["rewards"],
        "RECSYS_TOPICS__ITEM_VECTORS": topics["vectors"],
        "RECSYS_TOPICS__RECOMMENDATIONS": topics["recs"],
        "RECSYS_TOPICS__DLQ": topics["dlq"],
        "RECSYS_METRICS__PORT": "0",
        "RECSYS_MODEL_STORE__URL": store.url,
        "RECSYS_MODEL_STORE__ENDPOINT_URL": store.client.meta.endpoint_url,
        "RECSYS_MODEL_STORE__REGION": "us-east-1",
        "RECSYS_MODEL_STORE__ADDRESSING_STYLE": "path",
        "RECSYS_LEARNER__CHECKPOINT_DIR": str(tmp_path / "learner"),
        "RECSYS_LEARNER__CHECKPOINT_EVERY_S": "0.5",
        "RECSYS_LEARNER__GROUP_ID": f"{p}.learner",
        "RECSYS_LEARNER__DEVICE": "cpu",
        "RECSYS_LEARNER__BATCH_SIZE": "32",
        "RECSYS_LEARNER__DIM": "16",
        "RECSYS_LEARNER__KEEP_CHECKPOINTS": "3",
        "RECSYS_PUBLISHER__CHECKPOINT_DIR": str(tmp_path / "publisher"),
        "RECSYS_PUBLISHER__WATCH_INTERVAL_S": "0.3",
        "RECSYS_PUBLISHER__GROUP_ID": f"{p}.publisher",
        "RECSYS_PUBLISHER__DEVICE": "cpu",
        "RECSYS_STORE__URL": f"sqlite:///{tmp_path / 'store.db'}",
        "HF_HUB_OFFLINE": "1",
    }
    producer = make_producer(kafka_settings)
    for k in range(400):
        user, item = f"u{k % 20}", ITEMS[k % len(ITEMS)]
        r = RewardRecord(f"r{k}", user, item, float(k % 3 == 0), 1_000 + k, "joined",
                         None, 0, "v0", f"q{k}")  # fmt: skip
        producer.send(topics["rewards"], key=user.encode(), value=r.to_bytes())
    producer.flush()
    learner = WorkerProcess("learner", env, tmp_path / "learner.log").start()
    publisher = WorkerProcess("publisher", env, tmp_path / "publisher.log").start()
    try:
        assert wait_for(lambda: store.versions(), 180, 0.3), learner.tail()
        assert wait_for(
            lambda: "serving model version" in (tmp_path / "publisher.log").read_text(), 120, 0.3
        ), publisher.tail()
        synced = ckpt.list_checkpoints(tmp_path / "publisher")
        assert synced, "the publisher's own directory holds the synced versions"
        now = int(time.time() * 1000)
        for n in range(20):
            ev = Event(f"e{n}", "click", f"u{n}", ITEMS[n], now + n)
            producer.send(topics["events"], key=ev.user_id.encode(), value=ev.to_bytes())
        producer.flush()

        def served() -> list[Slate]:
            recs = read_topic(kafka_settings, topics["recs"], timeout=5)
            return [Slate.from_bytes(r.value) for r in recs]

        assert wait_for(lambda: any(s.model_version.startswith("v") for s in served()), 60, 0.5)
        remote = set(store.versions())
        assert any(s.model_version in remote | {c.name for c in synced} for s in served())
    finally:
        publisher.stop()
        learner.stop()
    # Pruned on both sides to RECSYS_LEARNER__KEEP_CHECKPOINTS.
    assert len(store.versions()) <= 3
    assert len(ckpt.list_checkpoints(tmp_path / "publisher")) <= 3
