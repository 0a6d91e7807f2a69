"""Thin kafka-python wrappers: client factories, topic creation, the dead-letter writer and the
consumer loop that commits offsets only after its sink made their effects durable.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import FrameType
from typing import Any, TypeVar

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import (
    CommitFailedError,
    KafkaError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

from recsys import metrics
from recsys.config import KafkaSettings
from recsys.errors import FencedError
from recsys.events import ContractError, Rejection

log = logging.getLogger(__name__)

# Large enough for the 10 MB poison payloads the DLQ must be able to carry verbatim.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: How long :func:`close_producer` waits for the producer's last sends.
CLOSE_TIMEOUT_S = 10.0


def make_producer(settings: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """An idempotent producer (acks=all): retries never duplicate or reorder a partition."""
    kwargs: dict[str, Any] = {
        **settings.client_kwargs(),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_request_size": MAX_MESSAGE_BYTES,
    }
    kwargs.update(overrides)
    return KafkaProducer(**kwargs)


def replace_producer(
    old: KafkaProducer,
    new_producer: Callable[[], KafkaProducer],
    worker: str,
    dlq: DeadLetterWriter | None = None,
) -> KafkaProducer:
    """A new producer for one whose flush did not finish in time (``dlq`` is moved onto it).

    kafka-python 3 can wedge: seen in the tests, a producer whose first sends went to a
    just-created topic kept the partitions' leader unknown and refreshed metadata forever, so
    its batches neither went out nor expired. A new producer starts from fresh metadata. What
    the old one still held was not committed, so the caller fails its batch and it is re-read
    (sends are idempotent by id and key). Through a broker outage longer than the flush
    timeout this replaces the producer once per try, which costs a reconnect and nothing else.
    Counted in ``recsys_producers_replaced_total{worker}``.
    """
    log.warning("%s: a producer flush did not finish in time; replacing the producer", worker)
    # The new one first: in a broker outage it cannot bootstrap and raises, and the caller must
    # keep an open producer to retry with (a closed one fails every later batch, for good).
    producer = new_producer()
    close_producer(old, timeout_s=0.0)
    if dlq is not None:
        dlq.producer = producer
    metrics.PRODUCERS_REPLACED.labels(worker=worker).inc()
    return producer


def close_producer(producer: KafkaProducer, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Close ``producer``, waiting at most ``timeout_s`` for its last sends.

    kafka-python waits forever by default, and raises when a timed close cannot flush: either
    would hang or crash a worker stopped during a broker outage. What is unsent by then was not
    committed either, so the partitions' next owner re-reads it.
    """
    try:
        producer.close(timeout=timeout_s)
    except KafkaError as exc:
        log.warning("producer closed with sends pending (%s); they are re-read, not lost", exc)
        # kafka-python's close() flushes first and, when that times out, raises before it stops
        # its network thread, which then lives on (reconnecting, refreshing metadata, holding
        # the GIL): stop it without sending what is pending.
        sender = getattr(producer, "_sender", None)
        if sender is not None and sender.is_alive():
            sender.force_close()
            sender.join(max(timeout_s, 1.0))


