"""Offline evaluation: leave-one-out split, ranking metrics by hand, baselines, a quick run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.data.load_report import LoadReport
from recsys.data.movielens import MovieLens
from recsys.encoder.catalog import ItemCatalog
from recsys.eval import offline
from tests.unit.tiny_bert import make_tiny_bert


def _data(rows: list[tuple[int, int, float, int]]) -> MovieLens:
    order = sorted(range(len(rows)), key=lambda k: rows[k][3])
    arr = np.array([rows[k] for k in order], dtype=np.float64)
    return MovieLens(
        path=Path("."),
        layout="ml-latest",
        user=arr[:, 0].astype(np.int64),
        item=arr[:, 1].astype(np.int64),
        rating=arr[:, 2],
        ts_ms=arr[:, 3].astype(np.int64),
        movies=(),
        report=LoadReport(),
    )


def test_split_is_chronological_leave_one_out() -> None:
    rows = [
        (1, 10, 4.0, 5), (1, 11, 2.0, 1), (1, 12, 5.0, 9), (1, 13, 3.0, 7),
        (2, 10, 4.0, 2), (2, 14, 4.0, 3),  # too short to evaluate: train only
    ]  # fmt: skip
    cat = ItemCatalog(dim=4)
    split = offline.make_split(_data(rows), cat, reward_scale=0.5)
    i = cat.index
    assert split.users == ["1"]
    assert [x for x, _, _ in split.train["1"]] == [i["11"], i["10"]]  # ts 1, 5
    assert split.val == [i["13"]]
    assert split.test == [i["12"]]
    assert [x for x, _, _ in split.train["2"]] == [i["10"], i["14"]]
    # rewards: 1 + 0.5 (rating - mean of the user's training ratings), clipped to [0.1, 2]
    assert [r for _, r, _ in split.train["1"]] == [pytest.approx(0.5), pytest.approx(1.5)]
    assert split.num_items == 5


def test_rank_metrics_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    targets = torch.tensor([2, 0])
    exclude = [[0], []]  # item 0 seen by user 0: it cannot outrank the target
    m = offline.rank_metrics(scores, targets, exclude)
    # user 0: rank 1 (only item 1 above) -> hit, NDCG 1/log2(3); user 1: rank 3 -> hit
    assert m["HR@10"] == 1.0
    assert m["NDCG@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 2)
    tiny = offline.rank_metrics(torch.rand(2, 30), torch.tensor([0, 1]), [[0], [1]])
    assert tiny["HR@20"] == 0.0  # an excluded target is never a hit


def test_windows_cover_every_training_item_once() -> None:
    rows = [(1, it, 4.0, k) for k, it in enumerate(range(10, 17))]  # 7 ratings: 5 train
    rows += [(2, 20, 3.0, 1), (2, 21, 5.0, 2)]  # train only
    cat = ItemCatalog(dim=4)
    split = offline.make_split(_data(rows), cat)
    w = offline.sequence_windows(split, max_history=2)
    seen = sorted([x for row in w.history.tolist() for x in row if x >= 0] + w.item.tolist())
    train = sorted(i for seq in split.train.values() for i, _, _ in seq)
    assert seen == train
    i = cat.index
    # user 1's last window ends at its last training item: history [12, 13] -> 14
    assert [i["12"], i["13"]] in w.history.tolist()
    assert i["14"] in w.item.tolist()
    assert bool(w.propensity.isnan().all())  # MovieLens logs no propensity


def test_early_stopping_keeps_the_best_epoch() -> None:
    curve = iter([0.1, 0.3, 0.2, 0.25, 0.29, 0.5])
    state = {"epoch": 0}
    kept: list[int] = []
    best, seen = offline.early_stopping(
        lambda: state.update(epoch=state["epoch"] + 1),
        lambda: next(curve),
        lambda: state["epoch"],
        kept.append,
        max_epochs=10,
        patience=3,
    )
    assert best == 2  # 0.3 at epoch 2; epochs 3-5 did not beat it
    assert seen == [0.1, 0.3, 0.2, 0.25, 0.29]  # stopped before the 0.5
    assert kept == [2]


def test_early_stopping_waits_for_min_epochs() -> None:
    curve = iter([0.3, 0.1, 0.1, 0.1, 0.5, 0.1, 0.1])
    state = {"epoch": 0}
    kept: list[int] = []
    best, seen = offline.early_stopping(
        lambda: state.update(epoch=state["epoch"] + 1),
        lambda: next(curve),
        lambda: state["epoch"],
        kept.append,
        max_epochs=7,
        patience=2,
        min_epochs=5,
    )
    assert best == 5  # patience ran out at epoch 3, but min_epochs kept it going to the 0.5
    assert seen == [0.3, 0.1, 0.1, 0.1, 0.5, 0.1, 0.1]
    assert kept == [5]


def test_ablation_intervals_pair_an_ablation_with_the_same_seeds() -> None:
    good, bad = [0] * 50, [30] * 50
    runs = {
        offline.OURS: [{"seed": 0, "test_ranks": good}, {"seed": 1, "test_ranks": bad}],
        "abl": [{"seed": 0, "test_ranks": good}],
    }
    ci = offline.ablation_intervals(runs, {offline.OURS: "ours", "abl": "ablation"})
    assert ci["abl"]["diff"] == 0.0  # seed 0 against seed 0, not the mean of both seeds


def test_paired_interval_detects_a_real_difference() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 40, size=400)
    better = np.maximum(base - 5, 0)  # every user's target ranked 5 places higher
    a = [{"test_ranks": better.tolist()}]
    b = [{"test_ranks": base.tolist()}]
    ci = offline.paired_interval(a, b)
    assert ci["lo"] > 0
    same = offline.paired_interval(b, b)
    assert same["diff"] == 0.0
    assert same["lo"] == 0.0 == same["hi"]


@pytest.mark.slow
def test_quick_run_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "bert")
    out = tmp_path / "offline.json"
    lines: list[str] = []
    report = offline.run_offline(
        data_dir / "ml-latest-small", quick=True, seeds=2, json_out=out,
        cache_dir=tmp_path / "cache", model_path=model, max_epochs=1, out=lines.append,
    )  # fmt: skip
    assert json.loads(out.read_text()) == report
    kinds = {name: res["kind"] for name, res in report["results"].items()}
    assert kinds == {
        "recsys": "ours",
        "+ PG (REINFORCE, top-K correction)": "ablation",
        "+ contrastive (InfoNCE, alpha 0.1)": "ablation",
        "+ text (gated residual)": "ablation",
        "no id (text only)": "ablation",
        "SASRec (CE, every position)": "peer",
        "most-popular": "peer",
        "item-kNN (cosine)": "peer",
        "EASE": "peer",
        "ALS (implicit)": "peer",
        "BPR (implicit)": "peer",
    }
    for name, res in report["results"].items():
        assert res["runs"] == (1 if "params" in res else 2), name
        for part in ("test", "val"):
            for metric in offline.METRICS:
                assert 0.0 <= res[part][metric]["mean"] <= 1.0
                assert res[part][metric]["std"] >= 0.0
    assert set(report["ablations"]) == {n for n, k in kinds.items() if k == "ablation"}
    for ci in report["ablations"].values():
        assert ci["lo"] <= ci["diff"] <= ci["hi"]
    table = "\n".join(lines)
    assert "NDCG@20" in table
    assert "EASE" in table
    assert "paired per-user bootstrap" in table
    # the second run reads every item vector from the cache
    report2 = offline.run_offline(
        data_dir / "ml-latest-small", quick=True, seeds=1, cache_dir=tmp_path / "cache",
        model_path=model, max_epochs=1, out=lines.append,
    )  # fmt: skip
    assert report2["results"]["most-popular"] == report["results"]["most-popular"]


def test_cli_arguments() -> None:
    import argparse

    p = argparse.ArgumentParser()
    offline.add_arguments(p)
    args = p.parse_args(["--path", "x", "--quick", "--seeds", "4", "--json", "f.json"])
    assert (args.path, args.quick, args.seeds, args.json_out) == ("x", True, 4, "f.json")
