"""The incremental learner: observe (no leakage), steps that learn, non-finite guards, growth."""

from __future__ import annotations

import math

import pytest
import torch

from recsys import metrics
from recsys.config import LearnerSettings
from recsys.encoder.catalog import ItemCatalog
from recsys.errors import CheckpointError, ConfigError
from recsys.events import RewardRecord
from recsys.history import PAD
from recsys.learner.config import LearnerConfig, model_config
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig, user_bucket

MODEL = ModelConfig(
    text_dim=8, dim=16, max_history=4, item_capacity=8, adaptor_hidden=16, dropout=0.0
)


def _learner(**kw: object) -> Learner:
    cfg = dict(batch_size=32, device="cpu", buffer_capacity=1000, lr=3e-3, seed=0)
    cfg.update(kw)
    return Learner(MODEL, LearnerConfig(**cfg))  # type: ignore[arg-type]


def _rec(
    n: int, user: str, item: str, ts: int, reward: float = 1.0, propensity: float | None = None
) -> RewardRecord:
    return RewardRecord(f"r{n}", user, item, reward, ts, "organic", propensity=propensity)


def _cycle_records(users: int = 20, length: int = 12, items: int = 6) -> list[RewardRecord]:
    """Each user walks item k -> k+1 (mod items): the next item is predictable from the last."""
    out: list[RewardRecord] = []
    for u in range(users):
        for t in range(length):
            out.append(_rec(len(out), f"u{u}", f"i{(u + t) % items}", 1000 * t + u))
    out.sort(key=lambda r: r.ts)
    return out


def test_the_worker_settings_choose_the_objective_and_the_towers() -> None:
    shipped = LearnerSettings()
    assert LearnerConfig.from_settings(shipped).objective == "ce"
    assert not model_config(shipped, text_dim=8).use_text
    pg = LearnerSettings(objective="reinforce", text=True, id_embeddings=False, dim=16)
    assert LearnerConfig.from_settings(pg).objective == "reinforce"
    cfg = model_config(pg, text_dim=8, item_capacity=100)
    assert (cfg.use_text, cfg.use_id_embedding, cfg.dim, cfg.item_capacity) == (
        True,
        False,
        16,
        100,
    )
    with pytest.raises(ConfigError, match="use_text"):
        model_config(LearnerSettings(text=False, id_embeddings=False), text_dim=8)
    head = LearnerSettings(reward_impression_weight=1.0, reward_refit_every=0)
    cfg_head = LearnerConfig.from_settings(head)
    assert (cfg_head.reward_impression_weight, cfg_head.reward_refit_every) == (1.0, 0)


def test_config_validation_names_the_parameter() -> None:
    for bad in (
        {"batch_size": 0},
        {"lr": -1.0},
        {"weight_cap": 0.0},
        {"objective": "x"},
        {"recent_fraction": 2.0},
        {"recent_capacity": 10**9},
        {"augment_views": 3},
        {"alpha": float("nan")},
    ):
        name = next(iter(bad))
        with pytest.raises(ConfigError, match=f"LearnerConfig.{name}"):
            LearnerConfig(**bad)
    catalog = ItemCatalog(dim=5)
    with pytest.raises(ConfigError, match="text_dim"):
        Learner(MODEL, LearnerConfig(device="cpu"), catalog)


def test_observe_builds_states_without_leakage() -> None:
    lr = _learner(recent_capacity=0, recent_fraction=0.0)
    unknown0 = metrics.ITEMS_UNKNOWN._value.get()
    recs = [
        _rec(0, "u", "a", 10),
        _rec(1, "u", "b", 20, reward=0.0),
        _rec(2, "u", "c", 30),
        _rec(3, "u", "d", 30),
        _rec(4, "v", "a", 35, propensity=0.25),
        _rec(5, "u", "e", 40),
        _rec(6, "u", "x", 50, reward=float("nan")),
    ]
    assert lr.observe(recs) == 6
    assert metrics.ITEMS_UNKNOWN._value.get() - unknown0 == 5  # a..e, id-only
    rows = lr.buffer.gather(lr.buffer.reservoir_rows())
    a, b, c, d, e = (lr.catalog.index[x] for x in "abcde")
    hist = [[x for x in row if x != PAD] for row in rows.history.tolist()]
    # each state is the positive history strictly before the impression
    assert hist == [[], [a], [a], [a], [], [a, c, d]]
    assert rows.item.tolist() == [a, b, c, d, a, e]
    assert rows.reward.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert rows.propensity[4].item() == 0.25
    assert math.isnan(rows.propensity[0].item())
    assert lr.histories.get("u") == [a, c, d, e]  # zero reward never enters a history


