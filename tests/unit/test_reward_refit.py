"""The reward head's exact refit: ridge solves per group, ALS sweeps, the buffer's row weights."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from recsys import metrics
from recsys.errors import ConfigError
from recsys.events import RewardRecord
from recsys.learner import reward_refit
from recsys.learner.config import LearnerConfig
from recsys.learner.reward_refit import refit_reward_head, ridge_per_group
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig, PolicyNet
from recsys.replay_buffer import ReplayBuffer, Transitions


@pytest.mark.parametrize("chunk", [None, 16])
def test_ridge_per_group_matches_the_closed_form_of_each_group(monkeypatch, chunk) -> None:
    """Per group: argmin Σ w (y − θ·x)² + λ Σw ‖θ_f + s‖², bias unregularised, solved by
    numpy on that group's rows alone; the same when rows and groups go a few at a time."""
    if chunk is not None:
        monkeypatch.setattr(reward_refit, "_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(0)
    rows, k, groups, lam = 60, 4, 3, 0.3
    g = rng.integers(0, groups, rows)
    x = np.concatenate([rng.normal(size=(rows, k - 1)), np.ones((rows, 1))], axis=1)
    y, w = rng.normal(size=rows), rng.uniform(0.5, 2.0, rows)
    shift = rng.normal(size=(groups, k - 1))
    got = ridge_per_group(
        torch.from_numpy(g),
        groups,
        torch.from_numpy(x),
        torch.from_numpy(y),
        torch.from_numpy(w),
        lam,
        torch.from_numpy(shift),
    ).numpy()
    for j in range(groups):
        m = g == j
        d = np.diag([1.0] * (k - 1) + [0.0])
        n = w[m].sum()
        a = (x[m] * w[m, None]).T @ x[m] + lam * n * d
        b = (x[m] * w[m, None]).T @ y[m] - lam * n * np.append(shift[j], 0.0)
        np.testing.assert_allclose(got[j], np.linalg.solve(a, b), rtol=1e-4, atol=1e-5)


def _objective(model: PolicyNet, users, items, rewards, weights, lam: float) -> torch.Tensor:
    """The learner's reward loss, weighted over rows (what the refit minimises)."""
    pred, norms = model.reward_predictions(users, items)
    return (weights * ((rewards - pred) ** 2 + lam * norms)).sum() / weights.sum()


def test_als_sweeps_reach_the_minimum_of_the_heads_loss() -> None:
    """Low-rank rewards, some rows of unknown users: each sweep lowers the head's own loss,
    the last solve leaves the items' gradient at zero, and 20 sweeps reach the minimum that
    500 full-batch Adam steps find."""
    torch.manual_seed(0)
    cfg = ModelConfig(text_dim=8, dim=8, max_history=4, item_capacity=40, dropout=0.0)
    model = PolicyNet(cfg)
    model.items.num_items.fill_(40)
    model.items.n_active = 40
    n_users, n_items, rows, lam = 50, 40, 3000, 0.05
    p_true, q_true = torch.randn(n_users, 3), torch.randn(n_items, 3)
    users = torch.randint(0, n_users, (rows,))
    items = torch.randint(0, n_items, (rows,))
    rewards = (p_true[users] * q_true[items]).sum(-1) + 0.1 * torch.randn(rows)
    users[:100] = -1
    weights = torch.rand(rows) + 0.5

    adam = PolicyNet(cfg)
    adam.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(adam.reward_head.parameters(), lr=1e-2)
    for _ in range(500):
        opt.zero_grad()
        _objective(adam, users, items, rewards, weights, lam).backward()
        opt.step()

    with torch.no_grad():
        losses = [float(_objective(model, users, items, rewards, weights, lam))]
        for _ in range(20):
            refit_reward_head(model, users, items, rewards, weights, lam, sweeps=1)
            losses.append(float(_objective(model, users, items, rewards, weights, lam)))
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(losses)), losses
    head = model.reward_head
    head.zero_grad()
    _objective(model, users, items, rewards, weights, lam).backward()
    assert head.items.grad is not None
    assert head.bias.grad is not None
    assert float(head.items.grad.abs().max()) < 1e-4
    assert float(head.bias.grad.abs().max()) < 1e-4
    with torch.no_grad():
        assert losses[-1] < 1.01 * float(_objective(adam, users, items, rewards, weights, lam))


