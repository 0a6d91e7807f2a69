"""The learner worker's logic without Kafka: dedupe rewards, decide how many gradient steps new
data buys, react to drift, and checkpoint with the offsets consumed so far.

The worker feeds it decoded records and the offsets they came from; everything here can be
driven from a test with plain lists.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys import metrics
from recsys.config import LearnerSettings
from recsys.drift import POPULARITY_SIGNAL, DriftMonitor, DriftReaction, EventClock
from recsys.errors import CheckpointError
from recsys.events import ItemVector, RewardRecord
from recsys.learner.trainer import Learner
from recsys.lru import LRU

log = logging.getLogger(__name__)

DRIFT_SIGNALS = ("reward_rate", "mean_reward", "loss")
"""What the learner's drift monitor watches (with the popularity of engaged items)."""


@dataclass(frozen=True)
class OnlineConfig:
    """How the online learner spends compute and how often it checkpoints.

    ``replay_ratio``: samples drawn for training per new reward (so steps per new batch is
    ``ceil(new · replay_ratio / batch_size)``, capped by ``max_steps_per_batch``).
    """

    replay_ratio: float = 4.0
    # ceil(1000 · 4 / 128): a full poll (the worker's max_records 1000) gets its replay budget.
    # At 16 the demo's backfill trained at half the replay ratio (about 880 steps for 55,000
    # ratings where `recsys eval sim`, in 500-record chunks, took 1,770).
    max_steps_per_batch: int = 32
    checkpoint_every_steps: int = 200
    checkpoint_every_s: float = 10.0
    dedupe_capacity: int = 200_000
    dedupe_persisted: int = 20_000

    @classmethod
    def from_settings(cls, s: LearnerSettings) -> OnlineConfig:
        return cls(
            replay_ratio=s.replay_ratio,
            max_steps_per_batch=s.max_steps_per_batch,
            checkpoint_every_steps=s.checkpoint_every_steps,
            checkpoint_every_s=s.checkpoint_every_s,
        )

    def __post_init__(self) -> None:
        if not self.replay_ratio > 0:
            raise ValueError(f"replay_ratio must be > 0, got {self.replay_ratio}")
        if self.max_steps_per_batch < 1:
            raise ValueError(f"max_steps_per_batch must be >= 1, got {self.max_steps_per_batch}")
        if self.checkpoint_every_steps < 1:
            raise ValueError(
                f"checkpoint_every_steps must be >= 1, got {self.checkpoint_every_steps}"
            )
        if not self.checkpoint_every_s > 0:
            raise ValueError(f"checkpoint_every_s must be > 0, got {self.checkpoint_every_s}")
        if self.dedupe_capacity < 1:
            raise ValueError(f"dedupe_capacity must be >= 1, got {self.dedupe_capacity}")
        if not 0 <= self.dedupe_persisted <= self.dedupe_capacity:
            raise ValueError("dedupe_persisted must be in [0, dedupe_capacity]")


class RecentIds:
    """A bounded set of recently seen ids (oldest forgotten first), gauged as ``name``."""

    def __init__(self, capacity: int, name: str = "learner_reward_ids") -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._ids: LRU[str, bool] = LRU(capacity, name=name)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def add(self, key: str) -> bool:
        """Remember ``key``; False if it was already there (a duplicate)."""
        if key in self._ids:
            return False
        self._ids.put(key, True)
        return True

    def newest(self, n: int) -> list[str]:
        return self._ids.keys()[-n:] if n else []


