"""Learner worker: rewards + item vectors → replay buffer → gradient steps → checkpoints.

Kafka offsets are part of each checkpoint; on start the worker restores the newest valid
checkpoint and seeks to the offsets it records, so a crash repeats no update and loses none.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from recsys import metrics
from recsys.config import Settings
from recsys.drift import DriftMonitor, DriftReaction
from recsys.encoder.catalog import ItemCatalog
from recsys.events import ItemVector, RewardRecord
from recsys.learner.config import LearnerConfig
from recsys.learner.online import OnlineConfig, OnlineLearner
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig
from workers.common import run_consumer

log = logging.getLogger(__name__)


class LearnerSink:
    """Feeds the online learner; commits (and resumes from) the offsets of its checkpoints."""

    def __init__(
        self,
        online: OnlineLearner,
        rewards_topic: str,
        vectors_topic: str,
        resume_offsets: Mapping[str, int],
    ) -> None:
        self.online = online
        self.rewards_topic = rewards_topic
        self.vectors_topic = vectors_topic
        self.resume_offsets = dict(resume_offsets)
        self.consumed: dict[str, int] = dict(resume_offsets)
        self.checkpointed: dict[str, int] = dict(resume_offsets)
        self.seek: object = None  # set to consumer.seek once the consumer exists

    def write(self, records: Sequence[ConsumerRecord]) -> None:
        rewards: list[RewardRecord] = []
        vectors: list[ItemVector] = []
        for r in records:
            self.consumed[f"{r.topic}:{r.partition}"] = r.offset + 1
            try:
                if r.topic == self.vectors_topic:
                    vectors.append(ItemVector.from_bytes(r.value))
                else:
                    rewards.append(RewardRecord.from_bytes(r.value))
            except ValueError as exc:
                # Our own workers wrote these topics: a bad record is a bug to see, not data.
                metrics.EVENTS_REJECTED.labels(reason="bad_record").inc()
                log.error(
                    "skipping undecodable record %s:%d@%d: %s", r.topic, r.partition, r.offset, exc
                )
        self.online.add_vectors(vectors)
        self.online.train(self.online.add_rewards(rewards))

    def flush(self) -> Mapping[TopicPartition, int] | None:
        if self.online.checkpoint_due() and self.online.checkpoint(self.consumed) is not None:
            self.checkpointed = dict(self.consumed)
        return {_tp(key): off for key, off in self.checkpointed.items()}

    def final_checkpoint(self) -> None:
        if self.consumed != self.checkpointed or self.online.checkpoint_due():
            self.online.checkpoint(self.consumed)

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            offset = self.resume_offsets.get(f"{tp.topic}:{tp.partition}")
            if offset is not None and callable(self.seek):
                self.seek(tp, offset)


def _tp(key: str) -> TopicPartition:
    topic, _, partition = key.rpartition(":")
    return TopicPartition(topic, int(partition))


def new_learner(settings: Settings) -> Learner:
    s = settings.learner
    model_cfg = ModelConfig(
        text_dim=settings.encoder.dim,
        dim=s.dim,
        num_layers=s.layers,
        max_history=s.max_history,
        item_capacity=s.item_capacity,
        use_id_embedding=s.id_embeddings,
    )
    learner_cfg = LearnerConfig(
        batch_size=s.batch_size,
        lr=s.lr,
        alpha=s.alpha,
        topk=s.topk,
        weight_cap=s.weight_cap,
        buffer_capacity=s.buffer_capacity,
        device=s.device,
        keep_checkpoints=s.keep_checkpoints,
    )
    return Learner(model_cfg, learner_cfg, ItemCatalog(dim=settings.encoder.dim))


def run(settings: Settings) -> int:
    s = settings.learner
    online, offsets = OnlineLearner.resume(
        s.checkpoint_dir,
        lambda: new_learner(settings),
        config=OnlineConfig(
            replay_ratio=s.replay_ratio,
            max_steps_per_batch=s.max_steps_per_batch,
            checkpoint_every_steps=s.checkpoint_every_steps,
            checkpoint_every_s=s.checkpoint_every_s,
        ),
        drift=DriftMonitor.from_settings(settings.drift, ("reward_rate", "mean_reward", "loss")),
        reaction=DriftReaction.from_settings(settings.drift),
    )
    metrics.MODEL_VERSION.labels(worker="learner").set(online.version)
    topics = settings.topics
    sink = LearnerSink(online, topics.rewards, topics.item_vectors, offsets)
    return run_consumer(
        settings,
        "learner",
        s.group_id,
        [topics.rewards, topics.item_vectors],
        sink,
        on_exit=sink.final_checkpoint,
        bind=lambda loop: setattr(sink, "seek", loop.consumer.seek),
    )
