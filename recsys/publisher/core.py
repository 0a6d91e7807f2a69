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
  time. Users without usable history get the model's new-user state (its begin token, and the
  serving item value) once a model is loaded (``cold_start="model"``); before that, or with
  ``cold_start="popularity"``, the cold-start policy: Boltzmann over log popularity (positive
  feedback counts), i.e. popular items plus exploration, with exact propensities.
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

from recsys import metrics
from recsys.config import Settings
from recsys.events import Event, Slate, SlateItem
from recsys.history import (
    WATCHED_EVENT_TYPES,
    ShownItems,
    UserHistories,
    WatchedItems,
    impression_key,
    not_allowed,
    pad_histories,
)
from recsys.lru import LRU
from recsys.policy import Policy, Ranking
from recsys.rewards.rules import RewardRules
from recsys.serving.model import ServingModel
from recsys.store import HistoryEntry, SlateWrite, StateEntry, Store, UserStateRow

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
    cold_start: Literal["popularity", "model"] = "model"
    batch_interval_s: float = 0.2
    refresh_batch_users: int = 2048
    chunk_size: int | None = None  # None: the Policy's default for the device
    device: str | None = None
    seed: int | None = None
    refresh_on_impression: bool = True
    watched_len: int = 2000  # most recent watched items per user that are never shown again
    cooldown_s: float = 0.0  # how long a shown item stays out of the user's slates (0: off)
    shown_len: int = 200  # most recent shown items per user held for the cooldown
    max_users: int = 100_000  # users whose state is held in memory (LRU)
    max_items: int = 2_000_000  # distinct item ids tracked

    def __post_init__(self) -> None:
        for name in (
            "k",
            "history_len",
            "refresh_batch_users",
            "chunk_size",
            "watched_len",
            "shown_len",
            "max_users",
            "max_items",
        ):
            v = getattr(self, name)
            if v is None and name == "chunk_size":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("temperature", "cold_start_temperature"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (isinstance(self.cooldown_s, int | float) and 0 <= self.cooldown_s < math.inf):
            raise ValueError(f"cooldown_s must be a finite number >= 0, got {self.cooldown_s!r}")
        if not (isinstance(self.batch_interval_s, int | float) and self.batch_interval_s >= 0):
            raise ValueError(f"batch_interval_s must be >= 0, got {self.batch_interval_s!r}")
        if self.exploration not in ("boltzmann", "epsilon", "greedy"):
            raise ValueError(
                f"exploration must be boltzmann, epsilon or greedy, got {self.exploration!r}"
            )
        if self.cold_start not in ("popularity", "model"):
            raise ValueError(f"cold_start must be popularity or model, got {self.cold_start!r}")
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
            cold_start=ps.cold_start,
            batch_interval_s=ps.batch_interval_ms / 1000.0,
            refresh_batch_users=ps.refresh_batch_users,
            chunk_size=ps.chunk_size,
            device=None if ps.device == "auto" else ps.device,
            seed=ps.seed,
            refresh_on_impression=ps.refresh_on_impression,
            cooldown_s=ps.cooldown_s,
            max_users=ps.max_users,
            max_items=ps.max_items,
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
    states: list[UserStateRow]
    popularity: dict[str, int]
    cold_start: Slate | None
    users: list[str] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class UserState:
    """One user's state in the publisher's cache; rebuilt from a :class:`UserStateRow` on a miss.

    ``history``, ``watched`` and ``shown`` are one-user instances of the shared definitions in
    :mod:`recsys.history`; ``entries`` is the persisted twin of the first two (event and
    request ids, so a reloaded user deduplicates exactly as before the eviction). ``shown``
    is not persisted: it matters for minutes, and a user evicted from the LRU has usually been
    inactive longer than that.
    """

    partition: int | None
    history: UserHistories
    watched: WatchedItems
    shown: ShownItems
    # A list scanned for event ids (at most 2 * history_len entries) rather than a set beside
    # it: the set cost ~2 KB per user, the scan well under a microsecond per positive event.
    entries: list[StateEntry] = field(default_factory=list)
    rating_n: int = 0
    rating_sum: float = 0.0


class _View:
    """``get(user)`` of one per-user structure for users in memory (the old dict-like API)."""

    def __init__(self, publisher: Publisher, attr: str) -> None:
        self._publisher = publisher
        self._attr = attr

    def get(self, user_id: str) -> list[int]:
        st = self._publisher._peek(user_id)
        if st is None:
            return []
        structure: UserHistories | WatchedItems = getattr(st, self._attr)
        return structure.get(user_id)


class Publisher:
    """Per-user state, dirty users and slate computation; I/O only through ``store``.

    ``model()`` returns the current :class:`ServingModel` (or None before the first version),
    typically ``lambda: watcher.current``; it is read once per batch, so a batch never mixes
    versions.

    Per-user state lives in an LRU of ``max_users`` entries. With a ``store``, what must outlive
    an eviction (history entries, watched items, rating stats, source partition) is a store row
    written with each batch, an evicted user is reloaded on their next event, and a new version
    refreshes the users of the owned partitions page by page from the store. A user whose changes
    are not stored yet is never dropped: evicted, it waits in a side table until its batch is
    stored. Without a store (tests, ``recsys eval sim``) an evicted user is forgotten.
    """

    def __init__(
        self,
        cfg: PublisherConfig,
        model: Callable[[], ServingModel | None],
        rules: RewardRules | None = None,
        clock: Callable[[], float] = time.time,
        store: Store | None = None,
    ) -> None:
        self.cfg = cfg
        self._model = model
        self.rules = rules or RewardRules()
        self._clock = clock
        self._mono = time.monotonic
        self.store = store
        self._users: LRU[str, UserState] = LRU(
            cfg.max_users, name="publisher_users", on_evict=self._evicted
        )
        self._unsaved: dict[str, UserState] = {}  # evicted with changes not yet stored
        self._changed: set[str] = set()  # users whose stored row is behind their state
        self.histories = _View(self, "history")
        self.watched = _View(self, "watched")
        self.item_ids: list[str] = []
        self._item_index: dict[str, int] = {}
        self._popularity: list[int] = []
        self._items_gauge = metrics.CACHE_ENTRIES.labels(cache="publisher_items")
        metrics.CACHE_CAPACITY.labels(cache="publisher_items").set(cfg.max_items)
        self._items_full_logged = False
        self.owned: set[int] | None = None  # None: every partition (no assignment seen)
        self._dirty: dict[str, int] = {}  # user -> oldest unpublished event ts
        # Each dirty user's partition (their state may be evicted), so a revocation drops them.
        self._dirty_partition: dict[str, int | None] = {}
        # Per user, the positives in _pop_delta: a revocation takes them back (the partition's
        # next owner re-reads and counts them).
        self._user_pop: dict[str, list[str]] = {}
        self._dirty_since: float | None = None
        self._pop_delta: Counter[str] = Counter()
        self._refresh: deque[str] = deque()  # without a store: users in memory
        self._cursors: dict[int, str] = {}  # with a store: partition -> last user refreshed
        self._serving: str | None = None  # version the last batch was computed with
        self._restored = False
        self._lookup: tuple[str, np.ndarray] | None = None
        self._cold_dirty = True
        self._generator = torch.Generator()
        if cfg.seed is not None:
            self._generator.manual_seed(cfg.seed + 1)

    # -- state in ----------------------------------------------------------------------------

    def _intern(self, item_id: str) -> int | None:
        """The item's index; None for a new id once ``max_items`` ids are tracked."""
        i = self._item_index.get(item_id)
        if i is None:
            if len(self.item_ids) >= self.cfg.max_items:
                if not self._items_full_logged:
                    log.warning(
                        "publisher: max_items=%d reached; new ids untracked", self.cfg.max_items
                    )
                    self._items_full_logged = True
                return None
            i = len(self.item_ids)
            self.item_ids.append(item_id)
            self._item_index[item_id] = i
            self._popularity.append(0)
            self._items_gauge.set(len(self.item_ids))
        return i

    def _evicted(self, user: str, state: UserState) -> None:
        if self.store is None:
            self._changed.discard(user)  # nowhere to save it: forgotten, as documented
            self._user_pop.pop(user, None)
        elif user in self._changed:
            self._unsaved[user] = state

    def _new_state(self, partition: int | None) -> UserState:
        return UserState(
            partition,
            UserHistories(self.cfg.history_len),
            WatchedItems(self.cfg.watched_len),
            ShownItems(round(self.cfg.cooldown_s * 1000), self.cfg.shown_len),
        )

    def _from_row(self, row: UserStateRow) -> UserState:
        st = self._new_state(row.partition)
        for item_id in row.watched:  # oldest first, as they were added
            i = self._intern(item_id)
            if i is not None:
                st.watched.add(row.user_id, i)
        for ts, item_id, event_id, request_id in sorted(row.entries, key=lambda e: e[0]):
            self._add_entry(row.user_id, st, ts, item_id, event_id, request_id)
        st.rating_n, st.rating_sum = row.rating_n, row.rating_sum
        return st

    def _row(self, user: str, st: UserState) -> UserStateRow:
        ids = self.item_ids
        return UserStateRow(
            user,
            st.partition,
            tuple(st.entries),
            tuple(ids[i] for i in st.watched.get(user)),
            st.rating_n,
            st.rating_sum,
        )

    def not_allowed(self, user: str, now_ms: int) -> list[int]:
        """The items a slate for ``user`` may not hold now (watched, or in their cooldown);
        [] for a user not in memory."""
        st = self._peek(user)
        if st is None:
            return []
        return not_allowed(st.watched.get(user), st.shown.recent(user, now_ms))

    def _peek(self, user: str) -> UserState | None:
        """The user's state if it is in memory (no store read, no recency change)."""
        st = self._users.peek(user)
        return st if st is not None else self._unsaved.get(user)

    def _load(self, users: Iterable[str]) -> dict[str, UserState]:
        if self.store is None:
            return {}
        return {u: self._from_row(r) for u, r in self.store.load_user_states(users).items()}

    def load_popularity(self, popularity: Mapping[str, int]) -> None:
        """Take the store's positive-feedback counts (cold-start slates), which every replica
        adds its stored batches to, plus this replica's counts not stored yet."""
        changed = False
        for item_id, n in popularity.items():
            i = self._intern(item_id)
            if i is not None:
                count = int(n) + self._pop_delta.get(item_id, 0)
                changed |= self._popularity[i] != count
                self._popularity[i] = count
        if changed:
            self._cold_dirty = True

    def restore(
        self,
        histories: Iterable[tuple[str, Sequence[HistoryEntry]]],
        popularity: Mapping[str, int],
        known_users: Iterable[str],
    ) -> None:
        """Seed users in memory (no store): their histories, popularity, and users to refresh
        on the first version."""
        for user, entries in histories:
            st = self._new_state(None)
            for ts, item_id, event_id in sorted(entries, key=lambda e: e[0]):
                if self._add_entry(user, st, ts, item_id, event_id, None):
                    st.watched.add(user, self._item_index[item_id])
            self._users.put(user, st)
        for user in known_users:
            if user not in self._users:
                self._users.put(user, self._new_state(None))
        self.load_popularity(popularity)
        self._restored = len(self._users) > 0

    def _add_entry(
        self,
        user: str,
        st: UserState,
        ts: int,
        item_id: str,
        event_id: str,
        request_id: str | None,
    ) -> bool:
        """One positive feedback event into the user's history (and watched set)."""
        if any(e[2] == event_id for e in st.entries):
            return False  # a duplicate event (a producer retry, a re-read): already in
        i = self._intern(item_id)
        if i is None:
            return False
        key = impression_key(request_id, item_id)  # click + dwell + purchase: one entry
        if not st.history.add(user, i, ts, 1.0, key):
            return False
        # The item id string is the item table's: one copy per item, not one per entry.
        entry = (ts, self.item_ids[i], event_id, request_id)
        bisect.insort(st.entries, entry, key=lambda e: e[0])
        excess = len(st.entries) - st.history.retain
        if excess > 0:
            del st.entries[:excess]
        return True

    def _add_positive(
        self, user: str, ts: int, item_id: str, event_id: str, request_id: str | None = None
    ) -> bool:
        """Add one positive entry to a user in memory (benchmarks seed users with it)."""
        st = self._peek(user)
        if st is None:
            st = self._new_state(None)
            self._users.put(user, st)
        added = self._add_entry(user, st, ts, item_id, event_id, request_id)
        if added:
            st.watched.add(user, self._item_index[item_id])
        return added

    def _reward(self, e: Event, st: UserState) -> tuple[float, bool]:
        """The reward rules' value of one feedback event (0 for impressions), and whether the
        user's rating stats changed."""
        if e.type == "impression":
            return 0.0, False
        centre = None
        changed = False
        if e.type == "rating" and self.rules.rating_centre == "user":
            centre = self.rules.user_centre(st.rating_n, st.rating_sum)
            if e.value is not None:
                st.rating_n += 1
                st.rating_sum += e.value
                changed = True
        return self.rules.value(e.type, e.value, centre), changed

    def _state_for_event(
        self, user: str, partition: int | None, absent: set[str]
    ) -> tuple[UserState, bool]:
        """The user's state, loaded or created (then True: a user never seen before)."""
        st = self._users.get(user)
        if st is not None:
            return st, False
        created = False
        st = self._unsaved.pop(user, None)
        if st is None and user not in absent:
            st = self._load([user]).get(user)  # evicted again since this batch's prefetch
        if st is None:
            st = self._new_state(partition)
            created = True
            absent.discard(user)
        self._users.put(user, st)
        if created:
            self._changed.add(user)  # a new user gets a row, so a refresh can find them
        return st, created

    def observe(
        self, events: Iterable[Event], partitions: Sequence[int | None] | None = None
    ) -> int:
        """Update per-user state from events; returns how many users became due for a new slate.

        ``partitions``: each event's source partition (its user's owner), when known.
        """
        evs = list(events)
        parts: Sequence[int | None] = partitions if partitions is not None else [None] * len(evs)
        if len(parts) != len(evs):
            raise ValueError("partitions must have one entry per event")
        before = len(self._dirty)
        absent: set[str] = set()
        if self.store is not None:
            missing = [
                u
                for u in dict.fromkeys(e.user_id for e in evs)
                if u not in self._users and u not in self._unsaved
            ]
            # One query for the batch's evicted or unseen users, not one per event.
            loaded = self._load(missing[: self.cfg.max_users])
            for u, st in loaded.items():
                self._users.put(u, st)
            absent = set(missing[: self.cfg.max_users]) - loaded.keys()
        for e, part in zip(evs, parts, strict=True):
            user = e.user_id
            st, new = self._state_for_event(user, part, absent)
            changed = False
            if part is not None and st.partition != part:
                st.partition = part  # a row from before partitions were stored
                changed = True
            r, rated = self._reward(e, st)
            changed |= rated
            i = self._intern(e.item_id)
            if i is not None and e.type in WATCHED_EVENT_TYPES and st.watched.add(user, i):
                changed = True  # a watched item leaves the user's allowed set
            if i is not None and e.type == "impression":
                st.shown.add(user, i, e.ts)
            if r > 0 and self._add_entry(user, st, e.ts, e.item_id, e.event_id, e.request_id):
                assert i is not None
                self._popularity[i] += 1
                self._pop_delta[e.item_id] += 1
                self._user_pop.setdefault(user, []).append(e.item_id)
                self._cold_dirty = True
                changed = True
            if changed:
                self._changed.add(user)
            # A shown slate is spent: the user's next visit gets a fresh sample from the policy
            # (exploration, and no repeating a slate the user just passed over).
            shown = e.type == "impression" and self.cfg.refresh_on_impression
            if changed or new or shown:
                old = self._dirty.get(user)
                self._dirty[user] = e.ts if old is None else min(old, e.ts)
                self._dirty_partition[user] = st.partition
                if self._dirty_since is None:
                    self._dirty_since = self._mono()
        return len(self._dirty) - before

    # -- ownership ---------------------------------------------------------------------------

    def assign(self, partitions: Iterable[int]) -> None:
        """This replica now owns the users of ``partitions``: with a store, their users whose
        slate is not of the serving version are refreshed (a replica that joins mid-swap)."""
        parts = set(partitions)
        self.owned = (self.owned or set()) | parts
        if self.store is not None:
            for p in parts:
                self._cursors[p] = ""

    def revoke(self, partitions: Iterable[int]) -> None:
        """Drop the users of ``partitions``: what they changed since the last stored batch is
        re-read by the partitions' next owner from the stored offsets."""
        parts = set(partitions)
        if self.owned is not None:
            self.owned -= parts
        for p in parts:
            self._cursors.pop(p, None)
        gone = {u for u, st in self._users.items() if st.partition in parts}
        gone |= {u for u, st in self._unsaved.items() if st.partition in parts}
        gone |= {u for u, p in self._dirty_partition.items() if p in parts}
        for u in gone:
            self._users.pop(u)
            self._unsaved.pop(u, None)
            self._changed.discard(u)
            self._dirty.pop(u, None)
            self._dirty_partition.pop(u, None)
            for item_id in self._user_pop.pop(u, ()):
                self._pop_delta[item_id] -= 1
                self._popularity[self._item_index[item_id]] -= 1
        self._pop_delta = +self._pop_delta  # drop zero counts
        if gone and self._refresh:
            self._refresh = deque(u for u in self._refresh if u not in gone)
        if not self._dirty:
            self._dirty_since = None

    # -- batches -----------------------------------------------------------------------------

    @property
    def refreshing(self) -> bool:
        """True while a full refresh for a new version still has users to go."""
        return bool(self._refresh or self._cursors)

    @property
    def pending(self) -> bool:
        """True while some observed event is not yet reflected in a published slate."""
        return bool(self._dirty)

    @property
    def users_in_memory(self) -> int:
        return len(self._users) + len(self._unsaved)

    def due(self) -> bool:
        """Whether :meth:`compute` has work now (micro-batch elapsed, refresh, or new version)."""
        model = self._model()
        version = model.version if model is not None else NO_MODEL_VERSION
        if version != self._serving and (
            self._serving is not None or self._restored or self._cursors
        ):
            return True
        if self.refreshing:
            return True
        if not self._dirty:
            return False
        waited = self._mono() - (self._dirty_since or self._mono())
        return (
            waited >= self.cfg.batch_interval_s or len(self._dirty) >= self.cfg.refresh_batch_users
        )

    def _start_refresh(self, version: str) -> None:
        if self.store is not None and self.owned is not None:
            log.info("version %s: refreshing the users of partitions %s", version, self.owned)
            self._cursors = dict.fromkeys(self.owned, "")
        else:
            log.info("version %s: refreshing %d users in memory", version, len(self._users))
            self._refresh = deque(self._users.keys())

    def _next_refresh(self, n: int, version: str, taken: set[str]) -> list[str]:
        """Up to ``n`` users of the pending refresh not in ``taken``."""
        out: list[str] = []
        while self._refresh and len(out) < n:
            u = self._refresh.popleft()
            if u not in taken:
                out.append(u)
        for p in sorted(self._cursors):
            assert self.store is not None
            while len(out) < n:
                page = self.store.owned_users(
                    p, after=self._cursors[p], limit=n - len(out), stale_for=version
                )
                if not page:
                    del self._cursors[p]
                    break
                self._cursors[p] = page[-1]
                out.extend(u for u in page if u not in taken)
            if len(out) >= n:
                break
        return out

    def compute(self) -> Batch | None:
        """Slates for every dirty user plus the next chunk of a pending full refresh."""
        model = self._model()  # read once: the whole batch uses one version
        version = model.version if model is not None else NO_MODEL_VERSION
        if version != self._serving:
            # A new version (or the first one after a restart) refreshes every owned user; the
            # very first batch of a fresh publisher only has dirty users, who are covered anyway
            # (and, with a store, the users of newly assigned partitions have cursors already).
            if self._serving is not None or self._restored:
                self._start_refresh(version)
            self._serving = version
            self._restored = False
            self._cold_dirty = True
        users = list(self._dirty)
        users += self._next_refresh(self.cfg.refresh_batch_users, version, set(users))
        if not users and not self._cold_dirty:
            return None
        now_ms = int(self._clock() * 1000)
        states = self._states(users)
        slates = [
            dataclasses.replace(w, event_ts=self._dirty.get(w.slate.user_id))
            for w in self._rank_users(users, model, version, now_ms, states)
        ]
        cold = self._cold_start_slate(model, version, now_ms) if self._cold_dirty else None
        rows = []
        for u in self._changed:
            st = self._peek(u)
            if st is not None:
                rows.append(self._row(u, st))
        return Batch(
            version=version,
            model=model,
            slates=slates,
            trigger_ts={u: self._dirty[u] for u in users if u in self._dirty},
            states=rows,
            popularity=dict(self._pop_delta),
            cold_start=cold,
            users=users,
        )

    def _states(self, users: list[str]) -> list[UserState]:
        """Each user's state; refreshed users not in memory are read from the store for this
        batch only (a refresh of every owned user must not flush the cache of active ones)."""
        found = {u: st for u in users if (st := self._peek(u)) is not None}
        loaded = self._load(u for u in users if u not in found)
        return [found.get(u) or loaded.get(u) or self._new_state(None) for u in users]

    def committed(self, batch: Batch) -> None:
        """The batch is durable (published and stored): forget what it covered."""
        for u in batch.users:
            self._dirty.pop(u, None)
            self._dirty_partition.pop(u, None)
        for row in batch.states:
            self._changed.discard(row.user_id)
            self._unsaved.pop(row.user_id, None)
            self._user_pop.pop(row.user_id, None)
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
        self,
        users: list[str],
        model: ServingModel | None,
        version: str,
        now_ms: int,
        states: list[UserState] | None = None,
    ) -> list[SlateWrite]:
        if states is None:
            states = self._states(users)
        hist = [st.history.get(u) for u, st in zip(users, states, strict=True)]
        seen = [
            not_allowed(st.watched.get(u), st.shown.recent(u, now_ms))
            for u, st in zip(users, states, strict=True)
        ]
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
                if m or self.cfg.cold_start == "model":
                    warm.append(n)
        out: list[SlateWrite | None] = [None] * len(users)
        if warm and model is not None:
            items, _ = pad_histories([mapped[n] for n in warm], model.max_history)
            vectors = model.user_states(items, model.buckets([users[n] for n in warm]))
            self._set_exploration(model)
            ranking = model.policy.rank(
                vectors, self.cfg.k, exclude=_exclusions([excluded[n] for n in warm])
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
        if model is not None and self.cfg.cold_start == "model":
            # What the model serves a user with no history: its begin token's state.
            (write,) = self._rank_users([""], model, version, now_ms, [self._new_state(None)])
            return write.slate
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
