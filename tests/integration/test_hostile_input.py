"""Hostile messages between valid ones on the real broker: all four workers keep running, every
bad message is dead-lettered with its reason, and the valid messages' effects all arrive.

The workers run in-process (each its own consumer loop, thread and consumer group), built by
the same ``build(settings)`` the ``workers/`` entry points run.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from recsys import checkpoint as ckpt
from recsys.app import WorkerApp, make_loop
from recsys.config import Settings, load_settings
from recsys.data.backfill import read_topic
from recsys.encoder.sink import build as build_encoder
from recsys.events import (
    ContractError,
    Event,
    EventParser,
    ItemRecord,
    ItemVector,
    Rejection,
    RewardRecord,
    parse_item,
)
from recsys.kafka import ConsumerLoop, create_topics, make_producer
from recsys.learner.sink import build as build_learner
from recsys.publisher.sink import build as build_publisher
from recsys.rewards.sink import build as build_reward
from recsys.store import Store
from tests.unit.tiny_bert import make_tiny_bert

pytestmark = pytest.mark.slow

T0 = 1_700_000_000_000
NESTED = b"[" * 1000 + b"]" * 1000
#: (bytes, reason the contract gives): the two messages that used to kill workers, and more.
HOSTILE = [
    (NESTED, "too_deep"),
    (
        json.dumps(
            {
                "event_id": "big-pos",
                "type": "click",
                "user_id": "u0",
                "item_id": "m0",
                "ts": T0,
                "position": 2**63,
            }
        ).encode(),
        "number_out_of_range",
    ),
    (b'{"event_id":"nul","type":"click","user_id":"u\\u0000","item_id":"m0","ts":1}', "bad_id"),
    (
        b'{"event_id":"dup","type":"click","type":"purchase","user_id":"u","item_id":"m","ts":1}',
        "duplicate_key",
    ),
]


def _settings(kafka_settings, prefix: str, tmp_path: Path) -> Settings:
    model = make_tiny_bert(tmp_path / "bert", hidden=32)
    return load_settings(
        kafka=kafka_settings.model_dump(),
        topics={
            "events": f"{prefix}.events",
            "rewards": f"{prefix}.rewards",
            "items": f"{prefix}.items",
            "item_vectors": f"{prefix}.vectors",
            "dlq": f"{prefix}.dlq",
            "reward_state": f"{prefix}.state",
            "recommendations": f"{prefix}.recs",
            "partitions": 2,
        },
        rewards={"group_id": f"{prefix}.reward", "window_ms": 1000, "allowed_lateness_ms": 0},
        encoder={
            "model_path": str(model),
            "dim": 32,
            "device": "cpu",
            "cache_dir": str(tmp_path / "cache"),
            "group_id": f"{prefix}.encoder",
        },
        learner={
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "checkpoint_every_s": 0.5,
            "group_id": f"{prefix}.learner",
            "device": "cpu",
            "dim": 16,
            "batch_size": 32,
        },
        publisher={"group_id": f"{prefix}.publisher", "device": "cpu", "batch_interval_ms": 50},
        store={"url": f"sqlite:///{tmp_path / 'store.db'}"},
    )


def _valid_events(n_users: int) -> list[Event]:
    out = []
    for u in range(n_users):
        for k in range(3):
            ts = T0 + 1000 * (u * 3 + k)
            rid = f"q{u}-{k}"
            item = f"m{(u + k) % 5}"
            out.append(Event(f"i{u}-{k}", "impression", f"u{u}", item, ts, rid, 0, 0.5))
            out.append(Event(f"c{u}-{k}", "click", f"u{u}", item, ts + 10, rid, 0))
    # far later: closes every window on both partitions
    out += [Event(f"end{p}", "click", f"z{p}", "m0", T0 + 10**7) for p in range(4)]
    return out


def _wait(
    what: str,
    cond: Callable[[], bool],
    loops: list[tuple[ConsumerLoop, threading.Thread]],
    s: float,
) -> None:
    deadline = time.monotonic() + s
    while time.monotonic() < deadline:
        for loop, thread in loops:
            assert thread.is_alive(), f"the {loop.worker} worker stopped"
        if cond():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_all_four_workers_survive_hostile_messages(kafka_settings, topic_prefix, tmp_path):
    settings = _settings(kafka_settings, topic_prefix, tmp_path)
    parser = EventParser.from_settings(settings.events)
    t = settings.topics
    names = [t.events, t.rewards, t.items, t.item_vectors, t.dlq, t.recommendations]
    create_topics(kafka_settings, names, 2)
    items = [ItemRecord(f"m{i}", f"film {i}", T0) for i in range(5)]
    events = _valid_events(6)
    producer = make_producer(kafka_settings)
    for n, item in enumerate(items):
        producer.send(t.items, key=item.item_id.encode(), value=item.to_bytes())
        if n == 2:  # hostile records in the middle of the catalogue
            for raw, _ in HOSTILE:
                producer.send(t.items, key=b"x", value=raw)
    for n, e in enumerate(events):
        producer.send(t.events, key=e.key, value=e.to_bytes())
        if n == len(events) // 2:
            for raw, _ in HOSTILE:
                producer.send(t.events, key=b"u0", value=raw)
    # the learner's own topics get them too (a bad producer can write anywhere)
    for raw, _ in HOSTILE:
        producer.send(t.rewards, key=b"u0", value=raw)
        producer.send(t.item_vectors, key=b"x", value=raw)
    producer.flush()
    producer.close()

    apps: list[WorkerApp] = [
        build_reward(settings),
        build_encoder(settings),
        build_learner(settings),
        build_publisher(settings),
    ]
    loops = []
    for app in apps:
        loop = make_loop(settings, app)
        thread = threading.Thread(target=loop.run, daemon=True, name=app.worker)
        if app.on_start is not None:
            app.on_start()
        thread.start()
        loops.append((loop, thread))
    try:
        expected_rewards = 6 * 3 + 4  # one joined reward per click, plus the closing clicks

        hostile = {raw for raw, _ in HOSTILE}

        def rewards() -> list[RewardRecord]:
            got = read_topic(kafka_settings, t.rewards, idle_s=0.5)
            return [RewardRecord.from_bytes(v) for _, _, v in got if v not in hostile]

        _wait("the rewards", lambda: len(rewards()) >= expected_rewards, loops, 120)

        def vector_ids() -> set[str]:
            got = read_topic(kafka_settings, t.item_vectors, idle_s=0.5)
            return {ItemVector.from_bytes(v).item_id for _, _, v in got if v not in hostile}

        # the encoder runs beside the reward worker, not before it: wait for its vectors too
        _wait("the vectors", lambda: vector_ids() == {i.item_id for i in items}, loops, 120)

        def learned() -> int:
            found = ckpt.find_latest(settings.learner.checkpoint_dir)
            if found is None:
                return 0
            offsets = found[1]["offsets"]
            return sum(off for key, off in offsets.items() if key.startswith(t.rewards + ":"))

        # every record on the rewards topic (ours and the hostile ones) is consumed and learned
        _wait("the learner", lambda: learned() >= len(rewards()) + len(HOSTILE), loops, 120)

        store = Store(settings.store.url)
        try:
            _wait(
                "the slates",
                lambda: all(store.get_recommendation(f"u{u}") is not None for u in range(6)),
                loops,
                60,
            )
        finally:
            store.close()

        # Each worker dead-letters every hostile record it consumed, with the reason its topic's
        # decoder gives (the learner reads two topics, so it sees each record twice).
        expected = {
            "reward": Counter(_reason(parser.parse, raw) for raw, _ in HOSTILE),
            "publisher": Counter(_reason(parser.parse, raw) for raw, _ in HOSTILE),
            "encoder": Counter(_reason(parse_item, raw) for raw, _ in HOSTILE),
            "learner": Counter(
                _reason(decode, raw)
                for raw, _ in HOSTILE
                for decode in (RewardRecord.from_bytes, ItemVector.from_bytes)
            ),
        }
        assert expected["reward"] == Counter(reason for _, reason in HOSTILE)
        by_worker = _dlq_reasons(kafka_settings, t.dlq)
        assert by_worker == expected
    finally:
        for loop, _ in loops:
            loop.stop()
        for _, thread in loops:
            thread.join(30)
        for app in apps:
            app.sink.close()
    for _, thread in loops:
        assert not thread.is_alive()


def _reason(decode: Callable[[bytes], object], raw: bytes) -> str:
    """The reason the contract gives ``raw`` through ``decode`` (a parser or a decoder)."""
    try:
        out = decode(raw)
    except ContractError as exc:
        return exc.reason.value
    assert isinstance(out, Rejection), out
    return out.reason.value


def _dlq_reasons(kafka_settings, topic: str) -> dict[str, Counter[str]]:
    """{worker: {reason: count}} from the DLQ records' headers."""
    from kafka.structs import TopicPartition

    from recsys.kafka import make_consumer

    consumer = make_consumer(kafka_settings, None)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(parts)
    consumer.seek_to_beginning()
    out: dict[str, Counter[str]] = {}
    idle = time.monotonic()
    while time.monotonic() - idle < 2.0:
        polled = consumer.poll(timeout_ms=200)
        for records in polled.values():
            idle = time.monotonic()
            for r in records:
                h = {k: v.decode() for k, v in r.headers}
                out.setdefault(h["recsys.worker"], Counter())[h["recsys.reason"]] += 1
    consumer.close()
    return out
