"""The user simulator: calibration, position bias, fatigue, shift, cold start, determinism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from recsys import datasets
from recsys.data.movielens import MovieLens, load_movielens
from recsys.demo.arms import EpsilonGreedyArm, MostPopularArm, RandomArm
from recsys.demo.simulator import SimConfig, UserSimulator
from recsys.events import Event, EventParser, Slate, SlateItem

DATA = datasets.path("ml-latest-small").parent  # packaged: ml-latest-small/, obd/random/all/
CFG = SimConfig(seed=3, n_items=300, als_iterations=4, shift_at_ms=1_700_000_100_000)


@pytest.fixture(scope="module")
def ml() -> MovieLens:
    return load_movielens(DATA / "ml-latest-small")


@pytest.fixture(scope="module")
def sim(ml: MovieLens) -> UserSimulator:
    return UserSimulator(ml, CFG)


def _slate(sim: UserSimulator, user: str, items: list[str], now: int, rid: str = "r1") -> Slate:
    return Slate(
        rid, user, "m1", now, tuple(SlateItem(i, 0.0, 0.5, p) for p, i in enumerate(items))
    )


def test_ctr_calibrated_for_random_items(sim: UserSimulator) -> None:
    # target_ctr is the mean P(click) of a uniformly random item at the top position.
    now = CFG.start_ms
    ids = [sim.item_ids[j] for j in sim.available(now)]
    probs = np.stack([sim.click_probabilities(u, ids) for u in sim.user_ids])
    assert probs.mean() == pytest.approx(CFG.target_ctr, rel=0.15)
    # Personalised: the best items per user beat the best items overall.
    per_user_top = np.sort(probs, axis=1)[:, -10:].mean()
    global_top = probs[:, np.argsort(-probs.mean(0))[:10]].mean()
    assert per_user_top > 1.5 * global_top > 1.5 * probs.mean()


@pytest.mark.slow
def test_empirical_ctr_matches_true_probabilities(ml: MovieLens) -> None:
    sim = UserSimulator(ml, replace(CFG, fatigue=0.0))
    rng = np.random.default_rng(0)
    now = CFG.start_ms
    avail = sim.available(now)
    clicks, expected, shown = 0, 0.0, 0
    for n in range(3000):
        user = sim.next_user(rng)
        items = [sim.item_ids[j] for j in rng.choice(avail, 5, replace=False)]
        slate = _slate(sim, user, items, now, f"r{n}")
        expected += sim.expected_clicks(slate, now)
        clicks += sum(e.type == "click" for e in sim.respond(slate, now, rng))
        shown += 5
    assert clicks == pytest.approx(expected, rel=0.15)
    assert 0.005 < clicks / shown < 0.05


def test_position_bias_monotone(sim: UserSimulator) -> None:
    exam = sim.examination(np.arange(10))
    assert exam[0] == 1.0
    assert np.all(np.diff(exam) < 0)


def test_fatigue_lowers_repeat_click_probability(ml: MovieLens) -> None:
    sim = UserSimulator(ml, replace(CFG, shift_at_ms=None))
    user, now = sim.user_ids[0], CFG.start_ms
    items = sim.item_ids[:3]
    before = sim.click_probabilities(user, items, now)
    sim.respond(_slate(sim, user, items, now), now, np.random.default_rng(0))
    after = sim.click_probabilities(user, items, now + 1000)
    assert np.all(after < before * 0.6)
    # It wears off: many half-lives later the items are nearly as attractive as before.
    later = sim.click_probabilities(user, items, now + 20 * CFG.fatigue_half_life_ms)
    np.testing.assert_allclose(later, before, rtol=1e-3)
    # Other users are not fatigued.
    other = sim.user_ids[1]
    np.testing.assert_array_equal(
        sim.click_probabilities(other, items, now + 1000), sim.click_probabilities(other, items)
    )


def test_preference_shift_changes_preferences(sim: UserSimulator) -> None:
    assert CFG.shift_at_ms is not None
    ids = sim.item_ids
    before = np.stack(
        [sim.click_probabilities(u, ids, CFG.shift_at_ms - 1) for u in sim.user_ids[:50]]
    )
    after = np.stack([sim.click_probabilities(u, ids, CFG.shift_at_ms) for u in sim.user_ids[:50]])
    corr = [np.corrcoef(b, a)[0, 1] for b, a in zip(before, after, strict=True)]
    assert np.mean(corr) < 0.8
    # The oracle sees the shift too.
    user = sim.user_ids[0]
    top_before = {i.item_id for i in sim.oracle_slate(user, 10, CFG.shift_at_ms - 1).items}
    top_after = {i.item_id for i in sim.oracle_slate(user, 10, CFG.shift_at_ms).items}
    assert top_before != top_after


def test_cold_start_items_released_over_time(sim: UserSimulator) -> None:
    start = CFG.start_ms
    n_new = round(CFG.new_item_fraction * CFG.n_items)  # type: ignore[operator]
    assert len(sim.available(start)) == CFG.n_items - n_new
    released = sim.released_between(start, start + CFG.release_batches * CFG.release_interval_ms)
    assert len(released) == n_new
    assert all(r.title and r.ts > start for r in released)
    first = sim.released_between(start, start + CFG.release_interval_ms)
    assert 0 < len(first) < n_new
    # An unreleased item never appears in the oracle's slate.
    unreleased = {r.item_id for r in released}
    assert not unreleased & {i.item_id for i in sim.oracle_slate(sim.user_ids[0], 50, start).items}


def test_the_random_slate_logs_the_single_draw_probability(sim: UserSimulator) -> None:
    start = CFG.start_ms
    n = len(sim.available(start))
    rng = np.random.default_rng(0)
    user = sim.user_ids[0]
    slates = [sim.random_slate(user, 5, start, rng) for _ in range(4000)]
    assert {i.propensity for s in slates for i in s.items} == {1.0 / n}
    # Slot 0 is one uniform draw: the chance it falls in a set of items is the sum of their
    # propensities (here a third of the released items), within 4 standard errors.
    third = {sim.item_ids[int(j)] for j in sim.available(start)[: n // 3]}
    p = len(third) / n
    freq = np.mean([s.items[0].item_id in third for s in slates])
    assert abs(freq - p) < 4 * (p * (1 - p) / len(slates)) ** 0.5
    assert all(len({i.item_id for i in s.items}) == 5 for s in slates)
    assert [i.position for i in slates[0].items] == list(range(5))


def test_respond_events_follow_the_contract(ml: MovieLens) -> None:
    sim = UserSimulator(ml, CFG)
    rng = np.random.default_rng(1)
    parser = EventParser(clock_ms=lambda: 2_000_000_000_000)
    now = CFG.start_ms
    events = []
    for n in range(100):
        slate = sim.oracle_slate(sim.next_user(rng), 5, now, request_id=f"req-{n}")
        events += sim.respond(slate, now, rng)
    assert sum(e.type == "impression" for e in events) == 500
    assert {e.type for e in events} >= {"impression", "click", "dwell"}
    for e in events:
        assert parser.parse(e.to_bytes()) == e
        assert e.request_id is not None
        assert e.position is not None
        assert e.model_version == "oracle"
        if e.type == "impression":
            assert e.propensity == 1.0
        else:
            assert e.ts > now
    assert len({e.event_id for e in events}) == len(events)


@pytest.mark.slow
def test_oracle_beats_baselines_and_determinism(ml: MovieLens) -> None:
    def run(policy_name: str, seed: int) -> list[tuple[str, str]]:
        sim = UserSimulator(ml, replace(CFG, seed=seed))
        rng = np.random.default_rng(seed)
        now = CFG.start_ms
        items = [sim.item_ids[j] for j in sim.available(now)]
        policies = {
            "random": RandomArm(items, 5, seed=seed),
            "popular": MostPopularArm(items, 5, seed=seed),
            "egreedy": EpsilonGreedyArm(items, 5, epsilon=0.2, seed=seed),
        }
        out = []
        for n in range(1500):
            user = sim.next_user(rng)
            if policy_name == "oracle":
                slate = sim.oracle_slate(user, 5, now + n, f"r{n}")
            else:
                slate = policies[policy_name].slate(user, now + n, f"r{n}")
            events = sim.respond(slate, now + n, rng)
            if policy_name != "oracle":
                policies[policy_name].update(events)
            out += [(e.type, e.item_id) for e in events]
        return out

    ctr = {}
    for name in ("random", "popular", "egreedy", "oracle"):
        events = run(name, 7)
        ctr[name] = sum(t == "click" for t, _ in events) / sum(t == "impression" for t, _ in events)
    assert ctr["oracle"] > ctr["egreedy"] > ctr["random"]
    assert run("egreedy", 7)[:500] == run("egreedy", 7)[:500]
    assert run("egreedy", 7)[:500] != run("egreedy", 8)[:500]


def test_validation_names_the_parameter(ml: MovieLens) -> None:
    with pytest.raises(ValueError, match="target_ctr"):
        UserSimulator(ml, replace(CFG, target_ctr=0.0))
    with pytest.raises(ValueError, match="shift_kind"):
        UserSimulator(ml, replace(CFG, shift_kind="flip"))
    with pytest.raises(ValueError, match="epsilon"):
        EpsilonGreedyArm(["a"], 1, epsilon=1.5)
    with pytest.raises(ValueError, match="k must"):
        RandomArm(["a"], 0)


def test_policy_propensities() -> None:
    # The arms log recsys's propensity: the single-draw probability over the allowed set
    # (tests/unit/test_arms.py checks it against first-draw frequencies).
    items = [str(i) for i in range(20)]
    eg = EpsilonGreedyArm(items, 4, epsilon=0.25, seed=0)
    # Another user clicks item 0: the best CTR estimate; "u" has watched nothing.
    eg.update([Event(f"c{i}", "click", "other", "0", 0) for i in range(4)])
    for r in range(200):
        for it in eg.slate("u", 0, str(r)).items:
            best = it.item_id == "0"
            assert it.propensity == pytest.approx(0.75 * best + 0.25 / 20)
    popular = MostPopularArm(items, 3, seed=0)
    popular.update([Event(f"c{i}", "click", "v", "7", 0) for i in range(3)])
    popular.update([Event("d", "click", "w", "2", 0), Event("x", "click", "u", "zz", 0)])
    assert [i.item_id for i in popular.slate("u", 0, "p").items][:2] == ["7", "2"]
    assert "7" not in {i.item_id for i in popular.slate("v", 0, "q").items}  # v watched it
    r = RandomArm(items, 4, seed=0).slate("u", 0, "x")
    assert all(i.propensity == pytest.approx(1 / 20) for i in r.items)


@pytest.mark.slow
def test_watched_items_lose_their_appeal_for_that_user_only(ml: MovieLens) -> None:
    sim = UserSimulator(ml, replace(CFG, shift_at_ms=None))
    user, other = sim.user_ids[0], sim.user_ids[1]
    items = sim.item_ids[:4]
    before = sim.click_probabilities(user, items)
    sim.mark_consumed(user, [*items[:2], "not-in-catalogue"])
    after = sim.click_probabilities(user, items)
    np.testing.assert_allclose(after[:2], before[:2] * CFG.consumed_factor)
    np.testing.assert_array_equal(after[2:], before[2:])
    np.testing.assert_array_equal(
        sim.click_probabilities(other, items),
        UserSimulator(ml, CFG).click_probabilities(other, items),
    )
    # The oracle ranks by the appeal that is left: watched items fall out of its slate.
    sim.mark_consumed(user, [s.item_id for s in sim.oracle_slate(user, 10, CFG.start_ms).items])
    released = [sim.item_ids[j] for j in sim.available(CFG.start_ms)]
    appeal = sim.click_probabilities(user, released)
    best = {released[j] for j in np.argsort(-appeal, kind="stable")[:10]}
    assert {s.item_id for s in sim.oracle_slate(user, 10, CFG.start_ms).items} == best


@pytest.mark.slow
def test_ceilings_match_the_slates_they_describe(ml: MovieLens) -> None:
    sim = UserSimulator(ml, CFG)
    now, k = CFG.start_ms, 5
    sim.mark_consumed(sim.user_ids[0], sim.item_ids[:50])
    c = sim.ceilings(k, now)
    assert c["oracle"] > c["best_fixed_slate"] > c["random"]
    # The oracle ceiling is the arrival-weighted expected CTR of the oracle's own slates.
    w = sim._arrival
    per_user = [sim.expected_clicks(sim.oracle_slate(u, k, now)) / k for u in sim.user_ids]
    assert c["oracle"] == pytest.approx(float(w @ np.array(per_user)), rel=1e-9)
    # No single slate shown to everybody beats the best fixed one: try each user's oracle slate.
    for u in sim.user_ids[:20]:
        ids = [s.item_id for s in sim.oracle_slate(u, k, now).items]
        everyone = [
            sim.expected_clicks(Slate("r", v, "m", now, tuple(SlateItem(i, 0.0, 1.0, p)
                                for p, i in enumerate(ids)))) / k
            for v in sim.user_ids
        ]  # fmt: skip
        assert float(w @ np.array(everyone)) <= c["best_fixed_slate"] + 1e-12
    with pytest.raises(ValueError, match="k must be"):
        sim.ceilings(0, now)
