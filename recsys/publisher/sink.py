"""The publisher worker's sink: slates to Kafka and the store, then offsets; and its build()."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from recsys import metrics
from recsys.events import EventParser, Rejection
from recsys.publisher.core import Batch, Publisher
from recsys.store import Store

log = logging.getLogger(__name__)

NO_MODEL_VERSION = "cold-start"
"""``model_version`` of slates published before any model version exists."""
WORKER = "publisher"

# --- the sink: Kafka + store, then offsets ------------------------------------------------------


class PublisherSink:
    """Consumer-loop sink: events -> :class:`Publisher` -> recommendations topic + store.

    ``flush`` publishes a due batch: every slate is produced and acknowledged, then the batch is
    upserted into the store in one transaction, then (by returning) its offsets may be committed.
    A crash anywhere before that re-reads the events, and the re-computed slates (fresh
    ``request_id``) replace the old ones: nothing is lost, nothing is half written. Invalid events
    are skipped here: the reward worker owns their dead-lettering and counting.
    """

    def __init__(
        self,
        publisher: Publisher,
        producer: Any,
        topic: str,
        store: Store,
        parser: EventParser | None = None,
        ack_timeout_s: float = 30.0,
    ) -> None:
        if not topic:
            raise ValueError("topic must not be empty")
        self.publisher = publisher
        self.producer = producer
        self.topic = topic
        self.store = store
        self.parser = parser or EventParser()
        self.ack_timeout_s = ack_timeout_s
        self._written: dict[TopicPartition, int] = {}
        self._durable: dict[TopicPartition, int] = {}
        self._recorded: set[str] = set()
        self.batches = 0

    def write(self, records: Sequence[ConsumerRecord]) -> None:
        events = []
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            self._written[tp] = r.offset + 1
            parsed = self.parser.parse(r.value)
            if isinstance(parsed, Rejection):
                log.debug("skipping invalid event at %s:%d: %s", r.topic, r.offset, parsed.detail)
                continue
            events.append(parsed)
        self.publisher.observe(events)

    def flush(self) -> Mapping[TopicPartition, int] | None:
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
        self.producer.flush(timeout=self.ack_timeout_s)
        for f in futures:
            f.get(timeout=self.ack_timeout_s)  # raises if any slate was not acknowledged
        self.store.save_batch(
            batch.slates,
            histories=batch.histories,
            popularity=batch.popularity,
            cold_start=batch.cold_start,
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

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._written.pop(tp, None)
            self._durable.pop(tp, None)
