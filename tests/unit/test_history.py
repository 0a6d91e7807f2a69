"""User histories: positive items, event-time order, last N, no leakage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.history import (
    PAD,
    UserHistories,
    WatchedItems,
    history_mask,
    impression_key,
    is_watched_record,
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