@pytest.mark.slow
def test_steps_learn_a_predictable_sequence() -> None:
    lr = _learner()
    assert lr.step() is None  # empty buffer
    lr.observe(_cycle_records())
    losses = []
    for _ in range(150):
        out = lr.step()
        assert out is not None
        assert out["skipped"] == 0.0
        losses.append(out["loss"])
    first, last = sum(losses[:10]), sum(losses[-10:])
    assert last < first
    idx = lr.catalog.index
    hits = 0
    for k in range(6):
        hist = [idx[f"i{(k + 4) % 6}"], idx[f"i{(k + 5) % 6}"]]
        scores = lr.scores([hist])[0]
        scores[hist] = float("-inf")  # ranked over the allowed set, as served
        hits += int(scores.argmax().item() == idx[f"i{k}"])
    assert hits >= 5
    assert lr.step_count == 150


@pytest.mark.parametrize(
    "kw",
    [
        {"softmax": "sampled", "num_negatives": 16},
        {"contrastive": "hinge"},
        {"objective": "ce", "contrastive": "none"},
        {"augment_views": 1},
        {"mask_history": False, "behaviour_weight": 1.0},
        {"impression_baseline": False, "off_policy_correction": False},
        {"sequence_weight": 0.0},
    ],
)
def test_variants_take_finite_steps(kw: dict[str, object]) -> None:
    lr = _learner(**kw)
    lr.observe(_cycle_records(users=8, length=6))
    for _ in range(5):
        out = lr.step()
        assert out is not None
        assert out["skipped"] == 0.0
        assert math.isfinite(out["loss"])


def test_logged_propensity_sets_the_correction_weight() -> None:
    lr = _learner(normalize_weights=False, topk=1, weight_cap=100.0)
    lr.observe([_rec(i, f"u{i}", f"i{i % 4}", i, propensity=0.5) for i in range(40)])
    lr.sync_items()
    batch = lr.buffer.sample(8)
    terms = lr.losses(batch)
    # K = 1: w = pi / 0.5 with pi = softmax(logits)[a]
    vecs = lr.model.item_vectors()
    lr.model.eval()
    pi = torch.softmax(lr.model.logits(lr.model.user_state(batch.history, vecs), vecs), -1)
    pi_a = pi.gather(1, batch.item.unsqueeze(1)).squeeze(1)
    assert terms["weight_mean"].item() == pytest.approx((pi_a / 0.5).mean().item(), rel=1e-4)


def test_non_finite_loss_skips_the_step_and_is_counted() -> None:
    lr = _learner()
    lr.observe(_cycle_records(users=4, length=4))
    lr.step()
    with torch.no_grad():
        lr.model.encoder.begin.fill_(float("nan"))
    snapshot = {k: v.clone() for k, v in lr.model.state_dict().items()}
    skipped0 = metrics.LEARNER_SKIPPED_STEPS._value.get()
    out = lr.step()
    assert out is not None
    assert out["skipped"] == 1.0
    assert metrics.LEARNER_SKIPPED_STEPS._value.get() - skipped0 == 1
    assert lr.step_count == 1
    for k, v in lr.model.state_dict().items():
        torch.testing.assert_close(v, snapshot[k], equal_nan=True)
    with pytest.raises(CheckpointError, match="non-finite"):
        lr.save_checkpoint("/nonexistent-never-written", {"t:0": 1})


