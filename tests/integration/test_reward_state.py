"""Fault tests of the reward worker's durable state, on the real embedded broker (issue 13).

1. Commit progress: hours of continuous event time (10% clicks, feedback up to 5 minutes
   later), produced at once; the worker's committed offset is never more than one poll batch
   behind its position. (The old commit point, ``RewardJoin.safe_offset()``, stays near the
   partition's start on such a stream: printed for comparison.)
2. Restart after that stream: worker processes SIGKILLed mid-stream and after the stream; each
   restart re-emits at most one batch of rewards, and a learner's dedupe (the rewards topic fed
   through the learner's ``RecentIds``) trains each ``reward_id`` exactly once.

Each prints its figures (``pytest -s`` shows them).
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import Counter

import pytest
from kafka.structs import TopicPartition
from prometheus_client import REGISTRY

from recsys.app import make_loop
from recsys.config import KafkaSettings, RewardSettings, load_settings
from recsys.errors import ConfigError
from recsys.events import RewardRecord
from recsys.kafka import create_topics, make_consumer
from recsys.learner.online import OnlineConfig, RecentIds
from recsys.rewards import RewardJoin, offline_join_for
from recsys.rewards.sink import RewardSink, build
from recsys.rewards.state import ChangelogReader
from recsys.testing.reward_kill import RewardReader, start_worker, wait_assigned, worker_env
from recsys.testing.streams import (
    continuous_events,
    partition_of,
    produce,
    read_topic,
    sentinels,
)

PARTITIONS = 3
BATCH = 1000  # the worker's max_batch in these tests: the bound on the commit gap


def _old_commit_point(events, rs: RewardSettings, partition_of) -> tuple[int, int]:
    """What the previous design would have committed for partition 0 at the stream's end:
    (safe_offset, partition length)."""
    join = RewardJoin.from_settings(rs)
    n = 0
    for e in events:
        if partition_of(e.user_id) == 0:
            join.update(e, n)
            n += 1
    return join.safe_offset() or 0, n


@pytest.mark.slow
def test_committed_offset_follows_the_position_under_continuous_traffic(
    kafka_settings, topic_prefix
):
    settings = load_settings(
        kafka=kafka_settings.model_dump(),
        topics={
            "events": f"{topic_prefix}.events",
            "rewards": f"{topic_prefix}.rewards",
            "dlq": f"{topic_prefix}.dlq",
            "reward_state": f"{topic_prefix}.state",
        },
        rewards={"group_id": f"{topic_prefix}.reward", "max_batch": BATCH},
    )
    t = settings.topics
    create_topics(settings.kafka, [t.events, t.rewards], PARTITIONS)
    create_topics(settings.kafka, [t.dlq], 1)
    hours, rate = 2.0, 6.0  # event time; ~43k events, produced as fast as the broker takes them
    events = continuous_events(hours, rate, seed=11)
    total = produce(settings.kafka, t.events, ((e.user_id.encode(), e.to_bytes()) for e in events))

    app = build(settings)
    loop, sink = make_loop(settings, app), app.sink
    assert isinstance(sink, RewardSink)
    gaps: list[int] = []  # position - committed, right after each commit
    exposed: list[int] = []  # position - the commit before: what a crash just then re-reads
    last: dict[TopicPartition, int] = {}
    commit = loop.consumer.commit

    def measured_commit(offsets):  # instrumentation: the gap between position and commit
        for tp in offsets:
            exposed.append(loop.consumer.position(tp) - last.get(tp, 0))
        commit(offsets)
        for tp, meta in offsets.items():
            gaps.append(loop.consumer.position(tp) - meta.offset)
            last[tp] = meta.offset

    loop.consumer.commit = measured_commit
    thread = threading.Thread(target=loop.run, daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        deadline = time.monotonic() + 150
        while sink.events < total and time.monotonic() < deadline:
            assert thread.is_alive(), "the worker loop died"
            time.sleep(0.2)
        assert sink.events == total
        seconds = time.monotonic() - started
        time.sleep(1.0)  # a tick: the last batch is committed
    finally:
        loop.stop()
        thread.join(30)
        sink.close()

    # (from the events: the embedded broker's reported end offsets lag behind the last batch)
    ends = dict(Counter(partition_of(e.user_id, PARTITIONS) for e in events))
    committed = committed_offsets(settings.kafka, settings.rewards.group_id, t.events)
    lag = [
        REGISTRY.get_sample_value(
            "recsys_consumer_committed_lag",
            {"worker": "reward", "topic": t.events, "partition": str(p)},
        )
        for p in range(PARTITIONS)
    ]
    old, n0 = _old_commit_point(events, settings.rewards, lambda u: partition_of(u, PARTITIONS))
    print(
        f"\ncommit progress: {total:,} events ({hours:g} h of event time at {rate:g}/s, "
        f"10% clicks, feedback <= 5 min later) in {seconds:.1f}s; {len(gaps)} commits; "
        f"max gap position - committed = {max(gaps)} after a commit, {max(exposed)} before "
        f"one (bound: one batch = {BATCH} events); "
        f"committed lag at the end {lag}; state records {sink.state_records:,}; "
        f"the old safe_offset commit point of partition 0: {old:,} of {n0:,}"
    )
    assert max(gaps) == 0
    assert max(exposed) <= BATCH
    assert committed == ends  # everything processed is committed, whatever windows are open
    assert all(v == 0 for v in lag)


def committed_offsets(kafka: KafkaSettings, group: str, topic: str) -> dict[int, int | None]:
    consumer = make_consumer(kafka, group)  # not subscribed: it only asks the coordinator
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        consumer.close()


def _restores(log: str) -> list[tuple[int, int, float]]:
    """(changelog records, resume offset, seconds) of each restore a worker logged."""
    pat = (
        r"state restored from (\d+) changelog records \(\d+ entries, ([0-9.]+)s\); "
        r"resuming at offset (\d+)"
    )
    return [(int(a), int(c), float(b)) for a, b, c in re.findall(pat, log)]


@pytest.mark.slow
def test_restarts_re_emit_at_most_one_batch_and_the_learner_trains_each_reward_once(
    broker, kafka_settings, topic_prefix, tmp_path
):
    topics = {
        "events": f"{topic_prefix}.events",
        "rewards": f"{topic_prefix}.rewards",
        "dlq": f"{topic_prefix}.dlq",
        "reward_state": f"{topic_prefix}.state",
    }
    create_topics(kafka_settings, [topics["events"], topics["rewards"]], PARTITIONS)
    create_topics(kafka_settings, [topics["dlq"]], 1)
    rs = RewardSettings(max_batch=BATCH)
    events = continuous_events(1.0, 6.0, seed=12)  # ~21k events
    closing = sentinels(events, PARTITIONS, rs)
    oracle = offline_join_for(events + closing, rs)
    group = f"{topic_prefix}.reward"
    env = worker_env(broker, topics, PARTITIONS, group)
    env["RECSYS_REWARDS__MAX_BATCH"] = str(BATCH)
    reader = RewardReader(kafka_settings, topics["rewards"], PARTITIONS)
    reader.start()
    procs = []
    dupes_at: list[int] = []  # records beyond the first per reward_id, before each restart

    def duplicates() -> int:
        with reader.lock:
            return reader.records - len(reader.first)

    def run_until(proc, log, done, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        assert done(), f"timed out; see {log}"

    try:
        messages = [(e.user_id.encode(), e.to_bytes()) for e in events]
        # Worker 0 is killed mid-stream, while events keep coming.
        logs = [tmp_path / f"w{i}.log" for i in range(3)]
        procs.append(start_worker(env, logs[0]))
        assert wait_assigned(procs[0], logs[0], 60), logs[0].read_text()
        replay = threading.Thread(
            target=produce,
            args=(kafka_settings, topics["events"], messages, len(messages) / 20),
            daemon=True,
        )
        replay.start()
        # Generous bounds: a loaded 2-core machine runs the worker several times slower.
        run_until(procs[0], logs[0], lambda: len(reader.first) > len(oracle) // 4, 180)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        dupes_at.append(duplicates())
        # Worker 1 finishes the stream, then is killed after its last commit.
        procs.append(start_worker(env, logs[1]))
        replay.join(120)
        ends = dict(Counter(partition_of(e.user_id, PARTITIONS) for e in events))
        run_until(
            procs[1],
            logs[1],
            lambda: committed_offsets(kafka_settings, group, topics["events"]) == ends,
            120,
        )
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        dupes_at.append(duplicates())
        # Worker 2 restores, gets the sentinels that close every window, and finishes.
        procs.append(start_worker(env, logs[2]))
        produce(
            kafka_settings, topics["events"], [(e.user_id.encode(), e.to_bytes()) for e in closing]
        )
        run_until(
            procs[2],
            logs[2],
            lambda: oracle.keys() <= reader.first.keys(),
            120,
        )
        time.sleep(1.5)
        procs[2].send_signal(signal.SIGTERM)
        assert procs[2].wait(30) == 0
        dupes_at.append(duplicates())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        reader.stop()

    per_restart = [dupes_at[0], dupes_at[1] - dupes_at[0], dupes_at[2] - dupes_at[1]]
    # The learner's view: the rewards topic in order through its dedupe (the part a restarted
    # learner keeps: dedupe_persisted ids), counting what it would train.
    trained: Counter[str] = Counter()
    seen = RecentIds(OnlineConfig().dedupe_persisted)
    records = read_topic(kafka_settings, topics["rewards"])
    for r in records:
        rec = RewardRecord.from_bytes(r.value)
        if seen.add(rec.reward_id):
            trained[rec.reward_id] += 1
    restores = [_restores(p.read_text(errors="replace")) for p in logs]
    print(
        f"\nrestart: {len(events) + len(closing):,} events, {len(oracle):,} oracle rewards, "
        f"{len(records):,} records; re-emitted: after the mid-stream kill {per_restart[1]}, "
        f"after the kill that followed the stream's last commit {per_restart[2]} "
        f"(bound: one batch, {BATCH} events); learner trained {sum(trained.values()):,} times "
        f"{len(trained):,} reward_ids; restores (changelog records, resume offset, s): "
        f"{restores[1:]}"
    )
    assert reader.conflicting == 0
    assert {k: reader.first[k] for k in oracle} == oracle
    assert reader.first.keys() == oracle.keys()
    assert per_restart[0] == 0
    assert per_restart[1] <= BATCH
    assert per_restart[2] == 0  # everything was committed: nothing is re-read
    assert set(trained.values()) == {1}
    assert trained.keys() == oracle.keys()


def test_a_state_topic_with_too_few_partitions_names_the_setting(kafka_settings, topic_prefix):
    state = f"{topic_prefix}.state"
    create_topics(kafka_settings, [state], 1)
    reader = ChangelogReader(kafka_settings, state, 1)
    try:
        with pytest.raises(ConfigError, match=r"RECSYS_TOPICS__REWARD_STATE.*1 partitions"):
            reader.ensure(2)
    finally:
        reader.close()
