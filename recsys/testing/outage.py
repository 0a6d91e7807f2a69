"""Broker outages (issue 13, fault tests 3 and 6): the broker stops mid-stream and comes back
on the same durable storage (Tansu's ``s3://`` engine on a moto_server S3).

**Pipeline** (fault test 3). A steady producer sends valid events (synthetic browsing sessions
with a few duplicate deliveries, then one sentinel per partition that closes every window) at
``--rate`` events/s.
The reward worker runs as a real ``recsys worker reward`` subprocess; the learner is the real
learner app (:func:`recsys.learner.sink.build`) in-process on :func:`recsys.app.make_loop`, so
its dedupe counters can be read. After ``--before-s`` of traffic the broker is stopped for
``--outage-s`` and restarted on the same port and storage. Reported:

- ``lost``: rewards of the offline oracle (:func:`recsys.rewards.offline_join` of the same
  events) missing from the rewards topic; ``wrong``: first records that differ from the oracle;
  ``learner_missing``: oracle reward_ids the learner never took in (all must be 0);
- ``reemitted``: reward records beyond the first per reward_id (the learner drops them);
  ``learner_dropped``: what the learner's dedupe dropped; ``duplicates_trained``: rewards the
  learner took in beyond one per reward_id (must be 0);
- ``reward_worker_pid_changed`` / ``reward_worker_exit`` (0: it exited only on our SIGTERM),
  ``learner_loop_alive``: every worker stayed up through the outage (no crash loop);
- ``recovery_s``: per worker, seconds from the broker's return until its consumer lag (the
  ``recsys_consumer_lag`` gauge, fresh: read after a batch consumed since the return) is under
  one second's worth of its input (must be ≤ 60).

**Encoder** (fault test 6). Items stream into the encoder worker (its real sink and loop,
in-process, with a producer whose delivery timeout is ``--encoder-delivery-timeout-s``) while
the broker is down for ``--encoder-outage-s``, longer than that timeout. Reported: items
produced, item records in the topic, items not consumed (log end minus the group's committed
offset: must be 0), distinct items with a vector on the vectors topic (must equal the distinct items
consumed), and the encoder's failed sends (≥ 1: the outage
outlasted the delivery timeout, so the rewind path ran).

    python -m recsys.testing.outage --outage-s 300 --encoder-outage-s 150 --json outage.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from recsys.broker import EmbeddedBroker, free_port, s3_env
from recsys.config import KafkaSettings, RewardSettings, Settings, load_settings
from recsys.demo.supervisor import WorkerProcess, wait_for
from recsys.events import ItemRecord, ItemVector, RewardRecord
from recsys.kafka import ConsumerLoop, create_topics, make_consumer, make_producer
from recsys.rewards import offline_join_for
from recsys.testing.streams import sentinels, synthetic_events

log = logging.getLogger("broker_outage")
ACCESS_KEY = "testing"  # moto accepts any key pair
RECOVERY_LIMIT_S = 60.0


# -- durable broker ----------------------------------------------------------------------------
@contextlib.contextmanager
def moto_server(log_dir: Path) -> Iterator[str]:
    """A moto_server subprocess on a free loopback port; yields its endpoint URL."""
    binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    with open(log_dir / "moto.log", "wb") as out:
        proc = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        ok = wait_for(lambda: _port_open(port) or proc.poll() is not None, 30)
        if not ok or proc.poll() is not None:
            raise RuntimeError(f"moto_server did not start; see {log_dir / 'moto.log'}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def durable_broker(s3_endpoint: str) -> EmbeddedBroker:
    """A started Tansu broker storing everything in a fresh bucket of ``s3_endpoint``."""
    import boto3

    bucket = f"tansu-{uuid.uuid4().hex[:10]}"
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=ACCESS_KEY,
    ).create_bucket(Bucket=bucket)
    return EmbeddedBroker(
        storage=f"s3://{bucket}/", env=s3_env(s3_endpoint, ACCESS_KEY, ACCESS_KEY)
    ).start()


def outage_kafka_settings(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_poll_interval_ms=60000,
    )


# -- instruments (the benchmark's own clients: they ride out the outage by retrying) ----------
class SteadyProducer(threading.Thread):
    """Sends ``messages`` at ``rate`` per second, outage or not; counts what was acknowledged.

    Its delivery timeout outlasts the outage, so the producer's buffer holds what apps send
    meanwhile (as an app's producer would) and nothing is re-sent out of order.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        messages: list[tuple[bytes, bytes]],
        rate: float,
        delivery_timeout_s: float,
    ) -> None:
        super().__init__(daemon=True, name="steady-producer")
        # Not idempotent: Tansu 0.6 answers an idempotent batch retried after its restart with
        # offset -1 and drops it (acknowledged, never stored). At-least-once instead, one
        # request in flight so that a retry cannot reorder a partition: a re-sent event is
        # dropped by the reward join's event_id dedupe.
        self.producer = make_producer(
            kafka,
            enable_idempotence=False,
            max_in_flight_requests_per_connection=1,
            linger_ms=20,
            delivery_timeout_ms=int(delivery_timeout_s * 1000),
            max_block_ms=int(delivery_timeout_s * 1000),
        )
        self.topic = topic
        self.messages = messages
        self.rate = rate
        self.sent = 0
        self.failed = 0
        self.futures: list[Any] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            start = time.monotonic()
            futures = self.futures
            for key, value in self.messages:
                futures.append(self.producer.send(self.topic, key=key, value=value))
                self.sent += 1
                ahead = self.sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            self.producer.flush()
            self.failed = sum(1 for f in futures if not f.succeeded())
        except BaseException as exc:  # reported, never silent
            self.error = exc
        finally:
            self.producer.close()


