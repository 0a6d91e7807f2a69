"""Hypothesis properties of the join's durable state: ``changes()`` and ``restore()``.

The streams are those of the join properties (bounded disorder, duplicates, every late rule and
rating centre, user means included). A "changelog" here is the latest entry per (kind, key) of
every ``changes()`` call so far, as a compacted topic keeps it.

- a join restored from the changelog at any point decides every later event exactly as the
  uninterrupted join (lockstep, event by event);
- crashing at random and restarting from the last durable state repeats at most the records of
  the batch in flight, and the deduplicated output equals the uninterrupted run's;
- changes() reports nothing twice when nothing changed, and restore needs a fresh join.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys.events import Event, RewardRecord
from recsys.rewards import RewardJoin, RewardRules
from recsys.rewards.join import CLOCK_ENTRY, StateEntry
from recsys.rewards.state import PartitionLog, fold, key_prefix
from tests.unit.test_rewards_properties import PROPS, L, Stream, W, _by_id, _run, streams

Changelog = dict[tuple[str, str], StateEntry]


def _join(s: Stream, **kw: Any) -> RewardJoin:
    return RewardJoin(
        RewardRules(rating_centre=s.centre),
        window_ms=W,
        allowed_lateness_ms=L,
        late_rule=s.late_rule,
        late_retention_ms=s.retention,
        dedupe_horizon_ms=s.horizon,
        track_changes=True,
        **kw,
    )


def _apply(log: Changelog, entries: list[StateEntry]) -> None:
    for e in entries:
        log[(e.kind, e.key)] = e


def _restored(s: Stream, log: Changelog, **kw: Any) -> RewardJoin:
    j = _join(s, **kw)
    j.restore(list(log.values()))
    return j


@PROPS
@given(streams(max_disorder=400), st.integers(0, 2**32 - 1))
def test_restored_join_decides_every_later_event_like_the_original(s: Stream, seed: int) -> None:
    rng = random.Random(seed)
    events = list(s.events)
    cut = rng.randrange(len(events) + 1)
    original = _join(s)
    log: Changelog = {}
    for pos in range(cut):
        original.update(events[pos], pos)
        if rng.random() < 0.3:
            _apply(log, original.changes())
    _apply(log, original.changes())
    restored = _restored(s, log)
    assert restored.next_offset == original.next_offset
    assert restored.clock == original.clock
    assert restored.open_windows == original.open_windows
    assert restored.remembered_impressions == original.remembered_impressions
    for pos in range(cut, len(events)):
        assert restored.update(events[pos], pos) == original.update(events[pos], pos), pos
    assert restored.close_all() == original.close_all()


def _crashing_run(s: Stream, seed: int) -> tuple[list[RewardRecord], int]:
    """Batches: update, then (flush) the records are delivered and the changes made durable.
    A crash anywhere delivers part of the batch in flight; the restart restores the durable
    state and resumes at its next offset. Returns the delivered records and the most records
    of one batch."""
    rng = random.Random(seed)
    events = list(s.events)
    log: Changelog = {}
    delivered: list[RewardRecord] = []
    pending: list[RewardRecord] = []
    biggest = 0
    crashes = 0
    j = _join(s)
    pos = 0
    while pos < len(events):
        pending.extend(j.update(events[pos], pos))
        pos += 1
        if rng.random() < 0.3 or pos == len(events):  # flush: records acked, state written
            delivered.extend(pending)
            biggest = max(biggest, len(pending))
            pending.clear()
            _apply(log, j.changes())
        if crashes < 6 and rng.random() < 0.08:
            crashes += 1
            delivered.extend(pending[: rng.randrange(len(pending) + 1)])
            biggest = max(biggest, len(pending))
            pending.clear()
            j = _restored(s, log)
            clock = log.get((CLOCK_ENTRY, ""))
            pos = 0 if clock is None else clock.value[2]
    delivered.extend(pending)
    delivered.extend(j.close_all())
    return delivered, biggest


@PROPS
@given(streams(max_disorder=400), st.integers(0, 2**32 - 1))
def test_crash_and_restore_repeats_only_the_batch_in_flight(s: Stream, seed: int) -> None:
    """User rating means included: the restored state carries them."""
    delivered, biggest = _crashing_run(s, seed)
    first: dict[str, RewardRecord] = {}
    for r in delivered:
        if r.reward_id in first:
            assert first[r.reward_id] == r, "a repeated reward_id carries different content"
        else:
            first[r.reward_id] = r
    assert first == _by_id(_run(s))
    # Only records of an unflushed batch can come twice, and each at most once more per crash.
    assert len(delivered) - len(first) <= 6 * biggest


def _imp(k: int, ts: int, **kw: Any) -> Event:
    return Event(f"i{k}", "impression", "u", f"a{k}", ts, request_id="r", position=0, **kw)


def test_changes_report_each_entry_once_and_the_clock_when_it_moves() -> None:
    j = RewardJoin(window_ms=100, allowed_lateness_ms=0, late_retention_ms=0, track_changes=True)
    assert j.changes() == []
    j.update(_imp(1, 1000), 0)
    j.update(Event("c1", "click", "u", "a1", 1010, request_id="r"), 1)
    got = {(e.kind, e.key) for e in j.changes()}
    assert got == {("e", "i1"), ("e", "c1"), ("m", "")}
    assert j.changes() == []  # nothing new
    j.skip(2)  # a rejected record: only the position moves
    assert [(e.kind, e.value) for e in j.changes()] == [("m", [1010, 1, 3])]
    imp = _join_entry(j, "i1")
    assert imp is None  # unchanged entries are not reported again


def _join_entry(j: RewardJoin, eid: str) -> StateEntry | None:
    return next((e for e in j.changes() if e.key == eid), None)


def test_restore_drops_what_the_clock_expired_and_needs_a_fresh_join() -> None:
    j = RewardJoin(window_ms=100, allowed_lateness_ms=0, late_retention_ms=0, track_changes=True)
    j.update(_imp(1, 1000), 0)
    entries = j.changes()
    j.update(Event("x", "click", "v", "b", 10**6), 1)  # moves the clock far past everything
    later = j.changes()
    log: Changelog = {}
    _apply(log, entries)
    _apply(log, later)
    r = RewardJoin(window_ms=100, allowed_lateness_ms=0, late_retention_ms=0, track_changes=True)
    r.restore(list(log.values()))
    assert r.remembered_impressions == 0
    assert r.open_windows == 0
    assert r.next_offset == 2
    with pytest.raises(RuntimeError):
        r.restore([])
    with pytest.raises(RuntimeError):
        RewardJoin().changes()  # not tracking


# -- the changelog layout (recsys.rewards.state) ----------------------------------------------
BUCKET = 50  # event time per bucket: the streams span ~1.5 s, so buckets die and get tombstones
PREFIX = key_prefix("g", "ev", 0)


def _compact(log: list[tuple[bytes, bytes | None]], rng: random.Random) -> list:
    """What a compacted topic may hold: some records superseded by a later one of the same key
    removed, a tombstone only once nothing older of its key is left (Kafka's order), the rest
    in order."""
    last = {k: i for i, (k, _) in enumerate(log)}
    kept = [(k, v) for i, (k, v) in enumerate(log) if last[k] == i or rng.random() >= 0.7]
    older: Counter[bytes] = Counter(k for k, _ in kept)
    out: list[tuple[bytes, bytes | None]] = []
    for k, v in kept:
        older[k] -= 1
        if v is None and older[k] == 0 and not any(o == k for o, _ in out) and rng.random() < 0.7:
            continue
        out.append((k, v))
    return out


@PROPS
@given(streams(max_disorder=400), st.integers(0, 2**32 - 1))
def test_changelog_survives_partial_batches_compaction_and_crashes(s: Stream, seed: int) -> None:
    """The sink's protocol on a simulated compacted topic: per batch the deltas, then (once
    they are acked) the clock record, then the tombstones it allows; a crash may cut any of
    these short. Restoring from the folded changelog resumes exactly: the deduplicated output
    equals the uninterrupted run's, repeats carry identical content, and the live changelog
    stays bounded by the live buckets."""
    rng = random.Random(seed)
    events = list(s.events)
    log: list[tuple[bytes, bytes | None]] = []
    j, plog = _join(s), PartitionLog(PREFIX, BUCKET)
    delivered: list[RewardRecord] = []
    pending: list[RewardRecord] = []
    crashes = 0
    pos = start = 0

    def restart() -> None:
        nonlocal j, plog, pos, start, log
        log = _compact(log, rng)
        entries, plog = fold(log, PREFIX, BUCKET)
        j = _join(s)
        j.restore(entries)
        pos = start = plog.upto or 0
        assert j.next_offset in (None, pos)

    while pos < len(events):
        pending.extend(j.update(events[pos], pos))
        pos += 1
        crash = crashes < 6 and rng.random() < 0.1
        if rng.random() < 0.3 or pos == len(events):
            deltas, clock, upto = plog.batch(j.changes(), start)
            assert clock is not None
            assert upto == pos
            if crash and rng.random() < 0.5:  # some deltas and rewards out, no clock record
                log.extend((d.key, d.value) for d in deltas[: rng.randrange(len(deltas) + 1)])
                delivered.extend(pending[: rng.randrange(len(pending) + 1)])
                pending.clear()
                crashes += 1
                restart()
                continue
            log.extend((d.key, d.value) for d in deltas)
            delivered.extend(pending)  # acked with the deltas, before the clock record
            pending.clear()
            log.append((clock.key, clock.value))
            tombs = plog.durable(upto, j.clock)
            if crash:
                tombs = tombs[: rng.randrange(len(tombs) + 1)]
            log.extend((t.key, None) for t in tombs)
            start = pos
        if crash:
            crashes += 1
            delivered.extend(pending[: rng.randrange(len(pending) + 1)])
            pending.clear()
            restart()
    delivered.extend(pending)
    delivered.extend(j.close_all())

    first: dict[str, RewardRecord] = {}
    for r in delivered:
        if r.reward_id in first:
            assert first[r.reward_id] == r, "a repeated reward_id carries different content"
        else:
            first[r.reward_id] = r
    assert first == _by_id(_run(s))
    # Bounded: what the topic still holds after compaction is live buckets, ratings and the clock.
    latest = dict(log)  # the last record of each key
    live = {k for k, v in latest.items() if v is not None}
    live_keys = {k for keys in plog.buckets.values() for k in keys} | set(plog.rating_keys.values())
    assert live - live_keys - {PREFIX + b'"m"]'} <= set(plog.stale) | _orphans(log, plog)


def _orphans(log: list[tuple[bytes, bytes | None]], plog: PartitionLog) -> set[bytes]:
    """Delta keys of partial batches after the last restore that nothing tombstoned yet."""
    known = {k for keys in plog.buckets.values() for k in keys}
    return {k for k, v in log if v is not None and b'"d"' in k and k not in known}


def test_keys_name_the_group_so_groups_never_share_state() -> None:
    a, b = key_prefix("g1", "ev", 0), key_prefix("g2", "ev", 0)
    j = RewardJoin(track_changes=True)
    j.update(_imp(1, 1000), 0)
    deltas, clock, _ = PartitionLog(a).batch(j.changes(), 0)
    assert clock is not None
    log = [(d.key, d.value) for d in deltas] + [(clock.key, clock.value)]
    assert fold(log, b)[0] == []
    entries, plog = fold(log, a)
    assert plog.upto == 1
    assert {e.key for e in entries} == {"i1", ""}
