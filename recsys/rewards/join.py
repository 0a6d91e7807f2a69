"""The attribution-window join: behaviour events of one partition in, reward records out.

One :class:`RewardJoin` holds the state of one partition of the events topic (a user's events
are all in one partition, in order). Its one-event API, ``update(event, offset)``, returns the
reward records that the event makes final, at once: nothing waits for a batch or a timer.

Semantics (event time, i.e. the events' ``ts``; W = window, L = allowed lateness,
T = late retention):

- **Impression** I opens an attribution window [I.ts, I.ts + W).
- **Feedback** F (click, dwell, add_to_cart, purchase, rating, skip) is attributed to the
  impression with the same ``user_id``, ``request_id`` and ``item_id``; without ``request_id``,
  to the user's latest impression of the item with ``I.ts <= F.ts``. Only impressions that
  arrived before F count. Then:

  - ``F.ts < I.ts + W`` and I's window still open: a ``joined`` reward, emitted at once. Each
    feedback event is its own record (a click and a later purchase on one impression are two
    ``joined`` records), so an impression's reward is the sum of its records.
  - ``F.ts >= I.ts + W + T``, or no impression: an ``organic`` reward (propensity unknown,
    ``ts`` of the feedback).
  - otherwise F is **late** (after the window, or arrived after the window closed): counted in
    ``late`` and, by ``late_rule``, emitted as ``organic`` or dropped.

- An impression that arrives when the clock is already past ``I.ts + W + L + T`` (later than
  anything still remembered: e.g. a re-send of an impression that was joined and forgotten) gets
  no outcome at all, counted in ``late_impressions``: a second outcome could contradict the first.

- **The clock** of the partition is the largest ``ts`` seen in it (each event's capped by its
  ``clock_cap``, the worker's Kafka record timestamp, so a client stamping events ahead cannot
  close other users' windows early). I's window closes when the
  clock reaches ``I.ts + W + L``; an impression that got no ``joined`` record by then emits
  one ``default`` record (reward 0). So every impression ends with exactly one outcome: one or
  more ``joined`` records, or one ``default`` record, never both. I is remembered for T more
  (to recognise late feedback), then forgotten.
- **Duplicates**: an event whose ``event_id`` was seen within ``dedupe_horizon_ms`` (or whose
  impression is still remembered) is dropped and counted in ``duplicates``.

``reward_id`` is deterministic: sha1 of ``feedback:<feedback event_id>`` for a record made by
feedback (joined or organic), of ``default:<impression event_id>`` for a default. Downstream
dedupes by it.

Results depend only on each user's own events in arrival order, as long as every event
arrives no later than L behind the partition's clock (the bounded-disorder assumption of any
watermark); events later than that are the late ones, and only their handling can depend on
which users share a partition. Batch boundaries never matter.

**Crash safety.** :meth:`safe_offset` is the offset from which a fresh ``RewardJoin`` re-reading
the partition rebuilds a state that makes every later decision exactly as this one would: the
oldest offset still held by an open or remembered impression, an unexpired dedupe entry or the
clock, lowered so that no re-read event depends on an event before it (a duplicate of it, a
feedback joined to it, an impression closed by its clock). A worker that commits only that
offset, after the records were acked, loses nothing on a crash; the re-read repeats records
with identical ids and contents, which downstream dedupes. Two caveats: ``rating_centre="user"``
keeps per-user means that a re-read rebuilds only from the re-read ratings, and the
``max_open_windows`` / ``max_dedupe_entries`` safety valves, when they fire, close or forget
state early.

**Durable state.** With ``track_changes=True`` the join records which entries its events changed;
:meth:`changes` returns them (and the clock) since the last call, and :meth:`restore` rebuilds a
join from the latest entries. A worker that makes the changes durable with each commit (the
reward worker's changelog topic, :mod:`recsys.rewards.state`) commits its consumer position, not
:meth:`safe_offset`: a restored join decides every later event exactly as the uninterrupted one
(user rating means included). Entries past their expiry (event time, by the restored clock) are
not restored, so an entry that simply expired needs no removal record; only the safety valves
remove live entries, and they are reported as removals.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from recsys.events import Event, RewardRecord
from recsys.rewards.rules import RewardRules

if TYPE_CHECKING:
    from recsys.config import RewardSettings

LATE_RULES = ("organic", "drop")

# Kinds of state entries (see RewardJoin.changes): one per event_id (its dedupe entry and, for an
# impression, the remembered impression), one per user (rating mean), and the partition's clock.
EVENT_ENTRY, RATING_ENTRY, CLOCK_ENTRY = "e", "r", "m"


class StateEntry(NamedTuple):
    """One entry of a join's state, as :meth:`RewardJoin.changes` reports it.

    ``value`` is JSON-ready (lists, numbers, strings, None), or None for a removed entry.
    ``expires`` is the event time at which the entry is dead anyway (None: never), so a
    changelog can drop it once the clock is there; for a removal, when the removed entry would
    have expired.
    """

    kind: str
    key: str
    value: Any
    expires: int | None


def feedback_reward_id(event_id: str) -> str:
    """reward_id of the record made by a feedback event (joined or organic)."""
    return hashlib.sha1(
        b"feedback:" + event_id.encode("utf-8", "surrogatepass"), usedforsecurity=False
    ).hexdigest()


def default_reward_id(impression_event_id: str) -> str:
    """reward_id of an impression's default record."""
    return hashlib.sha1(
        b"default:" + impression_event_id.encode("utf-8", "surrogatepass"), usedforsecurity=False
    ).hexdigest()


