"""Each loss and its gradient against small cases computed by hand."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from recsys import objectives as obj
from recsys.history import MASK, PAD


def test_topk_correction_by_hand() -> None:
    pi = torch.tensor([0.1, 0.5, 0.02])
    beta = torch.tensor([0.2, 0.05, 0.01])
    w = obj.topk_correction(pi, beta, k=3, cap=4.0)
    # min(pi/beta, 4) * 3 * (1 - pi)^2
    expected = [0.5 * 3 * 0.81, 4.0 * 3 * 0.25, 2.0 * 3 * 0.98**2]
    torch.testing.assert_close(w, torch.tensor(expected))
    # K = 1: plain capped importance weight
    torch.testing.assert_close(obj.topk_correction(pi, beta, 1, 100.0), pi / beta)
    with pytest.raises(ValueError, match="k"):
        obj.topk_correction(pi, beta, 0, 1.0)


def test_reinforce_loss_and_gradient_by_hand() -> None:
    # two samples, three items
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    actions = torch.tensor([1, 2])
    rewards = torch.tensor([2.0, -1.0])
    beta = torch.tensor([0.5, 1.0 / 3.0])
    loss, w = obj.off_policy_topk_loss(logits, actions, rewards, beta, k=2, cap=10.0)

    e = [math.exp(1), math.exp(2), 1.0]
    z = sum(e)
    p0 = [x / z for x in e]  # softmax of row 0
    pi0, pi1 = p0[1], 1 / 3
    w0 = min(pi0 / 0.5, 10) * 2 * (1 - pi0)
    w1 = 1.0 * 2 * (1 - pi1)
    torch.testing.assert_close(w, torch.tensor([w0, w1]))
    expected = -(w0 * 2.0 * math.log(pi0) + w1 * -1.0 * math.log(pi1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    loss.backward()
    # d(-w R log softmax_a)/dlogits = -w R (onehot(a) - p) / B, weights constant
    g0 = [-w0 * 2.0 * ((1.0 if j == 1 else 0.0) - p0[j]) / 2 for j in range(3)]
    g1 = [-w1 * -1.0 * ((1.0 if j == 2 else 0.0) - 1 / 3) / 2 for j in range(3)]
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, torch.tensor([g0, g1]))


def test_behaviour_probability_prefers_logged_propensity() -> None:
    beta_logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    prop = torch.tensor([0.9, float("nan")])
    beta = obj.behaviour_probability(prop, beta_logits, torch.tensor([1, 0]))
    torch.testing.assert_close(beta, torch.tensor([0.9, 0.75]))
    with pytest.raises(ValueError, match="unknown"):
        obj.behaviour_probability(prop, None, torch.tensor([1, 0]))


def test_behaviour_loss_is_cross_entropy() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    loss = obj.behaviour_loss(logits, torch.tensor([1]))
    assert loss.item() == pytest.approx(-math.log(0.75))
    loss.backward()
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, torch.tensor([[0.25, -0.25]]))


def test_sampled_softmax_log_q_correction_and_accidental_hits() -> None:
    state = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    neg = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    logits = obj.sampled_softmax_logits(
        state,
        pos,
        neg,
        pos_ids=torch.tensor([5, 7]),
        neg_ids=torch.tensor([7, 9]),
        pos_log_q=torch.log(torch.tensor([0.5, 0.25])),
        neg_log_q=torch.log(torch.tensor([0.25, 0.5])),
    )
    ln = math.log
    expected = torch.tensor(
        [
            [2 - ln(0.5), 1 - ln(0.25), 0 - ln(0.5)],
            [1 - ln(0.25), float("-inf"), 3 - ln(0.5)],  # item 7 is row 1's own positive
        ]
    )
    torch.testing.assert_close(logits, expected)


def test_sample_negatives_uniform_and_proposal() -> None:
    g = torch.Generator().manual_seed(0)
    ids, lq = obj.sample_negatives(10, 1000, g)
    assert ids.min() >= 0
    assert ids.max() < 10
    torch.testing.assert_close(lq, torch.full((1000,), -math.log(10)))
    q = torch.tensor([0.0, 3.0, 1.0])
    ids, lq = obj.sample_negatives(3, 4000, g, q=q)
    assert set(ids.tolist()) <= {1, 2}
    torch.testing.assert_close(lq, torch.log(q[ids] / 4))
    assert abs((ids == 1).float().mean().item() - 0.75) < 0.04


def test_info_nce_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    k = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    loss = obj.info_nce(q, k, temperature=0.5)
    c = 1 / math.sqrt(2)
    # cosines: row0 [1, c], row1 [0, c]; /0.5
    l0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(2 * c)))
    l1 = -math.log(math.exp(2 * c) / (math.exp(0) + math.exp(2 * c)))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    loss.backward()
    assert q.grad is not None
    assert torch.isfinite(q.grad).all()


def test_info_nce_masks_duplicate_keys_and_weights_rows() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([4, 4, 6])  # rows 0 and 1 share their next item
    loss = obj.info_nce(q, k, 1.0, k_ids=ids, weights=torch.tensor([1.0, 0.0, 0.0]))
    # row 0 alone: key 1 (same item) not a negative, so logits [cos(q0,k0), -inf, cos(q0,k2)]
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1.0)), rel=1e-6)


def test_nt_xent_by_hand() -> None:
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = obj.nt_xent(z1, z2, temperature=1.0)
    e = math.e
    # sims: z1a=[1,0] z1b=[0,1] z2a=[1,0] z2b=[1,0]
    l_z1a = -math.log(e / (1 + e + e))  # vs z1b(0), z2a(1)+, z2b(1)
    l_z1b = -math.log(1 / (1 + 1 + 1))  # vs z1a(0), z2a(0), z2b(0)+
    l_z2a = -math.log(e / (e + 1 + e))  # vs z1a(1)+, z1b(0), z2b(1)
    l_z2b = -math.log(1 / (e + 1 + e))  # vs z1a(1), z1b(0)+, z2a(1)
    assert loss.item() == pytest.approx((l_z1a + l_z1b + l_z2a + l_z2b) / 4, rel=1e-6)


def test_cosine_hinge_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    pos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    neg = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    loss = obj.cosine_hinge(s, pos, neg, margin=0.5)
    # row0: max(0, .5 - 1 + 0) = 0; row1: max(0, .5 - 0 + 1) = 1.5
    assert loss.item() == pytest.approx(0.75)
    loss.backward()
    assert s.grad is not None
    assert s.grad[0].abs().sum() == 0  # inactive hinge has no gradient
    many = obj.cosine_hinge(s.detach(), pos, torch.stack([neg, neg], 1), margin=0.5)
    assert many.item() == pytest.approx(0.75)


def _h(rows: list[list[int]], n: int = 6) -> torch.Tensor:
    return torch.tensor([[PAD] * (n - len(r)) + r for r in rows])


def test_crop_keeps_a_contiguous_left_padded_window() -> None:
    g = torch.Generator().manual_seed(1)
    items = _h([[1, 2, 3, 4, 5], [7], []])
    for _ in range(20):
        out = obj.crop(items, 0.6, g)
        row = [x for x in out[0].tolist() if x != PAD]
        assert len(row) == 3
        assert row in ([1, 2, 3], [2, 3, 4], [3, 4, 5])
        assert out[0, :3].tolist() == [PAD] * 3
        assert out[1].tolist() == items[1].tolist()
        assert out[2].tolist() == [PAD] * 6


def test_mask_and_reorder_preserve_structure() -> None:
    g = torch.Generator().manual_seed(2)
    items = _h([[1, 2, 3, 4, 5, 6], [8, 9]])
    m = obj.mask_items(items, 0.5, g)
    assert ((m == items) | (m == MASK)).all()
    assert (m[1, :4] == PAD).all()
    assert obj.mask_items(items, 1.0, g)[0].tolist() == [MASK] * 6
    for _ in range(20):
        r = obj.reorder(items, 0.5, g)
        assert sorted(r[0].tolist()) == [1, 2, 3, 4, 5, 6]
        pairs = zip(r[0].tolist(), items[0].tolist(), strict=True)
        moved = [i for i, (a, b) in enumerate(pairs) if a != b]
        assert not moved or max(moved) - min(moved) < 3  # within one 3-long segment
        assert r[1, :4].tolist() == [PAD] * 4
        assert sorted(r[1, 4:].tolist()) == [8, 9]
    a = obj.augment(items, g)
    assert a.shape == items.shape
    assert (a[1, :4] == PAD).all()


def test_full_softmax_gradient_matches_autograd_of_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 7, requires_grad=True)
    actions = torch.tensor([0, 3, 6, 3])
    rewards = torch.tensor([1.0, 0.5, 0.0, 2.0])
    beta = torch.full((4,), 1 / 7)
    loss, w = obj.off_policy_topk_loss(logits, actions, rewards, beta, k=5, cap=3.0)
    loss.backward()
    p = F.softmax(logits.detach(), -1)
    onehot = F.one_hot(actions, 7).float()
    manual = -(w * rewards).unsqueeze(1) * (onehot - p) / 4
    torch.testing.assert_close(logits.grad, manual)


def test_mask_seen_masks_earlier_history_items_but_never_the_target() -> None:
    from recsys.objectives import mask_seen

    logits = torch.zeros(3, 6)
    history = torch.tensor([[-1, 2, 4, 5], [-1, 2, 4, 5], [1, 3, 1, 0]])
    upto = torch.tensor([2, 4, 4])  # row 0 predicts column 2: only item 2 was seen before
    target = torch.tensor([4, 0, 1])  # row 2 engages item 1 again: not masked
    out = mask_seen(logits, history, upto, target)
    inf = float("-inf")
    assert out[0].tolist() == [0, 0, inf, 0, 0, 0]
    assert out[1].tolist() == [0, 0, inf, 0, inf, inf]
    assert out[2].tolist() == [inf, 0, 0, inf, 0, 0]
    assert logits.eq(0).all()  # out of place


def test_mask_seen_sampled_agrees_with_the_full_mask() -> None:
    from recsys.objectives import mask_seen, mask_seen_sampled

    torch.manual_seed(0)
    history = torch.randint(0, 12, (4, 5))
    history[0, :2] = -1
    rows_b = torch.tensor([0, 1, 2, 3, 3])
    upto = torch.tensor([5, 3, 0, 2, 5])
    neg = torch.arange(12)
    target = torch.full((5,), 99)  # a target outside the negatives
    full = mask_seen(torch.zeros(5, 12), history[rows_b], upto, target)
    sampled = mask_seen_sampled(torch.zeros(5, 13), history, rows_b, upto, neg)
    assert torch.equal(sampled[:, 1:].isinf(), full.isinf())
    assert not sampled[:, 0].isinf().any()  # the positive column is never masked


def test_mask_seen_sampled_dense_and_pairwise_paths_agree(monkeypatch: Any) -> None:
    from recsys import objectives
    from recsys.objectives import mask_seen_sampled

    torch.manual_seed(1)
    history = torch.randint(0, 30, (6, 8))
    history[:2, :3] = -1
    rows_b = torch.tensor([0, 1, 2, 3, 4, 5, 5, 2])
    upto = torch.tensor([8, 3, 0, 2, 8, 5, 1, 7])
    neg = torch.randint(0, 30, (10,))
    logits = torch.zeros(8, 11)
    dense = mask_seen_sampled(logits, history, rows_b, upto, neg)
    monkeypatch.setattr(objectives, "DENSE_MASK_ELEMENTS", 0)
    pairwise = mask_seen_sampled(logits, history, rows_b, upto, neg)
    assert torch.equal(dense.isinf(), pairwise.isinf())


def test_advantage_loss_moves_probability_away_from_ignored_items() -> None:
    from recsys.objectives import advantage, advantage_loss

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    adv = advantage(rewards, baseline=True)
    assert adv.tolist() == [0.75, -0.25, -0.25, -0.25]
    assert advantage(rewards, baseline=False).tolist() == rewards.tolist()
    logits = torch.zeros(4, 5, requires_grad=True)
    actions = torch.tensor([0, 1, 2, 3])
    log_pi = torch.log_softmax(logits, -1).gather(1, actions.unsqueeze(1)).squeeze(1)
    advantage_loss(log_pi, adv, torch.ones(4)).backward()
    assert logits.grad is not None
    assert logits.grad[0, 0] < 0  # clicked: its logit goes up (gradient descent)
    for b in (1, 2, 3):
        assert logits.grad[b, b] > 0  # shown and ignored: its logit goes down
    # bounded: a negative-advantage row's loss cannot go below 0 however unlikely the item
    tiny = torch.tensor([-30.0])
    assert advantage_loss(tiny, torch.tensor([-1.0]), torch.ones(1)).item() >= 0.0
    # without a baseline a zero reward has no gradient at all
    logits.grad = None
    log_pi = torch.log_softmax(logits, -1).gather(1, actions.unsqueeze(1)).squeeze(1)
    advantage_loss(log_pi, advantage(rewards, baseline=False), torch.ones(4)).backward()
    assert logits.grad[1:].abs().sum() == 0


def test_correction_weights_only_where_the_propensity_was_logged() -> None:
    from recsys.objectives import correction_weights

    pi = torch.tensor([0.2, 0.2, 0.5])
    prop = torch.tensor([0.1, float("nan"), 0.5])
    w = correction_weights(pi, prop, k=1, cap=10.0, enabled=True)
    assert w.tolist() == pytest.approx([2.0, 1.0, 1.0])
    off = correction_weights(pi, prop, k=1, cap=10.0, enabled=False)
    assert off.tolist() == [1.0, 1.0, 1.0]


def test_nt_xent_false_negative_mask_removes_those_negatives() -> None:
    from recsys.objectives import false_negative_pairs, nt_xent

    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    same = false_negative_pairs(torch.tensor([7, 7, 3, 4]))
    assert same.tolist()[0] == [True, True, False, False]
    masked = nt_xent(z1, z2, 0.5, same)
    # by hand: rows 0 and 1 do not see each other's views as negatives
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=-1)
    logits = z @ z.T / 0.5
    block = torch.eye(8, dtype=torch.bool)
    for a, b in ((0, 1), (1, 0)):
        for da in (0, 4):
            for db in (0, 4):
                block[a + da, b + db] = True
    logits = logits.masked_fill(block, float("-inf"))
    target = torch.arange(8).roll(4)
    want = torch.nn.functional.cross_entropy(logits, target)
    assert masked.item() == pytest.approx(want.item(), rel=1e-5)
    assert masked.item() != pytest.approx(nt_xent(z1, z2, 0.5).item(), rel=1e-3)
