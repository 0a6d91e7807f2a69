"""The demo's arms, counted per second of the live phase, and the peers played off the app's path.

Only recsys has to keep to the wall clock: its slates come from the workers, and a late visit
is served from an older slate. The peers and the oracle are pure computation over the same
visits, so :class:`PeerPlayer` queues each visit with its own simulated time and plays the
queue whenever the app loop has time to spare, and to the end once the live phase is over.
A peer's figures then do not depend on when the loop got to its visits, and the app loop
never falls behind real time because a peer is slow (on the demo's 2-core machines the peers
cost more per visit than everything on recsys's path).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from recsys.demo.arms import Arm
from recsys.demo.report import ArmSeries
from recsys.demo.simulator import UserSimulator
from recsys.events import Event, Slate


@dataclass(frozen=True)
class VisitSchedule:
    """When the app's visits happen: visit ``i`` (from 0) at ``start_ms + i / per_s``.

    The schedule clock, not the wall clock, stamps a visit and decides which released items it
    can see, so every arm meets the same users at the same times in every run.

    >>> s = VisitSchedule(start_ms=1_000, per_s=4.0)
    >>> s.due(0.0), s.due(0.6), [s.at_ms(i) for i in range(3)], [s.second(i) for i in (3, 4)]
    (1, 3, [1000, 1250, 1500], [0, 1])
    """

    start_ms: int
    per_s: float

    def due(self, elapsed_s: float) -> int:
        """How many visits are due ``elapsed_s`` into the schedule; each later one falls in a
        second no earlier than ``int(elapsed_s)``, so seconds before that can be closed."""
        return int(elapsed_s * self.per_s) + 1

    def at_ms(self, i: int) -> int:
        return self.start_ms + int(i * 1000 / self.per_s)

    def second(self, i: int) -> int:
        return int(i / self.per_s)


@dataclass
class _Second:
    impressions: int = 0
    clicks: int = 0
    expected: float = 0.0
    new_impressions: int = 0
    new_expected: float = 0.0


@dataclass
class ArmTally:
    """One arm: its own copy of the simulated world and its counts per second of the live phase.

    A visit is counted in the second it was made (``second``), whatever the wall clock says
    when it is played; :meth:`close_until` moves finished seconds into ``series`` (``t`` is a
    second's end, ``second + 1``).
    """

    world: UserSimulator
    series: ArmSeries = field(default_factory=ArmSeries)
    _open: dict[int, _Second] = field(default_factory=dict)
    _closed: int = 0  # seconds [0, _closed) are in the series

    def probabilities(self, slate: Slate, now_ms: int) -> np.ndarray:
        """Each slot's true click probability; call before ``world.respond`` adds fatigue."""
        ids = [s.item_id for s in slate.items]
        attr = self.world.click_probabilities(slate.user_id, ids, now_ms)
        return attr * self.world.examination(np.array([s.position for s in slate.items]))

    def show(self, slate: Slate, now_ms: int, rng: np.random.Generator, second: int) -> list[Event]:
        """Show a slate in this arm's world and count it in ``second``; returns the events."""
        if second < self._closed:  # before the world sees the slate: nothing half-done
            raise ValueError(f"second {second} is already closed (up to {self._closed})")
        p = self.probabilities(slate, now_ms)
        events = self.world.respond(slate, now_ms, rng)
        b = self._open.setdefault(second, _Second())
        ids = [s.item_id for s in slate.items]
        b.impressions += len(ids)
        b.clicks += sum(e.type == "click" for e in events)
        b.expected += float(p.sum())
        new = self.world.release_ms[self.world.item_indices(ids)] > self.world.config.start_ms
        b.new_impressions += int(new.sum())
        b.new_expected += float(p[new].sum())
        return events

    def close_until(self, second: int) -> None:
        """Every second before ``second`` is complete: into the series, empty ones included."""
        while self._closed < second:
            b = self._open.pop(self._closed, _Second())
            self._closed += 1
            self.series.add(
                float(self._closed),
                b.impressions,
                b.clicks,
                b.expected,
                b.new_impressions,
                b.new_expected,
            )


@dataclass(frozen=True)
class _Visit:
    second: int
    user: str
    now_ms: int
    request_id: str


class PeerPlayer:
    """Plays the peers (``policies``, each with its tally) and the oracle on recsys's visits.

    :meth:`release` and :meth:`visit` queue in the order the app saw them; :meth:`play` works
    the queue until a deadline, :meth:`drain` to the end. Each peer draws its clicks from its
    own generator (``rngs``), so the outcome is the same however the work is split in time.
    """

    def __init__(
        self,
        policies: Mapping[str, Arm],
        tallies: Mapping[str, ArmTally],
        oracle: ArmTally,
        rngs: Mapping[str, np.random.Generator],
        k: int,
    ) -> None:
        missing = (set(policies) | {"oracle"}) - set(rngs)
        if missing:
            raise ValueError(f"no random generator for {sorted(missing)}")
        self.policies = dict(policies)
        self.tallies = dict(tallies)
        self.oracle = oracle
        self.rngs = dict(rngs)
        self.k = k
        self._queue: deque[_Visit | list[str]] = deque()
        self.max_backlog = 0  # the most visits waiting at once (how far the peers fell behind)

    @property
    def backlog(self) -> int:
        """Queued visits and releases not yet played."""
        return len(self._queue)

    def release(self, item_ids: list[str]) -> None:
        """Items released now: every peer may show them from the next queued visit on."""
        self._queue.append(list(item_ids))

    def visit(self, second: int, user: str, now_ms: int, request_id: str) -> None:
        """A visit the app made at ``now_ms``, in ``second`` of the live phase."""
        self._queue.append(_Visit(second, user, now_ms, request_id))
        self.max_backlog = max(self.max_backlog, len(self._queue))

    def play(self, deadline: float) -> None:
        """Play queued entries until the queue is empty or ``time.monotonic()`` reaches
        ``deadline`` (each entry is played whole)."""
        while self._queue and time.monotonic() < deadline:
            self._play(self._queue.popleft())

    def play_one(self) -> None:
        """Play the oldest queued entry (if any)."""
        if self._queue:
            self._play(self._queue.popleft())

    def drain(self) -> None:
        """Play everything queued."""
        self.play(deadline=math.inf)

    def close_until(self, second: int) -> None:
        for tally in (*self.tallies.values(), self.oracle):
            tally.close_until(second)

    def _play(self, entry: _Visit | list[str]) -> None:
        if isinstance(entry, list):
            for policy in self.policies.values():
                policy.add_items(entry)
            return
        # A visit in a later second means every earlier second is complete for the peers.
        self.close_until(entry.second)
        for name, policy in self.policies.items():
            s = policy.slate(entry.user, entry.now_ms, entry.request_id)
            events = self.tallies[name].show(s, entry.now_ms, self.rngs[name], entry.second)
            policy.update(events)
        s = self.oracle.world.oracle_slate(entry.user, self.k, entry.now_ms, entry.request_id)
        self.oracle.show(s, entry.now_ms, self.rngs["oracle"], entry.second)
