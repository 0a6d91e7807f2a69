"""The publisher: user histories from events, a hot-swapped policy, fresh slates in micro-batches.

Pure logic, testable without Kafka; ``workers/publisher.py`` wires it to a consumer, a producer
and the SQL store.

- **Histories** use the one definition in :mod:`recsys.history` (positive-reward items in
  event-time order, last N); an event's reward comes from the reward rules of
  :mod:`recsys.rewards.rules`, the same the reward worker applies. Events are deduplicated by
  ``event_id`` per user, so re-reading the topic after a crash changes nothing.
- **Models** come from checkpoints the learner writes (``<dir>/v<step:012d>/``), loaded with
  :func:`recsys.learner.load_policy`. :class:`ModelWatcher` loads a new version in a background
  thread and swaps one reference: batches in flight finish on the old version, every batch that
  starts later uses the new one, and there is never a moment without a model.
- **Batches**: users whose history changed are recomputed at most ``batch_interval_s`` after
  their first change; a new version recomputes every known user, ``refresh_batch_users`` at a
  time. Users without usable history get the cold-start policy: Boltzmann over log popularity
  (positive feedback counts), i.e. popular items plus exploration, with exact propensities.
- :class:`PublisherSink` is the :class:`~recsys.kafka.Sink`: each batch is produced to the
  recommendations topic (keyed by user, a fresh ``request_id`` per slate) and acknowledged, then
  upserted into the store in one transaction, and only then are the offsets committed.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from recsys.config import Settings
from recsys.events import Event, Slate, SlateItem
from recsys.history import (
    WATCHED_EVENT_TYPES,
    UserHistories,
    WatchedItems,
    impression_key,
    pad_histories,
)
from recsys.policy import Policy, Ranking
from recsys.rewards.rules import RewardRules
from recsys.serving.model import ServingModel
from recsys.store import HistoryEntry, SlateWrite

log = logging.getLogger(__name__)

NO_MODEL_VERSION = "cold-start"
"""``model_version`` of slates published before any model version exists."""
WORKER = "publisher"

# --- the publisher ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublisherConfig:
    """Publisher hyper-parameters; validated at construction, errors name the parameter."""

    k: int = 10
    history_len: int = 50
    exploration: Literal["boltzmann", "epsilon", "greedy"] = "boltzmann"
    temperature: float = 1.0
    epsilon: float = 0.1
    cold_start_temperature: float = 1.0
    batch_interval_s: float = 0.2
    refresh_batch_users: int = 2048
    chunk_size: int | None = None  # None: the Policy's default for the device
    device: str | None = None
    seed: int | None = None
    refresh_on_impression: bool = True
    watched_len: int = 2000  # most recent watched items per user that are never shown again

    def __post_init__(self) -> None:
        for name in ("k", "history_len", "refresh_batch_users", "chunk_size", "watched_len"):
            v = getattr(self, name)
            if v is None and name == "chunk_size":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("temperature", "cold_start_temperature"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (isinstance(self.batch_interval_s, int | float) and self.batch_interval_s >= 0):
            raise ValueError(f"batch_interval_s must be >= 0, got {self.batch_interval_s!r}")
        if self.exploration not in ("boltzmann", "epsilon", "greedy"):
            raise ValueError(
                f"exploration must be boltzmann, epsilon or greedy, got {self.exploration!r}"
            )
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> PublisherConfig:
        """The publisher worker's configuration (``RECSYS_PUBLISHER__*``; history length
        defaults to the learner's)."""
        ps = settings.publisher
        return cls(
            k=ps.k,
            history_len=ps.history_len or settings.learner.max_history,
            exploration=ps.exploration,
            temperature=ps.temperature,
            epsilon=ps.epsilon,
            cold_start_temperature=ps.cold_start_temperature,
            batch_interval_s=ps.batch_interval_ms / 1000.0,
            refresh_batch_users=ps.refresh_batch_users,
            chunk_size=ps.chunk_size,
            device=None if ps.device == "auto" else ps.device,
            seed=ps.seed,
            refresh_on_impression=ps.refresh_on_impression,
        )

    def policy_kwargs(self) -> dict[str, Any]:
        """Arguments for a model's :class:`~recsys.policy.Policy`."""
        return {
            "exploration": self.exploration,
            "temperature": self.temperature,
            "epsilon": self.epsilon,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "device": self.device,
        }


