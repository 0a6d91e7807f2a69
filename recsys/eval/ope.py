"""Off-policy evaluation on logged bandit feedback: IPS, SNIPS, DM, DR with bootstrap intervals.

The estimators follow obp's conventions: ``action_dist`` has shape (n_rounds, n_actions,
len_list) and gives the evaluation policy's probability of each action at each position;
``estimated_rewards`` (DM, DR) has the same shape and holds a reward model's predictions.

``run_ope`` (``recsys eval ope``) checks the uniform logging policy against its own empirical
CTR (IPS on its own data is the mean reward exactly) and estimates a policy learned on the first
part of the log (time order) on the rest. With a few dozen clicks the intervals are wide.
"""

from __future__ import annotations

import argparse
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.data.obd import OBDLog, load_obd

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Logged:
    """Validated logged data plus an evaluation policy (and optionally a reward model)."""

    reward: np.ndarray  # (n,)
    action: np.ndarray  # (n,) int
    position: np.ndarray  # (n,) int, 0-based
    pscore: np.ndarray  # (n,) in (0, 1]
    action_dist: np.ndarray  # (n, n_actions, len_list)
    estimated_rewards: np.ndarray | None = None  # (n, n_actions, len_list)


def validate(
    reward: np.ndarray,
    action: np.ndarray,
    position: np.ndarray,
    pscore: np.ndarray,
    action_dist: np.ndarray,
    estimated_rewards: np.ndarray | None = None,
) -> Logged:
    """Check shapes and ranges; errors name the offending argument."""
    reward = np.asarray(reward, dtype=np.float64)
    action = np.asarray(action)
    position = np.asarray(position)
    pscore = np.asarray(pscore, dtype=np.float64)
    action_dist = np.asarray(action_dist, dtype=np.float64)
    if reward.ndim != 1 or len(reward) == 0:
        raise ValueError(f"reward must be a non-empty 1-d array, got shape {reward.shape}")
    n = len(reward)
    for name, arr in (("action", action), ("position", position), ("pscore", pscore)):
        if arr.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) like reward, got {arr.shape}")
    if not np.all(np.isfinite(reward)):
        raise ValueError("reward must be finite")
    if not np.issubdtype(action.dtype, np.integer) or not np.issubdtype(position.dtype, np.integer):
        raise ValueError("action and position must be integer arrays")
    if not np.all((pscore > 0) & (pscore <= 1)):
        raise ValueError("pscore must be in (0, 1]")
    if action_dist.ndim != 3 or action_dist.shape[0] != n:
        raise ValueError(
            f"action_dist must have shape ({n}, n_actions, len_list), got {action_dist.shape}"
        )
    _, n_actions, len_list = action_dist.shape
    if action.min() < 0 or action.max() >= n_actions:
        raise ValueError(f"action must be in [0, {n_actions}), got {action.min()}..{action.max()}")
    if position.min() < 0 or position.max() >= len_list:
        raise ValueError(f"position must be in [0, {len_list})")
    if np.any(action_dist < 0) or not np.allclose(action_dist.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("action_dist must be non-negative and sum to 1 over actions")
    if estimated_rewards is not None:
        estimated_rewards = np.asarray(estimated_rewards, dtype=np.float64)
        if estimated_rewards.shape != action_dist.shape:
            raise ValueError(
                f"estimated_rewards must have shape {action_dist.shape}, "
                f"got {estimated_rewards.shape}"
            )
    return Logged(reward, action, position, pscore, action_dist, estimated_rewards)


class _Estimator(ABC):
    name = "base"
    needs_model = False

    @abstractmethod
    def _rounds(self, d: Logged) -> tuple[np.ndarray, np.ndarray]:
        """Per-round numerator and denominator: estimate = sum(num) / sum(den)."""

    def estimate_policy_value(self, **kwargs: Any) -> float:
        num, den = self._rounds(self._data(kwargs))
        return float(num.sum() / den.sum())

    def estimate_interval(
        self, n_bootstrap: int = 1000, alpha: float = 0.05, seed: int = 0, **kwargs: Any
    ) -> tuple[float, float, float]:
        """(estimate, lower, upper): a percentile bootstrap over rounds, seeded."""
        if n_bootstrap < 10:
            raise ValueError(f"n_bootstrap must be >= 10, got {n_bootstrap}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        num, den = self._rounds(self._data(kwargs))
        rng = np.random.default_rng(seed)
        n = len(num)
        values = np.empty(n_bootstrap)
        for b in range(n_bootstrap):
            idx = rng.integers(0, n, n)
            values[b] = num[idx].sum() / den[idx].sum()
        lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
        return float(num.sum() / den.sum()), float(lo), float(hi)

    def _data(self, kwargs: dict[str, Any]) -> Logged:
        d = validate(**kwargs)
        if self.needs_model and d.estimated_rewards is None:
            raise ValueError(f"{self.name} needs estimated_rewards")
        return d

    @staticmethod
    def _weights(d: Logged) -> np.ndarray:
        n = np.arange(len(d.reward))
        return d.action_dist[n, d.action, d.position] / d.pscore

    @staticmethod
    def _dm(d: Logged) -> np.ndarray:
        assert d.estimated_rewards is not None
        n = np.arange(len(d.reward))
        return (d.action_dist[n, :, d.position] * d.estimated_rewards[n, :, d.position]).sum(1)


class IPS(_Estimator):
    """Inverse propensity scoring: mean of w·r, w = π(a|x, pos) / pscore."""

    name = "IPS"

    def _rounds(self, d: Logged) -> tuple[np.ndarray, np.ndarray]:
        return self._weights(d) * d.reward, np.ones(len(d.reward))


class SNIPS(_Estimator):
    """Self-normalised IPS: Σ w·r / Σ w."""

    name = "SNIPS"

    def _rounds(self, d: Logged) -> tuple[np.ndarray, np.ndarray]:
        w = self._weights(d)
        return w * d.reward, w


class DM(_Estimator):
    """Direct method: the reward model's value of the policy's action distribution."""

    name = "DM"
    needs_model = True

    def _rounds(self, d: Logged) -> tuple[np.ndarray, np.ndarray]:
        return self._dm(d), np.ones(len(d.reward))


class DR(_Estimator):
    """Doubly robust: DM plus the IPS-weighted residual of the reward model."""

    name = "DR"
    needs_model = True

    def _rounds(self, d: Logged) -> tuple[np.ndarray, np.ndarray]:
        assert d.estimated_rewards is not None
        n = np.arange(len(d.reward))
        q = d.estimated_rewards[n, d.action, d.position]
        return self._dm(d) + self._weights(d) * (d.reward - q), np.ones(len(d.reward))


ESTIMATORS: tuple[_Estimator, ...] = (IPS(), SNIPS(), DM(), DR())


class LogisticRewardModel:
    """L2-regularised logistic regression of click on (user features, item features, affinity,
    position), fitted by Newton's method; the reward model for DM/DR and the learned policy's
    scorer. Features per (round, action, position): the round's one-hot user features, the
    action's item features, the user-item affinity of that action, a position one-hot."""

    def __init__(self, l2: float = 1.0, iterations: int = 25) -> None:
        if l2 <= 0:
            raise ValueError(f"l2 must be > 0, got {l2}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.l2 = l2
        self.iterations = iterations
        self.coef: np.ndarray | None = None

    @staticmethod
    def features(
        log: OBDLog, rows: np.ndarray, actions: np.ndarray, positions: np.ndarray
    ) -> np.ndarray:
        n_aff = log.n_actions
        user = log.context[rows, : log.context.shape[1] - n_aff]
        affinity = log.context[rows, user.shape[1] + actions]
        pos = np.eye(log.len_list)[positions]
        item = log.action_context[actions]
        return np.hstack([np.ones((len(rows), 1)), user, item, affinity[:, None], pos])

    def fit(self, log: OBDLog, rows: np.ndarray) -> LogisticRewardModel:
        X = self.features(log, rows, log.action[rows], log.position[rows])
        y = log.reward[rows]
        w = np.zeros(X.shape[1])
        reg = self.l2 * np.eye(X.shape[1])
        reg[0, 0] = 0.0  # the intercept is not shrunk
        for _ in range(self.iterations):
            p = 1 / (1 + np.exp(-X @ w))
            grad = X.T @ (p - y) + reg @ w
            hess = (X * (p * (1 - p))[:, None]).T @ X + reg
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        self.coef = w
        return self

    def logits(self, log: OBDLog, rows: np.ndarray) -> np.ndarray:
        """Predicted logit for every (row, action, position): shape (len(rows), n_actions, L)."""
        if self.coef is None:
            raise RuntimeError("fit the model first")
        n, A, L = len(rows), log.n_actions, log.len_list
        r = np.repeat(rows, A * L)
        a = np.tile(np.repeat(np.arange(A), L), n)
        p = np.tile(np.arange(L), n * A)
        return (self.features(log, r, a, p) @ self.coef).reshape(n, A, L)


def softmax_policy(logits: np.ndarray, temperature: float) -> np.ndarray:
    """π(a | x, pos) ∝ exp(logit / temperature) over actions; full support, so IPS is defined."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def run_ope(
    path: str | Path,
    json_out: str | Path | None = None,
    train_fraction: float = 0.7,
    temperature: float = 0.2,
    l2: float = 1.0,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """`recsys eval ope`: the logging-policy check and a learned policy's value, with 95% CIs."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    log = load_obd(path)
    n = log.n_rounds
    # Rows are in time order, so the split is by time: train on the past, evaluate on the future.
    order = np.argsort(log.ts_ms, kind="stable")
    cut = int(n * train_fraction)
    train, test = order[:cut], order[cut:]

    base: dict[str, Any] = {
        "reward": log.reward,
        "action": log.action,
        "position": log.position,
        "pscore": log.pscore,
    }
    uniform = np.full((n, log.n_actions, log.len_list), 1.0 / log.n_actions)
    empirical = float(log.reward.mean())
    check_ips, lo, hi = IPS().estimate_interval(n_bootstrap, seed=seed, **base, action_dist=uniform)
    logging_check = {
        "empirical_ctr": empirical,
        "ips": check_ips,
        "ci95": [lo, hi],
        "holds": bool(np.isclose(check_ips, empirical, rtol=1e-12, atol=0)),
    }

    model = LogisticRewardModel(l2=l2).fit(log, train)
    logits = model.logits(log, test)
    policy = softmax_policy(logits, temperature)
    q_hat = 1 / (1 + np.exp(-logits))
    test_data = {k: v[test] for k, v in base.items()}
    rows = []
    for est in ESTIMATORS:
        kwargs: dict[str, Any] = {**test_data, "action_dist": policy}
        if est.needs_model:
            kwargs["estimated_rewards"] = q_hat
        value, low, high = est.estimate_interval(n_bootstrap, seed=seed, **kwargs)
        rows.append({"estimator": est.name, "estimate": value, "ci95": [low, high]})
    test_ctr = float(log.reward[test].mean())
    result: dict[str, Any] = {
        "path": str(path),
        "n_rounds": n,
        "clicks": int(log.reward.sum()),
        "n_actions": log.n_actions,
        "len_list": log.len_list,
        "train_rounds": len(train),
        "test_rounds": len(test),
        "train_clicks": int(log.reward[train].sum()),
        "test_clicks": int(log.reward[test].sum()),
        "logging_policy_check": logging_check,
        "logging_policy_test_ctr": test_ctr,
        "learned_policy": {"temperature": temperature, "l2": l2, "estimates": rows},
        "n_bootstrap": n_bootstrap,
        "seed": seed,
    }
    print(render(result))
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def render(result: dict[str, Any]) -> str:
    chk = result["logging_policy_check"]
    lines = [
        f"OBD log {result['path']}: {result['n_rounds']} rounds, {result['clicks']} clicks, "
        f"{result['n_actions']} actions, {result['len_list']} positions",
        "",
        "uniform logging policy on its own data (must equal its empirical CTR)",
        f"  empirical CTR {chk['empirical_ctr']:.5f}   IPS {chk['ips']:.5f}   "
        f"95% CI [{chk['ci95'][0]:.5f}, {chk['ci95'][1]:.5f}]   "
        f"{'holds' if chk['holds'] else 'FAILS'}",
        "",
        f"learned policy: trained on the first {result['train_rounds']} rounds "
        f"({result['train_clicks']} clicks), evaluated on the last {result['test_rounds']} "
        f"({result['test_clicks']} clicks; logging policy CTR there "
        f"{result['logging_policy_test_ctr']:.5f})",
        f"  {'estimator':<10}{'estimate':>10}   95% CI",
    ]
    for row in result["learned_policy"]["estimates"]:
        lo, hi = row["ci95"]
        lines.append(f"  {row['estimator']:<10}{row['estimate']:>10.5f}   [{lo:.5f}, {hi:.5f}]")
    lines.append("")
    lines.append(
        "With so few clicks the intervals are wide: a difference inside them is not evidence."
    )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `recsys eval ope`."""
    from recsys import datasets

    p.add_argument(
        "--path",
        default=datasets.path("obd"),
        help="Open Bandit Dataset folder (CSV layout; default: the packaged 10,000-row sample)",
    )
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures here")
    p.add_argument("--train-fraction", type=float, default=0.7, help="time-ordered training part")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0)


def run_from_args(args: argparse.Namespace) -> int:
    result = run_ope(
        args.path,
        args.json_out,
        train_fraction=args.train_fraction,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
    )
    return 0 if result["logging_policy_check"]["holds"] else 1


# --- OPE on recsys's own logs: the value of a target policy's first slot -------------------------


def first_slot_ope(
    reward: np.ndarray,
    propensity: np.ndarray,
    match: np.ndarray,
    logged_item: np.ndarray | None = None,
    target_item: np.ndarray | None = None,
    z: float = 1.96,
) -> dict[str, dict[str, float]]:
    """IPS / SNIPS / DR estimates of a target policy's slot-0 value from recsys's own logs.

    Each round logged a slate; ``reward[n]`` is what its slot-0 item earned (a click),
    ``propensity[n]`` that item's logged propensity, which by recsys's definition is the
    single-draw probability β(a|s) and so exactly ``P(slot 0 = a | s)``. ``match[n]``: the
    target policy (deterministic) puts the logged slot-0 item first. Then::

        IPS   = mean(1[match] · r / β)                       unbiased
        SNIPS = Σ 1[match] · r / β  /  Σ 1[match] / β         self-normalised
        DR    = mean(q̂(target) + 1[match] · (r − q̂(a)) / β)    q̂: per-item slot-0 CTR, cross-fitted

    DR needs ``logged_item`` and ``target_item`` (item ids per round). Intervals: normal
    approximation (``z`` standard errors; the delta method for SNIPS).
    """
    r = np.asarray(reward, dtype=np.float64)
    p = np.asarray(propensity, dtype=np.float64)
    m = np.asarray(match, dtype=bool)
    if not (r.shape == p.shape == m.shape) or r.ndim != 1 or len(r) == 0:
        raise ValueError("reward, propensity and match must be non-empty 1-d arrays of one length")
    if np.any(~(p > 0)) or np.any(p > 1):
        raise ValueError("propensity must be in (0, 1]")
    n = len(r)
    w = m / p
    ips_terms = w * r
    out: dict[str, dict[str, float]] = {}
    out["ips"] = _interval(ips_terms, z)
    sw = float(w.sum())
    if sw > 0:
        snips = float(ips_terms.sum() / sw)
        resid = (ips_terms - snips * w) / (sw / n)
        se = float(resid.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        out["snips"] = {"value": snips, "low": snips - z * se, "high": snips + z * se, "se": se}
    else:
        out["snips"] = {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    if logged_item is not None and target_item is not None:
        a = np.asarray(logged_item)
        t = np.asarray(target_item)
        q_a, q_t = _cross_fit_ctr(a, t, r)
        out["dr"] = _interval(q_t + w * (r - q_a), z)
    out["rounds"] = {"value": float(n), "matches": float(m.sum()), "weight_sum": sw / n}
    return out


def _interval(terms: np.ndarray, z: float) -> dict[str, float]:
    v = float(terms.mean())
    se = float(terms.std(ddof=1) / np.sqrt(len(terms))) if len(terms) > 1 else float("nan")
    return {"value": v, "low": v - z * se, "high": v + z * se, "se": se}


def _cross_fit_ctr(
    logged: np.ndarray, target: np.ndarray, reward: np.ndarray, prior: float = 20.0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-item slot-0 CTR (shrunk to the mean), fitted on one half, used on the other."""
    n = len(reward)
    fold = np.arange(n) % 2
    q_a = np.zeros(n)
    q_t = np.zeros(n)
    for f in (0, 1):
        train = fold != f
        mean = float(reward[train].mean()) if train.any() else 0.0
        clicks: dict[Any, float] = {}
        shown: dict[Any, float] = {}
        for a, r in zip(logged[train].tolist(), reward[train].tolist(), strict=True):
            clicks[a] = clicks.get(a, 0.0) + r
            shown[a] = shown.get(a, 0.0) + 1.0

        idx = np.flatnonzero(fold == f)
        for out, items in ((q_a, logged), (q_t, target)):
            out[idx] = [
                (clicks.get(x, 0.0) + prior * mean) / (shown.get(x, 0.0) + prior)
                for x in items[idx].tolist()
            ]
    return q_a, q_t
