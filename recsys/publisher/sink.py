"""The publisher worker's sink and :func:`build`: events → fresh slates to the recommendations
topic and the store, then offsets; a :class:`~recsys.serving.watcher.ModelWatcher` hot-swaps
model versions."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition

from recsys import metrics
from recsys.app import WorkerApp
from recsys.config import Settings
from recsys.events import EventParser
from recsys.kafka import (
    DeadLetterWriter,
    Sink,
    close_producer,
    make_producer,
    replace_producer,
)
from recsys.model_store import ModelStore
from recsys.publisher.core import Batch, Publisher, PublisherConfig
from recsys.rewards.rules import RewardRules
from recsys.serving.model import load_serving_model
from recsys.serving.watcher import ModelWatcher
from recsys.store import Store

log = logging.getLogger(__name__)

WORKER = "publisher"


class PublisherSink(Sink):
    """Consumer-loop sink: events -> :class:`Publisher` -> recommendations topic + store.

    ``flush`` publishes a due batch: every slate is produced and acknowledged, then the batch is
    upserted into the store in one transaction, with the users' changed state and, per
    partition, the next offset whose effects that state does not hold; then (by returning) its
    offsets may be committed. A crash anywhere before the store write re-reads the events, and
    the re-computed slates (fresh ``request_id``) replace the old ones: nothing is lost, nothing
    is half written. Invalid events are dead-lettered like in every worker (the DLQ header
    ``recsys.worker`` says which group rejected them, so the reward worker's copy and this one
    can be told apart).

    Scale-out: each replica owns the users of its assigned partitions. On assignment a
    partition is sought to its stored offset when that is past the consumer's position (the
    store already holds those events' effects, rating stats included, which a re-read would
    count twice) and its users whose slate is not of the serving version are refreshed; on
    revocation its users are dropped from memory (their stored state is the next owner's).
    """

    worker = WORKER

    def __init__(
        self,
        publisher: Publisher,
        producer: Any,
        topic: str,
        store: Store,
        parser: EventParser | None = None,
        ack_timeout_s: float = 30.0,
        dlq: DeadLetterWriter | None = None,
        watcher: ModelWatcher | None = None,
        group_id: str = "",
        popularity_sync_s: float = 30.0,
        new_producer: Callable[[], Any] | None = None,
    ) -> None:
        if not topic:
            raise ValueError("topic must not be empty")
        self.publisher = publisher
        self.producer = producer
        self.topic = topic
        self.store = store
        self.parser = parser or EventParser()
        self.ack_timeout_s = ack_timeout_s
        self.dlq = dlq
        self.watcher = watcher
        self.group_id = group_id
        self.popularity_sync_s = popularity_sync_s
        self.new_producer = new_producer  # replaces a producer whose flush wedged
        self._popularity_synced = time.monotonic()
        self._written: dict[TopicPartition, int] = {}
        self._durable: dict[TopicPartition, int] = {}
        self._recorded: set[str] = set()
        self._lock = threading.Lock()
        # Rebalance callbacks only record; ``write`` applies them in order on the loop's thread.
        self._changes: list[tuple[str, list[TopicPartition]]] = []
        self._consumer: KafkaConsumer | None = None
        self._filled = False
        self.batches = 0

    def on_assign(self, consumer: KafkaConsumer, partitions: list[TopicPartition]) -> None:
        log.info("publisher assigned partitions %s", sorted(p.partition for p in partitions))
        with self._lock:
            self._consumer = consumer
            self._changes.append(("assign", list(partitions)))

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        log.info("publisher revoked partitions %s", sorted(p.partition for p in partitions))
        with self._lock:
            self._changes.append(("revoke", list(partitions)))

    def _apply_assignment(self, records: Sequence[ConsumerRecord]) -> Sequence[ConsumerRecord]:
        with self._lock:
            changes, self._changes = self._changes, []
            consumer = self._consumer
        sought: set[TopicPartition] = set()
        for kind, parts in changes:
            if kind == "revoke":
                self.publisher.revoke(tp.partition for tp in parts)
                for tp in parts:
                    self._written.pop(tp, None)
                    self._durable.pop(tp, None)
                continue
            assert consumer is not None
            if not self._filled:
                n = len(consumer.partitions_for_topic(parts[0].topic) or ()) if parts else 0
                if n:
                    filled = self.store.fill_partitions(n)
                    if filled:
                        log.info("store: partition computed for %d users (murmur2)", filled)
                    self._filled = True
            stored = self.store.publisher_offsets(self.group_id)
            first: dict[TopicPartition, int] = {}
            for r in records:
                first.setdefault(TopicPartition(r.topic, r.partition), r.offset)
            assigned = consumer.assignment()
            for tp in parts:
                offset = stored.get((tp.topic, tp.partition))
                if offset is None or tp not in assigned:
                    continue
                position = first[tp] if tp in first else consumer.position(tp)
                if offset > position:
                    consumer.seek(tp, offset)
                    sought.add(tp)
            self.publisher.assign(tp.partition for tp in parts)
        if not sought:
            return records
        return [r for r in records if TopicPartition(r.topic, r.partition) not in sought]

    def write(self, records: Sequence[ConsumerRecord]) -> None:
        if self._changes:
            records = self._apply_assignment(records)
        for r in records:
            self._written[TopicPartition(r.topic, r.partition)] = r.offset + 1
        decoded = self.decode(records, self.parser.parse)
        self.publisher.observe([ev for _, ev in decoded], [r.partition for r, _ in decoded])

    def flush(self) -> Mapping[TopicPartition, int] | None:
        now = time.monotonic()
        if now - self._popularity_synced >= self.popularity_sync_s:
            # Other replicas count the positives of their own users: take theirs in.
            self.publisher.load_popularity(self.store.load_popularity())
            self._popularity_synced = now
        while self.publisher.due():
            batch = self.publisher.compute()
            if batch is None:
                break
            self.publish(batch)
            if not self.publisher.refreshing:
                break  # a long refresh continues on the next flush, so the loop keeps polling
        if self.publisher.pending:
            return dict(self._durable)
        self._durable = dict(self._written)
        return None

    def publish(self, batch: Batch) -> None:
        """Produce and await every slate, then store the batch in one transaction."""
        if batch.model is not None and batch.version not in self._recorded:
            created = batch.model.manifest.get("created_at")
            self.store.record_model_version(
                batch.version,
                batch.model.path,
                created_at=dt.datetime.fromtimestamp(created, dt.UTC) if created else None,
                metrics={
                    "step": batch.model.manifest.get("step"),
                    **batch.model.manifest.get("extra", {}),
                },
            )
            self._recorded.add(batch.version)
        futures = [
            self.producer.send(self.topic, key=w.slate.user_id.encode(), value=w.slate.to_bytes())
            for w in batch.slates
        ]
        try:
            self.producer.flush(timeout=self.ack_timeout_s)
        except KafkaTimeoutError:
            if self.new_producer is not None:
                self.producer = replace_producer(self.producer, self.new_producer, WORKER, self.dlq)
            raise  # the batch failed: the loop hands the partitions back and they are re-read
        for f in futures:
            f.get(timeout=self.ack_timeout_s)  # raises if any slate was not acknowledged
        # Every event observed so far has its effects in this batch or an earlier stored one
        # (compute takes every dirty user), so the written offsets are what the state covers.
        self.store.save_batch(
            batch.slates,
            states=batch.states,
            popularity=batch.popularity,
            cold_start=batch.cold_start,
            offsets={
                (self.group_id, tp.topic, tp.partition): off for tp, off in self._written.items()
            },
        )
        self.publisher.committed(batch)
        now = time.time()
        for ts in batch.trigger_ts.values():
            metrics.FRESHNESS_SECONDS.observe(max(0.0, now - ts / 1000.0))
        metrics.SLATES_PUBLISHED.inc(len(batch.slates))
        tops = [
            w.slate.items[0].score for w in batch.slates if w.slate.items and w.policy == "model"
        ]
        if tops:
            metrics.TOP_SCORE.set(sum(tops) / len(tops))
        self.batches += 1

    def healthy(self) -> bool:
        return self.watcher is None or self.watcher.alive

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        close_producer(self.producer)
        self.store.close()


def build(settings: Settings) -> WorkerApp:
    """The publisher worker: newest model version; users are loaded from the store as their
    partitions are assigned and their events arrive."""
    ps = settings.publisher
    cfg = PublisherConfig.from_settings(settings)
    root = ps.checkpoint_dir or settings.learner.checkpoint_dir
    # With a model store URL, each watch first downloads new versions from the store into root.
    sync = None
    if settings.model_store.url:
        sync = functools.partial(ModelStore.from_settings(settings).sync, root)
    watcher = ModelWatcher(
        root,
        functools.partial(load_serving_model, policy_kwargs=cfg.policy_kwargs()),
        ps.watch_interval_s,
        sync=sync,
    )
    watcher.poll()  # start on the newest valid version, if any
    store = Store(settings.store.url)
    publisher = Publisher(
        cfg, lambda: watcher.current, RewardRules.from_settings(settings.rewards), store=store
    )
    publisher.load_popularity(store.load_popularity())
    producer = make_producer(settings.kafka)
    sink = PublisherSink(
        publisher,
        producer,
        settings.topics.recommendations,
        store,
        EventParser.from_settings(settings.events),
        dlq=DeadLetterWriter(producer, settings.topics.dlq, WORKER),
        watcher=watcher,
        group_id=ps.group_id,
        new_producer=lambda: make_producer(settings.kafka),
    )
    return WorkerApp(
        WORKER,
        ps.group_id,
        [settings.topics.events],
        sink,
        poll_timeout_ms=50,
        tick_interval_s=max(0.01, min(0.5, cfg.batch_interval_s / 2)),
        on_start=watcher.start,
    )
