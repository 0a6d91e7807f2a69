"""User histories: THE one definition of a user's history, shared by learner and publisher.

A user's history is the items the user gave a **positive** reward to, in **event-time order**,
**last N** (DESIGN.md, "The event contract"). The state of a training sample is the history
*as of* the impression's time, strictly before it (``ts' < ts``), so nothing from the
impression itself or later leaks into its own state.

Item indices are the dense indices of :class:`recsys.encoder.catalog.ItemCatalog`. Padded tensors
use :data:`PAD` (``-1``) on the **left**, so the newest item always sits in the last column; the
augmentations in :mod:`recsys.objectives` use :data:`MASK` (``-2``) for masked positions.
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

import numpy as np
import torch

from recsys.lru import LRU

PAD = -1
"""Padding index in history tensors (left padding)."""
MASK = -2
"""Masked-position index (CL4SRec item mask augmentation)."""


UNBOUNDED = sys.maxsize
"""``max_users`` of a structure that never evicts (only for callers with their own bound)."""

V = TypeVar("V")


class _Unbounded(dict[str, V]):
    """The part of :class:`LRU`'s interface these classes use, without order or gauges: for
    one-user instances and owners that bound users themselves (the publisher's LRU of user
    states), where an LRU per instance would only cost memory and set a meaningless gauge."""

    max_entries = UNBOUNDED
    evictions = 0

    def put(self, key: str, value: V) -> None:
        self[key] = value


_NO_KEY = -1  # CPython's hash() never returns -1, so no real key collides with "no key"


class _UserEntries:
    """One user's retained entries as parallel int64 arrays, sorted by event time.

    Arrays, not one object per entry: ~24 bytes an entry instead of ~250 (an object, three
    ints and the key tuple), which is what bounds the learner's bytes per user.
    """

    __slots__ = ("items", "keys", "ts")

    def __init__(self) -> None:
        self.ts = array("q")
        self.items = array("q")
        # hash() of each entry's dedupe key: a per-process value, so never persisted; a 64-bit
        # collision among one user's ~2N keys (which would drop a click) is negligible.
        self.keys = array("q")


class _PerUser(Generic[V]):
    """What :class:`UserHistories` and :class:`WatchedItems` share: their users' states in a
    :class:`recsys.lru.LRU` of ``max_users`` (or, for :data:`UNBOUNDED`, a plain dict)."""

    def __init__(self, max_users: int, name: str, on_evict: Callable[[str], None] | None) -> None:
        self.name = name
        self._on_evict = on_evict
        self._users: LRU[str, V] | _Unbounded[V] = (
            _Unbounded()
            if max_users == UNBOUNDED
            else LRU(max_users, name=name, on_evict=self._evicted if on_evict else None)
        )

    def _evicted(self, user_id: str, _state: V) -> None:
        if self._on_evict is not None:
            self._on_evict(user_id)

    @property
    def max_users(self) -> int:
        return self._users.max_entries

    @property
    def evictions(self) -> int:
        """Users evicted so far (also ``recsys_cache_evictions_total{cache=name}``)."""
        return self._users.evictions

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def users(self) -> list[str]:
        """Users held, least recently active first."""
        return list(self._users.keys())


class UserHistories(_PerUser[_UserEntries]):
    """Per-user positive-item histories in event-time order, for at most ``max_users`` users.

    Parameters
    ----------
    max_len:
        N, the number of most recent items a history holds (>= 1).
    retain:
        How many entries per user are kept so that :meth:`as_of` can answer for events that
        arrive a little out of order; defaults to ``2 * max_len``. ``as_of`` is exact while the
        user's entries newer than ``ts`` number fewer than ``retain - max_len``.
    max_users:
        The bound on users held (a :class:`recsys.lru.LRU` by last event: :meth:`add`,
        :meth:`get` and :meth:`as_of` mark a user used). The least recently active user is
        evicted first, and a later event of theirs starts from an empty history unless
        ``on_evict`` saved it somewhere the owner reloads it from. :data:`UNBOUNDED` never
        evicts and keeps no gauges (a plain dict): only for owners that bound users
        themselves.
    name:
        The ``cache`` label of the ``recsys_cache_*`` gauges.
    on_evict:
        Called with each evicted user's id, after the user left the map (an owner with a store
        behind it marks the user to reload on the next event).
    """

    def __init__(
        self,
        max_len: int = 50,
        retain: int | None = None,
        *,
        max_users: int = UNBOUNDED,
        name: str = "histories",
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        retain = 2 * max_len if retain is None else retain
        if not isinstance(retain, int) or retain < max_len:
            raise ValueError(f"retain must be an int >= max_len ({max_len}), got {retain!r}")
        super().__init__(max_users, name, on_evict)
        self.max_len = max_len
        self.retain = retain

    def add(
        self, user_id: str, item_index: int, ts: int, reward: float, key: object = None
    ) -> bool:
        """Record one reward; only a positive reward enters the history. Returns whether it did.

        ``key`` (hashable) makes one engaged impression one entry: a second positive reward
        with a key already among the user's retained entries is not added. Callers pass
        :func:`impression_key` (``request_id`` + item), so the click, dwell and purchase of
        one impression are one history entry; ``None`` (organic feedback) is never a
        duplicate.
        """
        if not reward > 0:  # also rejects NaN
            return False
        entries = self._users.get(user_id)
        h = _NO_KEY if key is None else hash(key)
        if entries is None:
            entries = _UserEntries()
            self._users.put(user_id, entries)
        elif h != _NO_KEY and h in entries.keys:
            return False
        t = int(ts)
        if not entries.ts or entries.ts[-1] <= t:  # the common, in-order case
            entries.ts.append(t)
            entries.items.append(int(item_index))
            entries.keys.append(h)
        else:  # after any equal timestamps: arrival order breaks ties
            pos = bisect.bisect_right(entries.ts, t)
            entries.ts.insert(pos, t)
            entries.items.insert(pos, int(item_index))
            entries.keys.insert(pos, h)
        excess = len(entries.ts) - self.retain
        if excess > 0:
            del entries.ts[:excess], entries.items[:excess], entries.keys[:excess]
        return True

    def get(self, user_id: str) -> list[int]:
        """The user's current history: last ``max_len`` positive items, oldest first."""
        entries = self._users.get(user_id)
        if entries is None:
            return []
        return entries.items[-self.max_len :].tolist()

    def as_of(self, user_id: str, ts: int) -> list[int]:
        """The history as it was just before ``ts``: entries with event time ``< ts``."""
        entries = self._users.get(user_id)
        if entries is None:
            return []
        end = bisect.bisect_left(entries.ts, int(ts))
        return entries.items[max(0, end - self.max_len) : end].tolist()

    # --- persistence (flat arrays, for safetensors checkpoints; never pickle) ---------------

    def to_arrays(self) -> tuple[list[str], dict[str, np.ndarray]]:
        """Flatten to (user ids, arrays): counts [U], ts [E], items [E] (E = all entries).

        Users come least recently active first, so :meth:`from_arrays` restores the LRU order.
        """
        pairs = list(self._users.items())
        users = [u for u, _ in pairs]
        counts = np.array([len(e.ts) for _, e in pairs], dtype=np.int64)
        ts = np.frombuffer(b"".join(e.ts.tobytes() for _, e in pairs), dtype=np.int64)
        items = np.frombuffer(b"".join(e.items.tobytes() for _, e in pairs), dtype=np.int64)
        return users, {"counts": counts, "ts": ts.copy(), "items": items.copy()}

    @classmethod
    def from_arrays(
        cls,
        users: Sequence[str],
        arrays: dict[str, np.ndarray],
        max_len: int,
        retain: int,
        *,
        max_users: int = UNBOUNDED,
        name: str = "histories",
        on_evict: Callable[[str], None] | None = None,
    ) -> UserHistories:
        """The inverse of :meth:`to_arrays`; beyond ``max_users`` the least recent are dropped
        (not counted as evictions: they were never loaded)."""
        out = cls(max_len=max_len, retain=retain, max_users=max_users, name=name, on_evict=on_evict)
        counts = np.asarray(arrays["counts"], dtype=np.int64)
        ts = np.ascontiguousarray(arrays["ts"], dtype=np.int64)
        items = np.ascontiguousarray(arrays["items"], dtype=np.int64)
        if len(counts) != len(users) or int(counts.sum()) != len(ts) or len(ts) != len(items):
            raise ValueError("history arrays do not match the user list")
        if (counts < 0).any() or len(set(users)) != len(users):
            raise ValueError("history arrays have negative counts or repeated users")
        ends = np.cumsum(counts)
        skip = max(0, len(users) - max_users)
        for k in range(skip, len(users)):
            lo, hi = int(ends[k] - counts[k]), int(ends[k])
            e = _UserEntries()
            e.ts.frombytes(ts[lo:hi].tobytes())
            e.items.frombytes(items[lo:hi].tobytes())
            e.keys.extend([_NO_KEY] * (hi - lo))
            out._users.put(users[k], e)
        return out