def make_consumer(
    settings: KafkaSettings, group_id: str | None, *topics: str, **overrides: Any
) -> KafkaConsumer:
    """A consumer with auto-commit off: offsets are committed by :class:`ConsumerLoop`."""
    kwargs: dict[str, Any] = {
        **settings.client_kwargs(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "fetch_max_bytes": MAX_MESSAGE_BYTES * 2,
        "max_partition_fetch_bytes": MAX_MESSAGE_BYTES,
        # KIP-429: a rebalance moves only the partitions that change owner; the others keep
        # flowing, and a sink's state for them is never dropped and rebuilt.
        "partition_assignment_strategy": (CooperativeStickyAssignor,),
    }
    kwargs.update(overrides)
    return KafkaConsumer(*topics, **kwargs)


def make_admin(settings: KafkaSettings, **overrides: Any) -> KafkaAdminClient:
    return KafkaAdminClient(**{**settings.client_kwargs(), **overrides})


def create_topics(
    settings: KafkaSettings,
    names: Iterable[str],
    partitions: int,
    replication_factor: int = 1,
) -> list[str]:
    """Create the topics that do not exist yet; returns the names created."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        wanted = [n for n in dict.fromkeys(names) if n not in existing]
        created = []
        for name in wanted:
            try:
                admin.create_topics([NewTopic(name, partitions, replication_factor)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass  # another process won the race; the topic exists, which is all we need
        return created
    finally:
        admin.close()


def offsets_to_json(offsets: Mapping[TopicPartition, int]) -> dict[str, int]:
    """Offsets as checkpoint manifests store them: ``{"topic:partition": next offset}``."""
    return {f"{tp.topic}:{tp.partition}": int(off) for tp, off in offsets.items()}


def offsets_from_json(raw: Mapping[str, int]) -> dict[TopicPartition, int]:
    """Inverse of :func:`offsets_to_json` (topic names may contain ``:``)."""
    out: dict[TopicPartition, int] = {}
    for key, off in raw.items():
        topic, _, partition = key.rpartition(":")
        out[TopicPartition(topic, int(partition))] = int(off)
    return out


class DeadLetterWriter:
    """Sends a rejected message's original bytes to the DLQ, with headers saying why and whence."""

    def __init__(self, producer: KafkaProducer, topic: str, worker: str = "") -> None:
        if not topic:
            raise ValueError("topic must not be empty")
        self.producer = producer
        self.topic = topic
        self.worker = worker

    def send(self, record: ConsumerRecord, reason: str, detail: str = "") -> Any:
        headers = [
            ("recsys.reason", reason.encode()),
            ("recsys.detail", detail[:500].encode("utf-8", "replace")),
            ("recsys.worker", self.worker.encode()),
            ("recsys.source_topic", record.topic.encode()),
            ("recsys.source_partition", str(record.partition).encode()),
            ("recsys.source_offset", str(record.offset).encode()),
        ]
        metrics.EVENTS_DLQ.labels(reason=reason).inc()
        return self.producer.send(self.topic, key=record.key, value=record.value, headers=headers)


T = TypeVar("T")


class Sink(ABC):
    """Where a :class:`ConsumerLoop` delivers records; every worker's sink subclasses it.

    ``write`` receives each polled batch (possibly empty: a periodic tick for time-based work).
    ``flush`` makes the effects of everything written durable (e.g. produced and acked) and
    returns the offsets that are now safe to commit, or None for "all records written so far".

    The hooks have defaults, so a sink overrides only what it needs:

    - ``busy()``: True pauses consumption (back-pressure).
    - ``on_assign(consumer, partitions)`` / ``on_revoke(partitions)``: per-partition state. They
      run on the consumer's thread inside ``poll``; ``consumer`` is the loop's own consumer (to
      seek, or to read committed offsets).
    - ``on_bad_record(record, reason, detail)``: the one way a worker handles a record it cannot
      use: counted in ``recsys_events_rejected_total{reason,worker}`` and sent to the
      dead-letter topic with the reason (when the sink has a ``dlq``). :meth:`decode` routes
      both rejections and decoder exceptions here, so no input stops a worker.
    - ``healthy()``: False fails /healthz (e.g. a background thread died).
    - ``close()``: release what the sink owns (producers, stores), after the last commit.
    """

    worker: str = ""
    dlq: DeadLetterWriter | None = None

    @abstractmethod
    def write(self, records: Sequence[ConsumerRecord]) -> None: ...

    @abstractmethod
    def flush(self) -> Mapping[TopicPartition, int] | None: ...

    def busy(self) -> bool:
        return False

    def on_assign(self, consumer: KafkaConsumer, partitions: list[TopicPartition]) -> None:
        return None

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        return None

    def on_bad_record(self, record: ConsumerRecord, reason: str, detail: str = "") -> Any:
        """Count the record and dead-letter it; returns the DLQ send's future (or None)."""
        metrics.EVENTS_REJECTED.labels(reason=reason, worker=self.worker).inc()
        if self.dlq is None:
            log.warning(
                "%s: bad record %s:%d@%d (%s): %s",
                self.worker,
                record.topic,
                record.partition,
                record.offset,
                reason,
                detail[:200],
            )
            return None
        return self.dlq.send(record, reason, detail)

    def decode(
        self, records: Sequence[ConsumerRecord], parse: Callable[[Any], T | Rejection]
    ) -> list[tuple[ConsumerRecord, T]]:
        """``parse`` each record's value; rejections and exceptions go to :meth:`on_bad_record`.

        A :class:`~recsys.events.ContractError` (an internal topic's decoder) gives its
        contract reason; any other exception names its class as the reason: a decoder bug
        dead-letters the record instead of crash-looping the worker on it.
        """
        out: list[tuple[ConsumerRecord, T]] = []
        for r in records:
            try:
                parsed = parse(r.value)
            except ContractError as exc:
                self.on_bad_record(r, exc.reason.value, exc.detail)
                continue
            except Exception as exc:
                self.on_bad_record(r, type(exc).__name__, str(exc))
                continue
            if isinstance(parsed, Rejection):
                self.on_bad_record(r, parsed.reason.value, parsed.detail)
                continue
            out.append((r, parsed))
        return out

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        return None


class ConsumerLoop:
    """Poll in batches → sink.write → sink.flush → commit, until stopped.

    Parameters
    ----------
    consumer:
        A consumer from :func:`make_consumer` (auto-commit off), not yet subscribed.
    topics:
        Topics to subscribe to.
    sink:
        See :class:`Sink`.
    worker:
        Name used as the ``worker`` metric label.
    max_records:
        Largest batch handed to the sink.
    poll_timeout_ms:
        How long one poll waits for data.
    tick_interval_s:
        With no data, the sink still gets an empty ``write`` and a flush this often.
    stall_after_s:
        :meth:`healthy` turns False when no poll has returned for this long (a wedged sink or
        a loop that stopped), so /healthz means "making progress".

    A broker outage never ends the loop (a crash loop would only add restarts to it): a poll or
    a commit that raises a :class:`~kafka.errors.KafkaError` is logged and retried with backoff
    (kafka-python reconnects by itself), and when the sink's ``write`` or ``flush`` raises one
    (e.g. sends that expired during the outage) the batch's effects are unknown, so every
    assigned partition is handed back to the sink as if reassigned: ``on_revoke``, a seek to
    the last committed offset, ``on_assign``; the sink rebuilds its state as after a rebalance.
    A :class:`~recsys.errors.FencedError` from the sink (its store refused a zombie's write) is
    handled the same way: the batch is dropped and re-read from what the store holds.
    """

    def __init__(
        self,
        consumer: KafkaConsumer,
        topics: Sequence[str],
        sink: Sink,
        *,
        worker: str,
        max_records: int = 1000,
        poll_timeout_ms: int = 100,
        tick_interval_s: float = 0.5,
        stall_after_s: float = 120.0,
    ) -> None:
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        if poll_timeout_ms < 0:
            raise ValueError(f"poll_timeout_ms must be >= 0, got {poll_timeout_ms}")
        if tick_interval_s <= 0:
            raise ValueError(f"tick_interval_s must be > 0, got {tick_interval_s}")
        if not topics:
            raise ValueError("topics must not be empty")
        self.consumer = consumer
        self.topics = list(topics)
        self.sink = sink
        self.worker = worker
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.tick_interval_s = tick_interval_s
        self._stop = threading.Event()
        self._uncommitted: dict[TopicPartition, int] = {}
        self._paused = False
        self._committed: dict[TopicPartition, int] = {}
        self.stall_after_s = stall_after_s
        self.last_poll = time.monotonic()
        self.running = False
        self.batches = 0
        self.broker_errors = 0  # polls, commits and batches that failed on a KafkaError
        self._failures = 0  # consecutive ones (backoff)
        self._redo = False  # a batch failed: partitions to hand back to the sink

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        """Ask the loop to finish its batch, flush, commit and return (signal-handler safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop cleanly (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %s: stopping %s", signal.Signals(signum).name, self.worker)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def healthy(self) -> bool:
        """True while the loop runs and its last poll returned less than ``stall_after_s`` ago."""
        return self.running and time.monotonic() - self.last_poll < self.stall_after_s

    def run(self) -> None:
        self.consumer.subscribe(self.topics, listener=_Rebalance(self))
        last_flush = self.last_poll = time.monotonic()
        self.running = True
        try:
            while not self._stop.is_set():
                try:
                    if self._redo:
                        self._hand_back()
                    self._apply_backpressure()
                    polled = self.consumer.poll(
                        timeout_ms=self.poll_timeout_ms, max_records=self.max_records
                    )
                    batch = [r for records in polled.values() for r in records]
                    now = self.last_poll = time.monotonic()
                    if not batch and now - last_flush < self.tick_interval_s:
                        continue
                    self._process(batch)
                    last_flush = now
                    self._failures = 0
                except (KafkaError, FencedError) as exc:
                    self._retry_later(exc)
            if not self._redo:
                try:
                    self._process([])  # a clean stop flushes and commits what is durable
                except KafkaError as exc:  # the next owner re-reads from the last commit
                    log.warning("%s: final flush or commit not done: %s", self.worker, exc)
        finally:
            self.running = False
            # After a crash nothing more is committed: the next owner re-reads from the last
            # commit, and effects are idempotent.
            self.consumer.close(autocommit=False)

    # -- internals ---------------------------------------------------------------------------
    def _process(self, batch: list[ConsumerRecord]) -> None:
        started = time.perf_counter()
        for r in batch:
            tp = TopicPartition(r.topic, r.partition)
            self._uncommitted[tp] = r.offset + 1
        if batch:
            counts: dict[str, int] = {}
            for r in batch:
                counts[r.topic] = counts.get(r.topic, 0) + 1
            for topic, n in counts.items():
                metrics.EVENTS_CONSUMED.labels(worker=self.worker, topic=topic).inc(n)
        try:
            self.sink.write(batch)
            safe = self.sink.flush()
        except (KafkaError, FencedError):
            self._redo = True  # what the batch did is unknown: redo from the last commit
            raise
        self._commit(safe)
        self.batches += 1
        metrics.BATCH_SECONDS.labels(worker=self.worker).observe(time.perf_counter() - started)
        if batch:
            self._record_lag()

    def _commit(self, safe: Mapping[TopicPartition, int] | None) -> None:
        offsets = dict(self._uncommitted) if safe is None else dict(safe)
        assigned = self.consumer.assignment()
        offsets = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            self.consumer.commit(
                {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}
            )
        except (CommitFailedError, RebalanceInProgressError) as exc:
            # A rebalance is under way or took the partitions away mid-batch. A partition we
            # keep is committed with the next batch; one we lose is re-read by its next owner
            # from the last commit, and effects are idempotent: a repeat, never a loss.
            log.warning("commit not done (%s); retried with the next batch", exc)
            return
        except KafkaError as exc:
            # The coordinator is unreachable (a broker outage): nothing is lost by committing
            # later; the offsets stay pending and go with the next batch.
            self.broker_errors += 1
            log.warning("commit not done (%s); retried with the next batch", exc)
            return
        for tp, off in offsets.items():
            self._committed[tp] = off
            if self._uncommitted.get(tp) == off:
                del self._uncommitted[tp]

    def _retry_later(self, exc: KafkaError | FencedError) -> None:
        """Log a failed poll or batch and wait before the next try (0.5 s doubling to 10 s)."""
        if isinstance(exc, KafkaError):
            self.broker_errors += 1
        self._failures += 1
        delay = min(10.0, 0.5 * 2 ** min(self._failures - 1, 5))
        log.warning(
            "%s: %s (%s: %s); retrying in %.1fs",
            self.worker,
            "batch failed, partitions handed back to the sink" if self._redo else "poll failed",
            type(exc).__name__,
            exc,
            delay,
        )
        self._stop.wait(delay)

    def _hand_back(self) -> None:
        """After a failed batch: every assigned partition back to its last commit, and to the
        sink as if newly assigned (it drops and rebuilds what it held for them)."""
        parts = list(self.consumer.assignment())
        self.sink.on_revoke(parts)
        for tp in parts:
            committed = self._committed.get(tp)
            if committed is None:
                committed = self.consumer.committed(tp)
            if committed is None:
                self.consumer.seek_to_beginning(tp)  # nothing committed (make_consumer: earliest)
            else:
                self.consumer.seek(tp, committed)
            self._uncommitted.pop(tp, None)
        self.sink.on_assign(self.consumer, parts)
        self._redo = False
        log.info("%s: partitions %s handed back at their last commit", self.worker, parts)

    def _apply_backpressure(self) -> None:
        want_pause = self.sink.busy()
        if want_pause and not self._paused:
            parts = list(self.consumer.assignment())
            self.consumer.pause(*parts)
            metrics.PAUSED_PARTITIONS.labels(worker=self.worker).set(len(parts))
            self._paused = True
        elif not want_pause and self._paused:
            self.consumer.resume(*self.consumer.paused())
            metrics.PAUSED_PARTITIONS.labels(worker=self.worker).set(0)
            self._paused = False

    def _record_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            labels = {"worker": self.worker, "topic": tp.topic, "partition": str(tp.partition)}
            metrics.CONSUMER_LAG.labels(**labels).set(max(0, high - self.consumer.position(tp)))
            committed = self._committed.get(tp)
            if committed is not None:
                # What a restart would re-read: the position lag hides a commit that holds back.
                metrics.CONSUMER_COMMITTED_LAG.labels(**labels).set(max(0, high - committed))

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        # Runs on kafka-python's IO thread, where a blocking commit is not allowed. Nothing is
        # lost by not committing here: every flushed batch was committed already, and what the
        # sink held back (e.g. open windows) is re-read by the partition's next owner.
        self._on_lost(partitions)

    def _on_lost(self, partitions: list[TopicPartition]) -> None:
        self.sink.on_revoke(partitions)
        for tp in partitions:
            self._uncommitted.pop(tp, None)
            self._committed.pop(tp, None)

    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        self.sink.on_assign(self.consumer, partitions)
        if self._paused:
            self.consumer.pause(*partitions)


class _Rebalance(ConsumerRebalanceListener):
    """kafka-python's rebalance listener, forwarding to the loop."""

    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.loop._on_revoke(list(revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.loop._on_assign(list(assigned))

    def on_partitions_lost(self, lost: list[TopicPartition]) -> None:
        self.loop._on_lost(list(lost))
