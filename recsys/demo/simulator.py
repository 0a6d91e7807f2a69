"""A user simulator grounded in MovieLens, for the closed-loop demo and for scoring an oracle.

Preferences: user and item factors plus item biases fitted by ALS on ``ml-latest-small``
ratings (seeded, a second or two). Affinity ``s(u, i) = item_bias_weight · b_i + p_u · q_i``,
standardised over all (user, item) pairs to ``z``.

Clicks follow the position-based model: ``P(click) = examination(position) ·
attractiveness(u, i)`` with ``examination(p) = (1 + p) ** -position_bias`` and
``attractiveness = sigmoid(sharpness · z + offset) · fatigue``, where ``offset`` is solved so a
uniformly random item shown at the top is clicked with probability ``target_ctr``. Fatigue
multiplies attractiveness by ``exp(-fatigue · n)``, n the user's recent impressions of the item
(halving every ``fatigue_half_life_ms``). A click brings a dwell event (seconds grow with
affinity) and maybe a purchase (probability grows with affinity).

A share of the catalogue is held out and released in batches over time (cold start: the items
topic gets their text when they arrive). At ``shift_at_ms`` user preferences shift (user
factors permuted among users, or rotated), which a drift detector should notice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.data.movielens import MovieLens, load_movielens
from recsys.events import Event, ItemRecord, Slate, SlateItem

logger = logging.getLogger(__name__)


def _check(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if low is not None and not value >= low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and not value <= high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


@dataclass(frozen=True)
class SimConfig:
    """Simulator hyper-parameters (validated by :class:`UserSimulator`)."""

    seed: int = 0
    n_items: int | None = 1000  # the most-rated movies; None: the whole catalogue
    factors: int = 16
    als_iterations: int = 8
    als_reg: float = 0.1  # ALS-WR: scaled by each user's / item's number of ratings
    bias_reg: float = 5.0  # damping of the item-bias means
    item_bias_weight: float = 0.5
    target_ctr: float = 0.03
    sharpness: float = 2.0
    position_bias: float = 1.0
    fatigue: float = 0.7
    fatigue_half_life_ms: int = 10 * 60 * 1000
    new_item_fraction: float = 0.1
    release_batches: int = 5
    release_interval_ms: int = 30_000
    start_ms: int = 1_700_000_000_000
    shift_at_ms: int | None = None
    shift_kind: str = "permute"  # "permute" users' factors among users, or "rotate" them
    feedback_delay_ms: int = 500
    dwell_mean_s: float = 40.0
    purchase_rate: float = 0.05  # P(purchase | click) at average affinity
    activity_power: float = 0.5  # arrivals ∝ (number of ratings) ** activity_power
    consumed_factor: float = 0.1  # appeal left in an item the user has already watched


def fit_als(
    user: np.ndarray,
    item: np.ndarray,
    rating: np.ndarray,
    n_users: int,
    n_items: int,
    factors: int,
    iterations: int,
    reg: float,
    seed: int,
    bias_reg: float = 5.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Biased explicit-feedback MF by alternating least squares.

    Returns (P (n_users, f), Q (n_items, f), item bias (n_items,)). Biases are damped means
    fitted first; ALS then fits the residual with a regulariser scaled by each row's count.
    """
    rng = np.random.default_rng(seed)
    mu = rating.mean()
    n_i = np.bincount(item, minlength=n_items)
    b_i = np.bincount(item, weights=rating - mu, minlength=n_items) / (n_i + bias_reg)
    resid_u = rating - mu - b_i[item]
    n_u = np.bincount(user, minlength=n_users)
    b_u = np.bincount(user, weights=resid_u, minlength=n_users) / (n_u + bias_reg)
    r = resid_u - b_u[user]
    P = rng.normal(0, 0.1, (n_users, factors))
    Q = rng.normal(0, 0.1, (n_items, factors))
    by_user = _groups(user, n_users)
    by_item = _groups(item, n_items)
    for _ in range(iterations):
        P = _solve_side(by_user, Q, item, r, reg, factors)
        Q = _solve_side(by_item, P, user, r, reg, factors)
    return P, Q, b_i


