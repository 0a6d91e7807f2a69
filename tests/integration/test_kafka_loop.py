"""ConsumerLoop against the real embedded broker: commit-after-flush, DLQ headers, back-pressure."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from recsys.config import KafkaSettings
from recsys.errors import FencedError
from recsys.kafka import (
    ConsumerLoop,
    DeadLetterWriter,
    Sink,
    create_topics,
    make_consumer,
    make_producer,
)


class CollectingSink(Sink):
    """Records what it got; commits only what it was told is durable."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.pending: list[bytes] = []
        self.durable: list[bytes] = []
        self.fail_after = fail_after
        self.busy_flag = False
        self.ticks = 0

    def write(self, records: Sequence[ConsumerRecord]) -> None:
        if not records:
            self.ticks += 1
        self.pending.extend(r.value for r in records)
        if self.fail_after is not None and len(self.durable) + len(self.pending) > self.fail_after:
            raise RuntimeError("sink crashed before flush")

    def flush(self) -> Mapping[TopicPartition, int] | None:
        self.durable.extend(self.pending)
        self.pending.clear()
        return None

    def busy(self) -> bool:
        return self.busy_flag


def _produce(settings: KafkaSettings, topic: str, n: int) -> None:
    producer = make_producer(settings)
    for i in range(n):
        producer.send(topic, key=str(i % 7).encode(), value=str(i).encode())
    producer.flush()
    producer.close()


def _run_until(loop: ConsumerLoop, cond, timeout: float = 30.0) -> None:
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.05)
    loop.stop()
    t.join(15)
    assert not t.is_alive(), "loop did not stop"


def test_loop_delivers_everything_and_commits(kafka_settings, topic_prefix):
    topic = f"{topic_prefix}.in"
    create_topics(kafka_settings, [topic], partitions=3)
    _produce(kafka_settings, topic, 500)
    sink = CollectingSink()
    group = f"{topic_prefix}.g"
    loop = ConsumerLoop(
        make_consumer(kafka_settings, group), [topic], sink, worker="test", max_records=100
    )
    _run_until(loop, lambda: len(sink.durable) >= 500)
    assert sorted(int(v) for v in sink.durable) == list(range(500))

    # A second consumer in the same group finds everything committed: nothing to re-read.
    sink2 = CollectingSink()
    loop2 = ConsumerLoop(make_consumer(kafka_settings, group), [topic], sink2, worker="test")
    _run_until(loop2, lambda: sink2.ticks >= 3)
    assert sink2.durable == []


def test_crash_before_flush_commits_nothing_of_that_batch(kafka_settings, topic_prefix):
    topic = f"{topic_prefix}.in"
    create_topics(kafka_settings, [topic], partitions=1)
    _produce(kafka_settings, topic, 300)
    group = f"{topic_prefix}.g"
    crashing = CollectingSink(fail_after=150)
    loop = ConsumerLoop(
        make_consumer(kafka_settings, group), [topic], crashing, worker="test", max_records=50
    )
    try:
        loop.run()
    except RuntimeError:
        pass
    else:
        raise AssertionError("sink crash did not propagate")
    assert len(crashing.durable) <= 150

    # The restarted consumer resumes exactly after the last durable batch.
    sink = CollectingSink()
    loop2 = ConsumerLoop(make_consumer(kafka_settings, group), [topic], sink, worker="test")
    _run_until(loop2, lambda: len(crashing.durable) + len(sink.durable) >= 300)
    assert [int(v) for v in crashing.durable + sink.durable] == list(range(300))


class FencedOnceSink(CollectingSink):
    """Its store refuses the first flush (a zombie's write); records its hand-backs."""

    def __init__(self) -> None:
        super().__init__()
        self.fenced = False
        self.handed: list[str] = []

    def flush(self) -> Mapping[TopicPartition, int] | None:
        if self.pending and not self.fenced:
            self.fenced = True
            self.pending.clear()  # the refused batch left nothing durable
            raise FencedError("store holds newer state")
        return super().flush()

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        self.handed.append("revoke")

    def on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        self.handed.append("assign")