@dataclass
class Batch:
    """Slates computed in one go, with the state that must be stored with them."""

    version: str
    model: ServingModel | None
    slates: list[SlateWrite]
    trigger_ts: dict[str, int]  # user -> event time of the oldest event the slate reflects
    histories: dict[str, list[HistoryEntry]]
    popularity: dict[str, int]
    cold_start: Slate | None
    users: list[str] = field(default_factory=list)


class Publisher:
    """Histories, dirty users and slate computation; no I/O.

    ``model()`` returns the current :class:`ServingModel` (or None before the first version),
    typically ``lambda: watcher.current``; it is read once per batch, so a batch never mixes
    versions.
    """

    def __init__(
        self,
        cfg: PublisherConfig,
        model: Callable[[], ServingModel | None],
        rules: RewardRules | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self._model = model
        self.rules = rules or RewardRules()
        self._clock = clock
        self._mono = time.monotonic
        self.histories = UserHistories(cfg.history_len)
        self.watched = WatchedItems(cfg.watched_len)  # the items never shown to the user again
        self._entries: dict[str, list[HistoryEntry]] = {}  # persisted twin of histories
        self._event_ids: dict[str, set[str]] = {}
        self._ratings: dict[str, tuple[int, float]] = {}  # user-centred rating rule
        self.item_ids: list[str] = []
        self._item_index: dict[str, int] = {}
        self._popularity: list[int] = []
        self.known: set[str] = set()
        self._dirty: dict[str, int] = {}  # user -> oldest unpublished event ts
        self._dirty_since: float | None = None
        self._hist_changed: set[str] = set()
        self._pop_delta: Counter[str] = Counter()
        self._refresh: deque[str] = deque()
        self._serving: str | None = None  # version the last batch was computed with
        self._restored = False
        self._lookup: tuple[str, np.ndarray] | None = None
        self._cold_dirty = True
        self._generator = torch.Generator()
        if cfg.seed is not None:
            self._generator.manual_seed(cfg.seed + 1)

    # -- state in ----------------------------------------------------------------------------

    def _intern(self, item_id: str) -> int:
        i = self._item_index.get(item_id)
        if i is None:
            i = len(self.item_ids)
            self.item_ids.append(item_id)
            self._item_index[item_id] = i
            self._popularity.append(0)
        return i

    def restore(
        self,
        histories: Iterable[tuple[str, Sequence[HistoryEntry]]],
        popularity: Mapping[str, int],
        known_users: Iterable[str],
    ) -> None:
        """Resume from what the store holds (before any event is observed)."""
        for user, entries in histories:
            for ts, item_id, event_id in sorted(entries, key=lambda e: e[0]):
                self._add_positive(user, ts, item_id, event_id)
                self.watched.add(user, self._intern(item_id))
        self._hist_changed.clear()
        for item_id, n in popularity.items():
            self._popularity[self._intern(item_id)] = int(n)
        self.known.update(known_users)
        self.known.update(u for u in self._entries)
        self._restored = bool(self.known)

    def _add_positive(
        self, user: str, ts: int, item_id: str, event_id: str, request_id: str | None = None
    ) -> bool:
        ids = self._event_ids.setdefault(user, set())
        if event_id in ids:
            return False  # re-read after a restart: already in the history
        key = impression_key(request_id, item_id)  # click + dwell + purchase: one entry
        if not self.histories.add(user, self._intern(item_id), ts, 1.0, key):
            return False
        entries = self._entries.setdefault(user, [])
        bisect.insort(entries, (ts, item_id, event_id), key=lambda e: e[0])
        ids.add(event_id)
        if len(entries) > self.histories.retain:
            for _, _, old in entries[: len(entries) - self.histories.retain]:
                ids.discard(old)
            del entries[: len(entries) - self.histories.retain]
        self._hist_changed.add(user)
        return True

    def reward(self, e: Event) -> float:
        """The reward rules' value of one feedback event (0 for impressions)."""
        if e.type == "impression":
            return 0.0
        centre = None
        if e.type == "rating" and self.rules.rating_centre == "user":
            n, total = self._ratings.get(e.user_id, (0, 0.0))
            centre = self.rules.user_centre(n, total)
            if e.value is not None:
                self._ratings[e.user_id] = (n + 1, total + e.value)
        return self.rules.value(e.type, e.value, centre)

    def observe(self, events: Iterable[Event]) -> int:
        """Update histories from events; returns how many users became due for a new slate."""
        before = len(self._dirty)
        for e in events:
            self._intern(e.item_id)
            first_sight = e.user_id not in self.known
            self.known.add(e.user_id)
            changed = False
            r = self.reward(e)
            if e.type in WATCHED_EVENT_TYPES and self.watched.add(
                e.user_id, self._item_index[e.item_id]
            ):
                changed = True  # a watched item leaves the user's allowed set
            if r > 0 and self._add_positive(e.user_id, e.ts, e.item_id, e.event_id, e.request_id):
                self._popularity[self._item_index[e.item_id]] += 1
                self._pop_delta[e.item_id] += 1
                self._cold_dirty = True
                changed = True
            # A shown slate is spent: the user's next visit gets a fresh sample from the policy
            # (exploration, and no repeating a slate the user just passed over).
            shown = e.type == "impression" and self.cfg.refresh_on_impression
            if changed or first_sight or shown:
                old = self._dirty.get(e.user_id)
                self._dirty[e.user_id] = e.ts if old is None else min(old, e.ts)
                if self._dirty_since is None:
                    self._dirty_since = self._mono()
        return len(self._dirty) - before

    # -- batches -----------------------------------------------------------------------------

    @property
    def refreshing(self) -> bool:
        """True while a full refresh for a new version still has users to go."""
        return bool(self._refresh)

    @property
    def pending(self) -> bool:
        """True while some observed event is not yet reflected in a published slate."""
        return bool(self._dirty)

    def due(self) -> bool:
        """Whether :meth:`compute` has work now (micro-batch elapsed, refresh, or new version)."""
        model = self._model()
        version = model.version if model is not None else NO_MODEL_VERSION
        if version != self._serving and (self._serving is not None or self._restored):
            return True
        if self._refresh:
            return True
        if not self._dirty:
            return False
        waited = self._mono() - (self._dirty_since or self._mono())
        return (
            waited >= self.cfg.batch_interval_s or len(self._dirty) >= self.cfg.refresh_batch_users
        )

    def compute(self) -> Batch | None:
        """Slates for every dirty user plus the next chunk of a pending full refresh."""
        model = self._model()  # read once: the whole batch uses one version
        version = model.version if model is not None else NO_MODEL_VERSION
        if version != self._serving:
            # A new version (or the first one after a restart) refreshes every known user; the
            # very first batch of a fresh publisher only has dirty users, who are covered anyway.
            if self._serving is not None or self._restored:
                log.info("version %s: refreshing %d known users", version, len(self.known))
                self._refresh = deque(self.known)
            self._serving = version
            self._restored = False
            self._cold_dirty = True
        users = list(self._dirty)
        taken = set(users)
        while self._refresh and len(users) - len(self._dirty) < self.cfg.refresh_batch_users:
            u = self._refresh.popleft()
            if u not in taken:
                users.append(u)
                taken.add(u)
        if not users and not self._cold_dirty:
            return None
        now_ms = int(self._clock() * 1000)
        slates = [
            dataclasses.replace(w, event_ts=self._dirty.get(w.slate.user_id))
            for w in self._rank_users(users, model, version, now_ms)
        ]
        cold = self._cold_start_slate(model, version, now_ms) if self._cold_dirty else None
        return Batch(
            version=version,
            model=model,
            slates=slates,
            trigger_ts={u: self._dirty[u] for u in users if u in self._dirty},
            histories={u: list(self._entries.get(u, [])) for u in self._hist_changed},
            popularity=dict(self._pop_delta),
            cold_start=cold,
            users=users,
        )

    def committed(self, batch: Batch) -> None:
        """The batch is durable (published and stored): forget what it covered."""
        for u in batch.users:
            self._dirty.pop(u, None)
        for u in batch.histories:
            self._hist_changed.discard(u)
        self._pop_delta.subtract(batch.popularity)
        self._pop_delta = +self._pop_delta  # drop zero counts
        if batch.cold_start is not None:
            self._cold_dirty = False
        self._dirty_since = self._mono() if self._dirty else None

    # -- ranking -----------------------------------------------------------------------------

    def _model_lookup(self, model: ServingModel) -> np.ndarray:
        """Publisher item index -> model item index (-1: unknown to this version)."""
        cached = self._lookup
        if (
            cached is not None
            and cached[0] == model.version
            and len(cached[1]) == len(self.item_ids)
        ):
            return cached[1]
        table = np.array([model.index.get(i, -1) for i in self.item_ids], dtype=np.int64)
        self._lookup = (model.version, table)
        return table

    def _rank_users(
        self, users: list[str], model: ServingModel | None, version: str, now_ms: int
    ) -> list[SlateWrite]:
        hist = [self.histories.get(u) for u in users]
        seen = [self.watched.get(u) for u in users]
        warm: list[int] = []
        mapped: list[list[int]] = []
        excluded: list[list[int]] = seen
        if model is not None:
            lookup = self._model_lookup(model)
            excluded = []
            for n, h in enumerate(hist):
                m = [int(x) for x in lookup[h] if x >= 0] if h else []
                mapped.append(m)
                excluded.append([int(x) for x in lookup[seen[n]] if x >= 0] if seen[n] else [])
                if m:
                    warm.append(n)
        out: list[SlateWrite | None] = [None] * len(users)
        if warm and model is not None:
            items, _ = pad_histories([mapped[n] for n in warm], model.max_history)
            states = model.user_states(items)
            self._set_exploration(model)
            ranking = model.policy.rank(
                states, self.cfg.k, exclude=_exclusions([excluded[n] for n in warm])
            )
            for n, row in zip(warm, ranking.rows(), strict=True):
                out[n] = self._slate(users[n], version, now_ms, row, model.item_ids, "model")
        cold = [n for n in range(len(users)) if out[n] is None]
        if cold:
            universe, cold_ranking = self._cold_rank(model, [excluded[n] for n in cold])
            if cold_ranking is not None:
                for n, row in zip(cold, cold_ranking.rows(), strict=True):
                    out[n] = self._slate(users[n], version, now_ms, row, universe, "cold_start")
        return [s for s in out if s is not None]

    def _set_exploration(self, model: ServingModel) -> None:
        """The configured exploration times the version's drift boost (see
        :func:`exploration_factor`): temperature × f (Boltzmann), ε × f capped at 1."""
        f = exploration_factor(model.manifest)
        model.policy.temperature = self.cfg.temperature * f
        model.policy.epsilon = min(1.0, self.cfg.epsilon * f)

    def _cold_rank(
        self, model: ServingModel | None, histories: list[list[int]]
    ) -> tuple[list[str], Ranking | None]:
        """Popularity + exploration: Boltzmann over log(1 + positives), watched items excluded.

        ``histories``: per user, the item indices (in the returned universe) to exclude.
        """
        counts = np.asarray(self._popularity, dtype=np.float64)
        if model is not None:
            universe = model.item_ids
            pop = np.zeros(len(universe))
            lookup = self._model_lookup(model)
            known = lookup >= 0
            np.add.at(pop, lookup[known], counts[known])
        else:
            universe = self.item_ids
            pop = counts
        if len(universe) == 0:
            return universe, None
        matrix = torch.from_numpy(np.log1p(pop)).float().unsqueeze(1)  # [I, 1]
        policy = Policy(
            matrix,
            exploration="boltzmann",
            temperature=self.cfg.cold_start_temperature,
            chunk_size=self.cfg.chunk_size,
            device="cpu",
        )
        policy.generator = self._generator
        exclude = _exclusions(histories) if histories else None
        return universe, policy.rank(torch.ones(len(histories), 1), self.cfg.k, exclude=exclude)

    def _cold_start_slate(
        self, model: ServingModel | None, version: str, now_ms: int
    ) -> Slate | None:
        universe, ranking = self._cold_rank(model, [[]])
        if ranking is None:
            return None
        return self._slate("", version, now_ms, ranking.rows()[0], universe, "cold_start").slate

    @staticmethod
    def _slate(
        user: str,
        version: str,
        now_ms: int,
        row: list[tuple[int, float, float]],
        universe: Sequence[str],
        policy: str,
    ) -> SlateWrite:
        items = tuple(SlateItem(universe[i], s, p, pos) for pos, (i, s, p) in enumerate(row))
        # 128 random bits as hex, like uuid4().hex, without building a UUID object per slate.
        slate = Slate(os.urandom(16).hex(), user, version, now_ms, items)
        return SlateWrite(slate, policy)


def _exclusions(rows: list[list[int]]) -> torch.Tensor:
    """Per-user excluded item indices as a ``[B, M]`` LongTensor, ``-1`` padded (M >= 1)."""
    width = max([len(r) for r in rows] + [1])
    return pad_histories(rows, width)[0]


def exploration_factor(manifest: Mapping[str, Any]) -> float:
    """The drift reaction's exploration boost a model version carries (1.0 when absent).

    The learner writes ``DriftReaction.exploration_factor`` at checkpoint time into the
    version's metadata as ``extra["exploration_factor"]``; a bad value counts as 1.
    """
    extra = manifest.get("extra")
    raw = extra.get("exploration_factor", 1.0) if isinstance(extra, Mapping) else 1.0
    try:
        f = float(raw)
    except (TypeError, ValueError):
        return 1.0
    return f if math.isfinite(f) and f >= 1.0 else 1.0