class OnlineLearner:
    """Incremental training around a :class:`~recsys.learner.Learner`.

    Parameters
    ----------
    learner:
        The model, buffer and optimizer (fresh or restored from a checkpoint).
    checkpoint_dir:
        Where model versions are written (``v<step>`` directories).
    config:
        Step and checkpoint cadence.
    drift:
        Watches the mean reward and reward rate of shown items (organic feedback left out),
        the loss and the popularity of engaged items; a detection triggers ``reaction``.
    reaction:
        Raises the learning rate (and, through each version's metadata, the publisher's
        exploration) for a while after drift.
    event_clock:
        Advanced to each batch's newest reward time; give the same one to ``reaction`` so its
        duration counts in event time (the learner worker does).
    clock:
        Monotonic seconds; injectable for tests.
    on_checkpoint:
        Called with each checkpoint written (e.g. :meth:`recsys.model_store.ModelStore.publish`);
        an error there is logged, never fatal: the checkpoint itself stands.
    """

    def __init__(
        self,
        learner: Learner,
        checkpoint_dir: str | Path,
        config: OnlineConfig | None = None,
        drift: DriftMonitor | None = None,
        reaction: DriftReaction | None = None,
        event_clock: EventClock | None = None,
        clock: Callable[[], float] = time.monotonic,
        seen: Sequence[str] = (),
        on_checkpoint: Callable[[Path], None] | None = None,
    ) -> None:
        self.learner = learner
        self.on_checkpoint = on_checkpoint
        self.checkpoint_dir = Path(checkpoint_dir)
        self.config = config or OnlineConfig()
        self.drift = drift
        self.reaction = reaction
        self.event_clock = event_clock
        self._clock = clock
        self._seen = RecentIds(self.config.dedupe_capacity)
        for rid in seen:
            self._seen.add(rid)
        self._base_lr = [g["lr"] for g in learner.optimizer.param_groups]
        self._last_checkpoint_t = clock()
        self._last_checkpoint_step = learner.step_count
        self.duplicates = 0

    @classmethod
    def resume(
        cls,
        checkpoint_dir: str | Path,
        new_learner: Callable[[], Learner],
        **kwargs: Any,
    ) -> tuple[OnlineLearner, dict[str, int]]:
        """Restore from the newest valid checkpoint (or start fresh) -> (learner, offsets)."""
        found = Learner.load_latest_checkpoint(checkpoint_dir)
        if found is None:
            log.info("no valid checkpoint under %s: starting fresh", checkpoint_dir)
            return cls(new_learner(), checkpoint_dir, **kwargs), {}
        learner, offsets = found
        seen = _seen_from_latest(checkpoint_dir, learner.step_count)
        log.info("resumed from step %d with %d offsets", learner.step_count, len(offsets))
        return cls(learner, checkpoint_dir, seen=seen, **kwargs), offsets

    @property
    def version(self) -> int:
        return self.learner.step_count

    def add_vectors(self, vectors: Sequence[ItemVector]) -> int:
        """New or changed item text vectors from the encoder; returns how many."""
        if not vectors:
            return 0
        dim = self.learner.catalog.dim
        usable = [v for v in vectors if len(v.vector) == dim]
        if len(usable) < len(vectors):
            log.warning("ignoring %d item vectors of the wrong width", len(vectors) - len(usable))
        fits = self.learner.admit_batch([v.item_id for v in usable])
        if not all(fits):
            log.warning(
                "ignoring %d vectors of new items: item tables full (max_items=%d)",
                fits.count(False),
                self.learner.cfg.max_items,
            )
            usable = [v for v, ok in zip(usable, fits, strict=True) if ok]
        if usable:
            self.learner.catalog.put_vectors(
                [v.item_id for v in usable],
                np.asarray([v.vector for v in usable], dtype=np.float32),
                [v.key for v in usable],
            )
        return len(usable)

    def add_rewards(self, records: Sequence[RewardRecord]) -> int:
        """Buffer rewards not seen before (by reward_id); returns how many were new."""
        fresh = [r for r in records if self._seen.add(r.reward_id)]
        self.duplicates += len(records) - len(fresh)
        if fresh and self.event_clock is not None:
            self.event_clock.advance(max(r.ts for r in fresh))
        if fresh and self.drift is not None:
            # Per impression only (joined and default records): organic feedback, a backfill of
            # ratings say, has another scale, so a change in the mix would read as drift.
            rewards = [r.reward for r in fresh if r.kind != "organic"]
            if rewards:
                self._watch("mean_reward", float(np.mean(rewards)))
                self._watch("reward_rate", float(np.mean([x > 0 for x in rewards])))
            for r in fresh:  # what users engage with: the popularity-shift signal
                if r.reward > 0 and self.drift.update_item(r.item_id) and self.reaction:
                    self.reaction.trigger(POPULARITY_SIGNAL)
        return self.learner.observe(fresh)

    def train(self, new_samples: int) -> list[dict[str, float]]:
        """Take the gradient steps that ``new_samples`` new rewards pay for."""
        if new_samples <= 0:
            return []
        cfg = self.config
        want = math.ceil(new_samples * cfg.replay_ratio / self.learner.cfg.batch_size)
        factor = self.reaction.lr_factor if self.reaction is not None else 1.0
        for group, base in zip(self.learner.optimizer.param_groups, self._base_lr, strict=True):
            group["lr"] = base * factor
        out = []
        for _ in range(min(cfg.max_steps_per_batch, max(1, want))):
            result = self.learner.step()
            if result is None:
                break
            out.append(result)
        if out:
            loss = float(np.mean([r["loss"] for r in out if not r.get("skipped")] or [math.nan]))
            self._watch("loss", loss)
            metrics.MODEL_VERSION.labels(worker="learner").set(self.learner.step_count)
        return out

    def checkpoint_due(self) -> bool:
        steps = self.learner.step_count - self._last_checkpoint_step
        if steps <= 0:
            return False
        elapsed = self._clock() - self._last_checkpoint_t
        return (
            steps >= self.config.checkpoint_every_steps or elapsed >= self.config.checkpoint_every_s
        )

    def checkpoint(self, offsets: Mapping[str, int]) -> Path | None:
        """Write a model version with the offsets consumed so far; None if weights are bad.

        The version's metadata carries the drift reaction's ``exploration_factor`` (1.0 when
        no reaction is active): the publisher scales its exploration by it while serving it.
        """
        factor = self.reaction.exploration_factor if self.reaction is not None else 1.0
        try:
            path = self.learner.save_checkpoint(
                self.checkpoint_dir,
                dict(offsets),
                extra={
                    "seen_reward_ids": self._seen.newest(self.config.dedupe_persisted),
                    "exploration_factor": factor,
                },
            )
        except CheckpointError as exc:
            log.error("checkpoint not written: %s", exc)
            return None
        self._last_checkpoint_t = self._clock()
        self._last_checkpoint_step = self.learner.step_count
        log.info("checkpoint %s", path.name)
        if self.on_checkpoint is not None:
            try:
                self.on_checkpoint(path)
            except Exception:
                log.exception("checkpoint %s written but not published", path.name)
        return path

    def _watch(self, signal: str, value: float) -> None:
        if self.drift is None or signal not in self.drift.signals:
            return
        if self.drift.update(signal, value) and self.reaction is not None:
            self.reaction.trigger(signal)


def _seen_from_latest(checkpoint_dir: str | Path, step: int) -> list[str]:
    from recsys import checkpoint as ckpt

    found = ckpt.find_latest(checkpoint_dir)
    if found is None or int(found[1].get("step", -1)) != step:
        return []
    return [str(x) for x in found[1].get("extra", {}).get("seen_reward_ids", [])]
