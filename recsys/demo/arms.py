"""The closed loop's peers: random, most-popular, an ε-greedy bandit, LinUCB and Vowpal Wabbit.

Every arm plays by recsys's rules, so a comparison measures the policy and nothing else:

- **The same warm-start data**: :meth:`Arm.warm_start` gets the very events recsys is backfilled
  with (the catalogue's MovieLens ratings), valued by the same :class:`RewardRules`.
- **The same mask**: an item the user gave any feedback to (watched, rated, skipped) is never
  shown again, by the one definition recsys serves with
  (:class:`recsys.history.WatchedItems`, :data:`recsys.history.WATCHED_EVENT_TYPES`), and an
  item shown within the publisher's cooldown is not shown again
  (:class:`recsys.history.ShownItems`, ``cooldown_ms``).
- **The same user features**: the history is :class:`recsys.history.UserHistories` (positive
  items, event-time order, last ``history_len``, one entry per engaged impression), and item
  features come from the same frozen text encoder's vectors.
- **The same propensity**: every slate is drawn by :func:`recsys.policy.rank`, so each item's
  ``propensity`` is its single-draw probability over the allowed set (see :mod:`recsys.policy`);
  deterministic arms (most-popular, LinUCB) log 1.
- **Online**: each arm learns from its own slates' impressions and clicks (``update``).

Arms: :class:`RandomArm`, :class:`MostPopularArm` (positive-feedback counts),
:class:`EpsilonGreedyArm` (non-personalised: Beta-smoothed CTR per item, ε-greedy),
:class:`LinUCBArm` (personalised: ridge regression of the click on ``user ⊗ item`` text
features plus a per-item bias, with an upper-confidence bonus) and :class:`VWArm` (Vowpal
Wabbit's ``cb_explore_adf`` with softmax exploration over user-history and item-text features
and the item id; ``pip install 'recsys[vw]'``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from recsys.events import Event, Slate, SlateItem
from recsys.history import (
    WATCHED_EVENT_TYPES,
    ShownItems,
    UserHistories,
    WatchedItems,
    impression_key,
    not_allowed,
)
from recsys.policy import Exploration, rank
from recsys.rewards.rules import RewardRules

FEATURE_DIM = 16
"""Width of the item-text features the linear arms use (a PCA of the encoder's vectors)."""


def reduce_vectors(
    vectors: np.ndarray, dim: int = FEATURE_DIM, fit_rows: int | None = None
) -> np.ndarray:
    """PCA of ``vectors [I, D]`` to ``dim`` components, unit-normalised rows (float64).

    ``fit_rows``: fit the components on the first rows only (the initial catalogue), so items
    released later are projected, never looked at in advance.
    """
    x = np.asarray(vectors, dtype=np.float64)
    fit = x[: fit_rows or len(x)]
    mean = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    out = (x - mean) @ vt[: min(dim, vt.shape[0])].T
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norm > 0, norm, 1.0)