def encode_reward(r: RewardRecord) -> bytes:
    """The wire form of a reward record: the bytes of :meth:`RewardRecord.to_bytes`, built
    without ``asdict`` and ``json.dumps`` (this runs once per record in the worker)."""
    return (
        f'{{"reward_id":{_str(r.reward_id)},"user_id":{_str(r.user_id)},'
        f'"item_id":{_str(r.item_id)},"reward":{_float(r.reward)},"ts":{int(r.ts)},'
        f'"kind":{_str(r.kind)},"propensity":{_opt_float(r.propensity)},'
        f'"position":{"null" if r.position is None else int(r.position)},'
        f'"model_version":{_opt_str(r.model_version)},"request_id":{_opt_str(r.request_id)}}}'
    ).encode()


_str = json.encoder.encode_basestring_ascii  # what json.dumps uses for str (ensure_ascii)


def _float(v: float) -> str:
    if v != v or v in (math.inf, -math.inf):
        raise ValueError(f"reward fields must be finite, got {v}")
    return float.__repr__(float(v))


def _opt_float(v: float | None) -> str:
    return "null" if v is None else _float(v)


def _opt_str(v: str | None) -> str:
    return "null" if v is None else _str(v)


class _Impression:
    __slots__ = (
        "close_at",
        "closed",
        "dead",
        "end",
        "event",
        "expire_at",
        "forced",
        "joined",
        "offset",
    )

    def __init__(self, event: Event, offset: int, window: int, lateness: int, keep: int) -> None:
        self.event = event
        self.offset = offset
        self.end = event.ts + window
        self.close_at = self.end + lateness
        self.expire_at = self.close_at + keep
        self.joined = False
        self.closed = False
        self.forced = False  # closed early by the max_open_windows valve
        self.dead = False


