"""Throughput of `recsys replay` against a bare kafka-python producer, same broker, same run.

Both send the same bytes (the contract JSON of every MovieLens rating, keyed by user_id) to
fresh topics on one embedded broker. The reference producer gets the messages pre-serialised
and uses the same client settings as the replay path (idempotent, acks=all, same batching), so
``ratio`` = replay events/s ÷ bare events/s measures what the replay path adds on top of the
client: building events, serialising, pacing and progress. A second reference with
kafka-python's default settings is printed for context. Runs alternate and the best of
``--repeats`` is kept, since the machine is shared.

    python benchmarks/replay_throughput.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from recsys import datasets
from recsys.broker import EmbeddedBroker
from recsys.config import load_settings
from recsys.data.backfill import REPLAY_PRODUCER_OVERRIDES, replay
from recsys.data.movielens import load_movielens
from recsys.kafka import create_topics, make_producer

DEFAULT_PATH = datasets.path("ml-latest-small")


def _bare(producer: KafkaProducer, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    start = time.perf_counter()
    send = producer.send
    for key, value in messages:
        send(topic, key=key, value=value)
    producer.flush()
    return len(messages) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", type=Path, default=DEFAULT_PATH, help="MovieLens folder")
    ap.add_argument("--limit", type=int, default=None, help="events per run (default: all)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each path; best is kept")
    ap.add_argument("--partitions", type=int, default=6, help="partitions of each topic")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    ml = load_movielens(args.path)
    events = list(ml.events())[: args.limit]
    messages = [(e.user_id.encode(), e.to_bytes()) for e in events]
    results: dict[str, list[float]] = {"replay": [], "bare_same_config": [], "bare_defaults": []}
    with EmbeddedBroker() as broker:
        settings = load_settings(kafka={"bootstrap_servers": broker.bootstrap})
        topics = [f"bench.{name}.{i}" for name in results for i in range(args.repeats)]
        create_topics(settings.kafka, topics, args.partitions)
        same = make_producer(settings.kafka, **REPLAY_PRODUCER_OVERRIDES)
        default = KafkaProducer(bootstrap_servers=broker.bootstrap)
        # Warm-up: metadata and connections for every topic, outside the timed runs.
        for t in topics:
            same.send(t, key=b"w", value=b"{}").get(timeout=30)
            default.send(t, key=b"w", value=b"{}").get(timeout=30)
        for i in range(args.repeats):
            summary = replay(iter(events), same, f"bench.replay.{i}", progress=False)
            results["replay"].append(summary.events_per_s)
            results["bare_same_config"].append(_bare(same, f"bench.bare_same_config.{i}", messages))
            results["bare_defaults"].append(_bare(default, f"bench.bare_defaults.{i}", messages))
            print(
                f"run {i + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in results.items()),
                file=sys.stderr,
            )
        same.close()
        default.close()

    best = {k: max(v) for k, v in results.items()}
    ratio = best["replay"] / best["bare_same_config"]
    print(f"{'path':<22}{'events/s (best)':>18}{'runs':>30}")
    for name, values in results.items():
        runs = " ".join(f"{v:,.0f}" for v in values)
        print(f"{name:<22}{best[name]:>18,.0f}{runs:>30}")
    print(f"events per run: {len(events)}; ratio replay / bare_same_config = {ratio:.3f}")
    if args.json:
        out: dict[str, Any] = {
            "benchmark": "replay_throughput",
            "events_per_run": len(events),
            "partitions": args.partitions,
            "repeats": args.repeats,
            "events_per_s": best,
            "runs": results,
            "producer_overrides": REPLAY_PRODUCER_OVERRIDES,
            "ratio": ratio,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
