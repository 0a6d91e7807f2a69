"""The reward worker against the real embedded broker.

- two `recsys worker reward` processes in one consumer group share the partitions, and the
  rewards topic (deduplicated by reward_id) equals the offline oracle;
- 1% poison input, a 10 MB payload among it: every bad message lands in the DLQ with its
  reason, the worker keeps going, and ``recsys_events_rejected_total{reason}`` matches.

The durable state's fault tests (commit progress, restarts) are in test_reward_state.py.
"""

from __future__ import annotations

import hashlib
import re
import signal
import threading
import time
from collections import Counter

import pytest
from prometheus_client import REGISTRY

from recsys.app import make_loop
from recsys.config import RewardSettings, load_settings
from recsys.events import RewardRecord
from recsys.kafka import create_topics
from recsys.rewards import offline_join_for
from recsys.rewards.sink import RewardSink, build
from recsys.testing.reward_kill import RewardReader, start_worker, wait_assigned, worker_env
from recsys.testing.streams import (
    kill_test_events,
    poison_messages,
    produce,
    read_topic,
    sentinels,
    with_poison,
)

PARTITIONS = 6


def _assigned(log: str) -> list[int]:
    """The partitions a worker holds now, from its log (cooperative rebalancing logs what was
    added and what was revoked)."""
    held: set[int] = set()
    for verb, parts in re.findall(
        r"reward worker (assigned|revoked) partitions \[([0-9, ]*)\]", log
    ):
        ps = {int(p) for p in parts.split(",") if p.strip()}
        held = held | ps if verb == "assigned" else held - ps
    return sorted(held)


def test_two_worker_processes_share_the_partitions(broker, kafka_settings, topic_prefix, tmp_path):
    topics = {k: f"{topic_prefix}.{k}" for k in ("events", "rewards", "dlq")}
    create_topics(kafka_settings, [topics["events"], topics["rewards"]], PARTITIONS)
    create_topics(kafka_settings, [topics["dlq"]], 1)
    rs = RewardSettings()
    events = kill_test_events(20_000, seed=3)
    events += sentinels(events, PARTITIONS, rs)
    oracle = offline_join_for(events, rs)

    env = worker_env(broker, topics, PARTITIONS, f"{topic_prefix}.reward")
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    procs = [start_worker(env, logs[0])]
    reader = RewardReader(kafka_settings, topics["rewards"], PARTITIONS)
    reader.start()
    try:
        assert wait_assigned(procs[0], logs[0], 60), logs[0].read_text()
        procs.append(start_worker(env, logs[1]))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            a = [_assigned(p.read_text(errors="replace")) for p in logs]
            if all(a) and sorted(a[0] + a[1]) == list(range(PARTITIONS)):
                break
            time.sleep(0.2)
        shares = [_assigned(p.read_text(errors="replace")) for p in logs]
        assert all(shares), f"both workers must hold partitions, got {shares}"
        assert sorted(shares[0] + shares[1]) == list(range(PARTITIONS)), shares

        produce(
            kafka_settings, topics["events"], ((e.user_id.encode(), e.to_bytes()) for e in events)
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with reader.lock:
                if oracle.keys() <= reader.first.keys():
                    break
            assert all(p.poll() is None for p in procs), "a worker stopped"
            time.sleep(0.3)
        time.sleep(1.0)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(30) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        reader.stop()
    # Both did work: each process produced rewards for its own partitions.
    assert all(b"state restored from" in p.read_bytes() for p in logs)
    assert reader.conflicting == 0
    assert {k: reader.first[k] for k in oracle} == oracle
    assert reader.first.keys() == oracle.keys()


def _rejected(reason: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "recsys_events_rejected_total", {"reason": reason, "worker": "reward"}
        )
        or 0.0
    )


def test_poison_goes_to_the_dlq_and_the_worker_keeps_going(kafka_settings, topic_prefix):
    settings = load_settings(
        kafka=kafka_settings.model_dump(),
        topics={
            "events": f"{topic_prefix}.events",
            "rewards": f"{topic_prefix}.rewards",
            "dlq": f"{topic_prefix}.dlq",
            # Its own: a state topic shared with another test may have another partition count.
            "reward_state": f"{topic_prefix}.state",
        },
        rewards={"group_id": f"{topic_prefix}.reward"},
    )
    t = settings.topics
    create_topics(settings.kafka, [t.events, t.rewards], 3)
    create_topics(settings.kafka, [t.dlq], 1)
    rs = settings.rewards
    events = kill_test_events(12_000, seed=5)[-8_000:]  # mostly synthetic, some OBD
    poison = poison_messages(len(events) // 100, seed=5)  # 1%, the first too_large is 10 MB
    assert max(len(p.value) for p in poison) >= 10 * 1024 * 1024
    closing = sentinels(events, 3, rs)
    messages = with_poison(events, poison, seed=5) + [
        (e.user_id.encode(), e.to_bytes()) for e in closing
    ]
    oracle = offline_join_for(events + closing, rs)
    injected = Counter(p.reason for p in poison)
    before = {r: _rejected(r) for r in injected}
    produce(settings.kafka, t.events, messages)

    app = build(settings)
    loop, sink = make_loop(settings, app), app.sink
    assert isinstance(sink, RewardSink)
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            loop.run()
        except BaseException as exc:
            crashed.append(exc)
            raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while sink.events < len(messages) and time.monotonic() < deadline:
            assert thread.is_alive(), f"the worker stopped on bad input: {crashed!r}"
            time.sleep(0.1)
        assert sink.events >= len(messages)
        time.sleep(1.0)
        assert thread.is_alive()
    finally:
        loop.stop()
        thread.join(30)
        sink.close()
    assert not thread.is_alive()

    after = {r: _rejected(r) - before[r] for r in injected}
    assert after == {r: float(n) for r, n in injected.items()}

    dlq = read_topic(settings.kafka, t.dlq)
    by_hash = {hashlib.sha256(r.value).hexdigest(): dict(r.headers) for r in dlq}
    assert len(dlq) == len(poison)
    for p in poison:
        headers = by_hash[hashlib.sha256(p.value).hexdigest()]
        assert headers["recsys.reason"] == p.reason.encode()
        assert headers["recsys.source_topic"] == t.events.encode()

    first: dict[str, RewardRecord] = {}
    for r in read_topic(settings.kafka, t.rewards):
        rec = RewardRecord.from_bytes(r.value)
        first.setdefault(rec.reward_id, rec)
    assert first == oracle


@pytest.mark.slow
def test_kill_test_small(broker, tmp_path):
    """A smaller run of recsys.testing.reward_kill (the full one: 100k events, 10 kills)."""
    from recsys.testing.reward_kill import run_kill_test

    report = run_kill_test(
        20_000,
        3,
        seed=1,
        replay_seconds=15,
        timeout_s=240,
        bootstrap=broker,
        log_dir=tmp_path,
        verbose=False,
    )
    assert report["kills"] == 3
    assert report["worker_exits"][:3] == [-signal.SIGKILL] * 3
    assert (report["lost"], report["wrong"], report["conflicting_duplicates"]) == (0, 0, 0)
    assert (report["dlq_missing"], report["dlq_wrong_reason"]) == (0, 0)