class TopicReader(threading.Thread):
    """Reads a topic from the beginning as it fills; ``on_record(value)`` per record."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        partitions: int,
        on_record: Callable[[bytes], None],
    ) -> None:
        super().__init__(daemon=True, name=f"reader-{topic}")
        self.consumer = make_consumer(kafka, None)
        self.consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        self.consumer.seek_to_beginning()
        self.on_record = on_record
        self.lock = threading.Lock()
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                try:
                    polled = self.consumer.poll(timeout_ms=200, max_records=10_000)
                except KafkaError as exc:  # the instrument rides out the outage
                    self.errors += 1
                    log.info("reader: %s", exc)
                    time.sleep(0.5)
                    continue
                with self.lock:
                    for recs in polled.values():
                        for r in recs:
                            self.on_record(r.value)
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text exposition → {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (http on loopback)
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def total(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    vals = [
        v
        for (n, ls), v in samples.items()
        if n == name and all((k, x) in ls for k, x in labels.items())
    ]
    return sum(vals) if vals else None


class RecoveryWatch:
    """After the broker's return: when did each worker's lag get under one second's worth?

    ``read(worker)`` gives (consumed total, lag) from the worker's metrics. A lag counts only
    once the worker has consumed since the return (the gauge is set per batch, so an older
    value could be from before the outage).
    """

    def __init__(self, read: Callable[[str], tuple[float | None, float | None]]) -> None:
        self.read = read
        self.samples: list[dict[str, Any]] = []

    def watch(
        self, returned_at: float, thresholds: dict[str, float], timeout_s: float
    ) -> dict[str, float | None]:
        base = {w: self.read(w)[0] or 0.0 for w in thresholds}
        recovered: dict[str, float | None] = dict.fromkeys(thresholds)
        deadline = returned_at + timeout_s
        while time.monotonic() < deadline and any(v is None for v in recovered.values()):
            now = time.monotonic()
            for w, limit in thresholds.items():
                if recovered[w] is not None:
                    continue
                consumed, lag = self.read(w)
                self.samples.append({"t": round(now - returned_at, 2), w: lag})
                if consumed is not None and consumed > base[w] and lag is not None and lag < limit:
                    recovered[w] = round(now - returned_at, 2)
            time.sleep(0.25)
        return recovered


# -- fault test 3: the pipeline ------------------------------------------------------------
def _reward_env(bootstrap: str, topics: dict[str, str], partitions: int, metrics_port: int):
    return {
        "RECSYS_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "RECSYS_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "RECSYS_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "RECSYS_KAFKA__MAX_POLL_INTERVAL_MS": "60000",
        "RECSYS_TOPICS__EVENTS": topics["events"],
        "RECSYS_TOPICS__REWARDS": topics["rewards"],
        "RECSYS_TOPICS__DLQ": topics["dlq"],
        "RECSYS_TOPICS__REWARD_STATE": topics["state"],
        "RECSYS_TOPICS__PARTITIONS": str(partitions),
        "RECSYS_REWARDS__GROUP_ID": f"{topics['events']}.reward",
        "RECSYS_METRICS__HOST": "127.0.0.1",
        "RECSYS_METRICS__PORT": str(metrics_port),
        "RECSYS_LOG_LEVEL": "INFO",
    }


def learner_settings(kafka: KafkaSettings, topics: dict[str, str], ckpt: Path) -> Settings:
    return load_settings(
        kafka=kafka.model_dump(),
        topics={
            "rewards": topics["rewards"],
            "item_vectors": topics["vectors"],
            "dlq": topics["dlq"],
        },
        learner={
            "checkpoint_dir": ckpt,
            "checkpoint_every_s": 2.0,
            "group_id": f"{topics['events']}.learner",
            "device": "cpu",
            "dim": 16,
            "layers": 1,
            "batch_size": 32,
            "max_steps_per_batch": 2,
            "keep_checkpoints": 3,
        },
    )


def run_pipeline_outage(
    outage_s: float,
    *,
    s3_endpoint: str,
    rate: float = 100.0,
    before_s: float = 15.0,
    after_s: float = 30.0,
    partitions: int = 3,
    seed: int = 0,
    log_dir: Path | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Fault test 3 once; returns the report (see the module docstring)."""
    from prometheus_client import REGISTRY

    from recsys.app import make_loop
    from recsys.learner import sink as learner_sink

    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="broker-outage-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    rs = RewardSettings()
    events = synthetic_events(int(rate * (before_s + outage_s + after_s)), seed)
    closing = sentinels(events, partitions, rs)
    all_events = events + closing
    oracle = offline_join_for(all_events, rs)
    messages = [(e.user_id.encode(), e.to_bytes()) for e in all_events]
    say(f"{len(all_events):,} events at {rate:g}/s, {len(oracle):,} oracle rewards")

    broker = durable_broker(s3_endpoint)
    try:  # set-up that fails must not leave the broker running
        kafka = outage_kafka_settings(broker.bootstrap)
        p = f"out{uuid.uuid4().hex[:8]}"
        topics = {n: f"{p}.{n}" for n in ("events", "rewards", "dlq", "state", "vectors")}
        create_topics(kafka, [topics["events"], topics["rewards"], topics["state"]], partitions)
        create_topics(kafka, [topics["dlq"], topics["vectors"]], 1)

        first: dict[str, RewardRecord] = {}
        counts = {"records": 0}

        def on_reward(value: bytes) -> None:
            rec = RewardRecord.from_bytes(value)
            counts["records"] += 1
            first.setdefault(rec.reward_id, rec)

        metrics_port = free_port()
        reward = WorkerProcess(
            "reward",
            _reward_env(broker.bootstrap, topics, partitions, metrics_port),
            log_dir / "reward.log",
        )
        settings = learner_settings(kafka, topics, log_dir / "checkpoints")
        app = learner_sink.build(settings)
        loop = make_loop(settings, app)
        learner_thread = threading.Thread(target=loop.run, daemon=True, name="learner")
        reader = TopicReader(kafka, topics["rewards"], partitions, on_reward)
        producer = SteadyProducer(
            kafka, topics["events"], messages, rate, delivery_timeout_s=outage_s + 300
        )

        def read(worker: str) -> tuple[float | None, float | None]:
            if worker == "reward":
                try:
                    s = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
                except OSError:
                    return None, None
                return (
                    total(s, "recsys_events_consumed_total", worker="reward"),
                    total(s, "recsys_consumer_lag", worker="reward", topic=topics["events"]),
                )
            consumed = REGISTRY.get_sample_value(
                "recsys_events_consumed_total", {"worker": "learner", "topic": topics["rewards"]}
            )
            lags = [
                REGISTRY.get_sample_value(
                    "recsys_consumer_lag",
                    {"worker": "learner", "topic": topics["rewards"], "partition": str(q)},
                )
                for q in range(partitions)
            ]
            known = [x for x in lags if x is not None]
            return consumed, (sum(known) if known else None)

    except BaseException:
        broker.stop()
        raise
    report: dict[str, Any] = {"outage_s": outage_s, "rate": rate}
    try:
        reward.start()
        learner_thread.start()
        reader.start()
        if not wait_for(lambda: b"assigned partitions [" in _read(reward.log_path), 90, 0.2):
            raise RuntimeError(f"reward worker never got partitions: {reward.tail()}")
        reward_pid = reward.pid
        producer.start()
        time.sleep(before_s)
        with reader.lock:
            before = len(first)
        say(f"{time.monotonic() - started:.0f}s: {before:,} rewards so far; broker down")
        stop_index = producer.sent
        broker.stop()
        down_at = time.monotonic()
        time.sleep(outage_s)
        alive_during = reward.alive and learner_thread.is_alive()
        broker.start()
        returned = time.monotonic()
        say(f"broker back after {returned - down_at:.1f}s on {broker.bootstrap}")

        reward_rate = len(oracle) / len(all_events) * rate
        watch = RecoveryWatch(read)
        recovery = watch.watch(
            returned,
            {"reward": rate * 1.0, "learner": max(1.0, reward_rate * 1.0)},
            timeout_s=RECOVERY_LIMIT_S + 60,
        )
        say(f"recovery (s after the return): {recovery}")

        producer.join(max(30.0, len(messages) / rate + outage_s + 120))

        def all_rewards() -> bool:
            with reader.lock:
                return not (oracle.keys() - first.keys())

        wait_for(all_rewards, 120, 0.5)
        online = app.sink.online  # type: ignore[attr-defined]

        def learner_caught_up() -> bool:
            with reader.lock:
                n = counts["records"]
            got = read("learner")[0] or 0
            return got >= n and all(k in online._seen for k in oracle)

        wait_for(learner_caught_up, 60, 0.5)
        alive_after = reward.alive and learner_thread.is_alive() and loop.running
        loop.stop()
        learner_thread.join(60)
        reward_exit = reward.stop()
        reader.stop()

        learned = set(online._seen._ids)
        missing = sorted(oracle.keys() - first.keys())
        stored_events = {
            json.loads(v)["event_id"] for v in reread(kafka, topics["events"], partitions)
        }
        stored_rewards = {
            RewardRecord.from_bytes(v).reward_id
            for v in reread(kafka, topics["rewards"], partitions)
        }
        consumed_by_learner = read("learner")[0] or 0.0
        took_in = consumed_by_learner - online.duplicates
        report.update(
            {
                "events": len(all_events),
                "events_acked": producer.sent - producer.failed,
                "producer_failed": producer.failed,
                "producer_error": repr(producer.error) if producer.error else None,
                "oracle_rewards": len(oracle),
                "lost": len(oracle.keys() - first.keys()),
                "wrong": sum(1 for k, v in first.items() if oracle.get(k) != v),
                "reward_records": counts["records"],
                "reemitted": counts["records"] - len(first),
                "missing_sample": missing[:5],
                "events_stored": len(stored_events),
                "events_missing_from_topic": len({e.event_id for e in all_events} - stored_events),
                "events_missing_detail": _missing_detail(all_events, stored_events, producer),
                "stop_index": stop_index,
                "storage": broker.storage,
                "rewards_stored_but_unread": len(stored_rewards - first.keys()),
                "rewards_missing_from_topic": len(oracle.keys() - stored_rewards),
                "learner_consumed": int(consumed_by_learner),
                "learner_dropped": online.duplicates,
                "learner_missing": len(oracle.keys() - learned),
                "duplicates_trained": int(took_in - len(learned)),
                "workers_alive_during_outage": alive_during,
                "workers_alive_after": alive_after,
                "reward_worker_pid_changed": reward.pid != reward_pid,
                "reward_worker_exit": reward_exit,
                "learner_loop_alive": learner_thread.is_alive() or alive_after,
                "recovery_s_reward": recovery["reward"],
                "recovery_s_learner": recovery["learner"],
                "send_or_poll_errors_in_reward_log": _count_errors(reward.log_path),
                "seconds": round(time.monotonic() - started, 1),
                "logs": str(log_dir),
            }
        )
        return report
    finally:
        loop.stop()
        if learner_thread.is_alive():
            learner_thread.join(30)
        reward.stop()
        if reader.is_alive():
            reader.stop()
        with contextlib.suppress(Exception):
            app.sink.close()  # while the broker is still up: nothing left to wait for
        broker.stop()