class Arm(ABC):
    """Shared plumbing: the item list, what each user watched, their history, the slate draw.

    Subclasses implement :meth:`scores` (one row of item scores for a user) and may override
    :meth:`learn` (online updates from the arm's own events) and :meth:`learn_warm`.
    """

    name = "arm"
    exploration: Exploration = "greedy"
    temperature = 1.0
    epsilon = 0.0

    def __init__(
        self,
        items: Sequence[str],
        k: int,
        seed: int = 0,
        *,
        rules: RewardRules | None = None,
        history_len: int = 20,
        cooldown_ms: int = 0,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.rules = rules or RewardRules()
        self.items: list[str] = []
        self._index: dict[str, int] = {}
        self.watched = WatchedItems()
        self.shown = ShownItems(cooldown_ms)  # the publisher's cooldown, the same for every arm
        self.histories = UserHistories(history_len)
        self.add_items(items)

    # -- catalogue, masks, histories ---------------------------------------------------------
    def add_items(self, item_ids: Iterable[str]) -> None:
        """Make items eligible (cold start: a new item starts with no counts)."""
        new = [i for i in dict.fromkeys(item_ids) if i not in self._index]
        for i in new:
            self._index[i] = len(self.items)
            self.items.append(i)
        if new:
            self._grow(len(new))

    def _grow(self, n: int) -> None:  # noqa: B027 (an optional hook)
        """Extend per-item state by ``n`` new items."""

    def _observe(self, e: Event) -> float | None:
        """Masks and history from one event; returns its reward (None: not a known item)."""
        j = self._index.get(e.item_id)
        if j is None:
            return None
        if e.type in WATCHED_EVENT_TYPES:
            self.watched.add(e.user_id, j)
        elif e.type == "impression":
            self.shown.add(e.user_id, j, e.ts)
        r = 0.0 if e.type == "impression" else self.rules.value(e.type, e.value)
        self.histories.add(e.user_id, j, e.ts, r, impression_key(e.request_id, e.item_id))
        return r

    def warm_start(self, events: Iterable[Event]) -> None:
        """Learn from the backfill (organic feedback, no impressions) recsys is warmed with."""
        evs = list(events)
        rewards: list[tuple[Event, list[int], float]] = []
        for e in evs:
            hist = self.histories.as_of(e.user_id, e.ts)
            r = self._observe(e)
            if r is not None and e.type != "impression":
                rewards.append((e, hist, r))
        self.learn_warm(rewards)

    def learn_warm(self, rewards: list[tuple[Event, list[int], float]]) -> None:  # noqa: B027 (an optional hook)
        """``(event, history as of its ts, reward)`` of every warm feedback event."""

    def update(self, events: Iterable[Event]) -> None:
        """The arm's own slates' impressions and feedback."""
        evs = list(events)
        hists = {e.user_id: self.histories.get(e.user_id) for e in evs}
        for e in evs:
            self._observe(e)
        self.learn(evs, hists)

    def learn(self, events: list[Event], histories: Mapping[str, list[int]]) -> None:  # noqa: B027 (an optional hook)
        """Online update; ``histories``: each user's history when the slate was built."""

    # -- slates ------------------------------------------------------------------------------
    @abstractmethod
    def scores(self, user_id: str) -> np.ndarray:
        """One score per item of the arm's item list, for ``user_id``; higher is better."""

    def slate(self, user_id: str, now_ms: int, request_id: str) -> Slate:
        """A slate of ``k`` allowed items, drawn by :func:`recsys.policy.rank`."""
        s = torch.as_tensor(np.asarray(self.scores(user_id), dtype=np.float32)).unsqueeze(1)
        banned = not_allowed(self.watched.get(user_id), self.shown.recent(user_id, now_ms))
        exclude = torch.tensor([banned], dtype=torch.long) if banned else None
        r = rank(
            torch.ones(1, 1),
            s,
            self.k,
            exclude=exclude,
            exploration=self.exploration,
            temperature=self.temperature,
            epsilon=self.epsilon,
            generator=self.generator,
        )
        (row,) = r.rows()
        items = tuple(
            SlateItem(self.items[j], float(score), float(p), pos)
            for pos, (j, score, p) in enumerate(row)
        )
        return Slate(request_id, user_id, self.name, now_ms, items)


class RandomArm(Arm):
    """``k`` distinct allowed items uniformly at random; propensity ``1 / |allowed|``."""

    name = "random"
    exploration: Exploration = "epsilon"
    epsilon = 1.0

    def scores(self, user_id: str) -> np.ndarray:
        return np.zeros(len(self.items))


class _Counts(Arm):
    def __init__(self, *args: object, **kwargs: object) -> None:
        self.clicks = np.zeros(0)
        self.impressions = np.zeros(0)
        self.positives = np.zeros(0)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _grow(self, n: int) -> None:
        self.clicks = np.concatenate([self.clicks, np.zeros(n)])
        self.impressions = np.concatenate([self.impressions, np.zeros(n)])
        self.positives = np.concatenate([self.positives, np.zeros(n)])

    def learn_warm(self, rewards: list[tuple[Event, list[int], float]]) -> None:
        for e, _, r in rewards:
            if r > 0:
                self.positives[self._index[e.item_id]] += 1

    def learn(self, events: list[Event], histories: Mapping[str, list[int]]) -> None:
        for e in events:
            j = self._index.get(e.item_id)
            if j is None:
                continue
            if e.type == "impression":
                self.impressions[j] += 1
            elif e.type == "click":
                self.clicks[j] += 1
                self.positives[j] += 1


class MostPopularArm(_Counts):
    """The ``k`` allowed items with the most positive feedback (warm ratings + clicks).

    Deterministic (propensity 1); ties broken by a fixed random order.
    """

    name = "most_popular"

    def _grow(self, n: int) -> None:
        super()._grow(n)
        self._jitter = self.rng.random(len(self.items)) * 1e-3

    def scores(self, user_id: str) -> np.ndarray:
        return np.log1p(self.positives) + self._jitter


class EpsilonGreedyArm(_Counts):
    """Non-personalised bandit: Beta-smoothed CTR per item, ε-greedy slates.

    ``CTR_i = (clicks_i + s·m_i) / (impressions_i + s)`` with prior mean ``m_i`` proportional
    to the item's warm-start popularity (mean ``prior_ctr``; a new item gets the smallest
    prior) and strength ``s = prior_impressions``. Slates: slot by slot, the best remaining
    item with probability ``1 - ε``, a uniformly random allowed one with probability ``ε``.
    """

    name = "epsilon_greedy"
    exploration: Exploration = "epsilon"

    def __init__(
        self,
        items: Sequence[str],
        k: int,
        epsilon: float = 0.1,
        prior_ctr: float = 0.03,
        prior_impressions: float = 20.0,
        seed: int = 0,
        **kwargs: object,
    ) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        if not (prior_ctr > 0 and prior_impressions > 0):
            raise ValueError("prior_ctr and prior_impressions must be > 0")
        self.epsilon = epsilon
        self.prior_ctr = prior_ctr
        self.prior_impressions = prior_impressions
        self.prior = np.zeros(0)
        super().__init__(items, k, seed, **kwargs)

    def _grow(self, n: int) -> None:
        super()._grow(n)
        low = float(self.prior.min()) if len(self.prior) else self.prior_ctr
        self.prior = np.concatenate([self.prior, np.full(n, low)])

    def learn_warm(self, rewards: list[tuple[Event, list[int], float]]) -> None:
        super().learn_warm(rewards)
        pop = np.log1p(self.positives)
        if pop.mean() > 0:
            self.prior = np.clip(self.prior_ctr * pop / pop.mean(), 1e-4, 0.5)

    def ctr(self) -> np.ndarray:
        s = self.prior_impressions
        return (self.clicks + s * self.prior) / (self.impressions + s)

    def scores(self, user_id: str) -> np.ndarray:
        return self.ctr()


class _TextArm(Arm):
    """An arm with item text features ``[I, d]`` and a user feature (mean of history items)."""

    def __init__(
        self,
        items: Sequence[str],
        k: int,
        features: Mapping[str, np.ndarray],
        seed: int = 0,
        **kwargs: object,
    ) -> None:
        self._features = features
        self.V = np.zeros((0, 0))
        super().__init__(items, k, seed, **kwargs)  # type: ignore[arg-type]

    def _grow(self, n: int) -> None:
        d = len(next(iter(self._features.values())))
        new = np.array([self._features.get(i, np.zeros(d)) for i in self.items[-n:]])
        self.V = new if self.V.size == 0 else np.concatenate([self.V, new])

    def user_feature(self, history: Sequence[int]) -> np.ndarray:
        if not history:
            return np.zeros(self.V.shape[1])
        u = self.V[list(history)].mean(0)
        norm = float(np.linalg.norm(u))
        return u / norm if norm > 0 else u


class LinUCBArm(_TextArm):
    """Personalised linear bandit (LinUCB with a per-item bias).

    ``click ≈ θ · φ(u, i) + b_i`` with ``φ = [vec(u vᵢᵀ), vᵢ, 1]``: ``u`` the user's history
    feature, ``vᵢ`` the item's text feature (both :data:`FEATURE_DIM` wide). θ is ridge
    regression (``A = λI + Σ φφᵀ`` kept inverted by Sherman–Morrison), ``b_i`` the damped mean
    residual of the item. A slate is the top ``k`` by ``θ·φ + b_i + α·sqrt(φᵀA⁻¹φ)``
    (deterministic, propensity 1). Warm start: each warm rating as a sample (reward > 0 → 1,
    else 0) plus ``warm_negatives`` random unwatched items as 0 per rating.
    """

    name = "linucb"

    def __init__(
        self,
        items: Sequence[str],
        k: int,
        features: Mapping[str, np.ndarray],
        alpha: float = 0.3,
        ridge: float = 1.0,
        bias_prior: float = 20.0,
        warm_negatives: int = 1,
        seed: int = 0,
        **kwargs: object,
    ) -> None:
        if alpha < 0 or ridge <= 0 or bias_prior <= 0:
            raise ValueError("alpha must be >= 0, ridge and bias_prior > 0")
        self.alpha = alpha
        self.ridge = ridge
        self.bias_prior = bias_prior
        self.warm_negatives = warm_negatives
        self.bias_sum = np.zeros(0)
        self.bias_n = np.zeros(0)
        super().__init__(items, k, features, seed, **kwargs)
        p = self._phi(np.zeros(self.V.shape[1]), self.V[:1]).shape[1]
        self.A_inv = np.eye(p) / ridge
        self.b = np.zeros(p)
        self.theta = np.zeros(p)

    def _grow(self, n: int) -> None:
        super()._grow(n)
        self.bias_sum = np.concatenate([self.bias_sum, np.zeros(n)])
        self.bias_n = np.concatenate([self.bias_n, np.zeros(n)])

    @staticmethod
    def _phi(u: np.ndarray, V: np.ndarray) -> np.ndarray:
        outer = (u[None, :, None] * V[:, None, :]).reshape(len(V), -1)
        return np.concatenate([outer, V, np.ones((len(V), 1))], axis=1)

    def learn_warm(self, rewards: list[tuple[Event, list[int], float]]) -> None:
        rows: list[np.ndarray] = []
        ys: list[float] = []
        items: list[int] = []
        n = len(self.items)
        for e, hist, r in rewards:
            u = self.user_feature(hist)
            j = self._index[e.item_id]
            picks = [j, *self.rng.integers(0, n, self.warm_negatives).tolist()]
            rows.append(self._phi(u, self.V[picks]))
            ys.extend([1.0 if r > 0 else 0.0] + [0.0] * self.warm_negatives)
            items.extend(picks)
        if not rows:
            return
        X = np.concatenate(rows)
        y = np.asarray(ys)
        A = np.eye(X.shape[1]) * self.ridge + X.T @ X
        self.b = X.T @ y
        self.A_inv = np.linalg.inv(A)
        self.theta = self.A_inv @ self.b
        resid = y - X @ self.theta
        np.add.at(self.bias_sum, items, resid)
        np.add.at(self.bias_n, items, 1.0)

    def learn(self, events: list[Event], histories: Mapping[str, list[int]]) -> None:
        clicked = {(e.user_id, e.request_id, e.item_id) for e in events if e.type == "click"}
        for e in events:
            j = self._index.get(e.item_id)
            if e.type != "impression" or j is None:
                continue
            x = self._phi(self.user_feature(histories.get(e.user_id, [])), self.V[j : j + 1])[0]
            y = 1.0 if (e.user_id, e.request_id, e.item_id) in clicked else 0.0
            Ax = self.A_inv @ x
            self.A_inv -= np.outer(Ax, Ax) / (1.0 + x @ Ax)
            self.b += y * x
            self.theta = self.A_inv @ self.b
            self.bias_sum[j] += y - float(x @ self.theta)
            self.bias_n[j] += 1.0

    def scores(self, user_id: str) -> np.ndarray:
        phi = self._phi(self.user_feature(self.histories.get(user_id)), self.V)
        mean = phi @ self.theta + self.bias_sum / (self.bias_n + self.bias_prior)
        width = np.sqrt(np.maximum(((phi @ self.A_inv) * phi).sum(1), 0.0))
        return mean + self.alpha * width


class VWArm(_TextArm):
    """Vowpal Wabbit ``cb_explore_adf`` (the engine of Azure Personalizer), learning online.

    Shared features: the user's history feature (namespace ``U``); each action: the item's
    text feature (``A``) and its id (``I``); ``-q UA`` crosses user and item. Exploration is
    VW's ``--softmax --lambda``: VW's pmf over the allowed items is the single-draw
    distribution, and a slate is ``k`` draws from it without replacement (Plackett–Luce, via
    :func:`recsys.policy.rank` over ``log pmf``), so each item's propensity is its pmf value.
    Learning: every shown item is one bandit example (cost ``-1`` clicked, ``0`` not; its
    logged probability); direct-method regression (``--cb_type dm``). Warm start: each warm
    rating and ``warm_negatives`` random items per rating, as examples of probability 1.
    """

    name = "vw"
    exploration: Exploration = "boltzmann"

    def __init__(
        self,
        items: Sequence[str],
        k: int,
        features: Mapping[str, np.ndarray],
        lam: float = 30.0,
        warm_negatives: int = 1,
        seed: int = 0,
        extra_args: str = "",
        **kwargs: object,
    ) -> None:
        try:
            import vowpalwabbit
        except ImportError as exc:  # pragma: no cover - depends on the extra
            raise ImportError(
                "the vw arm needs Vowpal Wabbit: pip install 'recsys[vw]' (vowpalwabbit>=9)"
            ) from exc
        self._vwlib = vowpalwabbit
        self.lam = lam
        self.warm_negatives = warm_negatives
        self.vw = vowpalwabbit.Workspace(
            f"--cb_explore_adf --softmax --lambda {lam} -q UA --cb_type dm -b 20 "
            f"--random_seed {seed} --quiet {extra_args}",
            quiet=True,
        )
        self._lines: list[str] = []
        self._examples: list[object] = []
        self._pmf: dict[tuple[str, str], float] = {}
        super().__init__(items, k, features, seed, **kwargs)

    def _grow(self, n: int) -> None:
        super()._grow(n)
        label = self._vwlib.LabelType.CONTEXTUAL_BANDIT
        for j in range(len(self.items) - n, len(self.items)):
            feats = " ".join(f"v{d}:{x:.5f}" for d, x in enumerate(self.V[j]))
            line = f"|A {feats} |I i{j}"
            self._lines.append(line)
            self._examples.append(self._vwlib.Example(self.vw, line, label))

    def _shared(self, history: Sequence[int]) -> str:
        u = self.user_feature(history)
        return "shared |U " + " ".join(f"u{d}:{x:.5f}" for d, x in enumerate(u))

    def _learn_one(self, shared: str, j: int, cost: float, prob: float) -> None:
        self.vw.learn([shared, f"0:{cost}:{max(prob, 1e-6):.6g} {self._lines[j]}"])

    def learn_warm(self, rewards: list[tuple[Event, list[int], float]]) -> None:
        n = len(self.items)
        for e, hist, r in rewards:
            shared = self._shared(hist)
            self._learn_one(shared, self._index[e.item_id], -1.0 if r > 0 else 0.0, 1.0)
            for j in self.rng.integers(0, n, self.warm_negatives).tolist():
                self._learn_one(shared, j, 0.0, 1.0)

    def learn(self, events: list[Event], histories: Mapping[str, list[int]]) -> None:
        clicked = {(e.user_id, e.request_id, e.item_id) for e in events if e.type == "click"}
        for e in events:
            j = self._index.get(e.item_id)
            if e.type != "impression" or j is None:
                continue
            shared = self._shared(histories.get(e.user_id, []))
            cost = -1.0 if (e.user_id, e.request_id, e.item_id) in clicked else 0.0
            self._learn_one(shared, j, cost, e.propensity or 1.0)

    def scores(self, user_id: str) -> np.ndarray:
        """``log pmf`` over the allowed items (watched ones get a pmf of ~0 and are masked)."""
        watched = set(self.watched.get(user_id))
        allowed = [j for j in range(len(self.items)) if j not in watched]
        label = self._vwlib.LabelType.CONTEXTUAL_BANDIT
        shared = self._vwlib.Example(self.vw, self._shared(self.histories.get(user_id)), label)
        pmf = np.asarray(self.vw.predict([shared, *[self._examples[j] for j in allowed]]))
        out = np.full(len(self.items), -1e30)
        out[allowed] = np.log(np.maximum(pmf, 1e-30))
        return out
