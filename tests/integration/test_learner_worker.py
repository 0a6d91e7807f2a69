"""Encoder and learner workers as real subprocesses on the embedded broker: vectors flow to the
learner, checkpoints record offsets, and SIGKILLs (mid-training, mid-checkpoint) lose nothing.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest

from recsys import checkpoint as ckpt
from recsys.data.backfill import read_topic
from recsys.demo.supervisor import WorkerProcess, wait_for
from recsys.events import ItemRecord, ItemVector, RewardRecord
from recsys.kafka import create_topics, make_producer

pytestmark = pytest.mark.slow


def _env(kafka_settings, prefix: str, tmp_path: Path) -> dict[str, str]:
    return {
        "RECSYS_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "RECSYS_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "RECSYS_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "RECSYS_KAFKA__MAX_POLL_INTERVAL_MS": "30000",
        "RECSYS_TOPICS__EVENTS": f"{prefix}.events",
        "RECSYS_TOPICS__REWARDS": f"{prefix}.rewards",
        "RECSYS_TOPICS__ITEMS": f"{prefix}.items",
        "RECSYS_TOPICS__ITEM_VECTORS": f"{prefix}.vectors",
        "RECSYS_TOPICS__DLQ": f"{prefix}.dlq",
        "RECSYS_TOPICS__RECOMMENDATIONS": f"{prefix}.recs",
        "RECSYS_METRICS__PORT": "0",
        "RECSYS_ENCODER__CACHE_DIR": str(tmp_path / "cache"),
        "RECSYS_ENCODER__DEVICE": "cpu",
        "RECSYS_ENCODER__GROUP_ID": f"{prefix}.encoder",
        "RECSYS_LEARNER__CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "RECSYS_LEARNER__CHECKPOINT_EVERY_S": "0.5",
        "RECSYS_LEARNER__CHECKPOINT_EVERY_STEPS": "20",
        "RECSYS_LEARNER__GROUP_ID": f"{prefix}.learner",
        "RECSYS_LEARNER__DEVICE": "cpu",
        "RECSYS_LEARNER__BATCH_SIZE": "64",
        "RECSYS_LEARNER__DIM": "16",
        "RECSYS_LEARNER__KEEP_CHECKPOINTS": "50",
        "HF_HUB_OFFLINE": "1",
    }


def _rewards(n: int, n_items: int, seed: int = 0) -> list[RewardRecord]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        user = f"u{rng.randrange(40)}"
        item = f"m{rng.randrange(n_items)}"
        out.append(
            RewardRecord(f"r{k}", user, item, float(rng.random() < 0.3), 1_000 + k, "joined",
                         rng.choice([None, 0.1]), 0, "v0", f"q{k}")
        )  # fmt: skip
    return out


def test_encoder_worker_turns_items_into_vectors(kafka_settings, topic_prefix, tmp_path):
    env = _env(kafka_settings, topic_prefix, tmp_path)
    items_topic, vec_topic, dlq = (f"{topic_prefix}.{t}" for t in ("items", "vectors", "dlq"))
    create_topics(kafka_settings, [items_topic, vec_topic, dlq], partitions=2)
    producer = make_producer(kafka_settings)
    titles = ["Toy Story (1995)", "Toy Story 2 (1999)", "Heat (1995)"]
    for i, title in enumerate(titles):
        rec = ItemRecord(f"m{i}", title, 1, tags=("Animation",) if "Toy" in title else ("Crime",))
        producer.send(items_topic, key=rec.item_id.encode(), value=rec.to_bytes())
    producer.send(items_topic, key=b"bad", value=b'{"item_id": "x"}')
    producer.flush()
    worker = WorkerProcess("encoder", env, tmp_path / "encoder.log").start()
    try:
        got: list = []

        def three_vectors() -> bool:
            got[:] = read_topic(kafka_settings, vec_topic, idle_s=0.5)
            return len(got) >= 3

        assert wait_for(three_vectors, 90, 1.0), worker.tail()
        assert wait_for(lambda: len(read_topic(kafka_settings, dlq, idle_s=0.5)) == 1, 30, 0.5)
    finally:
        assert worker.stop() == 0, worker.tail()
    vectors = {v.item_id: v for v in (ItemVector.from_bytes(value) for _, _, value in got)}
    assert set(vectors) == {"m0", "m1", "m2"}
    import numpy as np

    a, b, c = (np.asarray(vectors[k].vector) for k in ("m0", "m1", "m2"))
    assert len(a) == 384
    assert a @ b > a @ c, "the two Toy Story films must be closer than Toy Story and Heat"


def test_learner_worker_survives_sigkills_and_resumes_at_its_offsets(
    kafka_settings, topic_prefix, tmp_path
):
    env = _env(kafka_settings, topic_prefix, tmp_path)
    rewards_topic = f"{topic_prefix}.rewards"
    vec_topic = f"{topic_prefix}.vectors"
    create_topics(kafka_settings, [rewards_topic, vec_topic], partitions=2)
    records = _rewards(3000, 50)
    producer = make_producer(kafka_settings)
    for r in records:
        producer.send(rewards_topic, key=r.user_id.encode(), value=r.to_bytes())
    producer.flush()
    root = tmp_path / "ckpt"
    rng = random.Random(1)

    def consumed(manifest) -> int:
        return sum(v for k, v in manifest["offsets"].items() if k.startswith(rewards_topic))

    steps_seen = []
    for _ in range(2):  # each round costs a process start (torch, the encoder): keep it to two
        worker = WorkerProcess("learner", env, tmp_path / "learner.log").start()
        assert wait_for(lambda: ckpt.find_latest(root) is not None, 180, 0.2), worker.tail()
        time.sleep(rng.uniform(0.2, 1.5))
        worker.kill()
        found = ckpt.find_latest(root)
        assert found is not None
        steps_seen.append(found[1]["step"])

    # A kill during a checkpoint write leaves only a temp dir; a truncated or tampered
    # checkpoint must be skipped too. Fake all three as the newest versions.
    good_path, good = ckpt.find_latest(root)
    (root / ".tmp-interrupted").mkdir()
    (root / ".tmp-interrupted" / "model.safetensors").write_bytes(b"partial")
    truncated = root / f"v{good['step'] + 1000:012d}"
    shutil.copytree(good_path, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    tampered = root / f"v{good['step'] + 2000:012d}"
    shutil.copytree(good_path, tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["offsets"] = {k: 0 for k in manifest["offsets"]}
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    w = tampered / "model.safetensors"
    blob = bytearray(w.read_bytes())
    blob[-1] ^= 0xFF
    w.write_bytes(bytes(blob))

    worker = WorkerProcess("learner", env, tmp_path / "learner.log").start()
    try:
        assert wait_for(
            lambda: (f := ckpt.find_latest(root)) is not None and consumed(f[1]) == len(records),
            300,
            0.3,
        ), worker.tail()
    finally:
        assert worker.stop() == 0, worker.tail()
    log = (tmp_path / "learner.log").read_text()
    assert f"resumed from step {good['step']}" in log
    assert "sha256 mismatch" in log
    _, final = ckpt.find_latest(root)
    assert final["step"] > good["step"]
    assert consumed(final) == len(records)
    assert steps_seen == sorted(steps_seen), "each restart resumes, never restarts from zero"
