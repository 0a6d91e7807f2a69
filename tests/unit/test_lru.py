import doctest

import pytest

import recsys.lru
from recsys import metrics
from recsys.lru import LRU


def test_docstring_examples() -> None:
    assert doctest.testmod(recsys.lru).failed == 0


def test_evicts_least_recently_used_and_reports_it() -> None:
    evicted: list[tuple[str, int]] = []
    cache: LRU[str, int] = LRU(3, name="test_lru", on_evict=lambda k, v: evicted.append((k, v)))
    for i, key in enumerate("abc"):
        cache.put(key, i)
    assert cache.get("a") == 0  # "b" becomes the oldest
    assert cache.peek("b") == 1  # a peek does not save it
    cache.put("d", 3)
    cache.put("e", 4)
    assert evicted == [("b", 1), ("c", 2)]
    assert cache.keys() == ["a", "d", "e"]
    assert cache.evictions == 2
    assert cache.pop("a") == 0
    assert "a" not in cache
    assert len(cache) == 2
    gauge = metrics.CACHE_ENTRIES.labels(cache="test_lru")._value.get()
    assert gauge == 2
    assert metrics.CACHE_CAPACITY.labels(cache="test_lru")._value.get() == 3


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        LRU(0, name="x")
