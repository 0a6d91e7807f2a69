"""Freshness: behaviour event → refreshed slate on the recommendations topic, end to end.

Starts the embedded broker and the encoder, reward, learner and publisher workers (as
subprocesses, as in production), warms the catalogue, then drives ``--rate`` events/s of
synthetic sessions (a slate of impressions, sometimes a click) for ``--seconds``. For every
click the driver times the wall clock from producing it to consuming the first slate for that
user published after it. The reference, measured in the same run on the same broker, is a bare
round trip: produce a message and consume it back. ``ratio`` = freshness p99 / bare p99.

    python benchmarks/freshness.py [--rate 1000] [--seconds 60] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from kafka.structs import TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys.broker import EmbeddedBroker, free_port
from recsys.config import KafkaSettings, TopicSettings
from recsys.data.backfill import replay_items
from recsys.demo.run import WORKER_NAMES, worker_env
from recsys.demo.supervisor import WorkerProcess, wait_for
from recsys.events import Event, ItemRecord, Slate
from recsys.kafka import create_topics, make_consumer, make_producer

TARGET_P99_S = 2.0


def _assigned_consumer(kafka: KafkaSettings, topic: str):
    consumer = make_consumer(kafka, None, fetch_max_wait_ms=10)
    parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in parts]
    consumer.assign(tps)
    consumer.seek_to_end(*tps)
    for tp in tps:
        consumer.position(tp)  # resolve the end now, before anything is produced
    return consumer


def bare_round_trip(kafka: KafkaSettings, n: int = 300) -> np.ndarray:
    """Produce one message and consume it back, ``n`` times: the floor of any Kafka pipeline."""
    create_topics(kafka, ["bench.roundtrip"], partitions=1)
    consumer = _assigned_consumer(kafka, "bench.roundtrip")
    producer = make_producer(kafka, linger_ms=0)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        producer.send("bench.roundtrip", value=str(i).encode()).get(10)
        got = False
        while not got:
            for records in consumer.poll(timeout_ms=100).values():
                got = got or any(r.value == str(i).encode() for r in records)
        out.append(time.perf_counter() - t0)
    producer.close()
    consumer.close()
    return np.asarray(out)


def run(rate: float, seconds: float, users: int, items: int) -> dict:
    topics = TopicSettings(partitions=2)
    rng = np.random.default_rng(0)
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
        create_topics(kafka, topics.all(), topics.partitions)
        bare = bare_round_trip(kafka)
        ports = {name: free_port() for name in WORKER_NAMES}
        workers = [
            WorkerProcess(name, worker_env(broker.bootstrap, Path(tmp), topics, ports[name]),
                          Path(tmp) / f"{name}.log").start()
            for name in WORKER_NAMES
        ]  # fmt: skip
        producer = make_producer(kafka)
        catalogue = [ItemRecord(f"i{j}", f"Item {j}", 0, tags=(f"g{j % 7}",)) for j in range(items)]
        replay_items(catalogue, producer, topics.items)
        slates = _assigned_consumer(kafka, topics.recommendations)
        ckpt = Path(tmp) / "checkpoints"
        try:
            # A first model version, so slates come from the policy rather than cold start.
            seed_events = _session_events(rng, 0, users, items, time.time(), click_all=True)
            for e in seed_events:
                producer.send(topics.events, key=e.key, value=e.to_bytes())
            producer.flush()
            if not wait_for(lambda: any(ckpt.glob("v*")), 300, 0.5):
                raise RuntimeError("no checkpoint; see the learner log in " + tmp)
            pending: dict[str, float] = {}
            latencies: list[float] = []
            sent = 0
            start = time.monotonic()
            visit = 0
            while time.monotonic() - start < seconds:
                due = int((time.monotonic() - start) * rate) - sent
                while due > 0:
                    visit += 1
                    for e in _session_events(rng, visit, users, items, time.time()):
                        producer.send(topics.events, key=e.key, value=e.to_bytes())
                        sent += 1
                        due -= 1
                        if e.type == "click" and e.user_id not in pending:
                            pending[e.user_id] = time.perf_counter()
                for records in slates.poll(timeout_ms=5, max_records=10_000).values():
                    now = time.perf_counter()
                    for r in records:
                        user = Slate.from_bytes(r.value).user_id
                        t0 = pending.pop(user, None)
                        if t0 is not None:
                            latencies.append(now - t0)
            alive = all(w.alive for w in workers)
        finally:
            producer.close()
            slates.close()
            for w in workers:
                w.stop()
    lat = np.asarray(latencies)
    pct = {f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)} if lat.size else {}
    bare_pct = {f"p{q}": float(np.percentile(bare, q)) for q in (50, 95, 99)}
    return {
        "rate_target": rate,
        "events_sent": sent,
        "events_per_s": sent / seconds,
        "clicks_timed": int(lat.size),
        "unanswered_at_end": len(pending),
        "freshness_s": pct,
        "bare_round_trip_s": bare_pct,
        "target_p99_s": TARGET_P99_S,
        "ratio": pct.get("p99", float("nan")) / bare_pct["p99"],
        "workers_alive": alive,
    }


def _session_events(
    rng: np.random.Generator,
    visit: int,
    users: int,
    items: int,
    now_s: float,
    click_all: bool = False,
) -> list[Event]:
    """One visit: 10 impressions of a random slate, and a click on one of them (30%)."""
    user = f"u{int(rng.integers(users))}"
    ts = int(now_s * 1000)
    slate = rng.choice(items, size=10, replace=False)
    rid = f"v{visit}"
    events = [
        Event(f"{rid}:imp:{p}", "impression", user, f"i{j}", ts, rid, p, 0.01)
        for p, j in enumerate(slate.tolist())
    ]
    if click_all or rng.random() < 0.3:
        p = int(rng.integers(10))
        events.append(Event(f"{rid}:click", "click", user, f"i{slate[p]}", ts + 1, rid, p))
    return events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the timed run")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    res = run(args.rate, args.seconds, args.users, args.items)
    f, b = res["freshness_s"], res["bare_round_trip_s"]
    print(f"{'measure':34s} {'p50':>8s} {'p95':>8s} {'p99':>8s}")
    print(f"{'freshness: click -> new slate (s)':34s} " + " ".join(
        f"{f.get(k, float('nan')):8.3f}" for k in ("p50", "p95", "p99")))  # fmt: skip
    print(f"{'bare produce -> consume (s)':34s} " + " ".join(
        f"{b[k]:8.3f}" for k in ("p50", "p95", "p99")))  # fmt: skip
    print(f"events sent {res['events_sent']} ({res['events_per_s']:.0f}/s), "
          f"clicks timed {res['clicks_timed']}, target p99 <= {TARGET_P99_S} s, "
          f"ratio (freshness p99 / bare p99) {res['ratio']:.1f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if res["workers_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
