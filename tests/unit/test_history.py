"""User histories: positive items, event-time order, last N, no leakage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.history import (
    PAD,
    ShownItems,
    UserHistories,
    WatchedItems,
    history_mask,
    impression_key,
    is_watched_record,
    not_allowed,
    pad_histories,
)


def test_only_positive_rewards_in_event_time_order() -> None:
    h = UserHistories(max_len=3)
    assert h.add("u", 10, ts=100, reward=1.0)
    assert not h.add("u", 11, ts=110, reward=0.0)
    assert not h.add("u", 12, ts=120, reward=-1.0)
    assert not h.add("u", 13, ts=125, reward=float("nan"))
    assert h.add("u", 14, ts=90, reward=2.0)  # arrives late, belongs earlier
    assert h.get("u") == [14, 10]
    h.add("u", 15, ts=130, reward=1.0)
    h.add("u", 16, ts=140, reward=1.0)
    assert h.get("u") == [10, 15, 16]  # last N
    assert h.get("nobody") == []
    assert h.as_of("nobody", 10**9) == []
    assert "u" in h
    assert len(h) == 1


def test_as_of_is_strictly_before_ts() -> None:
    h = UserHistories(max_len=2)
    for item, ts in [(1, 10), (2, 20), (3, 20), (4, 30)]:
        h.add("u", item, ts, 1.0)
    assert h.as_of("u", 10) == []
    assert h.as_of("u", 11) == [1]
    assert h.as_of("u", 20) == [1]  # same-time items are not in each other's state
    assert h.as_of("u", 21) == [2, 3]
    assert h.as_of("u", 10**9) == [3, 4] == h.get("u")


def test_equal_timestamps_keep_arrival_order() -> None:
    h = UserHistories(max_len=5)
    for item in (7, 8, 9):
        h.add("u", item, 50, 1.0)
    h.add("u", 6, 40, 1.0)
    assert h.get("u") == [6, 7, 8, 9]


def test_retain_bounds_memory() -> None:
    h = UserHistories(max_len=2, retain=3)
    for t in range(10):
        h.add("u", t, t, 1.0)
    users, arrays = h.to_arrays()
    assert users == ["u"]
    assert arrays["items"].tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="retain"):
        UserHistories(max_len=3, retain=2)
    with pytest.raises(ValueError, match="max_len"):
        UserHistories(max_len=0)


def test_arrays_round_trip() -> None:
    h = UserHistories(max_len=3)
    for u, i, t in [("a", 1, 5), ("b", 2, 6), ("a", 3, 7), ("a", 4, 1)]:
        h.add(u, i, t, 1.0)
    users, arrays = h.to_arrays()
    g = UserHistories.from_arrays(users, arrays, 3, 6)
    assert g.get("a") == h.get("a") == [4, 1, 3]
    assert g.get("b") == [2]
    assert g.as_of("a", 6) == [4, 1]
    with pytest.raises(ValueError, match="do not match"):
        UserHistories.from_arrays(["a"], {k: np.asarray(v) for k, v in arrays.items()}, 3, 6)


def test_pad_histories_left_pads_and_truncates() -> None:
    items, lengths = pad_histories([[1, 2], [], [1, 2, 3, 4, 5]], max_len=3)
    assert items.dtype == torch.long
    assert items.tolist() == [[PAD, 1, 2], [PAD, PAD, PAD], [3, 4, 5]]
    assert lengths.tolist() == [2, 0, 3]
    assert history_mask(items).sum(1).tolist() == [2, 0, 3]


def test_a_key_makes_one_entry_per_engaged_impression() -> None:
    h = UserHistories(max_len=5, retain=5)
    key = impression_key("r1", "a")
    assert h.add("u", 1, 10, 1.0, key)  # click
    assert not h.add("u", 1, 11, 1.0, key)  # dwell of the same impression
    assert not h.add("u", 1, 12, 5.0, key)  # purchase
    assert h.add("u", 1, 20, 1.0, impression_key("r2", "a"))  # engaged again, other slate
    assert h.add("u", 1, 21, 1.0, None)  # organic: never a duplicate
    assert h.add("u", 1, 22, 1.0, None)
    assert h.get("u") == [1, 1, 1, 1]
    assert impression_key(None, "a") is None
    for n in range(5):  # the first entry is trimmed: its key may enter again
        h.add("u", 2, 30 + n, 1.0)
    assert h.add("u", 1, 40, 1.0, key)


def test_watched_items_keep_every_feedback_item_newest_bounded() -> None:
    w = WatchedItems(max_len=3)
    assert w.add("u", 1)
    assert not w.add("u", 1)
    for i in (2, 3, 4):
        w.add("u", i)
    assert w.get("u") == [2, 3, 4]
    assert w.get("nobody") == []
    assert is_watched_record("joined")
    assert is_watched_record("organic")
    assert not is_watched_record("default")
    with pytest.raises(ValueError, match="max_len"):
        WatchedItems(0)


def test_max_users_evicts_the_least_recently_active_user() -> None:
    evicted: list[str] = []
    h = UserHistories(max_len=3, max_users=2, name="test_histories", on_evict=evicted.append)
    h.add("a", 1, 10, 1.0)
    h.add("b", 2, 11, 1.0)
    assert h.as_of("a", 20) == [1]  # reading a user's state is activity: "b" is now the oldest
    assert not h.add("c", 9, 12, 0.0)  # a zero reward stores nothing, so evicts nobody
    assert len(h) == 2
    h.add("c", 3, 13, 1.0)
    assert evicted == ["b"]
    assert h.evictions == 1
    assert "b" not in h
    assert h.users() == ["a", "c"]
    assert h.get("b") == []  # an evicted user restarts from an empty history
    h.add("b", 4, 14, 1.0)
    assert h.get("b") == [4]
    assert len(h) == 2


def test_max_users_gauges_report_entries_capacity_and_evictions() -> None:
    from recsys import metrics

    h = UserHistories(max_len=2, max_users=3, name="test_history_gauges")
    for n in range(5):
        h.add(f"u{n}", n, n, 1.0)
    labels = {"cache": "test_history_gauges"}
    assert metrics.CACHE_ENTRIES.labels(**labels)._value.get() == 3
    assert metrics.CACHE_CAPACITY.labels(**labels)._value.get() == 3
    assert metrics.CACHE_EVICTIONS.labels(**labels)._value.get() == 2


def test_arrays_round_trip_keeps_lru_order_and_applies_a_smaller_bound() -> None:
    h = UserHistories(max_len=3, max_users=10, name="test_history_rt")
    for u, i, t in [("a", 1, 5), ("b", 2, 6), ("c", 3, 7), ("a", 4, 8)]:
        h.add(u, i, t, 1.0)
    users, arrays = h.to_arrays()
    assert users == ["b", "c", "a"]  # least recently active first
    g = UserHistories.from_arrays(users, arrays, 3, 6, max_users=2, name="test_history_rt")
    assert g.users() == ["c", "a"]  # the oldest user is the one left out
    assert g.get("a") == [1, 4]
    assert g.evictions == 0  # never loaded, so not evicted
    with pytest.raises(ValueError, match="repeated"):
        UserHistories.from_arrays(["a", "a"], {k: v[:2] for k, v in arrays.items()}, 3, 6)


def test_watched_items_max_users_evicts_the_least_recently_active_user() -> None:
    w = WatchedItems(max_len=5, max_users=2, name="test_watched")
    w.add("a", 1)
    w.add("b", 2)
    w.add("a", 3)
    w.add("c", 4)
    assert w.users() == ["a", "c"]
    assert w.get("b") == []
    assert w.get("a") == [1, 3]
    assert w.evictions == 1
    assert len(w) == 2


def test_shown_items_leave_the_cooldown_after_cooldown_ms_bounded_per_user() -> None:
    s = ShownItems(cooldown_ms=1000, max_len=3)
    s.add("u", 1, 0)
    s.add("u", 2, 500)
    s.add("u", 1, 900)  # shown again: its cooldown restarts
    assert s.recent("u", 1200) == [2, 1]
    assert s.recent("u", 1600) == [1]
    assert s.recent("u", 1900) == []
    assert s.recent("nobody", 0) == []
    for i in (3, 4, 5, 6):
        s.add("u", i, 2000)
    assert s.recent("u", 2000) == [4, 5, 6]  # newest max_len kept
    s.add("u", 7, 5000)  # expired entries leave as new ones come
    assert s.recent("u", 0) == [7]
    off = ShownItems(cooldown_ms=0)
    off.add("u", 1, 0)
    assert off.recent("u", 0) == []
    assert len(off) == 0
    assert not_allowed([1, 2], [2, 3]) == [1, 2, 3]
    assert not_allowed([1], []) == [1]
    with pytest.raises(ValueError, match="cooldown_ms"):
        ShownItems(-1)
    with pytest.raises(ValueError, match="max_len"):
        ShownItems(10, max_len=0)
