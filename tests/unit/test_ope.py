"""OPE estimators: exactness on known cases, validation, intervals, and the OBD logging check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys import datasets
from recsys.eval.ope import DM, DR, IPS, SNIPS, run_ope, softmax_policy

DATA = datasets.path("ml-latest-small").parent  # packaged: ml-latest-small/, obd/random/all/


def _bandit(n: int = 20_000, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform logging over 4 actions, 1 slot, known click rates per action."""
    rng = np.random.default_rng(seed)
    rates = np.array([0.1, 0.2, 0.3, 0.6])
    action = rng.integers(0, 4, n)
    return {
        "reward": (rng.random(n) < rates[action]).astype(float),
        "action": action,
        "position": np.zeros(n, dtype=int),
        "pscore": np.full(n, 0.25),
        "rates": rates,
    }


def test_estimators_recover_a_known_policy_value() -> None:
    d = _bandit()
    rates = d.pop("rates")
    n = len(d["reward"])
    target = np.zeros((n, 4, 1))
    target[:, 3, 0] = 0.7
    target[:, 0, 0] = 0.3
    truth = 0.7 * rates[3] + 0.3 * rates[0]
    exact_model = np.broadcast_to(rates[None, :, None], (n, 4, 1))
    biased_model = exact_model + 0.1
    for est in (IPS(), SNIPS()):
        assert est.estimate_policy_value(**d, action_dist=target) == pytest.approx(truth, abs=0.02)
    assert DM().estimate_policy_value(
        **d, action_dist=target, estimated_rewards=exact_model
    ) == pytest.approx(truth)
    # DR corrects a biased reward model; DM does not.
    dm = DM().estimate_policy_value(**d, action_dist=target, estimated_rewards=biased_model)
    dr = DR().estimate_policy_value(**d, action_dist=target, estimated_rewards=biased_model)
    assert dm == pytest.approx(truth + 0.1)
    assert dr == pytest.approx(truth, abs=0.02)
    value, lo, hi = DR().estimate_interval(
        200, seed=1, **d, action_dist=target, estimated_rewards=biased_model
    )
    assert lo < truth < hi
    assert lo < value < hi
    assert DR().estimate_interval(
        200, seed=1, **d, action_dist=target, estimated_rewards=biased_model
    ) == (value, lo, hi)


def test_ips_of_logging_policy_is_mean_reward() -> None:
    d = _bandit(500, seed=3)
    d.pop("rates")
    uniform = np.full((500, 4, 1), 0.25)
    assert IPS().estimate_policy_value(**d, action_dist=uniform) == pytest.approx(
        d["reward"].mean(), rel=1e-12
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pscore": np.zeros(10)}, "pscore"),
        ({"pscore": np.full(10, 1.5)}, "pscore"),
        ({"action": np.zeros(9, dtype=int)}, "action"),
        ({"action": np.full(10, 4)}, "action"),
        ({"action_dist": np.full((10, 4, 1), 0.3)}, "action_dist"),
        ({"action_dist": np.full((10, 4), 0.25)}, "action_dist"),
        ({"reward": np.full(10, np.nan)}, "reward"),
    ],
)
def test_validation_names_the_argument(change: dict[str, np.ndarray], message: str) -> None:
    args = {
        "reward": np.zeros(10),
        "action": np.zeros(10, dtype=int),
        "position": np.zeros(10, dtype=int),
        "pscore": np.full(10, 0.25),
        "action_dist": np.full((10, 4, 1), 0.25),
        **change,
    }
    with pytest.raises(ValueError, match=message):
        IPS().estimate_policy_value(**args)


def test_dm_needs_a_reward_model() -> None:
    with pytest.raises(ValueError, match="estimated_rewards"):
        DM().estimate_policy_value(
            reward=np.zeros(2),
            action=np.zeros(2, dtype=int),
            position=np.zeros(2, dtype=int),
            pscore=np.ones(2),
            action_dist=np.ones((2, 1, 1)),
        )


def test_softmax_policy() -> None:
    p = softmax_policy(np.array([[[0.0], [1.0]]]), temperature=1.0)
    np.testing.assert_allclose(p[0, :, 0], [1 / (1 + np.e), np.e / (1 + np.e)])
    with pytest.raises(ValueError, match="temperature"):
        softmax_policy(np.zeros((1, 2, 1)), 0.0)


@pytest.mark.slow
def test_run_ope_on_obd(tmp_path: Path) -> None:
    out = tmp_path / "ope.json"
    result = run_ope(DATA / "obd" / "random" / "all", json_out=out, n_bootstrap=200)
    check = result["logging_policy_check"]
    assert check["holds"]
    assert check["empirical_ctr"] == pytest.approx(38 / 10_000)
    assert check["ci95"][0] < check["ips"] < check["ci95"][1]
    assert result["train_rounds"] == 7000
    assert result["train_clicks"] + result["test_clicks"] == 38
    names = [r["estimator"] for r in result["learned_policy"]["estimates"]]
    assert names == ["IPS", "SNIPS", "DM", "DR"]
    for row in result["learned_policy"]["estimates"]:
        assert row["ci95"][0] <= row["estimate"] <= row["ci95"][1]
    assert out.read_text().startswith("{")


def test_first_slot_ope_on_recsys_logs_recovers_the_greedy_value() -> None:
    # Logging: recsys's own Boltzmann policy (its logged propensity is the single-draw
    # probability, i.e. P(slot 0 = a)). Target: greedy. IPS, SNIPS and DR of the target's
    # slot-0 CTR must cover the true value; a wrong propensity (the Plackett–Luce conditional
    # of a later slot, or k/n) would not.
    import torch

    from recsys.eval.ope import first_slot_ope
    from recsys.policy import rank

    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    n_ctx, n_items, rounds = 20, 15, 30_000
    states = torch.randn(n_ctx, 4, generator=g)
    items = torch.randn(n_items, 4, generator=g)
    ctr = rng.uniform(0.01, 0.3, (n_ctx, n_items))
    ctx = rng.integers(0, n_ctx, rounds)
    r = rank(states[ctx], items, 3, exploration="boltzmann", temperature=0.7, generator=g)
    first = r.items[:, 0].numpy()
    prop = r.propensities[:, 0].numpy()
    reward = (rng.random(rounds) < ctr[ctx, first]).astype(float)
    greedy = (states @ items.T).argmax(1).numpy()
    target = greedy[ctx]
    true = float(ctr[ctx, target].mean())
    est = first_slot_ope(reward, prop, first == target, first, target)
    for name in ("ips", "snips", "dr"):
        assert est[name]["low"] <= true <= est[name]["high"], (name, est[name], true)
    assert est["rounds"]["matches"] > 100
    with pytest.raises(ValueError, match="propensity"):
        first_slot_ope(reward, np.zeros(rounds), first == target)
