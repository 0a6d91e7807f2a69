"""Helpers for the publisher integration tests: real checkpoints, events, topic readers."""

from __future__ import annotations

import time
from pathlib import Path

from kafka.structs import TopicPartition

from recsys.config import KafkaSettings
from recsys.events import Event, Slate
from recsys.kafka import make_consumer
from recsys.learner import Learner, LearnerConfig
from recsys.model import ModelConfig

ITEMS = [f"movie-{i}" for i in range(60)]


def make_checkpoint(root: Path, step: int, seed: int = 0, items: list[str] = ITEMS) -> Path:
    """A real learner checkpoint (tiny model) at ``root/v<step>``."""
    cfg = ModelConfig(
        text_dim=8,
        dim=16,
        max_history=10,
        item_capacity=64,
        adaptor_hidden=16,
        num_layers=1,
        num_heads=2,
        use_text=False,
    )
    learner = Learner(cfg, LearnerConfig(device="cpu", seed=seed, keep_checkpoints=10))
    for i in items:
        learner.catalog.index_of(i)
    learner.step_count = step
    return learner.save_checkpoint(root, offsets={})


def click(n: int, user: str, item: str, ts_ms: int | None = None) -> Event:
    kind = "impression" if n % 4 == 3 else "click"
    return Event(f"evt-{n}", kind, user, item, ts_ms or int(time.time() * 1000))


def read_topic(settings: KafkaSettings, topic: str, timeout: float = 30.0) -> list:
    """Every record of ``topic`` up to its end offsets at call time, in partition order."""
    consumer = make_consumer(settings, None)
    parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    end = consumer.end_offsets(tps)
    out: dict[TopicPartition, list] = {tp: [] for tp in tps}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(consumer.position(tp) < end[tp] for tp in tps):
        for tp, records in consumer.poll(200).items():
            out[tp].extend(records)
    consumer.close()
    return [r for tp in tps for r in out[tp]]


def slates_by_partition(records: list) -> dict[int, list[Slate]]:
    by: dict[int, list[Slate]] = {}
    for r in records:
        by.setdefault(r.partition, []).append(Slate.from_bytes(r.value))
    return by