def _groups(index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(n + 1))
    return order, bounds


def _solve_side(
    groups: tuple[np.ndarray, np.ndarray],
    other: np.ndarray,
    other_index: np.ndarray,
    r: np.ndarray,
    reg: float,
    factors: int,
) -> np.ndarray:
    order, bounds = groups
    n = len(bounds) - 1
    gram = np.zeros((n, factors, factors))
    rhs = np.zeros((n, factors))
    # One small matmul per row (user or item); the solve is batched.
    for g in range(n):
        rows = order[bounds[g] : bounds[g + 1]]
        if len(rows):
            X = other[other_index[rows]]
            gram[g] = X.T @ X
            rhs[g] = X.T @ r[rows]
    counts = np.diff(bounds).astype(np.float64)
    gram += (reg * np.maximum(counts, 1.0))[:, None, None] * np.eye(factors)
    return np.linalg.solve(gram, rhs[:, :, None])[:, :, 0]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class UserSimulator:
    """Users and items from MovieLens; answers slates with impression and feedback events."""

    def __init__(self, data: MovieLens | str | Path, config: SimConfig | None = None) -> None:
        cfg = config or SimConfig()
        _check("factors", cfg.factors, 1)
        _check("als_iterations", cfg.als_iterations, 1)
        _check("als_reg", cfg.als_reg, 0.0)
        _check("bias_reg", cfg.bias_reg, 0.0)
        _check("target_ctr", cfg.target_ctr, 1e-6, 0.5)
        _check("sharpness", cfg.sharpness, 0.0)
        _check("position_bias", cfg.position_bias, 0.0)
        _check("fatigue", cfg.fatigue, 0.0)
        _check("fatigue_half_life_ms", cfg.fatigue_half_life_ms, 1)
        _check("new_item_fraction", cfg.new_item_fraction, 0.0, 0.9)
        _check("release_batches", cfg.release_batches, 1)
        _check("release_interval_ms", cfg.release_interval_ms, 1)
        _check("feedback_delay_ms", cfg.feedback_delay_ms, 0)
        _check("dwell_mean_s", cfg.dwell_mean_s, 0.0)
        _check("purchase_rate", cfg.purchase_rate, 0.0, 0.99)
        _check("consumed_factor", cfg.consumed_factor, 0.0, 1.0)
        if cfg.n_items is not None:
            _check("n_items", cfg.n_items, 10)
        if cfg.shift_kind not in ("permute", "rotate"):
            raise ValueError(f"shift_kind must be 'permute' or 'rotate', got {cfg.shift_kind!r}")
        self.config = cfg
        ml = data if isinstance(data, MovieLens) else load_movielens(data)
        rng = np.random.default_rng(cfg.seed)

        users, u_idx = np.unique(ml.user, return_inverse=True)
        items, i_idx = np.unique(ml.item, return_inverse=True)
        P, Q, b_i = fit_als(
            u_idx, i_idx, ml.rating, len(users), len(items), cfg.factors,
            cfg.als_iterations, cfg.als_reg, cfg.seed, cfg.bias_reg,
        )  # fmt: skip
        counts = np.bincount(i_idx, minlength=len(items))
        if cfg.n_items is not None and cfg.n_items < len(items):
            # Most-rated first; stable so ties keep movie-id order.
            keep = np.sort(np.argsort(-counts, kind="stable")[: cfg.n_items])
        else:
            keep = np.arange(len(items))
        self.user_ids: list[str] = [str(u) for u in users.tolist()]
        self.item_ids: list[str] = [str(i) for i in items[keep].tolist()]
        self._user_index = {u: j for j, u in enumerate(self.user_ids)}
        self._item_index = {i: j for j, i in enumerate(self.item_ids)}
        self._P = P
        self._Q = Q[keep]
        self._bias = cfg.item_bias_weight * b_i[keep]
        raw = self._raw_affinity(self._P)
        self._mean, self._std = float(raw.mean()), float(raw.std()) or 1.0
        self.offset = self._calibrate((raw - self._mean) / self._std)

        movies = {m.item_id: m for m in ml.movies}
        n = len(self.item_ids)
        n_new = round(cfg.new_item_fraction * n)
        new = rng.choice(n, size=n_new, replace=False) if n_new else np.zeros(0, dtype=int)
        self.release_ms = np.full(n, cfg.start_ms, dtype=np.int64)
        batch = np.arange(n_new) % cfg.release_batches + 1
        self.release_ms[new] = cfg.start_ms + batch * cfg.release_interval_ms
        self.items: list[ItemRecord] = [
            ItemRecord(
                item_id=iid,
                title=movies[iid].title if iid in movies else f"Movie {iid}",
                ts=int(self.release_ms[j]),
                tags=movies[iid].tags if iid in movies else (),
            )
            for j, iid in enumerate(self.item_ids)
        ]
        activity = np.bincount(u_idx, minlength=len(users)).astype(np.float64)
        weights = activity**cfg.activity_power
        self._arrival = weights / weights.sum()
        self._shifted_P = self._shift(P, rng)
        # Recent impressions per (user, item): decayed count and when it was last updated.
        self._seen: dict[tuple[int, int], tuple[float, int]] = {}
        # Items each user has watched (clicked, or rated in their history): little appeal left.
        self._consumed: dict[int, set[int]] = {}

    # --- preferences ------------------------------------------------------------------------
    def _raw_affinity(self, P: np.ndarray, users: np.ndarray | None = None) -> np.ndarray:
        rows = P if users is None else P[users]
        return rows @ self._Q.T + self._bias

    def _calibrate(self, z: np.ndarray) -> float:
        """Offset b with mean(sigmoid(sharpness·z + b)) = target_ctr (bisection; monotone)."""
        lo, hi = -30.0, 30.0
        s = self.config.sharpness * z
        for _ in range(60):
            mid = (lo + hi) / 2
            if _sigmoid(s + mid).mean() < self.config.target_ctr:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def _shift(self, P: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.config.shift_kind == "permute":
            return P[rng.permutation(len(P))]
        rotation, _ = np.linalg.qr(rng.normal(size=(P.shape[1], P.shape[1])))
        return P @ rotation

    def _factors(self, now_ms: int | None) -> np.ndarray:
        shift = self.config.shift_at_ms
        if shift is not None and now_ms is not None and now_ms >= shift:
            return self._shifted_P
        return self._P

    def examination(self, positions: np.ndarray) -> np.ndarray:
        """P(a user looks at slot p), p 0-based."""
        return (1.0 + np.asarray(positions, dtype=np.float64)) ** -self.config.position_bias

    def _fatigue(self, u: int, items: np.ndarray, now_ms: int | None) -> np.ndarray:
        if now_ms is None or not self._seen:
            return np.ones(len(items))
        counts = np.array([self._decayed(u, int(i), now_ms) for i in items])
        return np.exp(-self.config.fatigue * counts)

    def _decayed(self, u: int, i: int, now_ms: int) -> float:
        entry = self._seen.get((u, i))
        if entry is None:
            return 0.0
        count, last = entry
        return count * 0.5 ** (max(now_ms - last, 0) / self.config.fatigue_half_life_ms)

    def _attractiveness(self, u: int, items: np.ndarray, now_ms: int | None) -> np.ndarray:
        P = self._factors(now_ms)
        raw = P[u] @ self._Q[items].T + self._bias[items]
        appeal = self._appeal(raw) * self._fatigue(u, items, now_ms)
        watched = self._consumed.get(u)
        if watched:
            appeal = np.where(
                np.isin(items, list(watched)), appeal * self.config.consumed_factor, appeal
            )
        return appeal

    def _appeal(self, raw: np.ndarray) -> np.ndarray:
        """P(click | examined) from raw affinity, before fatigue and the watched discount."""
        return _sigmoid(self.config.sharpness * (raw - self._mean) / self._std + self.offset)

    def _purchase_probability(self, z: float) -> float:
        rate = self.config.purchase_rate
        return float(_sigmoid(np.array(np.log(rate / (1 - rate)) + z)))

    # --- public API ---------------------------------------------------------------------------
    def user_index(self, user_id: str) -> int:
        try:
            return self._user_index[user_id]
        except KeyError:
            raise KeyError(f"unknown user {user_id!r}") from None

    def item_indices(self, item_ids: list[str] | tuple[str, ...]) -> np.ndarray:
        try:
            return np.array([self._item_index[i] for i in item_ids], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"unknown item {exc.args[0]!r}") from None

    def click_probabilities(
        self, user_id: str, item_ids: list[str] | tuple[str, ...], now_ms: int | None = None
    ) -> np.ndarray:
        """True P(click | examined) of each item for the user (fatigue applied when now_ms)."""
        return self._attractiveness(self.user_index(user_id), self.item_indices(item_ids), now_ms)

    def available(self, now_ms: int) -> np.ndarray:
        """Indices of the items released by ``now_ms``."""
        return np.flatnonzero(self.release_ms <= now_ms)

    def released_between(self, after_ms: int, until_ms: int) -> list[ItemRecord]:
        """Catalogue records released in (after_ms, until_ms], for the items topic."""
        mask = (self.release_ms > after_ms) & (self.release_ms <= until_ms)
        return [self.items[j] for j in np.flatnonzero(mask)]

    def next_user(self, rng: np.random.Generator) -> str:
        """Who arrives next: users in proportion to their MovieLens activity ** activity_power."""
        return self.user_ids[int(rng.choice(len(self.user_ids), p=self._arrival))]

    def oracle_slate(self, user_id: str, k: int, now_ms: int, request_id: str = "") -> Slate:
        """The best slate: released items by true attractiveness, best at the top (PBM)."""
        u = self.user_index(user_id)
        avail = self.available(now_ms)
        attr = self._attractiveness(u, avail, now_ms)
        top = np.argsort(-attr, kind="stable")[:k]
        items = tuple(
            SlateItem(self.item_ids[int(avail[j])], float(attr[j]), 1.0, p)
            for p, j in enumerate(top)
        )
        return Slate(request_id or f"oracle:{user_id}:{now_ms}", user_id, "oracle", now_ms, items)

    def random_slate(self, user_id: str, k: int, now_ms: int, rng: np.random.Generator) -> Slate:
        """What the app shows before the publisher has any slate: ``k`` released items drawn
        uniformly without replacement; propensity ``1 / |released|`` (the single-draw
        probability, docs/design.md "One propensity")."""
        avail = self.available(now_ms)
        chosen = rng.choice(len(avail), size=min(k, len(avail)), replace=False)
        prop = 1.0 / len(avail)
        items = tuple(
            SlateItem(self.item_ids[int(avail[j])], 0.0, prop, p) for p, j in enumerate(chosen)
        )
        return Slate("cold", user_id, "cold-start", now_ms, items)

    def ceilings(self, k: int, now_ms: int) -> dict[str, float]:
        """Noise-free CTR per impression that reference policies would get at ``now_ms``.

        Averaged over arriving users (by arrival probability), with what each user has watched
        discounted and no fatigue yet: ``oracle`` (each user's own best ``k`` released items),
        ``best_fixed_slate`` (the one slate of ``k`` items that is best on average, shown to
        everyone: the most any non-personalised policy can get) and ``random``. They say what a
        learner can reach without per-user knowledge.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        avail = self.available(now_ms)
        if len(avail) < k:
            raise ValueError(f"only {len(avail)} items released, k = {k}")
        attr = self._appeal(self._raw_affinity(self._factors(now_ms))[:, avail])  # [U, A]
        column = {int(i): j for j, i in enumerate(avail.tolist())}
        for u, watched in self._consumed.items():
            cols = [column[i] for i in watched if i in column]
            attr[u, cols] *= self.config.consumed_factor
        exam = self.examination(np.arange(k))
        w = self._arrival
        own_best = -np.sort(-attr, axis=1)[:, :k]
        fixed = np.argsort(-(w @ attr), kind="stable")[:k]
        return {
            "oracle": float(w @ (own_best @ exam)) / k,
            "best_fixed_slate": float(w @ (attr[:, fixed] @ exam)) / k,
            "random": float(w @ attr.mean(1)) * float(exam.sum()) / k,
        }

    def expected_clicks(self, slate: Slate, now_ms: int | None = None) -> float:
        """Expected clicks of a slate under the true model (before its impressions count)."""
        ids = [s.item_id for s in slate.items]
        attr = self.click_probabilities(slate.user_id, ids, now_ms)
        exam = self.examination(np.array([s.position for s in slate.items]))
        return float((attr * exam).sum())

    def respond(self, slate: Slate, now_ms: int, rng: np.random.Generator) -> list[Event]:
        """The user sees ``slate`` at ``now_ms``: impression events, then clicks, dwell, purchases.

        Feedback is stamped ``feedback_delay_ms`` after the impression. Showing an item adds to
        the user's fatigue for it.
        """
        cfg = self.config
        u = self.user_index(slate.user_id)
        idx = self.item_indices([s.item_id for s in slate.items])
        positions = np.array([s.position for s in slate.items])
        attr = self._attractiveness(u, idx, now_ms)
        clicked = rng.random(len(idx)) < attr * self.examination(positions)
        events: list[Event] = []
        rid, mv = slate.request_id, slate.model_version
        for s in slate.items:
            events.append(
                Event(f"sim:{rid}:{s.position}:impression", "impression", slate.user_id,
                      s.item_id, now_ms, rid, s.position, s.propensity, None, mv)
            )  # fmt: skip
        t = now_ms + cfg.feedback_delay_ms
        z = (np.log(attr / (1 - attr)) - self.offset) / max(cfg.sharpness, 1e-9)
        for j in np.flatnonzero(clicked):
            s = slate.items[int(j)]
            base = f"sim:{rid}:{s.position}"
            args = (slate.user_id, s.item_id)
            events.append(
                Event(f"{base}:click", "click", *args, t, rid, s.position, None, None, mv)
            )
            dwell = cfg.dwell_mean_s * float(np.exp(0.5 * z[j] + rng.normal(0, 0.5) - 0.125))
            events.append(
                Event(f"{base}:dwell", "dwell", *args, t + 1, rid, s.position, None,
                      round(dwell, 1), mv)
            )  # fmt: skip
            if cfg.purchase_rate > 0 and rng.random() < self._purchase_probability(z[j]):
                events.append(
                    Event(f"{base}:purchase", "purchase", *args, t + 2, rid, s.position,
                          None, None, mv)
                )  # fmt: skip
        for i in idx.tolist():
            self._seen[(u, i)] = (self._decayed(u, i, now_ms) + 1.0, now_ms)
        self._consumed.setdefault(u, set()).update(int(idx[j]) for j in np.flatnonzero(clicked))
        return events

    def mark_consumed(self, user_id: str, item_ids: list[str] | tuple[str, ...]) -> None:
        """The user has already watched these items (e.g. their rating history)."""
        known = [i for i in item_ids if i in self._item_index]
        if known:
            u = self.user_index(user_id)
            self._consumed.setdefault(u, set()).update(self.item_indices(known).tolist())
