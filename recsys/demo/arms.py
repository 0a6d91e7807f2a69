"""Baseline policies for the closed-loop comparison: random, most-popular, epsilon-greedy.

Each builds :class:`Slate` objects whose ``propensity`` is the item's marginal probability of
being in the slate under the policy, and learns from events with ``update``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from recsys.events import Event, Slate, SlateItem


class _Base:
    name = "base"

    def __init__(self, items: Sequence[str], k: int, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.rng = np.random.default_rng(seed)
        self.items: list[str] = []
        self._index: dict[str, int] = {}
        self.clicks = np.zeros(0)
        self.impressions = np.zeros(0)
        self.add_items(items)

    def add_items(self, item_ids: Iterable[str]) -> None:
        """Make items eligible (cold start: a new item starts with no counts)."""
        new = [i for i in dict.fromkeys(item_ids) if i not in self._index]
        for i in new:
            self._index[i] = len(self.items)
            self.items.append(i)
        self.clicks = np.concatenate([self.clicks, np.zeros(len(new))])
        self.impressions = np.concatenate([self.impressions, np.zeros(len(new))])

    def update(self, events: Iterable[Event]) -> None:
        """Count impressions and clicks of known items."""
        for e in events:
            j = self._index.get(e.item_id)
            if j is None:
                continue
            if e.type == "impression":
                self.impressions[j] += 1
            elif e.type == "click":
                self.clicks[j] += 1

    def _slate(
        self, user_id: str, now_ms: int, request_id: str, chosen: np.ndarray, prop: np.ndarray
    ) -> Slate:
        items = tuple(
            SlateItem(self.items[int(j)], float(-p), float(prop[p]), p)
            for p, j in enumerate(chosen)
        )
        return Slate(request_id, user_id, self.name, now_ms, items)

    def _random(self) -> np.ndarray:
        return self.rng.choice(len(self.items), size=min(self.k, len(self.items)), replace=False)


class RandomArm(_Base):
    """k distinct items uniformly at random; propensity k/n for every item."""

    name = "random"

    def slate(self, user_id: str, now_ms: int, request_id: str) -> Slate:
        chosen = self._random()
        prop = np.full(len(chosen), len(chosen) / len(self.items))
        return self._slate(user_id, now_ms, request_id, chosen, prop)


class MostPopularArm(_Base):
    """The k items with the most observed clicks (ties at random); deterministic, propensity 1."""

    name = "most_popular"

    def slate(self, user_id: str, now_ms: int, request_id: str) -> Slate:
        # A random tie-break key keeps unclicked items from always being the same ones.
        order = np.lexsort((self.rng.random(len(self.items)), -self.clicks))
        chosen = order[: self.k]
        return self._slate(user_id, now_ms, request_id, chosen, np.ones(len(chosen)))


class EpsilonGreedyArm(_Base):
    """With probability epsilon a uniformly random slate, else the top-k by estimated CTR.

    CTR estimates are Beta-smoothed: (clicks + prior_clicks) / (impressions + prior_impressions),
    so unseen items start at the prior mean. The marginal inclusion probability is exact:
    (1 - epsilon)·[item in greedy top-k] + epsilon·k/n.
    """

    name = "epsilon_greedy"

    def __init__(
        self,
        items: Sequence[str],
        k: int,
        epsilon: float = 0.1,
        prior_clicks: float = 1.0,
        prior_impressions: float = 20.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        if prior_clicks <= 0 or prior_impressions <= prior_clicks:
            raise ValueError(
                "prior_clicks must be > 0 and prior_impressions > prior_clicks, got "
                f"{prior_clicks}, {prior_impressions}"
            )
        super().__init__(items, k, seed)
        self.epsilon = epsilon
        self.prior_clicks = prior_clicks
        self.prior_impressions = prior_impressions

    def ctr(self) -> np.ndarray:
        return (self.clicks + self.prior_clicks) / (self.impressions + self.prior_impressions)

    def slate(self, user_id: str, now_ms: int, request_id: str) -> Slate:
        n = len(self.items)
        k = min(self.k, n)
        greedy = np.lexsort((self.rng.random(n), -self.ctr()))[:k]
        in_greedy = np.zeros(n, dtype=bool)
        in_greedy[greedy] = True
        chosen = self._random() if self.rng.random() < self.epsilon else greedy
        prop = (1 - self.epsilon) * in_greedy[chosen] + self.epsilon * k / n
        return self._slate(user_id, now_ms, request_id, chosen, prop)
