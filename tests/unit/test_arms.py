"""The demo's peers: same masks, same history, the one propensity, and they learn."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.demo.arms import (
    EpsilonGreedyArm,
    LinUCBArm,
    MostPopularArm,
    RandomArm,
    VWArm,
    reduce_vectors,
)
from recsys.events import Event

ITEMS = [f"m{i}" for i in range(12)]
T0 = 1_700_000_000_000


def _features(d: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vecs = reduce_vectors(rng.normal(size=(len(ITEMS), 8)), dim=d)
    return dict(zip(ITEMS, vecs, strict=True))


def _rating(n: int, user: str, item: str, value: float) -> Event:
    return Event(f"r{n}", "rating", user, item, T0 - 10_000 + n, value=value)


def _arms(**kw: object) -> list:
    f = _features()
    arms = [
        RandomArm(ITEMS, 3, seed=1, **kw),
        MostPopularArm(ITEMS, 3, seed=1, **kw),
        EpsilonGreedyArm(ITEMS, 3, seed=1, **kw),
        LinUCBArm(ITEMS, 3, f, seed=1, **kw),
    ]
    pytest.importorskip("vowpalwabbit")
    return [*arms, VWArm(ITEMS, 3, f, seed=1, **kw)]


def test_every_arm_masks_what_the_user_watched_and_slates_are_distinct():
    # Rated (even disliked) items are watched: no arm may show them, as recsys never does.
    for arm in _arms():
        arm.warm_start(
            [_rating(n, f"fan{n}", ITEMS[n % 4], 5.0) for n in range(20)]
            + [_rating(100, "u", "m0", 1.0), _rating(101, "u", "m1", 5.0)]
        )
        for v in range(20):
            s = arm.slate("u", T0 + v, f"q{v}")
            got = [i.item_id for i in s.items]
            assert len(got) == 3
            assert len(set(got)) == 3
            assert not {"m0", "m1"} & set(got), arm.name
            assert all(0 < i.propensity <= 1 for i in s.items)


def test_every_arm_keeps_shown_items_out_for_the_publishers_cooldown():
    for arm in _arms(cooldown_ms=60_000):
        first = arm.slate("u", T0, "q0")
        arm.update(
            [
                Event(f"i{i.position}", "impression", "u", i.item_id, T0, "q0", i.position)
                for i in first.items
            ]
        )
        shown = {i.item_id for i in first.items}
        for v in range(10):
            got = {i.item_id for i in arm.slate("u", T0 + 1000 * v, f"q{v}").items}
            assert not shown & got, arm.name
        assert arm.shown.recent("u", T0 + 60_000) == []


def test_random_and_epsilon_arms_log_the_single_draw_probability():
    # The logged propensity equals the frequency of being drawn first (5 standard errors).
    n = 4000
    watched = [_rating(0, "u", "m0", 2.0), _rating(1, "u", "m1", 2.0)]
    rand = RandomArm(ITEMS, 3, seed=2)
    rand.warm_start(watched)
    eps = EpsilonGreedyArm(ITEMS, 3, epsilon=0.5, seed=3)
    eps.warm_start(watched + [_rating(2 + i, f"f{i}", "m5", 5.0) for i in range(10)])
    for arm in (rand, eps):
        firsts: dict[str, int] = {}
        props: dict[str, float] = {}
        for v in range(n):
            s = arm.slate("u", T0, f"q{v}")
            firsts[s.items[0].item_id] = firsts.get(s.items[0].item_id, 0) + 1
            for it in s.items:
                assert props.setdefault(it.item_id, it.propensity) == pytest.approx(it.propensity)
        for item, p in props.items():
            freq = firsts.get(item, 0) / n
            assert abs(freq - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-3, (arm.name, item)
    assert props["m5"] == pytest.approx(0.5 + 0.5 / 10)  # eps: the best of 10 allowed items
    assert rand.slate("u", T0, "x").items[0].propensity == pytest.approx(1 / 10)


def _clicks_on(arm, good: str, rounds: int = 60) -> None:
    """Every user clicks ``good`` whenever it is shown, nothing else."""
    for v in range(rounds):
        user = f"u{v % 7}"
        s = arm.slate(user, T0 + v, f"q{v}")
        events = [
            Event(f"i{v}:{i.position}", "impression", user, i.item_id, T0 + v, f"q{v}",
                  i.position, i.propensity)
            for i in s.items
        ]  # fmt: skip
        events += [
            Event(f"c{v}", "click", user, i.item_id, T0 + v + 1, f"q{v}", i.position)
            for i in s.items
            if i.item_id == good
        ]
        arm.update(events)
        arm.watched._users.pop(user, None)  # let the users see it again (a test of learning)


@pytest.mark.parametrize("name", ["epsilon_greedy", "linucb", "vw", "most_popular"])
def test_arms_learn_online_from_their_own_clicks(name):
    f = _features()
    if name == "vw":
        pytest.importorskip("vowpalwabbit")
    arm = {
        "epsilon_greedy": lambda: EpsilonGreedyArm(ITEMS, 3, epsilon=0.3, seed=0),
        "linucb": lambda: LinUCBArm(ITEMS, 3, f, alpha=0.5, seed=0),
        "vw": lambda: VWArm(ITEMS, 3, f, lam=10.0, seed=0),
        "most_popular": lambda: MostPopularArm(ITEMS, 3, seed=0),
    }[name]()
    before = arm.scores("u0")
    rank_before = int((before > before[ITEMS.index("m7")]).sum())
    if name == "most_popular":  # deterministic: make m7 shown, then it must climb from clicks
        arm.positives[ITEMS.index("m7")] = 0.5
    _clicks_on(arm, "m7", 120)
    after = arm.scores("u0")
    assert int((after > after[ITEMS.index("m7")]).sum()) == 0, (name, rank_before, after)


def test_reduce_vectors_fits_on_the_initial_rows_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 6))
    a = reduce_vectors(x, dim=3, fit_rows=10)
    b = reduce_vectors(np.concatenate([x[:10], 100 * x[10:]]), dim=3, fit_rows=10)
    assert np.allclose(a[:10], b[:10])
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0)
