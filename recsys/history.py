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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

PAD = -1
"""Padding index in history tensors (left padding)."""
MASK = -2
"""Masked-position index (CL4SRec item mask augmentation)."""


@dataclass(frozen=True, slots=True)
class _Entry:
    ts: int
    seq: int  # arrival order, breaks ties between equal timestamps stably
    item: int
    key: object = None  # dedupe key (e.g. ``(request_id, item_id)``), None: never a duplicate


class UserHistories:
    """Per-user positive-item histories in event-time order.

    Parameters
    ----------
    max_len:
        N, the number of most recent items a history holds (>= 1).
    retain:
        How many entries per user are kept so that :meth:`as_of` can answer for events that
        arrive a little out of order; defaults to ``2 * max_len``. ``as_of`` is exact while the
        user's entries newer than ``ts`` number fewer than ``retain - max_len``.
    """

    def __init__(self, max_len: int = 50, retain: int | None = None) -> None:
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        retain = 2 * max_len if retain is None else retain
        if not isinstance(retain, int) or retain < max_len:
            raise ValueError(f"retain must be an int >= max_len ({max_len}), got {retain!r}")
        self.max_len = max_len
        self.retain = retain
        self._users: dict[str, list[_Entry]] = {}
        self._keys: dict[str, set[object]] = {}  # dedupe keys of each user's retained entries
        self._seq = 0

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def users(self) -> list[str]:
        return list(self._users)

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
        keys = self._keys.setdefault(user_id, set()) if key is not None else None
        if keys is not None:
            if key in keys:
                return False
            keys.add(key)
        entries = self._users.setdefault(user_id, [])
        entry = _Entry(int(ts), self._seq, int(item_index), key)
        self._seq += 1
        if not entries or entries[-1].ts <= entry.ts:
            entries.append(entry)  # the common, in-order case
        else:
            bisect.insort(entries, entry, key=lambda e: (e.ts, e.seq))
        if len(entries) > self.retain:
            user_keys = self._keys.get(user_id)
            for old in entries[: len(entries) - self.retain]:
                if user_keys is not None and old.key is not None:
                    user_keys.discard(old.key)
            del entries[: len(entries) - self.retain]
        return True

    def get(self, user_id: str) -> list[int]:
        """The user's current history: last ``max_len`` positive items, oldest first."""
        entries = self._users.get(user_id)
        if not entries:
            return []
        return [e.item for e in entries[-self.max_len :]]

    def as_of(self, user_id: str, ts: int) -> list[int]:
        """The history as it was just before ``ts``: entries with event time ``< ts``."""
        entries = self._users.get(user_id)
        if not entries:
            return []
        end = bisect.bisect_left(entries, int(ts), key=lambda e: e.ts)
        return [e.item for e in entries[max(0, end - self.max_len) : end]]

    # --- persistence (flat arrays, for safetensors checkpoints; never pickle) ---------------

    def to_arrays(self) -> tuple[list[str], dict[str, np.ndarray]]:
        """Flatten to (user ids, arrays): counts [U], ts [E], items [E] (E = all entries)."""
        users = list(self._users)
        counts = np.array([len(self._users[u]) for u in users], dtype=np.int64)
        flat = [e for u in users for e in self._users[u]]
        ts = np.array([e.ts for e in flat], dtype=np.int64)
        items = np.array([e.item for e in flat], dtype=np.int64)
        return users, {"counts": counts, "ts": ts, "items": items}

    @classmethod
    def from_arrays(
        cls, users: Sequence[str], arrays: dict[str, np.ndarray], max_len: int, retain: int
    ) -> UserHistories:
        out = cls(max_len=max_len, retain=retain)
        counts = arrays["counts"].tolist()
        ts = arrays["ts"].tolist()
        items = arrays["items"].tolist()
        if len(counts) != len(users) or sum(counts) != len(ts) or len(ts) != len(items):
            raise ValueError("history arrays do not match the user list")
        pos = 0
        for user, n in zip(users, counts, strict=True):
            entries = []
            for k in range(pos, pos + n):
                entries.append(_Entry(ts[k], out._seq, items[k]))
                out._seq += 1
            out._users[user] = entries
            pos += n
        return out


WATCHED_EVENT_TYPES = frozenset({"click", "dwell", "add_to_cart", "purchase", "rating", "skip"})
"""Event types that make an item *watched* (consumed or dismissed) for a user: any feedback."""


def is_watched_record(kind: str) -> bool:
    """Whether a reward record of this ``kind`` marks its item watched (feedback, not default).

    ``joined`` and ``organic`` records are made by a feedback event, ``default`` ones by an
    impression without feedback: the learner's twin of :data:`WATCHED_EVENT_TYPES`.
    """
    return kind != "default"


class WatchedItems:
    """Per user, the items they gave any feedback to (watched, rated, skipped), newest kept.

    The serving policy never shows a watched item again, and training masks the same set:
    this is the "allowed set" every propensity is defined over. Broader than the history (which
    keeps positives only, last N): a movie rated 2 stars is watched, not liked.

    Parameters
    ----------
    max_len:
        Most recent watched items kept per user (older ones become eligible again).
    """

    def __init__(self, max_len: int = 2000) -> None:
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        self.max_len = max_len
        self._users: dict[str, dict[int, None]] = {}  # insertion-ordered set

    def add(self, user_id: str, item_index: int) -> bool:
        """Mark an item watched; returns whether it was new for the user."""
        items = self._users.setdefault(user_id, {})
        item = int(item_index)
        if item in items:
            return False
        items[item] = None
        if len(items) > self.max_len:
            del items[next(iter(items))]
        return True

    def get(self, user_id: str) -> list[int]:
        """The user's watched items, oldest first."""
        return list(self._users.get(user_id, ()))

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users


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
