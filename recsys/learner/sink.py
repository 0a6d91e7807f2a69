"""The learner worker's sink and :func:`build`: rewards + item vectors → replay buffer →
gradient steps → checkpoints.

Kafka offsets are part of each checkpoint, and only checkpointed offsets are committed. On start
the worker restores the newest valid checkpoint; on every assignment (start-up or rebalance) a
partition is sought to the newest of its checkpointed and in-memory consumed offsets, so a crash
repeats no update and loses none, and a rebalance never rewinds past what the model has learned.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from recsys import checkpoint as ckpt
from recsys import metrics
from recsys.app import WorkerApp
from recsys.config import Settings
from recsys.drift import DriftMonitor, DriftReaction, EventClock
from recsys.encoder.catalog import ItemCatalog
from recsys.errors import RecsysError
from recsys.events import ItemVector, RewardRecord
from recsys.kafka import (
    DeadLetterWriter,
    Sink,
    close_producer,
    make_producer,
    offsets_from_json,
    offsets_to_json,
)
from recsys.learner.config import LearnerConfig, model_config
from recsys.learner.online import DRIFT_SIGNALS, OnlineConfig, OnlineLearner
from recsys.learner.trainer import Learner
from recsys.model_store import ModelStore

log = logging.getLogger(__name__)

WORKER = "learner"
ITEM_CAPACITY = "item_capacity"
"""Dead-letter reason of a record whose new item the full item tables cannot take."""

_WithItem = TypeVar("_WithItem", ItemVector, RewardRecord)


class LearnerSink(Sink):
    """Feeds the online learner; commits (and resumes from) the offsets of its checkpoints.

    A record that cannot be decoded, or that the learner rejects, is dead-lettered with its
    reason; the rest of its batch is learned.
    """

    worker = WORKER

    def __init__(
        self,
        online: OnlineLearner,
        rewards_topic: str,
        vectors_topic: str,
        resume_offsets: Mapping[TopicPartition, int],
        dlq: DeadLetterWriter | None = None,
    ) -> None:
        self.online = online
        self.rewards_topic = rewards_topic
        self.vectors_topic = vectors_topic
        self.dlq = dlq
        self.consumed: dict[TopicPartition, int] = dict(resume_offsets)
        self.checkpointed: dict[TopicPartition, int] = dict(resume_offsets)

    def write(self, records: Sequence[ConsumerRecord]) -> None:
        for r in records:
            self.consumed[TopicPartition(r.topic, r.partition)] = r.offset + 1
        vectors = self.decode(self._of(records, True), ItemVector.from_bytes)
        rewards = self.decode(self._of(records, False), RewardRecord.from_bytes)
        self.online.add_vectors([v for _, v in self._fitting(vectors)])
        self.online.train(self._add_rewards(self._fitting(rewards)))

    def _fitting(
        self, decoded: list[tuple[ConsumerRecord, _WithItem]]
    ) -> list[tuple[ConsumerRecord, _WithItem]]:
        """The records whose item fits the learner's item tables; the rest (new items beyond
        ``max_items``) are dead-lettered with reason ``item_capacity``."""
        learner = self.online.learner
        fits = learner.admit_batch([value.item_id for _, value in decoded])
        out = []
        for (record, value), ok in zip(decoded, fits, strict=True):
            if ok:
                out.append((record, value))
            else:
                self.on_bad_record(
                    record, ITEM_CAPACITY, f"new item beyond max_items={learner.cfg.max_items}"
                )
        return out

    def _of(self, records: Sequence[ConsumerRecord], vectors: bool) -> list[ConsumerRecord]:
        return [r for r in records if (r.topic == self.vectors_topic) == vectors]

    def _add_rewards(self, rewards: list[tuple[ConsumerRecord, RewardRecord]]) -> int:
        """Buffer the batch; if the learner rejects it, retry record by record so that only the
        record at fault is dead-lettered."""
        try:
            return self.online.add_rewards([rec for _, rec in rewards])
        except Exception:
            if len(rewards) == 1:
                raise
        added = 0
        for record, rec in rewards:
            try:
                added += self.online.add_rewards([rec])
            except Exception as exc:
                self.on_bad_record(record, type(exc).__name__, str(exc))
        return added

    def flush(self) -> Mapping[TopicPartition, int] | None:
        if self.online.checkpoint_due() and self.online.checkpoint(self._offsets()) is not None:
            self.checkpointed = dict(self.consumed)
        return dict(self.checkpointed)

    def on_assign(self, consumer: KafkaConsumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            offset = self.consumed.get(tp)
            if offset is not None:
                consumer.seek(tp, offset)

    def final_checkpoint(self) -> None:
        if self.consumed != self.checkpointed or self.online.checkpoint_due():
            self.online.checkpoint(self._offsets())

    def close(self) -> None:
        if self.dlq is not None:
            close_producer(self.dlq.producer)

    def _offsets(self) -> dict[str, int]:
        return offsets_to_json(self.consumed)


def new_learner(settings: Settings) -> Learner:
    """A fresh learner sized from settings (used when no checkpoint exists)."""
    s = settings.learner
    return Learner(
        model_config(s, settings.encoder.dim),
        LearnerConfig.from_settings(s),
        ItemCatalog(dim=settings.encoder.dim),
    )


def restore_from_store(store: ModelStore, checkpoint_dir: str | Path) -> list[Path]:
    """Bring the store's newest version into ``checkpoint_dir`` if the directory lacks it.

    A learner whose pod was rescheduled onto a fresh volume then resumes from the model (and the
    stream offsets in its manifest) it last published, instead of starting over while the
    committed offsets skip everything the old model had learned. With the store unreachable the
    local checkpoints are used if there are any; with none, starting would do exactly that
    harm, so start-up fails (the pod restarts and tries again).
    """
    try:
        return store.sync(checkpoint_dir)
    except Exception as exc:
        if ckpt.list_checkpoints(checkpoint_dir):
            log.warning(
                "model store %s unreachable (%s): resuming from the local checkpoints",
                store.url,
                type(exc).__name__,
            )
            return []
        raise RecsysError(
            f"model store {store.url} unreachable ({type(exc).__name__}) and "
            f"{checkpoint_dir} holds no checkpoint: not starting a fresh model"
        ) from exc


def build(settings: Settings) -> WorkerApp:
    """The learner worker, resumed from the newest valid checkpoint under its directory."""
    s = settings.learner
    # With a model store URL each checkpoint is also uploaded for the publishers.
    publish = None
    if settings.model_store.url:
        store = ModelStore.from_settings(settings)
        restore_from_store(store, s.checkpoint_dir)
        publish = store.publish
    # The reaction lasts its duration in event time (see EventClock): a backfill's detections
    # must not boost the live traffic that follows it.
    event_clock = EventClock()
    online, offsets = OnlineLearner.resume(
        s.checkpoint_dir,
        lambda: new_learner(settings),
        config=OnlineConfig.from_settings(s),
        drift=DriftMonitor.from_settings(settings.drift, DRIFT_SIGNALS),
        reaction=DriftReaction.from_settings(settings.drift, clock=event_clock),
        event_clock=event_clock,
        on_checkpoint=publish,
    )
    # The settings' bounds win over those a checkpoint was written with: lowering them is how
    # an operator fits the learner into a smaller pod.
    online.learner.set_memory_bounds(s.max_users, s.max_items)
    metrics.MODEL_VERSION.labels(worker=WORKER).set(online.version)
    topics = settings.topics
    dlq = DeadLetterWriter(make_producer(settings.kafka), topics.dlq, WORKER)
    sink = LearnerSink(online, topics.rewards, topics.item_vectors, offsets_from_json(offsets), dlq)
    return WorkerApp(
        WORKER,
        s.group_id,
        [topics.rewards, topics.item_vectors],
        sink,
        on_stop=sink.final_checkpoint,
    )
