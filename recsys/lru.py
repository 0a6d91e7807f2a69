"""A bounded map: least recently used entries are evicted first, with gauges.

Every per-user or per-item map a worker holds in memory is one of these (or sized by one), so
memory is bounded by settings whatever the number of distinct users. What must outlive an
eviction is written to the store by the owner (``on_evict``) and reloaded on the next miss.

>>> cache = LRU(2, name="doctest")
>>> cache.put("a", 1); cache.put("b", 2)
>>> cache.get("a")
1
>>> cache.put("c", 3)  # "b" is the least recently used now
>>> sorted(cache.keys())
['a', 'c']
>>> cache.evictions
1
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from recsys import metrics

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A dict of at most ``max_entries`` entries; ``get`` and ``put`` mark an entry as used.

    Parameters
    ----------
    max_entries:
        The bound (>= 1).
    name:
        The ``cache`` label of ``recsys_cache_entries``, ``recsys_cache_capacity`` and
        ``recsys_cache_evictions_total``.
    on_evict:
        Called with each evicted ``(key, value)``, after it left the map (e.g. to persist it).
    """

    def __init__(
        self,
        max_entries: int,
        *,
        name: str,
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self.name = name
        self.on_evict = on_evict
        self.evictions = 0
        self._data: OrderedDict[K, V] = OrderedDict()
        self._entries = metrics.CACHE_ENTRIES.labels(cache=name)
        self._evicted = metrics.CACHE_EVICTIONS.labels(cache=name)
        metrics.CACHE_CAPACITY.labels(cache=name).set(max_entries)
        self._entries.set(0)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def keys(self) -> list[K]:
        return list(self._data)

    def items(self) -> list[tuple[K, V]]:
        return list(self._data.items())

    def get(self, key: K) -> V | None:
        """The value, marked as most recently used; None when absent."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The value without marking it as used."""
        return self._data.get(key)

    def put(self, key: K, value: V) -> None:
        """Insert or replace, as most recently used; evicts the oldest entries over the bound."""
        before = len(self._data)
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            old_key, old_value = self._data.popitem(last=False)
            self.evictions += 1
            self._evicted.inc()
            if self.on_evict is not None:
                self.on_evict(old_key, old_value)
        # At the bound a put is an insert plus an eviction: the size, and the gauge, stay.
        if len(self._data) != before:
            self._entries.set(len(self._data))

    def pop(self, key: K) -> V | None:
        """Remove and return the value (no eviction callback: the caller owns it now)."""
        value = self._data.pop(key, None)
        self._entries.set(len(self._data))
        return value

    def clear(self) -> None:
        self._data.clear()
        self._entries.set(0)
