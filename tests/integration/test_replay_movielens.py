"""Replay all of ml-latest-small through the embedded broker and read it back."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from recsys.config import KafkaSettings, load_settings
from recsys.data.backfill import read_topic, run_replay
from recsys.events import EventParser, parse_item


def test_replay_movielens_exactly_once_in_user_order(
    kafka_settings: KafkaSettings, data_dir: Path, topic_prefix: str
) -> None:
    settings = load_settings(
        kafka=kafka_settings.model_dump(),
        topics={
            "events": f"{topic_prefix}.events",
            "items": f"{topic_prefix}.items",
            "partitions": 4,
        },
    )
    summary = run_replay("movielens", data_dir / "ml-latest-small", settings, progress=False)
    assert summary.events_sent == 100_836
    assert summary.items_sent == 9_742
    assert summary.skipped == []

    records = read_topic(settings.kafka, settings.topics.events)
    assert len(records) == 100_836
    parser = EventParser(clock_ms=lambda: 2_000_000_000_000)
    ids: set[str] = set()
    per_user: dict[str, list[int]] = defaultdict(list)
    partition_of: dict[str, int] = {}
    for partition, key, value in records:
        event = parser.parse(value)
        assert not hasattr(event, "reason"), event
        assert key == event.user_id.encode()
        ids.add(event.event_id)
        per_user[event.user_id].append(event.ts)
        # Keyed by user: one user's events all in one partition.
        assert partition_of.setdefault(event.user_id, partition) == partition
    assert len(ids) == 100_836  # every event exactly once
    assert len(per_user) == 610
    for ts in per_user.values():
        assert ts == sorted(ts)

    items = read_topic(settings.kafka, settings.topics.items)
    assert len(items) == 9_742
    first = parse_item(items[0][2])
    assert not hasattr(first, "reason"), first
    assert {json.loads(v)["item_id"] for _, _, v in items} == {k.decode() for _, k, _ in items}
