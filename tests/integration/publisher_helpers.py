"""Helpers for the publisher integration tests: real checkpoints, events, topic readers."""

from __future__ import annotations

import time

from kafka.structs import TopicPartition

from recsys.config import KafkaSettings
from recsys.events import Event, Slate
from recsys.kafka import make_consumer

ITEMS = [f"movie-{i}" for i in range(60)]


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
