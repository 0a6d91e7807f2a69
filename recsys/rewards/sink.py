"""The reward worker's sink: validate, dedupe and join events, produce rewards, commit safely.

Per batch: parse each message (rejects go to the DLQ with their reason and are counted), feed
the event to its partition's :class:`~recsys.rewards.RewardJoin` (dedupe by ``event_id``,
attribution window), produce the records it makes final and the join's state changes (to the
compacted state topic, :mod:`recsys.rewards.state`). Event-time checks read the record's
Kafka timestamp, never the wall clock: the future-timestamp check and the join's clock cap give
the same answer on every read. The flush then waits in two steps: first
for every reward, dead letter and state delta of the batch, then for each partition's clock
record, which says "the state is complete up to this offset". Only then is the consumer position
committed, so the committed offset follows the position (one batch behind at most).

On assignment a partition's state is restored from its changelog partition (read to its end)
and the consumer resumes at the offset of its clock record, which is the committed offset, or
one batch past it when a crash came between the clock record and the commit. A crash thus
re-reads at most the batch in flight, and re-emits only its records, with the same ids and
contents (the learner dedupes by ``reward_id``). A partition without a clock record (a new
group, or state written by an older version) starts at its committed offset with empty state.

:func:`build` is the worker: ``workers/reward.py`` runs it with :func:`recsys.app.run_consumer`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition

from recsys import metrics
from recsys.app import WorkerApp
from recsys.config import Settings
from recsys.events import EventParser, Rejection
from recsys.kafka import DeadLetterWriter, Sink, close_producer, make_producer, replace_producer
from recsys.rewards.join import RewardJoin, encode_reward
from recsys.rewards.rules import RewardRules
from recsys.rewards.state import ChangelogReader, PartitionLog, Record, fold, key_prefix

log = logging.getLogger(__name__)

WORKER = "reward"
DAY_MS = 24 * 3600 * 1000
#: Longest wait for a batch's sends before the producer is taken for wedged. Short enough that
#: a wedged worker still stops within a pod's grace period (30 s); a broker outage longer than
#: it only costs a new producer per try.
FLUSH_TIMEOUT_S = 20.0


class RewardSink(Sink):
    """The worker's :class:`~recsys.kafka.Sink`: validate, join, produce; state with offsets.

    The consumer handed to :meth:`on_assign` is sought, for each newly assigned partition, to
    where its restored state ends.
    """

    worker = WORKER

    def __init__(
        self,
        settings: Settings,
        producer: KafkaProducer,
        parser: EventParser | None = None,
        reader: ChangelogReader | None = None,
        new_producer: Callable[[], KafkaProducer] | None = None,
        flush_timeout_s: float = FLUSH_TIMEOUT_S,
    ) -> None:
        self.settings = settings.rewards
        self.kafka = settings.kafka
        self.group = settings.rewards.group_id
        self.source = settings.topics.events
        self.topic = settings.topics.rewards
        self.state_topic = settings.topics.reward_state
        self.reader = reader or ChangelogReader(
            settings.kafka, self.state_topic, settings.topics.replication_factor
        )
        self.producer = producer
        self._new_producer = new_producer
        self.flush_timeout_s = flush_timeout_s
        self.producers_replaced = 0
        self.consumer: KafkaConsumer | None = None
        # "Now" for the future-timestamp check is the record's own Kafka timestamp, so every
        # read of a record (a restart's re-read included) gives the same verdict.
        self._record_ms = 0
        self.parser = parser or EventParser.from_settings(
            settings.events, clock_ms=lambda: self._record_ms
        )
        self.rules = RewardRules.from_settings(settings.rewards)
        self.dlq = DeadLetterWriter(producer, settings.topics.dlq, WORKER)
        self.joins: dict[int, RewardJoin] = {}  # by partition of the source topic
        self.logs: dict[int, PartitionLog] = {}  # their changelog bookkeeping
        self._changed: set[TopicPartition] = set()  # assigned or revoked since the last batch
        self._lock = threading.Lock()
        self._futures: list[Any] = []
        self._clock_records: dict[int, tuple[Record, int, int | None]] = {}
        self._counted: dict[int, tuple[int, int, int]] = {}  # (late, dupes, late impressions)
        self._topic_checked = False
        self.events = 0
        self.rewards = 0
        self.state_records = 0  # changelog records produced (deltas, clocks, tombstones)
        self.restores: list[dict[str, Any]] = []  # one per restored partition (for reports)

    # -- rebalance (called on the consumer's thread during poll) --------------------------------
    def on_assign(self, consumer: KafkaConsumer, partitions: list[TopicPartition]) -> None:
        self.consumer = consumer
        log.info("reward worker assigned partitions %s", sorted(p.partition for p in partitions))
        with self._lock:
            self._changed.update(partitions)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        log.info("reward worker revoked partitions %s", sorted(p.partition for p in partitions))
        with self._lock:
            self._changed.update(partitions)

    def _apply_assignment(self, records: Sequence[ConsumerRecord]) -> Sequence[ConsumerRecord]:
        """Drop the state of partitions no longer assigned; restore the newly assigned ones
        and seek them to where their state ends (dropping their records of this batch when the
        fetch started elsewhere)."""
        with self._lock:
            changed, self._changed = self._changed, set()
        consumer = self.consumer
        if consumer is None:
            raise RuntimeError("partitions were assigned before any on_assign")
        assigned = {tp for tp in consumer.assignment() if tp.topic == self.source}
        for tp in changed:
            if tp.topic == self.source and tp not in assigned:
                self._drop(tp.partition)
        todo = {tp for tp in changed if tp in assigned}
        todo.update(TopicPartition(self.source, r.partition) for r in records)
        todo = {tp for tp in todo if tp in changed or tp.partition not in self.joins}
        if not todo:
            return records
        if not self._topic_checked:
            self._check_state_topic(consumer)
        first: dict[int, int] = {}
        for r in records:
            first.setdefault(r.partition, r.offset)
        committed = {tp: consumer.committed(tp) for tp in todo}
        keep = {tp for tp in todo if self._can_keep(tp, committed[tp])}
        # One read of all the changelog partitions to restore: they drain together.
        raws = self.reader.read(sorted(tp.partition for tp in todo - keep))
        sought: set[int] = set()
        for tp in sorted(todo):
            if tp in keep:
                start = self.logs[tp.partition].upto
                assert start is not None
            else:
                start = self._restore(consumer, tp, committed[tp], raws[tp.partition])
            if first.get(tp.partition) != start:
                consumer.seek(tp, start)
                sought.add(tp.partition)
        if not sought:
            return records
        return [r for r in records if r.partition not in sought]

    def _can_keep(self, tp: TopicPartition, committed: int | None) -> bool:
        """A partition that stayed here keeps its in-memory state when nothing of it is
        undurable and nobody else committed since; otherwise it is restored."""
        join, plog = self.joins.get(tp.partition), self.logs.get(tp.partition)
        return (
            join is not None
            and plog is not None
            and plog.upto is not None
            and join.next_offset == plog.upto == committed
        )

    def _restore(
        self,
        consumer: KafkaConsumer,
        tp: TopicPartition,
        committed: int | None,
        raw: list[tuple[bytes | None, bytes | None]],
    ) -> int:
        """Rebuild a partition's join from its changelog records; returns where to resume."""
        self._drop(tp.partition)
        started = time.monotonic()
        # Restoring allocates a few objects per entry, hundreds of thousands in all: the
        # cyclic GC would re-scan the growing heap again and again (4x the time), and these
        # objects hold no cycles to collect.
        gc_on = gc.isenabled()
        gc.disable()
        try:
            entries, plog = fold(raw, key_prefix(self.group, self.source, tp.partition))
            join = RewardJoin.from_settings(self.settings, self.rules, track_changes=True)
            join.restore(entries)
        finally:
            if gc_on:
                gc.enable()
        self.joins[tp.partition], self.logs[tp.partition] = join, plog
        if plog.upto is not None:
            start = plog.upto
        elif committed is not None:
            start = committed  # no state recorded: what was committed is where it starts
        else:
            start = consumer.beginning_offsets([tp])[tp]
        seconds = time.monotonic() - started
        self.restores.append(
            {
                "partition": tp.partition,
                "changelog_records": len(raw),
                "entries": len(entries),
                "committed": committed,
                "resume": start,
                "seconds": round(seconds, 3),
            }
        )
        log.info(
            "partition %d: state restored from %d changelog records (%d entries, %.2fs); "
            "resuming at offset %d (committed %s)",
            tp.partition,
            len(raw),
            len(entries),
            seconds,
            start,
            committed,
        )
        return start

    def _check_state_topic(self, consumer: KafkaConsumer) -> None:
        """The state topic must exist with a partition per events partition (created here,
        compacted, when it does not exist yet)."""
        n = len(consumer.partitions_for_topic(self.source) or ())
        if self.reader.ensure(n):
            log.info("created state topic %s with %d partitions", self.state_topic, n)
        self._topic_checked = True

    def _drop(self, partition: int) -> None:
        self.joins.pop(partition, None)
        self.logs.pop(partition, None)
        self._counted.pop(partition, None)
        self._clock_records.pop(partition, None)

    # -- Sink --------------------------------------------------------------------------------
    def write(self, records: Sequence[ConsumerRecord]) -> None:
        if self._changed or not {r.partition for r in records} <= self.joins.keys():
            records = self._apply_assignment(records)
        if not records:
            return
        parse = self.parser.parse
        send = self.producer.send
        topic = self.topic
        futures = self._futures
        joins = self.joins
        kinds: dict[str, list[float]] = {}
        starts: dict[int, int] = {}  # first offset of each partition in this batch
        cur = -1
        join: RewardJoin | None = None
        wall_ms = int(time.time() * 1000)  # for records without a timestamp
        for r in records:
            if r.partition != cur:
                cur = r.partition
                join = joins.get(cur)
                if join is None:
                    raise RuntimeError(f"partition {cur} has records but no restored state")
                starts.setdefault(cur, r.offset)
            assert join is not None
            rts = getattr(r, "timestamp", None)
            cap = rts if rts is not None and rts >= 0 else None
            self._record_ms = wall_ms if cap is None else cap
            ev = parse(r.value)
            if isinstance(ev, Rejection):
                futures.append(self.on_bad_record(r, ev.reason.value, ev.detail))
                join.skip(r.offset)
                continue
            for rec in join.update(ev, r.offset, cap):
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
        for p, start in starts.items():
            deltas, clock, upto = self.logs[p].batch(joins[p].changes(), start)
            for d in deltas:
                futures.append(send(self.state_topic, key=d.key, value=d.value, partition=p))
            self.state_records += len(deltas)
            if clock is not None and upto is not None:
                self._clock_records[p] = (clock, upto, joins[p].clock)
        self.events += len(records)
        for kind, (count, gain, loss) in kinds.items():
            self.rewards += int(count)
            metrics.REWARDS_EMITTED.labels(kind=kind).inc(count)
            metrics.REWARD_POSITIVE.labels(kind=kind).inc(gain)
            metrics.REWARD_NEGATIVE.labels(kind=kind).inc(loss)

    def flush(self) -> Mapping[TopicPartition, int] | None:
        """Wait for the batch's rewards and state, then its clock records; say what to commit.

        The clock records go last: one that reached the broker vouches for everything before
        it (a restore trusts it), so it must never land while a reward of its batch could
        still fail.
        """
        try:
            self._wait()
            if self._clock_records:
                send = self.producer.send
                for p, (rec, _, _) in self._clock_records.items():
                    self._futures.append(
                        send(self.state_topic, key=rec.key, value=rec.value, partition=p)
                    )
                self._wait()
        except Exception:
            # The batch failed: none of its clock records may be sent later, and the in-memory
            # state of its partitions is ahead of the durable one, so each is restored (and
            # sought back) before the next batch, whatever the caller does next.
            self._clock_records.clear()
            with self._lock:
                self._changed.update(TopicPartition(self.source, p) for p in self.joins)
            raise
        if self._clock_records:
            send = self.producer.send
            for p, (_, upto, clock) in self._clock_records.items():
                # Tombstones of what is dead as of this durable clock; acked with the next batch.
                for t in self.logs[p].durable(upto, clock):
                    self._futures.append(send(self.state_topic, key=t.key, value=None, partition=p))
                    self.state_records += 1
            self.state_records += len(self._clock_records)
            self._clock_records.clear()
        self._update_gauges()
        return {
            TopicPartition(self.source, p): plog.upto
            for p, plog in self.logs.items()
            if plog.upto is not None
        }

    def _wait(self) -> None:
        if self._futures:
            try:
                self.producer.flush(timeout=self.flush_timeout_s)
            except KafkaTimeoutError:
                self._futures = []
                self._replace_producer()
                raise  # the batch failed: its partitions are restored and re-read
            # Taken before raising: a failed send (e.g. expired in a broker outage) fails this
            # batch once; the loop then hands the partitions back and they are restored.
            futures, self._futures = self._futures, []
            for f in futures:
                if f is not None and f.failed():
                    raise f.exception

    def _replace_producer(self) -> None:
        """A flush that did not finish in ``flush_timeout_s``: see :func:`replace_producer`."""
        if self._new_producer is None:
            return
        self.producer = replace_producer(self.producer, self._new_producer, WORKER, self.dlq)
        self.producers_replaced += 1

    def close(self) -> None:
        self.reader.close()
        close_producer(self.producer)

    # -- helpers -----------------------------------------------------------------------------
    def _update_gauges(self) -> None:
        late = dupes = late_impressions = 0
        for p, j in self.joins.items():
            seen_late, seen_dupes, seen_impressions = self._counted.get(p, (0, 0, 0))
            late += j.late - seen_late
            dupes += j.duplicates - seen_dupes
            late_impressions += j.late_impressions - seen_impressions
            self._counted[p] = (j.late, j.duplicates, j.late_impressions)
        if late > 0:
            metrics.FEEDBACK_LATE.inc(late)
        if dupes > 0:
            metrics.EVENTS_DUPLICATE.inc(dupes)
        if late_impressions > 0:
            metrics.IMPRESSIONS_LATE.inc(late_impressions)
        metrics.OPEN_WINDOWS.set(sum(j.open_windows for j in self.joins.values()))
        metrics.DEDUPE_ENTRIES.set(sum(j.dedupe_entries for j in self.joins.values()))


def build(settings: Settings) -> WorkerApp:
    """The reward worker: its own producer (linger and compression from settings).

    Its sends never expire (a day's delivery timeout): once kafka-python 3's idempotent
    producer expires a batch it had already sent, it resets its producer id and then neither
    sends nor expires anything again (seen in a 5-minute outage, recsys/testing/outage.py).
    The batch instead fails when its flush takes longer than :data:`FLUSH_TIMEOUT_S`: the
    producer is replaced and the partitions are restored and re-read.
    """
    s = settings.rewards
    overrides: dict[str, Any] = {"linger_ms": s.linger_ms, "delivery_timeout_ms": DAY_MS}
    if s.compression != "none":
        overrides["compression_type"] = s.compression
    sink = RewardSink(
        settings,
        make_producer(settings.kafka, **overrides),
        new_producer=lambda: make_producer(settings.kafka, **overrides),
    )
    return WorkerApp(WORKER, s.group_id, [settings.topics.events], sink, max_records=s.max_batch)
