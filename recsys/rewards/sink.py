"""The reward worker's sink: validate, dedupe and join events, produce rewards, commit safely.

Per batch: parse each message (rejects go to the DLQ with their reason and are counted), feed
the event to its partition's :class:`~recsys.rewards.RewardJoin` (dedupe by ``event_id``,
attribution window), produce the records it makes final, flush the producer once, then commit
per partition the join's ``safe_offset()``: the oldest offset still needed to rebuild its state
(open windows, remembered impressions, dedupe entries). A crash at any instant loses nothing:
what was not committed is re-read and the state rebuilt; repeated records carry the same
``reward_id`` and content, and the learner dedupes by it.

After a rebalance a partition's state is dropped and rebuilt from its committed offset (the
consumer is sought there), so the state always matches the position.

:func:`build` is the worker: ``workers/reward.py`` runs it with :func:`recsys.app.run_consumer`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from recsys import metrics
from recsys.app import WorkerApp
from recsys.config import Settings
from recsys.events import EventParser, Rejection
from recsys.kafka import DeadLetterWriter, Sink, make_producer
from recsys.rewards.join import RewardJoin, encode_reward
from recsys.rewards.rules import RewardRules

log = logging.getLogger(__name__)

WORKER = "reward"


class RewardSink(Sink):
    """The worker's :class:`~recsys.kafka.Sink`: validate, join, produce; commit safe offsets.

    The consumer handed to :meth:`on_assign` seeks a newly assigned partition to its committed
    offset, where its rebuilt state starts.
    """

    worker = WORKER

    def __init__(
        self,
        settings: Settings,
        producer: KafkaProducer,
        parser: EventParser | None = None,
    ) -> None:
        self.settings = settings.rewards
        self.source = settings.topics.events
        self.topic = settings.topics.rewards
        self.producer = producer
        self.consumer: KafkaConsumer | None = None
        self.parser = parser or EventParser(
            settings.events.max_bytes, settings.events.max_clock_skew_ms
        )
        self.rules = RewardRules.from_settings(settings.rewards)
        self.dlq = DeadLetterWriter(producer, settings.topics.dlq, WORKER)
        self.joins: dict[int, RewardJoin] = {}  # by partition of the source topic
        self._reset: set[TopicPartition] = set()
        self._lock = threading.Lock()
        self._futures: list[Any] = []
        self._late = self._dupes = 0
        self.events = 0
        self.rewards = 0

    # -- rebalance (called on the consumer's thread during poll) --------------------------------
    def on_assign(self, consumer: KafkaConsumer, partitions: list[TopicPartition]) -> None:
        self.consumer = consumer
        log.info("reward worker assigned partitions %s", sorted(p.partition for p in partitions))
        with self._lock:
            self._reset.update(partitions)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        with self._lock:
            self._reset.update(partitions)

    def _apply_resets(self, records: Sequence[ConsumerRecord]) -> Sequence[ConsumerRecord]:
        """Drop the state of reassigned partitions; make their position the committed offset."""
        with self._lock:
            parts, self._reset = self._reset, set()
        consumer = self.consumer
        if consumer is None:
            raise RuntimeError("partitions were reset before any assignment")
        assigned = consumer.assignment()
        first: dict[int, int] = {}
        for r in records:
            first.setdefault(r.partition, r.offset)
        sought: set[int] = set()
        for tp in parts:
            if tp.topic != self.source:
                continue
            self.joins.pop(tp.partition, None)
            if tp not in assigned:
                continue
            committed = consumer.committed(tp)
            if committed is None:
                committed = consumer.beginning_offsets([tp])[tp]
            if first.get(tp.partition) != committed:
                consumer.seek(tp, committed)
                sought.add(tp.partition)
            log.info("partition %d: state rebuilt from offset %d", tp.partition, committed)
        if not sought:
            return records
        return [r for r in records if r.partition not in sought]

    # -- Sink --------------------------------------------------------------------------------
    def write(self, records: Sequence[ConsumerRecord]) -> None:
        if self._reset:
            records = self._apply_resets(records)
        if not records:
            return
        parse = self.parser.parse
        send = self.producer.send
        topic = self.topic
        futures = self._futures
        joins = self.joins
        kinds: dict[str, list[float]] = {}
        cur = -1
        join: RewardJoin | None = None
        for r in records:
            if r.partition != cur:
                cur = r.partition
                join = joins.get(cur)
                if join is None:
                    join = joins[cur] = RewardJoin.from_settings(self.settings, self.rules)
            assert join is not None
            ev = parse(r.value)
            if isinstance(ev, Rejection):
                futures.append(self.on_bad_record(r, ev.reason.value, ev.detail))
                join.skip(r.offset)
                continue
            for rec in join.update(ev, r.offset):
                # Keyed by user: the producer's partitioner keeps one user's rewards in order.
                key = rec.user_id.encode("utf-8", "surrogatepass")
                futures.append(send(topic, value=encode_reward(rec), key=key))
                k = kinds.get(rec.kind)
                if k is None:
                    k = kinds[rec.kind] = [0, 0.0, 0.0]
                k[0] += 1
                if rec.reward > 0:
                    k[1] += rec.reward
                elif rec.reward < 0:
                    k[2] -= rec.reward
        self.events += len(records)
        for kind, (count, gain, loss) in kinds.items():
            self.rewards += int(count)
            metrics.REWARDS_EMITTED.labels(kind=kind).inc(count)
            metrics.REWARD_POSITIVE.labels(kind=kind).inc(gain)
            metrics.REWARD_NEGATIVE.labels(kind=kind).inc(loss)

    def flush(self) -> Mapping[TopicPartition, int] | None:
        """Wait for every record of the batch to be acked, then say what is safe to commit."""
        if self._futures:
            self.producer.flush()
            for f in self._futures:
                if f.failed():
                    raise f.exception
            self._futures.clear()
        self._update_gauges()
        safe = {}
        for p, join in self.joins.items():
            off = join.safe_offset()
            if off is not None:
                safe[TopicPartition(self.source, p)] = off
        return safe

    def close(self) -> None:
        self.producer.close()

    # -- helpers -----------------------------------------------------------------------------
    def _update_gauges(self) -> None:
        late = sum(j.late for j in self.joins.values())
        dupes = sum(j.duplicates for j in self.joins.values())
        # Joins are dropped on rebalance, so count increments from the running totals.
        if late > self._late:
            metrics.FEEDBACK_LATE.inc(late - self._late)
        if dupes > self._dupes:
            metrics.EVENTS_DUPLICATE.inc(dupes - self._dupes)
        self._late, self._dupes = late, dupes
        metrics.OPEN_WINDOWS.set(sum(j.open_windows for j in self.joins.values()))
        metrics.DEDUPE_ENTRIES.set(sum(j.dedupe_entries for j in self.joins.values()))


def build(settings: Settings) -> WorkerApp:
    """The reward worker: its own producer (linger and compression from settings)."""
    s = settings.rewards
    overrides: dict[str, Any] = {"linger_ms": s.linger_ms}
    if s.compression != "none":
        overrides["compression_type"] = s.compression
    sink = RewardSink(settings, make_producer(settings.kafka, **overrides))
    return WorkerApp(WORKER, s.group_id, [settings.topics.events], sink, max_records=s.max_batch)