WATCHED_EVENT_TYPES = frozenset({"click", "dwell", "add_to_cart", "purchase", "rating", "skip"})
"""Event types that make an item *watched* (consumed or dismissed) for a user: any feedback."""


def is_watched_record(kind: str) -> bool:
    """Whether a reward record of this ``kind`` marks its item watched (feedback, not default).

    ``joined`` and ``organic`` records are made by a feedback event, ``default`` ones by an
    impression without feedback: the learner's twin of :data:`WATCHED_EVENT_TYPES`.
    """
    return kind != "default"


class WatchedItems(_PerUser[dict[int, None]]):
    """Per user, the items they gave any feedback to (watched, rated, skipped), newest kept.

    The serving policy never shows a watched item again, and training masks the same set:
    this is the "allowed set" every propensity is defined over. Broader than the history (which
    keeps positives only, last N): a movie rated 2 stars is watched, not liked.

    Parameters
    ----------
    max_len:
        Most recent watched items kept per user (older ones become eligible again).
    max_users:
        The bound on users held (LRU by last event, as :class:`UserHistories`); an evicted
        user's watched set starts empty again. :data:`UNBOUNDED` never evicts.
    name:
        The ``cache`` label of the ``recsys_cache_*`` gauges.
    on_evict:
        Called with each evicted user's id, after the user left the map.
    """

    def __init__(
        self,
        max_len: int = 2000,
        *,
        max_users: int = UNBOUNDED,
        name: str = "watched",
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        super().__init__(max_users, name, on_evict)  # a user's state: an ordered set of items
        self.max_len = max_len

    def add(self, user_id: str, item_index: int) -> bool:
        """Mark an item watched; returns whether it was new for the user."""
        items = self._users.get(user_id)
        if items is None:
            items = {}
            self._users.put(user_id, items)
        item = int(item_index)
        if item in items:
            return False
        items[item] = None
        if len(items) > self.max_len:
            del items[next(iter(items))]
        return True

    def get(self, user_id: str) -> list[int]:
        """The user's watched items, oldest first."""
        return list(self._users.get(user_id) or ())


class _ShownEntries:
    """One user's impressions as parallel int64 arrays sorted by event time (16 bytes each)."""

    __slots__ = ("items", "ts")

    def __init__(self) -> None:
        self.ts = array("q")
        self.items = array("q")


class ShownItems(_PerUser[_ShownEntries]):
    """Per user, the items shown to them in the last ``cooldown_ms`` (their impressions): the
    serving cooldown, an impression discount in its hard form.

    A user who comes back within minutes and is shown the same slate passes over it again (the
    items they ignored a minute ago are no better now); with a cooldown the policy samples the
    slate from the allowed set minus these items, and every propensity is over that set.

    Parameters
    ----------
    cooldown_ms:
        How long a shown item stays out of the user's slates; 0 disables the cooldown
        (:meth:`add` keeps nothing, :meth:`recent` is empty).
    max_len:
        Most recent impressions kept per user (the bound on a user's entries; a user shown
        more than this within the cooldown sees the oldest ones become eligible early).
    max_users:
        The bound on users held (LRU by last impression, as :class:`WatchedItems`).
    name:
        The ``cache`` label of the ``recsys_cache_*`` gauges.

    >>> shown = ShownItems(cooldown_ms=60_000)
    >>> shown.add("u1", 7, ts=1_000)
    >>> shown.add("u1", 3, ts=30_000)
    >>> shown.recent("u1", now_ms=50_000)
    [7, 3]
    >>> shown.recent("u1", now_ms=70_000)  # item 7 was shown 69 s ago: eligible again
    [3]
    """

    def __init__(
        self,
        cooldown_ms: int,
        max_len: int = 200,
        *,
        max_users: int = UNBOUNDED,
        name: str = "shown",
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(cooldown_ms, int) or cooldown_ms < 0:
            raise ValueError(f"cooldown_ms must be an int >= 0, got {cooldown_ms!r}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        super().__init__(max_users, name, on_evict)
        self.cooldown_ms = cooldown_ms
        self.max_len = max_len

    def add(self, user_id: str, item_index: int, ts: int) -> None:
        """Record that the item was shown to the user at event time ``ts``."""
        if self.cooldown_ms == 0:
            return
        e = self._users.get(user_id)
        if e is None:
            e = _ShownEntries()
            self._users.put(user_id, e)
        t = int(ts)
        if not e.ts or e.ts[-1] <= t:
            e.ts.append(t)
            e.items.append(int(item_index))
        else:
            pos = bisect.bisect_right(e.ts, t)
            e.ts.insert(pos, t)
            e.items.insert(pos, int(item_index))
        expired = bisect.bisect_right(e.ts, e.ts[-1] - self.cooldown_ms)
        cut = max(expired, len(e.ts) - self.max_len)
        if cut > 0:
            del e.ts[:cut], e.items[:cut]

    def recent(self, user_id: str, now_ms: int) -> list[int]:
        """The items shown to the user after ``now_ms - cooldown_ms``, each once, oldest
        impression first."""
        e = self._users.get(user_id)
        if e is None:
            return []
        start = bisect.bisect_right(e.ts, int(now_ms) - self.cooldown_ms)
        return list(dict.fromkeys(e.items[start:].tolist()))


def not_allowed(watched: list[int], shown: list[int]) -> list[int]:
    """What a user's slate may not hold: their watched items and those in their cooldown
    (:meth:`ShownItems.recent`). Every propensity is over the catalogue minus these."""
    if not shown:
        return watched
    return list(dict.fromkeys(watched + shown))


def impression_key(request_id: str | None, item_id: str) -> tuple[str, str] | None:
    """The history dedupe key of feedback on one impression: ``(request_id, item_id)``.

    None when there is no ``request_id`` (organic feedback): such entries are never merged.
    """
    return None if request_id is None else (request_id, item_id)


def pad_histories(
    histories: Iterable[Sequence[int]], max_len: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch histories into a left-padded LongTensor.

    Returns ``(items [B, N], lengths [B])`` with ``N = max_len``; ``items[b, N - lengths[b]:]``
    holds the last ``lengths[b]`` items of history ``b`` (oldest first), the rest is :data:`PAD`.
    A history longer than ``max_len`` keeps its last ``max_len`` items.
    """
    rows = [list(h)[-max_len:] for h in histories]
    out = np.full((len(rows), max_len), PAD, dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for b, row in enumerate(rows):
        if row:
            out[b, max_len - len(row) :] = row
            lengths[b] = len(row)
    return (
        torch.from_numpy(out).to(device) if device is not None else torch.from_numpy(out),
        torch.from_numpy(lengths).to(device) if device is not None else torch.from_numpy(lengths),
    )


def history_mask(items: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, N]: True where ``items`` holds a real (or masked) position, not padding."""
    return items != PAD
