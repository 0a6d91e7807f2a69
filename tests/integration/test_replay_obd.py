"""Replay the OBD sample through the embedded broker: impressions, clicks joined by request_id."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from recsys.config import KafkaSettings, load_settings
from recsys.data.backfill import read_topic, run_replay
from recsys.events import Event, EventParser


def test_replay_obd_clicks_join_impressions(
    kafka_settings: KafkaSettings, data_dir: Path, topic_prefix: str
) -> None:
    settings = load_settings(
        kafka=kafka_settings.model_dump(),
        topics={
            "events": f"{topic_prefix}.events",
            "items": f"{topic_prefix}.items",
            "partitions": 3,
        },
    )
    summary = run_replay("obd", data_dir / "obd" / "random" / "all", settings, progress=False)
    assert summary.events_sent == 10_038
    assert summary.items_sent == 80

    parser = EventParser(clock_ms=lambda: 2_000_000_000_000)
    events: list[Event] = []
    for _, _, value in read_topic(settings.kafka, settings.topics.events):
        event = parser.parse(value)
        assert isinstance(event, Event), event
        events.append(event)
    assert Counter(e.type for e in events) == {"impression": 10_000, "click": 38}
    impressions = Counter(e.request_id for e in events if e.type == "impression")
    assert len(impressions) == 10_000
    clicks = [e for e in events if e.type == "click"]
    for click in clicks:
        assert impressions[click.request_id] == 1
    assert all(e.propensity == 0.0125 for e in events if e.type == "impression")


def test_replay_limit_and_rate(
    kafka_settings: KafkaSettings, data_dir: Path, topic_prefix: str
) -> None:
    settings = load_settings(
        kafka=kafka_settings.model_dump(),
        topics={
            "events": f"{topic_prefix}.events",
            "items": f"{topic_prefix}.items",
            "partitions": 1,
        },
    )
    path = data_dir / "obd" / "random" / "all"
    summary = run_replay("obd", path, settings, max_rate=1000, limit=300, progress=False)
    assert summary.events_sent == 300
    # 300 events at ≤1000/s cannot take less than ~0.3 s.
    assert summary.seconds >= 0.29
    assert len(read_topic(settings.kafka, settings.topics.events)) == 300
