"""The demo loop's own health: a loop that falls behind real time says so in the report."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest

from recsys import datasets
from recsys.data.movielens import load_movielens
from recsys.demo.arms import EpsilonGreedyArm, MostPopularArm, RandomArm
from recsys.demo.playback import ArmTally, PeerPlayer, VisitSchedule
from recsys.demo.report import ArmSeries, DemoResult
from recsys.demo.run import _record_lag
from recsys.demo.simulator import SimConfig, UserSimulator


def test_a_late_demo_loop_is_recorded_and_flagged_in_the_report():
    on_time = DemoResult(minutes=1.0, arms={})
    _record_lag(on_time, [0.01] * 60)
    assert on_time.extra["loop_lag_s"]["max"] == 0.01
    assert on_time.notes == []
    late = DemoResult(minutes=1.0, arms={})
    _record_lag(late, [0.01] * 40 + [12.0] * 20)
    assert late.extra["loop_lag_s"]["max"] == 12.0
    (note,) = late.notes
    assert "fell behind real time" in note
    assert "33%" in note


# -- the peers, played off the app's real-time path ------------------------------------------


@pytest.fixture(scope="module")
def world() -> UserSimulator:
    ml = load_movielens(datasets.path("ml-latest-small"))
    cfg = SimConfig(seed=5, n_items=200, als_iterations=3, release_interval_ms=2_000)
    return UserSimulator(ml, cfg)


def _played(world: UserSimulator, chunks: list[int]) -> dict[str, ArmSeries]:
    """Plays 60 visits (3 per simulated second, releases on the way) through a PeerPlayer,
    working its queue ``chunks[n]`` entries at a time after each visit (0: only at the end)."""
    start = world.config.start_ms
    initial = [world.item_ids[j] for j in world.available(start)]
    policies = {
        "random": RandomArm(initial, 5, seed=1),
        "most_popular": MostPopularArm(initial, 5, seed=1),
        "epsilon_greedy": EpsilonGreedyArm(initial, 5, epsilon=0.3, seed=1),
    }
    tallies = {name: ArmTally(copy.deepcopy(world)) for name in policies}
    oracle = ArmTally(copy.deepcopy(world))
    rngs = {name: np.random.default_rng(i) for i, name in enumerate([*policies, "oracle"])}
    player = PeerPlayer(policies, tallies, oracle, rngs, k=5)
    users = np.random.default_rng(0)
    released = start
    for v in range(60):
        now_ms = start + v * 333
        fresh = world.released_between(released, now_ms)
        if fresh:
            player.release([i.item_id for i in fresh])
        released = now_ms
        player.visit(v // 3, world.next_user(users), now_ms, f"r{v}")
        for _ in range(min(chunks[v % len(chunks)], player.backlog)):
            player.play_one()
    player.drain()
    player.close_until(20)
    return {"oracle": oracle.series} | {n: t.series for n, t in tallies.items()}


def test_peers_played_late_count_exactly_what_they_would_have_on_time(world):
    on_time = _played(world, [5])  # every visit played as it comes
    late = _played(world, [0])  # everything played after the "live phase"
    bursts = _played(world, [0, 0, 0, 2, 0, 3])  # behind, catching up now and then
    assert world.released_between(world.config.start_ms, world.config.start_ms + 20_000)
    for name, series in on_time.items():
        assert series.t == [float(s) for s in range(1, 21)]
        assert sum(series.impressions) == 60 * 5
        assert late[name] == series, name
        assert bursts[name] == series, name
    assert sum(on_time["oracle"].expected) > sum(on_time["random"].expected)


def test_a_tally_counts_a_visit_in_its_own_second_and_closes_empty_seconds(world):
    tally = ArmTally(copy.deepcopy(world))
    now = world.config.start_ms
    user = world.user_ids[0]
    tally.show(world.oracle_slate(user, 3, now, "a"), now, np.random.default_rng(0), second=2)
    tally.close_until(4)
    assert tally.series.t == [1.0, 2.0, 3.0, 4.0]
    assert tally.series.impressions == [0, 0, 3, 0]
    with pytest.raises(ValueError, match="already closed"):
        tally.show(world.oracle_slate(user, 3, now, "b"), now, np.random.default_rng(0), second=1)


def test_the_player_plays_nothing_past_its_deadline(world):
    start = world.config.start_ms
    items = [world.item_ids[j] for j in world.available(start)]
    player = PeerPlayer(
        {"random": RandomArm(items, 3)},
        {"random": ArmTally(copy.deepcopy(world))},
        ArmTally(copy.deepcopy(world)),
        {"random": np.random.default_rng(0), "oracle": np.random.default_rng(1)},
        k=3,
    )
    for v in range(4):
        player.visit(0, world.user_ids[v], start, f"r{v}")
    player.play(deadline=time.monotonic() - 1.0)
    assert player.backlog == 4
    assert player.max_backlog == 4
    player.drain()
    assert player.backlog == 0
    with pytest.raises(ValueError, match="oracle"):
        PeerPlayer(
            {"random": RandomArm(items, 3)}, {}, player.oracle, {"random": player.rngs["random"]}, 3
        )


def test_the_schedule_fixes_each_visit_and_never_reopens_a_closed_second():
    schedule = VisitSchedule(start_ms=5_000, per_s=15.0)
    visit = 0
    for elapsed in np.sort(np.random.default_rng(0).uniform(0, 30, size=200)):
        closed = int(elapsed)
        due = schedule.due(elapsed)
        assert due > elapsed * 15 >= due - 1  # everything due, nothing early
        visit = max(visit, due)
        assert schedule.second(visit) >= closed  # the next visit lands in an open second
    assert [schedule.at_ms(i) for i in (0, 1, 15, 450)] == [5_000, 5_066, 6_000, 35_000]
    assert [schedule.second(i) for i in (0, 14, 15, 449)] == [0, 0, 1, 29]
