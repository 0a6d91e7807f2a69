"""Stream a data set's events to Kafka: `recsys replay {movielens,obd}`.

Events go to the events topic keyed by ``user_id`` (one user's events stay in one partition,
in order); catalogue records go to the items topic keyed by ``item_id``. Messages are the
contract's JSON (:meth:`Event.to_bytes`). The producer batches (``linger_ms``) and is flushed
once at the end, never per message; send failures are counted and raised after the flush.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recsys.config import KafkaSettings, Settings
from recsys.data.load_report import SkippedRow
from recsys.errors import RecsysError
from recsys.events import Event, ItemRecord

logger = logging.getLogger(__name__)

Dataset = Literal["movielens", "obd"]
DATASETS: tuple[Dataset, ...] = ("movielens", "obd")

# Producer batching for bulk replay: bigger batches than a latency-sensitive worker would use.
REPLAY_PRODUCER_OVERRIDES: dict[str, Any] = {"linger_ms": 20, "batch_size": 512 * 1024}


class ReplayError(RecsysError):
    """Some messages could not be delivered to Kafka."""


@dataclass
class ReplaySummary:
    """What one replay did."""

    events_sent: int = 0
    items_sent: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.events_sent / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "events_sent": self.events_sent,
            "items_sent": self.items_sent,
            "rows_skipped": len(self.skipped),
            "skipped": [str(s) for s in self.skipped],
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.events_per_s, 1),
        }

    def render(self, max_skipped: int = 20) -> str:
        lines = [
            f"events sent   {self.events_sent}",
            f"items sent    {self.items_sent}",
            f"rows skipped  {len(self.skipped)}",
            f"seconds       {self.seconds:.2f}",
            f"events/s      {self.events_per_s:,.0f}",
        ]
        lines += [f"  skipped {s}" for s in self.skipped[:max_skipped]]
        if len(self.skipped) > max_skipped:
            lines.append(f"  ... and {len(self.skipped) - max_skipped} more")
        return "\n".join(lines)


class _Progress:
    """tqdm when installed, else a plain stderr line every few seconds."""

    def __init__(self, enabled: bool, total: int | None, desc: str) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._count = 0
        self._last = time.monotonic()
        self._desc = desc
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=desc, unit="ev", unit_scale=True, mininterval=0.5)

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        self._count += n
        now = time.monotonic()
        if now - self._last >= 2.0:
            self._last = now
            print(f"{self._desc}: {self._count} events", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Failures:
    """Counts failed sends from producer callbacks (they run on the sender thread)."""

    def __init__(self) -> None:
        self.count = 0
        self.first: BaseException | None = None

    def __call__(self, exc: BaseException) -> None:
        self.count += 1
        if self.first is None:
            self.first = exc


def replay(
    events: Iterable[Event],
    producer: Any,
    topic: str,
    max_rate: float | None = None,
    limit: int | None = None,
    progress: bool = True,
    total: int | None = None,
    flush: bool = True,
) -> ReplaySummary:
    """Send ``events`` to ``topic`` keyed by user_id; returns counts and rate.

    ``max_rate`` caps events per second (None: as fast as the producer goes); ``limit`` stops
    after that many events; ``total`` sizes the progress bar. Raises ReplayError after the
    final flush if any send failed.
    """
    if max_rate is not None and max_rate <= 0:
        raise ValueError(f"max_rate must be > 0, got {max_rate}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit is not None:
        total = limit if total is None else min(total, limit)
    failures = _Failures()
    bar = _Progress(progress, total, f"replay → {topic}")
    # Pacing is checked every `check` events so the clock is not read per message.
    check = 1 if max_rate is None else max(1, min(1000, int(max_rate // 50)))
    send = producer.send
    sent = 0
    pending = 0
    start = time.perf_counter()
    try:
        for event in events:
            if limit is not None and sent >= limit:
                break
            future = send(topic, key=event.user_id.encode(), value=event.to_bytes())
            future.add_errback(failures)
            sent += 1
            pending += 1
            if pending >= 1000:
                bar.update(pending)
                pending = 0
            if max_rate is not None and sent % check == 0:
                ahead = start + sent / max_rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
        if flush:
            producer.flush()
    finally:
        bar.update(pending)
        bar.close()
    seconds = time.perf_counter() - start
    if failures.count:
        raise ReplayError(
            f"{failures.count} of {sent} events to {topic} were not delivered: {failures.first!r}"
        )
    return ReplaySummary(events_sent=sent, seconds=seconds)


def replay_items(items: Iterable[ItemRecord], producer: Any, topic: str) -> int:
    """Send catalogue records to ``topic`` keyed by item_id and flush; returns the count."""
    failures = _Failures()
    n = 0
    for item in items:
        producer.send(topic, key=item.item_id.encode(), value=item.to_bytes()).add_errback(failures)
        n += 1
    producer.flush()
    if failures.count:
        raise ReplayError(f"{failures.count} of {n} items to {topic} were not delivered")
    return n


def read_topic(
    kafka: KafkaSettings, topic: str, timeout_s: float = 60.0, idle_s: float = 2.0
) -> list[tuple[int, bytes | None, bytes | None]]:
    """Every (partition, key, value) now in ``topic``, read from the beginning to the end.

    No consumer group (partitions are assigned by hand), so nothing is committed and no group
    join is waited for; used to check a replay and by tests. The end is the high watermark the
    fetch responses report: the embedded Tansu 0.6 broker answers ListOffsets(latest) with the
    last batch's base offset + 1, short of the true end, so ``end_offsets`` is only a fallback
    (after ``idle_s`` without records) for partitions never fetched.
    """
    from kafka.structs import TopicPartition

    from recsys.kafka import make_consumer

    consumer = make_consumer(kafka, None, max_poll_records=5000)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        parts = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        out: list[tuple[int, bytes | None, bytes | None]] = []
        start = last_data = time.monotonic()
        while True:
            polled = consumer.poll(timeout_ms=200)
            for tp, records in polled.items():
                out.extend((tp.partition, r.key, r.value) for r in records)
                last_data = time.monotonic()
            if polled:  # the position counts records fetched: some may still wait to be returned
                continue
            watermarks = [consumer.highwater(tp) for tp in parts]
            if all(
                hw is not None and consumer.position(tp) >= hw
                for tp, hw in zip(parts, watermarks, strict=True)
            ):
                return out
            now = time.monotonic()
            if now - last_data > idle_s:
                end = consumer.end_offsets(parts)
                if all(consumer.position(tp) >= end[tp] for tp in parts):
                    return out
            if now - start > timeout_s:
                raise ReplayError(f"reading {topic} back timed out after {timeout_s}s")
    finally:
        consumer.close()


def load_dataset(
    dataset: Dataset, path: str | Path
) -> tuple[Iterable[Event], Sequence[ItemRecord], int, list[SkippedRow]]:
    """(events, catalogue records, number of events, skipped rows) of one data set."""
    if dataset == "movielens":
        from recsys.data.movielens import load_movielens

        ml = load_movielens(path)
        return ml.events(), ml.movies, len(ml), list(ml.report.skipped)
    if dataset == "obd":
        from recsys.data.obd import load_obd, obd_items

        log = load_obd(path)
        n_events = log.n_rounds + int((log.reward > 0).sum())
        return log.events(), obd_items(log), n_events, list(log.report.skipped)
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def run_replay(
    dataset: Dataset,
    path: str | Path,
    settings: Settings,
    max_rate: float | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> ReplaySummary:
    """Load a data set and replay it: catalogue to the items topic, then events in time order.

    Creates the events and items topics (with ``settings.topics.partitions``) if missing.
    """
    from recsys.kafka import create_topics, make_producer

    events, items, n_events, skipped = load_dataset(dataset, path)
    topics = settings.topics
    create_topics(
        settings.kafka, [topics.events, topics.items], topics.partitions, topics.replication_factor
    )
    producer = make_producer(settings.kafka, **REPLAY_PRODUCER_OVERRIDES)
    try:
        start = time.perf_counter()
        n_items = replay_items(items, producer, topics.items)
        summary = replay(
            events,
            producer,
            topics.events,
            max_rate=max_rate,
            limit=limit,
            progress=progress,
            total=n_events,
        )
        summary.items_sent = n_items
        summary.skipped = skipped
        logger.info(
            "replayed %s from %s: %d events, %d items in %.1fs",
            dataset,
            path,
            summary.events_sent,
            n_items,
            time.perf_counter() - start,
        )
        return summary
    finally:
        producer.close()
