"""Ranking and exploration: exclusion, exact propensities, and sampling that matches them."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from recsys.policy import MIN_PROPENSITY, Policy, _categorical_draws, rank


def _case(seed: int = 0, b: int = 4, i: int = 12, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(i, d, generator=g)


def test_greedy_is_topk_of_masked_scores():
    states, items = _case()
    exclude = torch.tensor([[0, 1, -1], [-1, -1, -1], [11, 5, 3], [2, -1, -1]])
    r = rank(states, items, 4, exclude=exclude, exploration="greedy")
    scores = states @ items.T
    for b in range(4):
        banned = {int(x) for x in exclude[b] if x >= 0}
        order = [j for j in scores[b].argsort(descending=True).tolist() if j not in banned][:4]
        assert r.items[b].tolist() == order
        assert torch.allclose(r.scores[b], scores[b, order])
    assert torch.all(r.propensities == 1.0)
    assert r.valid.all()


@pytest.mark.parametrize("mode", ["greedy", "boltzmann", "epsilon"])
def test_excluded_items_never_recommended_and_slates_distinct(mode):
    states, items = _case(1, b=64, i=30)
    g = torch.Generator().manual_seed(3)
    exclude = torch.randint(-1, 30, (64, 20), generator=g)
    r = rank(
        states, items, 8, exclude=exclude, exploration=mode, epsilon=0.5, generator=g, candidates=2
    )
    for b in range(64):
        banned = {int(x) for x in exclude[b] if x >= 0}
        got = [i for i, v in zip(r.items[b].tolist(), r.valid[b].tolist(), strict=True) if v]
        assert not banned & set(got)
        assert len(set(got)) == len(got)
        assert len(got) == min(8, 30 - len(banned))
    assert torch.all((r.propensities > 0) & (r.propensities <= 1))


def _pl_conditional(z: list[float], slate: list[int]) -> list[float]:
    """Plackett–Luce conditional probabilities by the textbook formula."""
    out, remaining = [], set(range(len(z)))
    for a in slate:
        denom = sum(math.exp(z[i]) for i in remaining)
        out.append(math.exp(z[a]) / denom)
        remaining.remove(a)
    return out


@pytest.mark.parametrize("candidates", [1, 4, 7])
def test_boltzmann_conditionals_are_plackett_luce_and_propensity_is_single_draw(candidates):
    states, items = _case(2, b=3, i=7)
    g = torch.Generator().manual_seed(0)
    r = rank(
        states,
        items,
        4,
        exploration="boltzmann",
        temperature=3.0,
        generator=g,
        candidates=candidates,
    )
    z = (states @ items.T / 3.0).tolist()
    for b in range(3):
        slate = r.items[b].tolist()
        expected = _pl_conditional(z[b], slate)
        assert r.conditional[b].tolist() == pytest.approx(expected, rel=1e-5)
        soft = torch.softmax(torch.tensor(z[b], dtype=torch.float64), 0)
        assert r.propensities[b].tolist() == pytest.approx(soft[slate].tolist(), rel=1e-5)
        assert r.conditional[b, 0].item() == pytest.approx(r.propensities[b, 0].item(), rel=1e-6)


@pytest.mark.parametrize("candidates", [1, 2, 8])
def test_boltzmann_samples_match_logged_slate_probabilities(candidates):
    # Same user repeated: the empirical frequency of each ordered slate must match the product
    # of the logged conditionals (which is that slate's exact probability). Few candidates
    # force the path where the rest of the catalogue is sampled conditioned on its maximum.
    states, items = _case(4, b=1, i=5, d=3)
    n = 40_000
    g = torch.Generator().manual_seed(11)
    r = rank(
        states.expand(n, 3),
        items,
        2,
        exploration="boltzmann",
        temperature=1.5,
        generator=g,
        candidates=candidates,
    )
    slates = [tuple(s) for s in r.items.tolist()]
    freq = Counter(slates)
    prob = {}
    for s, p in zip(slates, r.conditional.prod(1).tolist(), strict=True):
        prob[s] = p
    # The observed slates' exact probabilities add up to 1 less the mass of slates never drawn,
    # which 40,000 draws leave only for slates rarer than about 1e-4.
    assert 1.0 - 1e-3 < sum(prob.values()) < 1.0 + 1e-6
    for s, p in prob.items():
        se = math.sqrt(p * (1 - p) / n)
        assert abs(freq[s] / n - p) < 5 * se + 1e-4, (s, freq[s] / n, p)


def test_epsilon_greedy_propensities_and_frequencies():
    states, items = _case(5, b=1, i=6, d=3)
    eps, n = 0.3, 30_000
    g = torch.Generator().manual_seed(2)
    r = rank(states.expand(n, 3), items, 3, exploration="epsilon", epsilon=eps, generator=g)
    order = (states @ items.T)[0].argsort(descending=True).tolist()
    # Every logged conditional follows the formula (1-ε)[best remaining] + ε/(I - j).
    for row, props in zip(r.items.tolist()[:200], r.conditional.tolist()[:200], strict=True):
        shown: list[int] = []
        for j, (a, p) in enumerate(zip(row, props, strict=True)):
            best = next(x for x in order if x not in shown)
            assert p == pytest.approx((1 - eps) * (a == best) + eps / (6 - j))
            shown.append(a)
    freq = Counter(tuple(s) for s in r.items.tolist())
    for s, p in zip(
        (tuple(x) for x in r.items.tolist()), r.conditional.prod(1).tolist(), strict=True
    ):
        se = math.sqrt(p * (1 - p) / n)
        assert abs(freq[s] / n - p) < 5 * se + 1e-4


def test_tiny_temperature_is_stable_and_near_greedy():
    states, items = _case(6, b=8, i=50)
    g = torch.Generator().manual_seed(0)
    r = rank(states, items, 5, exploration="boltzmann", temperature=1e-6, generator=g)
    greedy = rank(states, items, 5, exploration="greedy")
    assert torch.equal(r.items, greedy.items)
    assert torch.all(torch.isfinite(r.propensities))
    assert torch.all(r.conditional > 0.99)
    assert torch.all(r.propensities[:, 0] > 0.99)


def test_k_larger_than_catalogue_and_fully_excluded_user():
    states, items = _case(7, b=2, i=3)
    exclude = torch.tensor([[0, 1, 2], [-1, -1, -1]])
    for mode in ("greedy", "boltzmann", "epsilon"):
        r = rank(states, items, 5, exclude=exclude, exploration=mode, candidates=1)
        assert r.items.shape == (2, 5)
        assert r.valid[0].sum() == 0
        assert r.valid[1].sum() == 3
        assert r.rows()[0] == []
        assert sorted(i for i, _, _ in r.rows()[1]) == [0, 1, 2]


def test_policy_chunks_equal_one_batch():
    states, items = _case(8, b=50, i=40)
    exclude = torch.randint(-1, 40, (50, 6), generator=torch.Generator().manual_seed(1))
    one = Policy(items, exploration="greedy", chunk_size=1000, device="cpu").rank(
        states, 6, exclude
    )
    many = Policy(items, exploration="greedy", chunk_size=7, device="cpu").rank(states, 6, exclude)
    assert torch.equal(one.items, many.items)
    a = Policy(items, seed=3, chunk_size=7, device="cpu").rank(states, 6, exclude)
    b = Policy(items, seed=3, chunk_size=7, device="cpu").rank(states, 6, exclude)
    assert torch.equal(a.items, b.items), "seeded sampling must be reproducible"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"exploration": "softmax"}, "exploration"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_hyperparameters_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Policy(torch.ones(3, 2), device="cpu", **kwargs)


def test_bad_shapes_and_k():
    with pytest.raises(ValueError, match="k must"):
        rank(torch.ones(2, 3), torch.ones(4, 3), 0)
    with pytest.raises(ValueError, match="width"):
        rank(torch.ones(2, 3), torch.ones(4, 2), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_greedy():
    states, items = _case(9, b=100, i=500, d=16)
    cpu = Policy(items, exploration="greedy", device="cpu").rank(states, 10)
    gpu = Policy(items, exploration="greedy", device="cuda").rank(states, 10)
    assert gpu.items.device.type == "cuda"
    assert torch.equal(cpu.items, gpu.items.cpu())
    sampled = Policy(items, device="cuda", seed=0).rank(states, 10)
    assert torch.all(sampled.propensities > 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("n_items", "temp", "seed"),
    [
        (20, 2.0, 5),  # one block of the two-level draw
        (70, 4.0, 6),  # several blocks, a flat policy: most slate items come from the rest
    ],
)
def test_boltzmann_position_marginals_with_most_items_outside_the_pool(n_items, temp, seed):
    # A pool of 3: positions 0 and 1 must follow the exact Plackett–Luce marginals.
    states, items = _case(seed + 7, b=1, i=n_items, d=4)
    n = 60_000
    g = torch.Generator().manual_seed(seed)
    r = rank(
        states.expand(n, 4),
        items,
        3,
        exploration="boltzmann",
        temperature=temp,
        generator=g,
        candidates=3,
    )
    p = torch.softmax((states @ items.T)[0].double() / temp, 0)
    second = torch.stack(
        [(p * p[a] / (1 - p)).sum() - p[a] * p[a] / (1 - p[a]) for a in range(n_items)]
    )
    for pos, expected in ((0, p), (1, second)):
        freq = torch.bincount(r.items[:, pos], minlength=n_items).double() / n
        se = torch.sqrt(expected * (1 - expected) / n)
        assert torch.all((freq - expected).abs() < 5 * se + 1e-4), (pos, freq, expected)
    # Every conditional is the exact Plackett–Luce conditional of its slate, every logged
    # propensity the single-draw softmax of its item.
    z = ((states @ items.T)[0] / temp).tolist()
    for b in range(0, n, 6_000):
        slate = r.items[b].tolist()
        assert r.conditional[b].tolist() == pytest.approx(_pl_conditional(z, slate), rel=1e-4)
        assert r.propensities[b].tolist() == pytest.approx(p[slate].tolist(), rel=1e-4)


def test_categorical_draws_follow_p_across_blocks():
    # 100 items span several blocks of the two-level draw; zero-mass items are never drawn.
    g = torch.Generator().manual_seed(2)
    p = torch.rand(100, generator=g) ** 3
    p[[0, 31, 32, 63, 99]] = 0.0
    n = 200_000
    draws = _categorical_draws(p.expand(4, 100).contiguous(), n // 4, g).flatten()
    freq = torch.bincount(draws, minlength=100).double() / n
    expected = p.double() / p.double().sum()
    se = torch.sqrt(expected * (1 - expected) / n)
    assert torch.all(freq[expected == 0] == 0)
    assert torch.all((freq - expected).abs() < 5 * se + 1e-5), (freq - expected).abs().max()


def test_epsilon_allowed_count_ignores_padding_duplicates_and_out_of_range():
    # epsilon = 1 draws uniformly from what is allowed: the propensity is 1 / allowed, the
    # conditional at slot j 1 / (allowed - j).
    states, items = _case(14, b=2, i=9, d=3)
    exclude = torch.tensor([[2, 2, -1, 5, 40], [-1, -1, -1, -1, -1]])
    r = rank(states, items, 3, exclude=exclude, exploration="epsilon", epsilon=1.0)
    assert r.propensities[0].tolist() == pytest.approx([1 / 7] * 3)
    assert r.propensities[1, 0].item() == pytest.approx(1 / 9)
    assert r.conditional[0, 2].item() == pytest.approx(1 / 5)


def _slot0_matches_propensity(r, n_items: int, n: int) -> None:
    """Monte Carlo: how often each item is drawn first equals its logged propensity (5 SE)."""
    freq = torch.bincount(r.items[:, 0], minlength=n_items).double() / n
    logged = torch.zeros(n_items, dtype=torch.float64)
    for a in range(n_items):
        props = r.propensities[r.items == a]
        if props.numel():  # the same user state: an item's propensity never depends on its slot
            assert float(props.max() - props.min()) <= 1e-9 * float(props.max())
            logged[a] = props[0]
    se = torch.sqrt(logged * (1 - logged) / n)
    assert torch.all((freq - logged).abs() < 5 * se + 2e-4), (freq, logged)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "candidates"), [("boltzmann", 2), ("boltzmann", None), ("epsilon", None)]
)
def test_logged_propensity_is_the_empirical_first_draw_frequency(mode, candidates):
    # One user state repeated, two items excluded: the logged propensity of an item is the
    # single-draw probability over the allowed set, i.e. the frequency of being drawn first.
    states, items = _case(21, b=1, i=9, d=3)
    n = 40_000
    g = torch.Generator().manual_seed(4)
    exclude = torch.tensor([[3, 7]]).expand(n, 2)
    r = rank(
        states.expand(n, 3),
        items,
        4,
        exclude=exclude,
        exploration=mode,
        temperature=0.7,
        epsilon=0.4,
        generator=g,
        candidates=candidates,
    )
    _slot0_matches_propensity(r, 9, n)
    assert not bool(((r.items == 3) | (r.items == 7)).any())
    if mode == "epsilon":  # and it follows the formula (1 - ε)·[best allowed] + ε/|allowed|
        order = (states @ items.T)[0].argsort(descending=True).tolist()
        best = next(i for i in order if i not in (3, 7))
        for row, props in zip(r.items.tolist()[:100], r.propensities.tolist()[:100], strict=True):
            for a, p in zip(row, props, strict=True):
                assert p == pytest.approx(0.6 * (a == best) + 0.4 / 7)


def test_policy_floor_is_the_contract_floor():
    from recsys import events

    assert getattr(events, "MIN_PROPENSITY", MIN_PROPENSITY) == MIN_PROPENSITY