def test_new_items_grow_model_and_optimizer() -> None:
    lr = _learner()
    lr.observe(_cycle_records(users=4, length=4, items=6))
    lr.step()
    assert lr.model.items.capacity == 8
    lr.observe([_rec(1000 + k, "u0", f"new{k}", 10**6 + k) for k in range(10)])
    out = lr.step()
    assert out is not None
    assert out["skipped"] == 0.0
    assert lr.model.items.capacity == 16
    assert lr.model.num_items == 16
    emb = lr.model.items.id_embedding.weight  # type: ignore[union-attr]
    assert lr.optimizer.state[emb]["exp_avg"].shape == (16, 16)
    assert any(p is emb for p in lr.optimizer.param_groups[0]["params"])
    assert lr.scores([[0, 1]]).shape == (1, 16)


def test_sampled_behaviour_estimate_matches_exact_softmax() -> None:
    """Above ``behaviour_negatives`` items β comes from a log-Q corrected sampled softmax."""
    torch.manual_seed(0)
    model = ModelConfig(text_dim=8, dim=16, max_history=4, item_capacity=3000, dropout=0.0)
    lr = Learner(model, LearnerConfig(device="cpu", behaviour_negatives=1500, batch_size=16))
    lr.catalog.put_vectors([f"i{k}" for k in range(3000)], torch.randn(3000, 8).numpy())
    lr.sync_items()
    with torch.no_grad():  # a moderately peaked behaviour distribution
        lr.model.beta_bias.normal_(0.0, 1.0)
        lr.model.beta_proj.weight.mul_(0.25)
    net = lr.model.eval()
    items = torch.randint(0, 3000, (16, 4))
    actions = torch.randint(0, 3000, (16,))
    with torch.no_grad():
        vecs = net.item_vectors()
        state = net.user_state(items, vecs)
        exact = torch.softmax(net.behaviour_logits(state, vecs), -1)
        exact_a = exact.gather(1, actions.unsqueeze(1)).squeeze(1)
        neg = torch.randint(0, 3000, (1500,))
        zero = torch.zeros(16)
        lq = torch.full((1500,), math.log(1500 / 3000))
        est = net.behaviour_sampled_logits(state, vecs[actions], vecs[neg], actions, neg, zero, lq)
        est_a = torch.softmax(est, -1)[:, 0]
    ratio = est_a / exact_a
    assert (ratio - 1).abs().mean() < 0.15


def _ctr_ratio(baseline: bool) -> float:
    """π(b) / π(a) where a and b were clicked equally often but a was shown 4x as often."""
    # The policy network alone: the counted value bias would rank b first either way.
    lr = _learner(
        impression_baseline=baseline,
        contrastive="none",
        sequence_weight=0.0,
        organic_value_weight=0.0,
        click_value_weight=0.0,
        reward_head_weight=0.0,
    )
    recs = []
    for rep in range(8):  # each impression a different new user: the same (empty) context
        for item, shown, clicked in (("a", 8, 2), ("b", 2, 2)):
            for k in range(shown):
                user = f"u{rep}-{item}-{k}"
                recs.append(_rec(len(recs), user, item, len(recs), reward=float(k < clicked)))
    lr.observe(recs)
    for _ in range(80):
        lr.step()
    scores = lr.scores([[]])[0]
    return math.exp(float(scores[lr.catalog.index["b"]] - scores[lr.catalog.index["a"]]))


def test_ignored_impressions_lose_probability_only_with_the_baseline() -> None:
    with_baseline, without = _ctr_ratio(True), _ctr_ratio(False)
    # without a baseline a zero reward has no gradient: equal clicks, about equal probability;
    # with it the six ignored impressions of a move probability to b (higher click rate)
    assert 0.5 < without < 2.0
    assert with_baseline > 2 * without


