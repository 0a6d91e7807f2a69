"""Throughput of the reward worker against a bare kafka-python consumer, same topic, same run.

One embedded broker; the events topic holds the OBD sample plus synthetic sessions (impressions,
clicks, dwell, carts, purchases, skips, ratings; out of order within the allowed lateness; a
few duplicates), then one sentinel per partition that closes every window.

- **bare**: a kafka-python consumer with the worker's consumer settings polls every message of
  the topic and JSON-decodes it. Nothing else.
- **worker**: the reward worker's own consumer loop and sink, in this process: consume,
  validate, dedupe, join, produce every reward record (acks=all, idempotent), flush, commit the
  safe offsets; each run in a fresh consumer group.

Rates count events from the first polled batch to the last one processed (the worker: flushed
and committed), so group joins are not counted. ``ratio`` = worker events/s ÷ bare events/s,
medians over ``--repeats`` alternating runs (the machine is shared). Every worker run's rewards
are checked against the offline oracle.

    python benchmarks/reward_throughput.py --events 100000 --json reward_throughput.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kafka.structs import TopicPartition

from recsys.app import make_loop
from recsys.broker import EmbeddedBroker
from recsys.config import Settings, load_settings
from recsys.events import RewardRecord
from recsys.kafka import create_topics, make_consumer
from recsys.rewards import offline_join_for
from recsys.rewards.sink import RewardSink, build
from recsys.testing.streams import (
    kill_test_events,
    produce,
    read_topic,
    sentinels,
)


def bare_rate(settings: Settings, topic: str, total: int, max_records: int) -> float:
    """Poll and JSON-decode every message of ``topic``; events/s from the first batch."""
    consumer = make_consumer(settings.kafka, None)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(parts)
        consumer.seek_to_beginning()
        loads = json.loads
        n = 0
        start = None
        while n < total:
            polled = consumer.poll(timeout_ms=500, max_records=max_records)
            if start is None and polled:
                start = time.perf_counter()
            for records in polled.values():
                for r in records:
                    loads(r.value)
                n += len(records)
        assert start is not None
        return total / (time.perf_counter() - start)
    finally:
        consumer.close()


def worker_rate(settings: Settings, total: int) -> tuple[float, Any]:
    """Run the worker in-process (fresh group) until every event is flushed and committed."""
    s = settings.model_copy(
        update={
            "rewards": settings.rewards.model_copy(
                update={"group_id": f"bench-{uuid.uuid4().hex[:8]}"}
            )
        }
    )
    app = build(s)
    loop, sink = make_loop(s, app), app.sink
    assert isinstance(sink, RewardSink)
    first: list[float] = []
    done = threading.Event()
    write, commit = sink.write, loop.consumer.commit

    def timed_write(records):  # the first non-empty batch starts the clock
        if records and not first:
            first.append(time.perf_counter())
        write(records)

    def timed_commit(offsets):  # the commit after the last event stops it
        commit(offsets)
        if sink.events >= total and not done.is_set():
            first.append(time.perf_counter())
            done.set()

    sink.write = timed_write  # type: ignore[method-assign]
    loop.consumer.commit = timed_commit
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    while not done.wait(0.5):
        if not t.is_alive():
            raise RuntimeError("worker loop died")
    end = first[-1]
    loop.stop()
    t.join(30)
    sink.close()
    return total / (end - first[0]), sink


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000, help="events in the topic")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each; medians")
    ap.add_argument("--partitions", type=int, default=6, help="partitions of each topic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.events < 1:
        ap.error("--repeats and --events must be >= 1")

    events = kill_test_events(args.events, args.seed)
    with EmbeddedBroker() as broker:
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        base = load_settings(
            kafka={"bootstrap_servers": broker.bootstrap},
            topics={
                "events": f"{prefix}.events",
                "rewards": f"{prefix}.rewards",
                "dlq": f"{prefix}.dlq",
                "partitions": args.partitions,
            },
        )
        rs = base.rewards
        events += sentinels(events, args.partitions, rs)
        oracle = offline_join_for(events, rs)
        create_topics(base.kafka, [base.topics.events, base.topics.dlq], args.partitions)
        total = produce(
            base.kafka, base.topics.events, ((e.user_id.encode(), e.to_bytes()) for e in events)
        )
        bare: list[float] = []
        worker: list[float] = []
        checks: list[dict[str, int]] = []
        for i in range(args.repeats):
            bare.append(bare_rate(base, base.topics.events, total, rs.max_batch))
            topics = base.topics.model_copy(update={"rewards": f"{prefix}.rewards.{i}"})
            s = base.model_copy(update={"topics": topics})
            create_topics(s.kafka, [s.topics.rewards], args.partitions)
            rate, sink = worker_rate(s, total)
            worker.append(rate)
            checks.append(_check(s, oracle))
            print(
                f"run {i + 1}: bare {bare[-1]:,.0f} ev/s, worker {rate:,.0f} ev/s, "
                f"rewards {sink.rewards:,}, check {checks[-1]}",
                file=sys.stderr,
            )

    b, w = statistics.median(bare), statistics.median(worker)
    report = {
        "events": total,
        "partitions": args.partitions,
        "repeats": args.repeats,
        "bare_events_per_s": round(b, 1),
        "worker_events_per_s": round(w, 1),
        "bare_runs": [round(x, 1) for x in bare],
        "worker_runs": [round(x, 1) for x in worker],
        "ratio": round(w / b, 3),
        "target_ratio": 0.7,
        "oracle_rewards": len(oracle),
        "checks": checks,
    }
    print(f"{'path':<10} {'events/s (median)':>18}  runs")
    print(f"{'bare':<10} {b:>18,.0f}  {', '.join(f'{x:,.0f}' for x in bare)}")
    print(f"{'worker':<10} {w:>18,.0f}  {', '.join(f'{x:,.0f}' for x in worker)}")
    print(f"ratio {w / b:.3f} (target >= 0.7); {total:,} events, {len(oracle):,} rewards")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    bad = [c for c in checks if c["lost"] or c["wrong"]]
    return 1 if bad else 0


def _check(settings: Settings, oracle: dict[str, RewardRecord]) -> dict[str, int]:
    records = read_topic(settings.kafka, settings.topics.rewards)
    first: dict[str, RewardRecord] = {}
    for r in records:
        rec = RewardRecord.from_bytes(r.value)
        first.setdefault(rec.reward_id, rec)
    return {
        "records": len(records),
        "lost": len(oracle.keys() - first.keys()),
        "wrong": sum(1 for k, v in first.items() if oracle.get(k) != v),
    }


if __name__ == "__main__":
    sys.exit(main())