def reread(
    kafka: KafkaSettings,
    topic: str,
    partitions: int,
    idle_s: float = 3.0,
    ends: dict[int, int] | None = None,
) -> list[bytes]:
    """Every value of ``topic``, read from the beginning by a fresh consumer until idle (Tansu's
    ListOffsets answer is not the log end, so the end is where nothing more comes). ``ends``,
    when given, receives each partition's next offset after its last record."""
    consumer = make_consumer(kafka, None)
    try:
        consumer.assign([TopicPartition(topic, q) for q in range(partitions)])
        consumer.seek_to_beginning()
        out: list[bytes] = []
        last = time.monotonic()
        while time.monotonic() - last < idle_s:
            for recs in consumer.poll(timeout_ms=200, max_records=10_000).values():
                out.extend(r.value for r in recs)
                if ends is not None:
                    for r in recs:
                        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
                last = time.monotonic()
        return out
    finally:
        consumer.close()


def _missing_detail(events: list[Any], stored: set[str], producer: SteadyProducer) -> list[str]:
    """Send index, partition and acknowledged offset of (up to 10) acked events not stored."""
    out = []
    for i, e in enumerate(events):
        if e.event_id in stored or i >= len(producer.futures):
            continue
        f = producer.futures[i]
        meta = f.get(0) if f.succeeded() else None
        where = f"p{meta.partition}@{meta.offset}" if meta is not None else "not acked"
        out.append(f"#{i} {where}")
        if len(out) == 10:
            break
    return out


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def _count_errors(path: Path) -> int:
    return sum(1 for line in _read(path).splitlines() if b" ERROR " in line or b"Traceback" in line)