def test_reward_head_learns_each_users_taste_into_the_serving_scores() -> None:
    """Users of taste A rate p high and q low, users of taste B the reverse, and both watch
    both equally: no item-level statistic separates them. The policy terms are off, so what
    ranks p over q for A (and q over p for B) is the reward head's user factors alone."""
    lr = _learner(organic_value_weight=0.0, contrastive="none", pg_weight=0.0, sequence_weight=0.0)
    recs: list[RewardRecord] = []
    for _rep in range(6):
        for u in range(20):
            liked, disliked = ("p", "q") if u % 2 else ("q", "p")
            for item, r in ((liked, 2.0), (disliked, -2.0)):
                recs.append(_rec(len(recs), f"u{u}", item, len(recs), reward=r))
    lr.observe(recs)
    held = torch.cat([lr.buffer.recent_rows(), lr.buffer.reservoir_rows()])
    assert set(lr.buffer.gather(held).users.tolist()) == {
        user_bucket(f"u{u}", MODEL.user_buckets) for u in range(20)
    }
    before = lr.scores([[], []], ["u1", "u2"])
    for _ in range(200):
        lr.step()
    ix = lr.catalog.index
    after = lr.scores([[], []], ["u1", "u2"])
    gap = (after[:, ix["p"]] - after[:, ix["q"]]) - (before[:, ix["p"]] - before[:, ix["q"]])
    assert gap[0] > 1.0
    assert gap[1] < -1.0
    unknown = lr.scores([[]])  # no user id: the head's item bias only, the same for everyone
    torch.testing.assert_close(unknown, lr.scores([[]], ["someone new"]))


def test_the_reward_head_fits_its_multiplier_of_batches_per_step(monkeypatch) -> None:
    """``reward_batch_multiplier`` m: the head's loss reads m batches of rows from the buffer
    each step, the policy's terms still one."""
    for m in (1, 4):
        lr = _learner(reward_batch_multiplier=m)
        lr.observe(_cycle_records())
        rows: list[int] = []
        real = lr.model.reward_predictions

        def spy(users: torch.Tensor, idx: torch.Tensor, real=real, rows=rows):
            rows.append(len(idx))
            return real(users, idx)

        monkeypatch.setattr(lr.model, "reward_predictions", spy)
        out = lr.step()
        assert out is not None
        assert out["skipped"] == 0.0
        assert rows == [m * 32]
    with pytest.raises(ConfigError, match="reward_batch_multiplier"):
        _learner(reward_batch_multiplier=0)


def test_retired_fields_of_old_checkpoints_are_dropped() -> None:
    old = {**LearnerConfig().to_dict(), "augment_weight": 0.1, "contrast_all_positions": True}
    assert LearnerConfig.from_dict(old) == LearnerConfig()
    with pytest.raises(ConfigError, match="unknown"):
        LearnerConfig.from_dict({"not_a_field": 1})
    with pytest.raises(ConfigError, match=r"LearnerConfig\.impression_baseline"):
        LearnerConfig(impression_baseline=1)  # type: ignore[arg-type]


def test_a_checkpoint_from_before_the_reward_head_resumes_with_a_fresh_head(tmp_path) -> None:
    """Upgrading keeps the trained model: the head's tables and optimizer state are absent
    from an older checkpoint, so they start fresh while everything else is restored."""
    import json

    from safetensors.torch import load_file, save_file

    from recsys import checkpoint as ckpt

    lr = _learner(reward_head_weight=0.0)
    lr.observe(_cycle_records())
    for _ in range(5):
        lr.step()
    path = lr.save_checkpoint(tmp_path, {"t:0": 1})
    # Rewrite it as the release before the head wrote it.
    old = lambda name: name.startswith("reward_head.") or name == "reward_weight"  # noqa: E731
    model = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if not old(k)}
    save_file(model, str(path / "model.safetensors"))
    opt = load_file(str(path / "optimizer.safetensors"))
    save_file({k: v for k, v in opt.items() if not old(k)}, str(path / "optimizer.safetensors"))
    meta = json.loads((path / "optimizer.json").read_text())
    for g in meta["param_groups"]:
        g["params"] = [n for n in g["params"] if not old(n)]
    meta["scalars"] = {k: v for k, v in meta["scalars"].items() if not old(k)}
    (path / "optimizer.json").write_text(json.dumps(meta))
    manifest = json.loads((path / "manifest.json").read_text())
    for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json"):
        manifest["files"][name] = ckpt.sha256_file(path / name)
    (path / "manifest.json").write_text(json.dumps(manifest))

    restored, _ = Learner.load_checkpoint(path)
    for name, p in lr.model.named_parameters():
        if not old(name):
            torch.testing.assert_close(dict(restored.model.named_parameters())[name], p)
    assert restored.model.reward_head.users.abs().sum() == 0
    restored.observe(_cycle_records())
    out = restored.step()  # the fresh head trains with the rest
    assert out is not None
    assert out["skipped"] == 0.0