def test_the_buffers_row_weights_are_its_sampling_probabilities() -> None:
    buf = ReplayBuffer(capacity=40, history_len=2, recent_capacity=10, recent_fraction=0.5)
    b = 25
    buf.add(
        Transitions(
            history=torch.full((b, 2), -1),
            item=torch.arange(b),
            reward=torch.ones(b),
            propensity=torch.where(torch.arange(b) % 2 == 0, 0.1, float("nan")),
            position=torch.zeros(b, dtype=torch.long),
            user=torch.arange(b),
        )
    )
    users, items, rewards, logged, weights = buf.reward_rows()
    assert logged.tolist() == (items % 2 == 0).tolist()  # where a propensity was logged
    assert len(users) == len(items) == len(rewards) == len(buf) == 35
    # 10 ring rows share half the draws, 25 reservoir rows the other half
    torch.testing.assert_close(weights[:10], torch.full((10,), 0.5 * 35 / 10))
    torch.testing.assert_close(weights[10:], torch.full((25,), 0.5 * 35 / 25))
    assert set(items[:10].tolist()) == set(range(15, 25))  # the ring holds the newest


def _refits() -> float:
    """Observations of ``recsys_learner_reward_refit_seconds`` so far."""
    (family,) = metrics.LEARNER_REFIT_SECONDS.collect()
    return next(s.value for s in family.samples if s.name.endswith("_count"))


def test_the_learner_refits_its_head_every_n_steps(monkeypatch) -> None:
    cfg = ModelConfig(text_dim=8, dim=8, max_history=4, item_capacity=8, dropout=0.0)
    lr = Learner(
        cfg,
        LearnerConfig(batch_size=16, device="cpu", buffer_capacity=500, reward_refit_every=3),
    )
    lr.observe(
        [
            RewardRecord(f"r{n}", f"u{n % 7}", f"i{n % 5}", float(n % 3), n, "organic")
            for n in range(200)
        ]
    )
    calls: list[int] = []
    real = lr.refit_reward_head

    def counted() -> None:
        calls.append(lr.step_count)
        real()

    monkeypatch.setattr(lr, "refit_reward_head", counted)
    before = _refits()
    for _ in range(7):
        lr.step()
    assert calls == [3, 6]
    assert _refits() - before == 2  # recsys_learner_reward_refit_seconds counts each refit
    with pytest.raises(ConfigError, match="reward_refit_every"):
        LearnerConfig(reward_refit_every=-1)


def test_impressions_weigh_in_the_heads_fit_only_by_their_setting() -> None:
    """Rows with a logged propensity (impressions) at ``reward_impression_weight``: at 0 the
    head's gradient steps and refits leave the users of impressions alone; at 1 they fit them."""
    cfg = ModelConfig(text_dim=8, dim=8, max_history=4, item_capacity=8, dropout=0.0)
    recs = [
        RewardRecord(f"r{n}", f"u{n % 7}", f"i{n % 5}", float(n % 3), n, "default", propensity=0.2)
        for n in range(200)
    ]
    moved = []
    for weight in (0.0, 1.0):
        lr = Learner(
            cfg,
            LearnerConfig(
                batch_size=16,
                device="cpu",
                buffer_capacity=500,
                reward_refit_every=2,
                reward_impression_weight=weight,
            ),
        )
        lr.observe(recs)
        for _ in range(4):
            lr.step()
        moved.append(float(lr.model.reward_head.users.abs().sum()))
    assert moved[0] == 0.0
    assert moved[1] > 0.0