class RewardJoin:
    """The reward join of one partition (see the module docstring for the semantics).

    Parameters
    ----------
    rules:
        Reward values of feedback events; default :class:`RewardRules`.
    window_ms:
        Attribution window W after an impression, event time.
    allowed_lateness_ms:
        L: a window closes when the partition's clock passes its end by this much.
    late_rule:
        ``organic`` (emit late feedback as an organic reward) or ``drop``.
    late_retention_ms:
        T: how long after its window an impression is remembered to recognise late feedback.
    dedupe_horizon_ms:
        How long (event time) an ``event_id`` is remembered to drop duplicates.
    max_open_windows, max_dedupe_entries:
        Safety valves on memory: beyond them the earliest-closing window closes early, and the
        oldest ``event_id`` is forgotten. (With ``rating_centre="user"``, at most
        ``max_dedupe_entries`` users' rating means are kept, the oldest dropped first.)
    track_changes:
        Record changed entries for :meth:`changes` (off by default: a join nobody asks would
        keep them all).
    """

    def __init__(
        self,
        rules: RewardRules | None = None,
        *,
        window_ms: int = 30 * 60 * 1000,
        allowed_lateness_ms: int = 2 * 60 * 1000,
        late_rule: str = "organic",
        late_retention_ms: int = 10 * 60 * 1000,
        dedupe_horizon_ms: int = 10 * 60 * 1000,
        max_open_windows: int = 1_000_000,
        max_dedupe_entries: int = 2_000_000,
        track_changes: bool = False,
    ) -> None:
        for name, v, low in (
            ("window_ms", window_ms, 1),
            ("allowed_lateness_ms", allowed_lateness_ms, 0),
            ("late_retention_ms", late_retention_ms, 0),
            ("dedupe_horizon_ms", dedupe_horizon_ms, 0),
            ("max_open_windows", max_open_windows, 1),
            ("max_dedupe_entries", max_dedupe_entries, 1),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if late_rule not in LATE_RULES:
            raise ValueError(f"late_rule must be one of {LATE_RULES}, got {late_rule!r}")
        self.rules = rules or RewardRules()
        self.window_ms = window_ms
        self.allowed_lateness_ms = allowed_lateness_ms
        self.late_rule = late_rule
        self.late_retention_ms = late_retention_ms
        self.dedupe_horizon_ms = dedupe_horizon_ms
        self.max_open_windows = max_open_windows
        self.max_dedupe_entries = max_dedupe_entries
        self._user_centre = self.rules.rating_centre == "user"
        self._emit_late = late_rule == "organic"

        self._clock: int | None = None  # max ts seen
        self._clock_offset = -1  # offset of the event that set it
        self._next_offset: int | None = None  # one past the last offset seen
        self._imps: dict[str, _Impression] = {}  # remembered impressions by event_id
        self._by_request: dict[tuple[str, str, str], _Impression] = {}
        self._by_item: dict[tuple[str, str], list[_Impression]] = {}
        self._ledger: deque[_Impression] = deque()  # remembered impressions, offset order
        self._closing: list[tuple[int, int, _Impression]] = []  # heap by close_at
        self._expiring: list[tuple[int, int, _Impression]] = []  # heap by expire_at
        self._seen: dict[str, tuple[int, int]] = {}  # event_id -> (expire_at, offset)
        self._seen_order: deque[tuple[int, int, str]] = deque()  # arrival (offset) order
        self._deps: deque[tuple[int, int]] = deque()  # (a, b): event b depends on offset a
        self._ratings: dict[str, list[float]] = {}  # user -> [count, sum] (user centre mode)
        self._open = 0
        # Changed since the last changes(): event_ids, users; None when not tracking.
        self._dirty: set[str] | None = set() if track_changes else None
        self._dirty_users: set[str] = set()
        self._removed: dict[str, int] = {}  # event_id -> expiry of a live entry a valve removed
        self._reported_offset: int | None = None  # _next_offset at the last changes()
        self.duplicates = 0
        self.late = 0
        self.late_impressions = 0
        self.forced_closes = 0

    @classmethod
    def from_settings(
        cls,
        settings: RewardSettings,
        rules: RewardRules | None = None,
        *,
        track_changes: bool = False,
    ) -> RewardJoin:
        return cls(
            rules or RewardRules.from_settings(settings),
            window_ms=settings.window_ms,
            allowed_lateness_ms=settings.allowed_lateness_ms,
            late_rule=settings.late_rule,
            late_retention_ms=settings.late_retention_ms,
            dedupe_horizon_ms=settings.dedupe_horizon_ms,
            max_open_windows=settings.max_open_windows,
            max_dedupe_entries=settings.max_dedupe_entries,
            track_changes=track_changes,
        )

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def open_windows(self) -> int:
        """Impressions whose window is still open."""
        return self._open

    @property
    def remembered_impressions(self) -> int:
        """Open plus closed-but-remembered impressions."""
        return len(self._imps)

    @property
    def dedupe_entries(self) -> int:
        return len(self._seen)

    @property
    def clock(self) -> int | None:
        """The largest ``ts`` seen (None before the first event)."""
        return self._clock

    @property
    def next_offset(self) -> int | None:
        """One past the last offset seen (None before any record)."""
        return self._next_offset

    # -- the one-event API -----------------------------------------------------------------------
    def update(
        self, event: Event, offset: int | None = None, clock_cap: int | None = None
    ) -> list[RewardRecord]:
        """Take one event (at ``offset`` in the partition; default: the next one).

        Returns the records it makes final: its own joined/organic record, and the defaults of
        the windows its ``ts`` closed. Offsets must increase. ``clock_cap`` (e.g. the Kafka
        record's timestamp) bounds how far this event may move the clock: an event stamped
        minutes ahead by a skewed client then cannot close everyone else's windows early.
        """
        if offset is None:
            offset = 0 if self._next_offset is None else self._next_offset
        self._next_offset = offset + 1
        out: list[RewardRecord] = []
        eid = event.event_id
        clock = self._clock
        hit = self._seen.get(eid)
        if hit is not None and clock is not None and hit[0] > clock:
            self._duplicate(hit[1], offset)
            return out
        imp = self._imps.get(eid)
        if imp is not None:
            self._duplicate(imp.offset, offset)
            return out
        ts = event.ts
        t = ts if clock_cap is None or ts <= clock_cap else clock_cap
        if clock is None or t > clock:
            self._clock = clock = t
            self._clock_offset = offset
            self._advance(clock, out)
        self._remember(eid, ts + self.dedupe_horizon_ms, offset)
        if event.type == "impression":
            self._open_window(event, offset, clock, out)
        else:
            self._feedback(event, offset, out)
        return out

    def skip(self, offset: int) -> None:
        """A record at ``offset`` that carried no event (rejected): only the position moves."""
        self._next_offset = offset + 1

    def close_all(self) -> list[RewardRecord]:
        """End of stream: close every open window now (offline runs and tests)."""
        out: list[RewardRecord] = []
        while self._closing:
            imp = heapq.heappop(self._closing)[2]
            if not imp.closed:
                self._close(imp, out)
        return out

    def safe_offset(self) -> int | None:
        """The offset to commit: re-reading from it rebuilds this state (see the module doc).

        None before any record was seen.
        """
        x = self._next_offset
        if x is None:
            return None
        ledger = self._ledger
        while ledger and ledger[0].dead:
            ledger.popleft()
        if ledger and ledger[0].offset < x:
            x = ledger[0].offset
        if self._seen_order and self._seen_order[0][1] < x:
            x = self._seen_order[0][1]
        if 0 <= self._clock_offset < x:
            x = self._clock_offset
        # No re-read event may depend on an event before the restart point.
        for a, b in reversed(self._deps):
            if b < x:
                break
            if a < x:
                x = a
        deps = self._deps
        while deps and deps[0][1] < x:
            deps.popleft()
        return x

    # -- durable state ---------------------------------------------------------------------------
    def changes(self) -> list[StateEntry]:
        """The entries changed since the last call (needs ``track_changes=True``).

        One :class:`StateEntry` per changed event_id (its live dedupe entry and remembered
        impression; None when a safety valve removed it), per changed user rating mean, and the
        clock entry (clock, the offset that set it, the next offset) whenever the position
        moved. Applying every call's entries in order, latest per ``(kind, key)`` winning, and
        handing them to :meth:`restore` rebuilds this join as of the last call.
        """
        dirty = self._dirty
        if dirty is None:
            raise RuntimeError("changes() needs RewardJoin(track_changes=True)")
        clock = self._clock
        out: list[StateEntry] = []
        for eid in dirty:
            entry = self._event_entry(eid, clock)
            if entry is not None:
                out.append(entry)
        dirty.clear()
        self._removed.clear()
        for user in self._dirty_users:
            stats = self._ratings.get(user)
            value = None if stats is None else [stats[0], stats[1]]
            out.append(StateEntry(RATING_ENTRY, user, value, None))
        self._dirty_users.clear()
        nxt = self._next_offset
        if nxt is not None and (out or nxt != self._reported_offset):
            out.append(StateEntry(CLOCK_ENTRY, "", [clock, self._clock_offset, nxt], None))
        self._reported_offset = nxt
        return out

    def _event_entry(self, eid: str, clock: int | None) -> StateEntry | None:
        seen = self._seen.get(eid)
        if seen is not None and clock is not None and seen[0] <= clock:
            seen = None  # expired: the dedupe check ignores it already
        imp = self._imps.get(eid)
        if seen is None and imp is None:
            removed = self._removed.get(eid)
            # An entry that just expired needs no record: restore drops it by the clock.
            return None if removed is None else StateEntry(EVENT_ENTRY, eid, None, removed)
        iv: list[Any] | None = None
        expires = seen[0] if seen is not None else None
        if imp is not None:
            ev = imp.event
            owner = (
                ev.request_id is not None
                and self._by_request.get((ev.user_id, ev.request_id, ev.item_id)) is imp
            )
            iv = [
                ev.user_id,
                ev.item_id,
                ev.ts,
                ev.request_id,
                ev.position,
                ev.propensity,
                ev.value,
                ev.model_version,
                imp.offset,
                imp.joined,
                imp.forced,
                owner,
            ]
            if expires is None or imp.expire_at > expires:
                expires = imp.expire_at
        value = [
            None if seen is None else seen[0],
            None if seen is None else seen[1],
            iv,
        ]
        return StateEntry(EVENT_ENTRY, eid, value, expires)

    def restore(self, entries: Iterable[StateEntry | tuple[Any, ...]]) -> None:
        """Rebuild a fresh join from the latest entry per ``(kind, key)`` of :meth:`changes`.

        Entries whose expiry the restored clock has passed are left out, as the join would
        have forgotten them. Without a clock entry (nothing was ever recorded) the join stays
        empty.
        """
        if self._next_offset is not None or self._imps or self._seen or self._ratings:
            raise RuntimeError("restore() needs a fresh RewardJoin")
        meta: list[Any] | None = None
        events: list[tuple[str, list[Any]]] = []
        ratings: dict[str, list[float]] = {}
        for entry in entries:
            kind, key, value = entry[0], entry[1], entry[2]
            if value is None:
                continue
            if kind == CLOCK_ENTRY:
                meta = value
            elif kind == EVENT_ENTRY:
                events.append((key, value))
            elif kind == RATING_ENTRY:
                ratings[key] = [float(value[0]), float(value[1])]
            else:
                raise ValueError(f"unknown state entry kind {kind!r}")
        if meta is None:
            if events or ratings:
                raise ValueError("state entries without a clock entry")
            return
        clock, self._clock_offset, self._next_offset = meta[0], int(meta[1]), int(meta[2])
        self._clock = None if clock is None else int(clock)
        self._reported_offset = self._next_offset
        self._ratings = ratings
        seen: list[tuple[int, int, str]] = []
        imps: list[tuple[_Impression, bool]] = []
        W, L, T = self.window_ms, self.allowed_lateness_ms, self.late_retention_ms
        for eid, (sx, soff, iv) in events:
            if sx is not None and (clock is None or sx > clock):
                seen.append((int(soff), int(sx), eid))
            if iv is None:
                continue
            user, item, ts, req, pos, prop, val, mv, off, joined, forced, owner = iv
            ev = Event(eid, "impression", user, item, int(ts), req, pos, prop, val, mv)
            imp = _Impression(ev, int(off), W, L, T)
            if clock is not None and imp.expire_at <= clock:
                continue
            imp.joined = bool(joined)
            imp.forced = bool(forced)
            imp.closed = imp.forced or (clock is not None and imp.close_at <= clock)
            imps.append((imp, bool(owner)))
        seen.sort()  # arrival order, as the valve and the expiry sweep expect
        for soff, sx, eid in seen:
            self._seen[eid] = (sx, soff)
            self._seen_order.append((sx, soff, eid))
        imps.sort(key=lambda t: t[0].offset)
        for imp, owner in imps:
            ev = imp.event
            self._imps[ev.event_id] = imp
            self._ledger.append(imp)
            self._by_item.setdefault((ev.user_id, ev.item_id), []).append(imp)
            if owner and ev.request_id is not None:
                self._by_request[(ev.user_id, ev.request_id, ev.item_id)] = imp
            if imp.closed:
                heapq.heappush(self._expiring, (imp.expire_at, imp.offset, imp))
            else:
                heapq.heappush(self._closing, (imp.close_at, imp.offset, imp))
                self._open += 1

    # -- internals -------------------------------------------------------------------------------
    def _duplicate(self, first_offset: int, offset: int) -> None:
        self.duplicates += 1
        self._deps.append((first_offset, offset))

    def _remember(self, eid: str, expire_at: int, offset: int) -> None:
        self._seen[eid] = (expire_at, offset)
        self._seen_order.append((expire_at, offset, eid))
        dirty = self._dirty
        if dirty is not None:
            dirty.add(eid)
        if len(self._seen) > self.max_dedupe_entries:
            while len(self._seen) > self.max_dedupe_entries and self._seen_order:
                _, off, old = self._seen_order.popleft()
                cur = self._seen.get(old)
                if cur is not None and cur[1] == off:
                    del self._seen[old]
                    if dirty is not None and self._clock is not None and cur[0] > self._clock:
                        dirty.add(old)  # a live entry removed early: report the removal
                        self._removed[old] = cur[0]

    def _advance(self, clock: int, out: list[RewardRecord]) -> None:
        """The clock moved to ``clock``: close due windows, forget expired state."""
        closing = self._closing
        while closing and closing[0][0] <= clock:
            imp = heapq.heappop(closing)[2]
            if not imp.closed:
                self._close(imp, out)
        expiring = self._expiring
        while expiring and expiring[0][0] <= clock:
            self._forget(heapq.heappop(expiring)[2])
        order, seen = self._seen_order, self._seen
        while order and order[0][0] <= clock:
            _, off, eid = order.popleft()
            cur = seen.get(eid)
            if cur is not None and cur[1] == off:
                del seen[eid]

    def _open_window(self, event: Event, offset: int, clock: int, out: list[RewardRecord]) -> None:
        if event.ts + self.window_ms + self.allowed_lateness_ms + self.late_retention_ms <= clock:
            # Older than any impression still remembered: it may be a re-send of one that had
            # its outcome (joined, or a default) and was forgotten; a second outcome would
            # contradict the first, so it gets none (counted in late_impressions).
            self.late_impressions += 1
            self._deps.append((self._clock_offset, offset))
            return
        imp = _Impression(
            event, offset, self.window_ms, self.allowed_lateness_ms, self.late_retention_ms
        )
        self._imps[event.event_id] = imp
        self._ledger.append(imp)
        if event.request_id is not None:
            rkey = (event.user_id, event.request_id, event.item_id)
            prev = self._by_request.get(rkey)
            if prev is not None and self._dirty is not None:
                self._dirty.add(prev.event.event_id)  # it no longer answers for the request
            self._by_request[rkey] = imp
        self._by_item.setdefault((event.user_id, event.item_id), []).append(imp)
        self._open += 1
        if imp.close_at <= clock:
            # Arrived after its window closed (by another event's clock): default at once.
            self._deps.append((self._clock_offset, offset))
            self._close(imp, out)
            return
        heapq.heappush(self._closing, (imp.close_at, offset, imp))
        while self._open > self.max_open_windows and self._closing:
            early = heapq.heappop(self._closing)[2]
            if not early.closed:
                self.forced_closes += 1
                self._close(early, out)
                early.forced = True
                if self._dirty is not None:
                    self._dirty.add(early.event.event_id)

    def _close(self, imp: _Impression, out: list[RewardRecord]) -> None:
        imp.closed = True
        self._open -= 1
        if not imp.joined:
            ev = imp.event
            out.append(
                RewardRecord(
                    reward_id=default_reward_id(ev.event_id),
                    user_id=ev.user_id,
                    item_id=ev.item_id,
                    reward=0.0,
                    ts=ev.ts,
                    kind="default",
                    propensity=ev.propensity,
                    position=ev.position,
                    model_version=ev.model_version,
                    request_id=ev.request_id,
                )
            )
        heapq.heappush(self._expiring, (imp.expire_at, imp.offset, imp))

    def _forget(self, imp: _Impression) -> None:
        if imp.dead:
            return
        imp.dead = True
        ev = imp.event
        if self._imps.get(ev.event_id) is imp:
            del self._imps[ev.event_id]
        if ev.request_id is not None:
            key = (ev.user_id, ev.request_id, ev.item_id)
            if self._by_request.get(key) is imp:
                del self._by_request[key]
        ikey = (ev.user_id, ev.item_id)
        same = self._by_item.get(ikey)
        if same is not None:
            same.remove(imp)
            if not same:
                del self._by_item[ikey]

    def _feedback(self, event: Event, offset: int, out: list[RewardRecord]) -> None:
        ts = event.ts
        imp: _Impression | None = None
        if event.request_id is not None:
            imp = self._by_request.get((event.user_id, event.request_id, event.item_id))
        else:
            for c in self._by_item.get((event.user_id, event.item_id), ()):
                if c.event.ts <= ts and (
                    imp is None or (c.event.ts, c.offset) > (imp.event.ts, imp.offset)
                ):
                    imp = c
        reward = self._value(event)
        if imp is not None and ts < imp.end + self.late_retention_ms:
            self._deps.append((imp.offset, offset))
            if ts < imp.end and not imp.closed:
                if not imp.joined and self._dirty is not None:
                    self._dirty.add(imp.event.event_id)
                imp.joined = True
                iv = imp.event
                out.append(
                    RewardRecord(
                        reward_id=feedback_reward_id(event.event_id),
                        user_id=event.user_id,
                        item_id=event.item_id,
                        reward=reward,
                        ts=iv.ts,
                        kind="joined",
                        propensity=iv.propensity,
                        position=iv.position,
                        model_version=iv.model_version,
                        request_id=iv.request_id,
                    )
                )
                return
            self.late += 1
            if not self._emit_late:
                return
        out.append(
            RewardRecord(
                reward_id=feedback_reward_id(event.event_id),
                user_id=event.user_id,
                item_id=event.item_id,
                reward=reward,
                ts=ts,
                kind="organic",
                propensity=None,
                position=event.position,
                model_version=event.model_version,
                request_id=event.request_id,
            )
        )

    def _value(self, event: Event) -> float:
        if event.type == "rating" and self._user_centre and event.value is not None:
            stats = self._ratings.get(event.user_id)
            if stats is None:
                stats = self._ratings[event.user_id] = [0.0, 0.0]
                if len(self._ratings) > self.max_dedupe_entries:
                    dropped = next(iter(self._ratings))
                    del self._ratings[dropped]
                    if self._dirty is not None:
                        self._dirty_users.add(dropped)
            if self._dirty is not None:
                self._dirty_users.add(event.user_id)
            centre = self.rules.user_centre(int(stats[0]), stats[1])
            stats[0] += 1
            stats[1] += event.value
            return self.rules.value("rating", event.value, centre)
        return self.rules.value(event.type, event.value)
