"""Prequential evaluation's pieces: tie-fair ranking, the baselines' updates, the tally."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.eval.prequential import ISGD, RecentPopularity, Tally, chunk_histories, rank_of


def test_rank_excludes_seen_items_and_breaks_ties_fairly():
    rng = np.random.default_rng(0)
    scores = np.array([5.0, 4.0, 3.0, 2.0])
    assert rank_of(scores, 2, [], rng) == 2
    assert rank_of(scores, 2, [0], rng) == 1
    flat = np.zeros(101)
    ranks = [rank_of(flat, 0, [], rng) for _ in range(2000)]
    assert 40 < np.mean(ranks) < 60, "a cold model must not get free hits from ties"


def test_recent_popularity_forgets_outside_its_window():
    pop = RecentPopularity(4, window=3)
    for item in (0, 0, 1, 2):
        pop.update(0, item)
    assert pop.scores(0).tolist() == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="window"):
        RecentPopularity(4, window=0)


def test_isgd_moves_towards_observed_pairs():
    mf = ISGD(2, 5, factors=4, lr=0.1, reg=0.0, seed=1)
    before = mf.scores(0)[3]
    for _ in range(50):
        mf.update(0, 3)
    assert mf.scores(0)[3] > before
    assert mf.scores(0)[3] == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="lr"):
        ISGD(1, 1, lr=0)


def test_tally_per_window():
    t = Tally(windows=2, total=4)
    for pos, rank in enumerate([0, 20, 3, 9]):
        t.add(pos, rank)
    s = t.summary()
    assert s["per_window"]["HR@10"] == [0.5, 1.0]
    assert s["HR@10"] == 0.75
    assert s["NDCG@10"] == pytest.approx((1 + 1 / np.log2(5) + 1 / np.log2(11)) / 4)


def test_chunk_histories_are_exact_per_event():
    seen = {"a": [1, 2], "b": [7]}
    hists = chunk_histories(["a", "b", "a", "c", "a"], [3, 8, 4, 9, 5], seen, max_len=3)
    # a user's earlier events of the chunk are in its later histories; nothing from itself on
    assert hists == [[1, 2], [7], [1, 2, 3], [], [2, 3, 4]]
    assert seen == {"a": [1, 2], "b": [7]}, "the chunk-start histories are left alone"


def test_prefix_keeps_the_first_events_in_order():
    from pathlib import Path

    from recsys.data.load_report import LoadReport
    from recsys.data.movielens import MovieLens
    from recsys.eval.prequential import stream_prefix

    data = MovieLens(
        path=Path("."),
        layout="ml-latest",
        user=np.array([1, 2, 1]),
        item=np.array([10, 11, 12]),
        rating=np.array([4.0, 3.0, 5.0]),
        ts_ms=np.array([1, 2, 3]),
        movies=(),
        report=LoadReport(),
    )
    head = stream_prefix(data, 2)
    assert head.item.tolist() == [10, 11]
    assert head.ts_ms.tolist() == [1, 2]
    assert len(head) == 2


def test_paired_interval_resamples_users_not_events():
    # 2 users: the first always a hit for a, never for b; the second the other way round, on
    # 10x fewer events. Per event a is well ahead; per user it is a coin flip, so a bootstrap
    # over users must give a wide interval that contains 0, and the same data spread over many
    # users a narrow one that does not.
    from recsys.eval.prequential import paired_user_interval

    a = [0] * 100 + [50] * 10
    b = [50] * 100 + [0] * 10
    two = paired_user_interval(a, b, [0] * 100 + [1] * 10)["HR@10"]
    assert two["diff"] == pytest.approx(90 / 110)
    assert two["lo"] < 0 < two["hi"]
    many = paired_user_interval(a, b, list(range(110)))["HR@10"]
    assert many["diff"] == pytest.approx(90 / 110)
    assert 0 < many["lo"] < many["diff"] < many["hi"]