def test_a_fenced_batch_is_handed_back_and_re_read(kafka_settings, topic_prefix):
    topic = f"{topic_prefix}.in"
    create_topics(kafka_settings, [topic], partitions=2)
    _produce(kafka_settings, topic, 200)
    sink = FencedOnceSink()
    loop = ConsumerLoop(
        make_consumer(kafka_settings, f"{topic_prefix}.g"), [topic], sink, worker="test"
    )
    _run_until(loop, lambda: len(sink.durable) >= 200)
    assert sink.fenced
    assert sorted(int(v) for v in sink.durable) == list(range(200))  # nothing lost or doubled
    assert sink.handed[:3] == ["assign", "revoke", "assign"]  # joined, then handed back
    assert loop.broker_errors == 0  # a fenced write is not a broker problem


def test_backpressure_pauses_then_resumes(kafka_settings, topic_prefix):
    topic = f"{topic_prefix}.in"
    create_topics(kafka_settings, [topic], partitions=2)
    sink = CollectingSink()
    sink.busy_flag = True
    loop = ConsumerLoop(
        make_consumer(kafka_settings, f"{topic_prefix}.g"), [topic], sink, worker="test"
    )
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    _produce(kafka_settings, topic, 50)
    time.sleep(3)
    assert sink.durable == [], "paused consumer must not deliver"
    assert sink.ticks > 0, "paused loop must keep ticking"
    sink.busy_flag = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(sink.durable) < 50:
        time.sleep(0.05)
    loop.stop()
    t.join(15)
    assert sorted(int(v) for v in sink.durable) == list(range(50))


def test_dead_letter_carries_bytes_and_headers(kafka_settings, topic_prefix):
    src, dlq = f"{topic_prefix}.in", f"{topic_prefix}.dlq"
    create_topics(kafka_settings, [src, dlq], partitions=1)
    payload = b"x" * (10 * 1024 * 1024)
    _produce_raw = make_producer(kafka_settings)
    _produce_raw.send(src, key=b"u1", value=payload).get(30)
    _produce_raw.close()
    consumer = make_consumer(kafka_settings, None)
    consumer.assign([TopicPartition(src, 0)])
    consumer.seek_to_beginning()
    records = []
    deadline = time.monotonic() + 30
    while not records and time.monotonic() < deadline:
        for rs in consumer.poll(500).values():
            records.extend(rs)
    consumer.close()
    producer = make_producer(kafka_settings)
    DeadLetterWriter(producer, dlq).send(records[0], "too_large", "10485760 bytes").get(30)
    producer.close()

    reader = make_consumer(kafka_settings, None)
    reader.assign([TopicPartition(dlq, 0)])
    reader.seek_to_beginning()
    got = []
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        for rs in reader.poll(500).values():
            got.extend(rs)
    reader.close()
    assert len(got) == 1
    assert got[0].value == payload
    assert got[0].key == b"u1"
    headers = dict(got[0].headers)
    assert headers["recsys.reason"] == b"too_large"
    assert headers["recsys.source_topic"] == src.encode()
    assert headers["recsys.source_partition"] == b"0"
    assert headers["recsys.source_offset"] == b"0"


def test_closing_a_producer_with_sends_pending_stops_its_network_thread():
    """kafka-python's close() raises when its flush times out, before stopping the sender:
    close_producer must not leave that thread running against a broker that is gone."""
    from recsys.broker import EmbeddedBroker
    from recsys.kafka import close_producer

    with EmbeddedBroker() as broker:
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap)
        create_topics(settings, ["t"], partitions=1)
        producer = make_producer(settings)
        producer.send("t", value=b"sent").get(timeout=30)
        broker.stop()
        producer.send("t", value=b"pending")  # cannot be delivered now
        sender = producer._sender
        assert sender.is_alive()
        close_producer(producer, timeout_s=0.5)
        assert not sender.is_alive()
