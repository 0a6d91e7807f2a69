"""The counted per-item value estimates and the serving-only value bias they feed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.errors import ConfigError
from recsys.events import RewardRecord
from recsys.learner.config import LearnerConfig
from recsys.learner.item_value import ItemValues
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig
from recsys.serving.model import load_serving_model, policy_scores

MODEL = ModelConfig(
    text_dim=8, dim=16, max_history=4, item_capacity=8, adaptor_hidden=16, dropout=0.0
)


def _impressions(
    item: int, shown: int, clicked: int, slot: int = 0, start: int = 0
) -> tuple[list[int], list[float], list[int], list[tuple[str, str] | None]]:
    items, rewards, slots, keys = [], [], [], []
    for n in range(shown):
        items.append(item)
        rewards.append(1.0 if n < clicked else 0.0)
        slots.append(slot)
        keys.append((f"req{start + n}", f"i{item}"))
    return items, rewards, slots, keys


def test_organic_term_ranks_items_by_shrunk_mean_reward() -> None:
    v = ItemValues(organic_prior=5.0)
    # item 0: many good ratings; item 1: one great rating (shrunk); item 2: bad ratings
    v.update([0] * 20 + [1] + [2] * 10, [1.5] * 20 + [2.0] + [-1.0] * 10, [-1] * 31, [None] * 31)
    q = v.organic_term()
    assert q[0] > q[1] > 0 > q[2]
    assert q[0] == pytest.approx((30 / 25) / np.std([30 / 25, 2 / 6, -10 / 15]))
    assert v.click_term().tolist() == [0.0, 0.0, 0.0]  # no impressions yet: no click signal


def test_click_term_learns_from_ignored_impressions() -> None:
    v = ItemValues(click_prior=20.0)
    for args in (_impressions(0, 100, 10), _impressions(1, 100, 0, start=100)):
        v.update(*args)
    v.update([2], [0.0], [-1], [None])  # item 2 never shown
    c = v.click_term()
    mu = 10 / 200
    assert c[0] == pytest.approx(math.log((10 + 20 * mu) / (100 + 20)) - math.log(mu))
    assert c[1] < 0 < c[0]  # shown and ignored: below the average item
    assert c[2] == 0.0  # never shown: the prior, exactly the average


def test_optimism_ranks_by_an_upper_bound_that_shrinks_with_exposure() -> None:
    v = ItemValues(click_prior=20.0)
    # items 0 and 1 at the same CTR, 1 shown ten times as often; item 2 shown and never clicked
    for args in (_impressions(0, 50, 5), _impressions(1, 500, 50, start=50)):
        v.update(*args)
    v.update(*_impressions(2, 500, 0, start=550))
    v.update([3], [0.0], [-1], [None])  # item 3 never shown
    plain, bold = v.click_term(), v.click_term(optimism=2.0)
    assert plain.tolist() == v.click_term(optimism=0.0).tolist()
    lift = bold - plain
    assert lift[3] > lift[0] > lift[1] > 0  # the less an item is known, the larger its lift
    assert bold[3] > bold[1]  # a new item starts above an average well-known one ...
    assert bold[2] < plain[1]  # ... and one shown 500 times unclicked stays below it
    mu = 55 / 1050
    a, b = 20 * mu, 20.0
    assert bold[3] == pytest.approx(math.log((a + 2 * math.sqrt(a)) / b) - math.log(mu))


def test_one_click_per_impression_and_position_debiasing() -> None:
    v = ItemValues(click_prior=1.0, slot_prior=1.0)
    # one impression with click, dwell and purchase records: one click, one exposure
    v.update([0, 0, 0], [1.0, 0.5, 5.0], [0, 0, 0], [("r", "i0")] * 3)
    assert v.clicks[0] == 1.0
    assert v.exposure[0] == 1.0
    # slot 0 is clicked at 0.2, slot 3 at 0.05: an impression at slot 3 is worth a quarter
    v = ItemValues(slot_prior=1e-9)
    v.update(*_impressions(0, 1000, 200, slot=0))
    v.update(*_impressions(1, 1000, 50, slot=3, start=1000))
    exam = v.examination()
    assert exam[0] == 1.0
    assert exam[3] == pytest.approx(0.25)
    assert np.all(np.diff(exam) <= 0)  # never rises down the slate
    v.update(*_impressions(2, 4, 0, slot=3, start=5000))
    assert v.exposure[2] == pytest.approx(1.0)


def _records() -> list[RewardRecord]:
    out = [RewardRecord(f"o{n}", f"u{n}", "good", 1.5, 1000 + n, "organic") for n in range(10)] + [
        RewardRecord(f"b{n}", f"v{n}", "bad", -1.5, 1000 + n, "organic") for n in range(10)
    ]
    out += [
        RewardRecord(f"d{n}", f"w{n}", "shown", 0.0, 2000 + n, "default", 0.1, 0, "v1", f"q{n}")
        for n in range(50)
    ]
    return out


def test_value_bias_is_served_not_trained_and_survives_checkpoints(tmp_path: Path) -> None:
    # The reward head off: its bias would share the scoring space's bias column.
    cfg = LearnerConfig(
        batch_size=8, device="cpu", organic_value_weight=2.0, reward_head_weight=0.0, seed=0
    )
    lr = Learner(MODEL, cfg)
    lr.observe(_records())
    lr.sync_values()
    idx = {i: lr.catalog.index_of(i) for i in ("good", "bad", "shown")}
    vb = lr.model.value_biases().clone()
    assert vb[idx["good"]] > 0 > vb[idx["bad"]]
    # serving scores carry the value bias exactly ...
    with_value = lr.scores([[idx["shown"]]])[0]
    lr.model.set_value_bias(torch.zeros(lr.model.num_items))
    without = policy_scores(lr.model, [[idx["shown"]]])[0]
    assert torch.allclose(with_value - without, vb, atol=1e-5)
    lr.sync_values()
    # ... the training logits do not (the learned bias would learn to cancel it)
    emb = lr.model.item_embeddings()
    state = torch.zeros(1, MODEL.dim)
    train = lr.model.policy_logits(state, emb, lr.model.item_biases())[0]
    assert torch.allclose(train, lr.model.item_biases())
    assert lr.step() is not None
    path = lr.save_checkpoint(tmp_path, {"t:0": 1})
    restored, _ = Learner.load_checkpoint(path)
    assert np.allclose(restored.values.organic_sum, lr.values.organic_sum)
    served = load_serving_model(path, {"device": "cpu"})
    col = served.policy.item_matrix[:, MODEL.dim]  # the scoring space's bias column
    expected = lr.model.item_biases() + lr.model.value_biases()
    assert torch.allclose(col, expected.float(), atol=1e-6)  # T = 1: vectors / T, bias · T


def test_zero_weights_leave_scores_as_the_policy_network_alone() -> None:
    lr = Learner(
        MODEL,
        LearnerConfig(
            device="cpu",
            organic_value_weight=0.0,
            click_value_weight=0.0,
            reward_head_weight=0.0,
            seed=0,
        ),
    )
    lr.observe(_records())
    lr.sync_values()
    assert torch.count_nonzero(lr.model.value_biases()) == 0


def test_an_item_nobody_rated_is_valued_as_the_average_rated_item() -> None:
    v = ItemValues(organic_prior=5.0)
    v.update([0] * 20 + [1] * 10, [1.5] * 20 + [-1.0] * 10, [-1] * 30, [None] * 30)
    v.update([2], [0.0], [0], ["q:2"])  # item 2: an impression, no organic reward yet
    q = v.organic_term()
    assert q[2] == pytest.approx((q[0] + q[1]) / 2)  # between the good and the bad item
    assert q[0] > q[2] > q[1]


def test_the_learner_serves_the_click_terms_optimism_from_its_config() -> None:
    def served(optimism: float) -> torch.Tensor:
        cfg = LearnerConfig(
            device="cpu",
            organic_value_weight=0.0,
            click_value_weight=1.0,
            click_value_optimism=optimism,
            reward_head_weight=0.0,
            seed=0,
        )
        lr = Learner(MODEL, cfg)
        clicks = [
            RewardRecord(f"c{n}", f"x{n}", "good", 1.0, 3000 + n, "joined", 0.1, 0, "v1", f"k{n}")
            for n in range(5)
        ]
        lr.observe(_records() + clicks)
        lr.sync_values()
        values = ItemValues(cfg.organic_value_prior, cfg.click_value_prior)
        values.load_state(lr.values.state())
        expected = values.bias(lr.model.num_items, 0.0, 1.0, optimism)
        assert torch.allclose(lr.model.value_biases(), torch.from_numpy(expected))
        return lr.model.value_biases().clone()

    assert (served(2.0) > served(0.0)).all()
    with pytest.raises(ConfigError, match="click_value_optimism"):
        LearnerConfig(click_value_optimism=-1.0)
