"""The policy network: shapes, causality, padding, capacity, behaviour-head stop-gradient."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from recsys.errors import ConfigError
from recsys.history import MASK, PAD, pad_histories
from recsys.model import ModelConfig, PolicyNet, user_bucket, user_buckets


def _net(encoder: Any = "transformer", **kw: Any) -> PolicyNet:
    torch.manual_seed(0)
    cfg = ModelConfig(
        text_dim=8,
        dim=16,
        max_history=6,
        item_capacity=16,
        adaptor_hidden=12,
        encoder=encoder,
        dropout=0.0,
        **kw,
    )
    net = PolicyNet(cfg).eval()
    net.set_text_vectors(torch.randn(10, 8))
    return net


@pytest.mark.parametrize("encoder", ["transformer", "gru"])
def test_shapes_and_empty_history(encoder: Any) -> None:
    net = _net(encoder)
    items, _ = pad_histories([[], [1], [1, 2, 3, 4, 5, 6, 7, 8]], 6)
    logits = net(items)
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits).all()
    # scoring space: [embedding, T·bias, T·w·head factors] and [state, 1, head user factor]
    assert net.item_vectors().shape == (10, 33)
    assert net.item_vectors(torch.tensor([[1, 2]])).shape == (1, 2, 33)
    last, seq = net.user_states_all(items)
    assert last.shape == (3, 16)
    assert seq.shape == (3, 6, 16)
    # a new user (empty history) is served from the begin token, the same for everyone
    a = net.user_state(pad_histories([[]], 6)[0])
    assert a.shape == (1, 33)
    assert a[0, 16] == 1.0
    torch.testing.assert_close(a[:, :16], last[:1])


@pytest.mark.parametrize("encoder", ["transformer", "gru"])
def test_state_ignores_padding_and_batch_company(encoder: str) -> None:
    net = _net(encoder)
    alone = net.user_state(pad_histories([[3, 4]], 6)[0])
    together = net.user_state(pad_histories([[3, 4], [1, 2, 3, 4, 5, 6]], 6)[0])[:1]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder", ["transformer", "gru"])
def test_states_are_causal(encoder: str) -> None:
    net = _net(encoder)
    a, _ = pad_histories([[1, 2, 3, 4]], 6)
    b, _ = pad_histories([[1, 2, 7, 8]], 6)
    _, sa = net.user_states_all(a)
    _, sb = net.user_states_all(b)
    # columns 2..5 hold 1,2,3,4 vs 1,2,7,8: the states before columns <= 4 agree
    torch.testing.assert_close(sa[:, :5], sb[:, :5], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(sa[:, 5], sb[:, 5])
    assert not torch.allclose(net.user_state(a), net.user_state(b))


def test_mask_token_changes_state() -> None:
    net = _net()
    a, _ = pad_histories([[1, 2, 3]], 6)
    m = a.clone()
    m[0, -2] = MASK
    assert not torch.allclose(net.user_state(a), net.user_state(m))


def test_behaviour_head_gradient_is_stopped_into_state_and_items() -> None:
    net = _net().train()
    items, _ = pad_histories([[1, 2], [3]], 6)
    vecs = net.item_vectors()
    state = net.user_state(items, vecs)
    net.behaviour_logits(state, vecs).sum().backward()
    assert net.beta_proj.weight.grad is not None
    assert net.beta_bias.grad is not None
    for name, p in net.named_parameters():
        if not name.startswith("beta_"):
            assert p.grad is None or not p.grad.any(), name


def test_temperature_scales_logits() -> None:
    hot = _net(temperature=2.0)
    cold = _net(temperature=1.0)
    items, _ = pad_histories([[1, 2]], 6)
    torch.testing.assert_close(hot(items) * 2.0, cold(items))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_item_bias_is_in_the_serving_scores(temperature: float) -> None:
    """Serving ranks with user_state @ item_vectors.T / T: that must equal the training logits,
    bias included (what the publisher loads is what the learner trained)."""
    net = _net(temperature=temperature)
    with torch.no_grad():
        net.item_bias.copy_(torch.linspace(-2.0, 2.0, net.item_bias.shape[0]))
    net.eval()
    items, _ = pad_histories([[1, 2], [3]], 6)
    emb = net.item_embeddings()
    state, _ = net.user_states_all(items, emb)
    train = net.policy_logits(state, emb, net.item_biases())
    vecs = net.item_vectors()
    served = net.user_state(items, vecs) @ vecs.T / temperature
    torch.testing.assert_close(served, train, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net(items), train, atol=1e-5, rtol=1e-5)
    without = net.policy_logits(state, emb, torch.zeros(10))
    assert not torch.allclose(train, without)  # the bias does move the scores
    off = _net(item_bias=False)
    with torch.no_grad():
        off.item_bias.fill_(3.0)
    assert off.item_vectors()[:, 16].abs().sum() == 0  # switched off: no effect (bias column)


def test_checkpoint_without_item_bias_loads_with_zero_bias() -> None:
    net = _net()
    state = {k: v for k, v in net.state_dict().items() if k != "item_bias"}
    fresh = _net()
    with torch.no_grad():
        fresh.item_bias.fill_(1.0)
    fresh.load_state_dict(state)
    assert fresh.item_bias.abs().sum() == 0


def test_text_enters_as_a_gated_residual_starting_at_zero() -> None:
    net = _net()
    ids_only = _net(use_text=False)
    ids_only.load_state_dict(net.state_dict(), strict=False)
    assert net.items.text_gate.item() == 0.0
    torch.testing.assert_close(net.item_embeddings(), ids_only.item_embeddings())
    with torch.no_grad():
        net.items.text_gate.fill_(0.5)
    assert not torch.allclose(net.item_embeddings(), ids_only.item_embeddings())
    with pytest.raises(ConfigError, match="text_gate_init"):
        ModelConfig(text_gate_init=float("nan"))


def test_checkpoint_without_text_gate_loads_with_the_plain_sum() -> None:
    net = _net(text_gate_init=0.0)
    state = {k: v for k, v in net.state_dict().items() if k != "items.text_gate"}
    fresh = _net()
    fresh.load_state_dict(state)
    assert float(fresh.items.text_gate) == 1.0


def test_text_only_and_id_only_variants() -> None:
    text_only = _net(use_id_embedding=False)
    assert text_only.items.id_embedding is None
    ids_only = _net(use_text=False)
    assert ids_only.items.adaptor is None
    items, _ = pad_histories([[1]], 6)
    assert torch.isfinite(text_only(items)).all()
    assert torch.isfinite(ids_only(items)).all()


def test_capacity_is_validated_and_grows() -> None:
    net = _net()
    with pytest.raises(ConfigError, match="item_capacity"):
        net.set_text_vectors(torch.randn(17, 8))
    items, _ = pad_histories([[1, 2]], 6)
    before = net(items)
    assert net.items.id_embedding is not None
    old_emb: Any = net.items.id_embedding.weight
    mapping = net.grow(40)
    assert net.items.capacity == 40
    assert net.cfg.item_capacity == 40
    assert mapping[old_emb].shape == (40, 16)
    torch.testing.assert_close(net(items), before)  # existing items unchanged
    net.set_text_vectors(torch.randn(5, 8), start=30)
    assert net.num_items == 35
    assert net(items).shape == (1, 35)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match="dim"):
        ModelConfig(dim=0)
    with pytest.raises(ConfigError, match="num_heads"):
        ModelConfig(dim=10, num_heads=3)
    with pytest.raises(ConfigError, match="encoder"):
        ModelConfig(encoder="lstm")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="temperature"):
        ModelConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="use_text"):
        ModelConfig(use_text=False, use_id_embedding=False)
    cfg = ModelConfig(dim=32)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        ModelConfig.from_dict({"bogus": 1})
    assert PAD == -1


@pytest.mark.parametrize("layers", [1, 3])
def test_serving_state_equals_the_training_path(layers: int) -> None:
    # In eval mode the last layer computes the last position only; it must be the same state.
    net = _net(num_layers=layers)
    items, _ = pad_histories([[], [2], [1, 2, 3], [4, MASK, 6, 7, 8, 9], [5, 5, 5, 5]], 6)
    served = net.user_state(items)
    last, _ = net.user_states_all(items)
    torch.testing.assert_close(served[:, :16], last, atol=1e-5, rtol=1e-5)
    net.train()  # dropout is 0: the training path must agree too
    torch.testing.assert_close(net.user_state(items), served, atol=1e-5, rtol=1e-5)


def test_reward_head_is_in_the_serving_scores() -> None:
    """Serving's one inner product is the policy logits plus ``reward_weight · p_u·q_i``; an
    untrained head (zero user factors), an unknown user or a zero weight leaves the serving
    scores as they were."""
    net = _net(temperature=0.5)
    items, _ = pad_histories([[1, 2], [3], []], 6)
    users = torch.tensor([5, 9, -1])
    vecs = net.item_vectors()
    before = net.user_state(items, vecs, users) @ vecs.T / 0.5
    net.set_reward_weight(2.0)
    vecs = net.item_vectors()
    torch.testing.assert_close(net.user_state(items, vecs, users) @ vecs.T / 0.5, before)
    head = net.reward_head
    with torch.no_grad():
        head.users.copy_(torch.randn_like(head.users))
        head.bias.copy_(torch.randn_like(head.bias))
        head.user_bias.copy_(torch.randn_like(head.user_bias))
        head.text_proj.weight.copy_(torch.randn_like(head.text_proj.weight))
    vecs = net.item_vectors()
    emb = net.item_embeddings()
    state, _ = net.user_states_all(items, emb)
    policy = net.policy_logits(state, emb, net.item_biases())
    reward = torch.stack(
        [net.reward_predictions(users, torch.full((3,), i))[0] for i in range(10)], dim=1
    )
    served = net.user_state(items, vecs, users) @ vecs.T / 0.5
    personal = reward - head.item_biases(None, 10) - head.user_biases(users).unsqueeze(1)
    torch.testing.assert_close(served, policy + 2.0 * personal, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(net(items, users), served, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(served, before, atol=1e-3)
    torch.testing.assert_close(served[2], before[2])  # an unknown user: no personal part
    net.set_reward_weight(0.0)
    vecs = net.item_vectors()
    torch.testing.assert_close(net.user_state(items, vecs, users) @ vecs.T / 0.5, before)


def test_user_buckets_are_stable_and_in_range() -> None:
    assert user_bucket("alice", 1 << 16) == user_bucket("alice", 1 << 16)  # no per-process salt
    got = user_buckets([f"u{n}" for n in range(2000)], 64)
    assert got.min() >= 0
    assert got.max() < 64
    assert len(set(got.tolist())) == 64  # spread over every bucket
    assert 0 <= user_bucket("\ud800", 7) < 7  # a lone surrogate still hashes


def test_reward_head_grows_with_the_item_capacity() -> None:
    net = _net()
    with torch.no_grad():
        net.reward_head.bias.fill_(1.0)
    mapping = net.grow(40)
    head = net.reward_head
    assert head.items.shape == (40, 16)
    assert head.bias.shape == (40,)
    assert head.bias[:16].eq(1.0).all()
    assert head.bias[16:].eq(0.0).all()
    assert head.items[16:].abs().sum() > 0  # new items can learn at once
    assert len(mapping) == 2 + 1 + 2  # two biases, the id embedding, the head's item tables


def test_checkpoint_without_reward_head_loads_with_a_fresh_head() -> None:
    net = _net()
    state = {
        k: v
        for k, v in net.state_dict().items()
        if not k.startswith("reward_head.") and k != "reward_weight"
    }
    fresh = _net()
    with torch.no_grad():
        fresh.reward_head.users.fill_(1.0)
        fresh.reward_weight.fill_(1.0)
    fresh.load_state_dict(state)
    assert fresh.reward_head.users.abs().sum() == 0  # untrained: no effect on serving
    assert fresh.reward_head.items.abs().sum() > 0  # but able to learn
    assert float(fresh.reward_weight) == 0.0