# -- fault test 6: the encoder -------------------------------------------------------------
def run_encoder_outage(
    outage_s: float,
    *,
    s3_endpoint: str,
    delivery_timeout_s: float = 20.0,
    items_per_s: float = 5.0,
    before_s: float = 10.0,
    after_s: float = 10.0,
    partitions: int = 2,
    log_dir: Path | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Fault test 6 once; returns the report (see the module docstring)."""
    from recsys.encoder.cache import VectorCache
    from recsys.encoder.sink import EncoderSink
    from recsys.encoder.text import TextEncoder
    from recsys.kafka import DeadLetterWriter

    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="encoder-outage-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    broker = durable_broker(s3_endpoint)
    try:  # set-up that fails must not leave the broker running
        kafka = outage_kafka_settings(broker.bootstrap)
        p = f"enc{uuid.uuid4().hex[:8]}"
        topics = {n: f"{p}.{n}" for n in ("items", "vectors", "dlq")}
        create_topics(kafka, [topics["items"], topics["vectors"]], partitions)
        create_topics(kafka, [topics["dlq"]], 1)
        group = f"{p}.encoder"

        n_items = int(items_per_s * (before_s + outage_s + after_s))
        items = [
            ItemRecord(f"it{i}", f"Item {i}: a film about {i % 17} things", 1, tags=(f"g{i % 5}",))
            for i in range(n_items)
        ]
        messages = [(it.item_id.encode(), it.to_bytes()) for it in items]

        request_timeout_ms = int(min(10_000, delivery_timeout_s * 1000 / 2))
        enc_producer: KafkaProducer = make_producer(
            kafka,
            delivery_timeout_ms=int(delivery_timeout_s * 1000),
            request_timeout_ms=request_timeout_ms,
        )
        stop_now, stopped = threading.Event(), threading.Event()

        class BrokerDiesMidBatch(EncoderSink):
            """Stops the broker between a fetch and its sends, so the outage always catches
            vectors in flight (a steady trickle would otherwise leave it idle at random)."""

            def write(self, records: Sequence[ConsumerRecord]) -> None:
                if stop_now.is_set() and not stopped.is_set():
                    broker.stop()
                    stopped.set()
                super().write(records)

        text_encoder = TextEncoder(device="cpu")
        sink = BrokerDiesMidBatch(
            text_encoder,
            VectorCache(log_dir / "cache", text_encoder.name, text_encoder.dim),
            enc_producer,
            topics["vectors"],
            DeadLetterWriter(enc_producer, topics["dlq"], "encoder"),
        )
        loop = ConsumerLoop(
            make_consumer(kafka, group), [topics["items"]], sink, worker="encoder", max_records=50
        )
        thread = threading.Thread(target=loop.run, daemon=True, name="encoder")
        vectors: set[str] = set()
        counts = {"vectors": 0}

        def on_vector(value: bytes) -> None:
            vectors.add(ItemVector.from_bytes(value).item_id)
            counts["vectors"] += 1

        reader = TopicReader(kafka, topics["vectors"], partitions, on_vector)
        producer = SteadyProducer(
            kafka, topics["items"], messages, items_per_s, delivery_timeout_s=outage_s + 300
        )
    except BaseException:
        broker.stop()
        raise
    report: dict[str, Any] = {
        "outage_s": outage_s,
        "delivery_timeout_s": delivery_timeout_s,
    }
    try:
        thread.start()
        reader.start()
        producer.start()
        if not wait_for(lambda: len(vectors) > 0, 120, 0.2):
            raise RuntimeError("the encoder produced no vector before the outage")
        time.sleep(before_s)
        stop_now.set()
        if not stopped.wait(60):
            raise RuntimeError("the encoder got no batch to stop the broker in")
        say(f"{time.monotonic() - started:.0f}s: {len(vectors)} vectors; broker down")
        time.sleep(outage_s)
        alive_during = thread.is_alive()
        broker.start()
        returned = time.monotonic()
        say(f"broker back; encoder send failures so far: {sink.send_failures}")
        producer.join(n_items / items_per_s + outage_s + 120)

        def all_vectors() -> bool:
            with reader.lock:
                return len(vectors) >= n_items

        wait_for(all_vectors, 180, 0.5)
        caught_up = time.monotonic() - returned
        alive_after = thread.is_alive() and loop.running
        loop.stop()
        thread.join(60)
        reader.stop()
        committed = _committed(kafka, group, topics["items"], partitions)
        ends: dict[int, int] = {}
        stored = reread(kafka, topics["items"], partitions, ends=ends)
        report.update(
            {
                "items_produced": producer.sent - producer.failed,
                "producer_failed": producer.failed,
                "item_records_in_topic": len(stored),  # at-least-once: a retry may repeat one
                "distinct_items_in_topic": len({json.loads(v)["item_id"] for v in stored}),
                # Offsets may have gaps (a retried batch): consumed = committed at each log end.
                "items_unconsumed": sum(max(0, e - committed.get(q, 0)) for q, e in ends.items()),
                "committed_offsets": committed,
                "items_with_vectors": len(vectors),
                "vector_records": counts["vectors"],
                "missing": n_items - len(vectors & {it.item_id for it in items}),
                "encoder_send_failures": sink.send_failures,
                "encoder_alive_during_outage": alive_during,
                "encoder_alive_after": alive_after,
                "all_vectors_s_after_return": round(caught_up, 1),
                "seconds": round(time.monotonic() - started, 1),
            }
        )
        return report
    finally:
        loop.stop()
        if thread.is_alive():
            thread.join(30)
        if reader.is_alive():
            reader.stop()
        sink.close()  # while the broker is still up: nothing left to wait for
        broker.stop()


def _committed(kafka: KafkaSettings, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = make_consumer(kafka, group)
    try:
        return {q: consumer.committed(TopicPartition(topic, q)) or 0 for q in range(partitions)}
    finally:
        consumer.close()


def pipeline_ok(r: dict[str, Any]) -> bool:
    return (
        r["lost"] == 0
        and r["wrong"] == 0
        and r["learner_missing"] == 0
        and r["duplicates_trained"] == 0
        and r["producer_failed"] == 0
        and r["workers_alive_after"]
        and not r["reward_worker_pid_changed"]
        and r["reward_worker_exit"] == 0
        and r["recovery_s_reward"] is not None
        and r["recovery_s_reward"] <= RECOVERY_LIMIT_S
        and r["recovery_s_learner"] is not None
        and r["recovery_s_learner"] <= RECOVERY_LIMIT_S
    )


def encoder_ok(r: dict[str, Any]) -> bool:
    return (
        r["items_unconsumed"] == 0
        and r["items_with_vectors"] == r["distinct_items_in_topic"] == r["items_produced"]
        and r["missing"] == 0
        and r["encoder_send_failures"] >= 1
        and r["encoder_alive_after"]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outage-s", type=float, default=300.0, help="pipeline outage (s)")
    ap.add_argument("--rate", type=float, default=100.0, help="events/s of the producer")
    ap.add_argument("--before-s", type=float, default=15.0, help="traffic before the outage")
    ap.add_argument("--after-s", type=float, default=30.0, help="traffic after it")
    ap.add_argument("--encoder-outage-s", type=float, default=150.0, help="0 skips it")
    ap.add_argument("--encoder-delivery-timeout-s", type=float, default=120.0)
    ap.add_argument("--encoder-items-per-s", type=float, default=5.0, help="items/s produced")
    ap.add_argument("--s3-endpoint", help="an S3-compatible endpoint (default: own moto_server)")
    ap.add_argument("--json", type=Path, help="write the report here too")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log_dir = Path(tempfile.mkdtemp(prefix="broker-outage-"))
    with contextlib.ExitStack() as stack:
        endpoint = args.s3_endpoint or stack.enter_context(moto_server(log_dir))
        results: dict[str, Any] = {}
        if args.outage_s > 0:
            results["pipeline"] = run_pipeline_outage(
                args.outage_s,
                s3_endpoint=endpoint,
                rate=args.rate,
                before_s=args.before_s,
                after_s=args.after_s,
                log_dir=log_dir / "pipe",
            )
        if args.encoder_outage_s > 0:
            results["encoder"] = run_encoder_outage(
                args.encoder_outage_s,
                s3_endpoint=endpoint,
                delivery_timeout_s=args.encoder_delivery_timeout_s,
                items_per_s=args.encoder_items_per_s,
                log_dir=log_dir / "enc",
            )
    ok = True
    for name, r in results.items():
        good = pipeline_ok(r) if name == "pipeline" else encoder_ok(r)
        ok = ok and good
        verdict = "ok" if good else "FAILED"
        if name == "encoder" and r["encoder_send_failures"] == 0:
            verdict += ": no send was pending when the broker stopped, the rewind never ran"
        print(f"\n{name} ({verdict})")
        for k, v in r.items():
            print(f"  {k:<36} {v}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
