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

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_baselines_on_a_tiny_case() -> None:
    rows = [(u, it, 4.0, 10 * u + k) for u in range(1, 5) for k, it in enumerate([1, 2, 3, 4])]
    rows += [(5, 1, 4.0, 100), (5, 9, 4.0, 101), (5, 2, 4.0, 102), (5, 3, 4.0, 103)]
    cat = ItemCatalog(dim=4)
    split = offline.make_split(_data(rows), cat)
    pop = offline.popularity_scorer(split)([[0]])
    assert pop[0, cat.index["1"]] == 5
    assert pop[0, cat.index["9"]] == 1
    knn = offline.item_knn_scorer(split)
    s = knn([[cat.index["1"]]])[0]
    # item 2 always co-occurs with item 1 in training: maximal cosine, above item 9
    assert s[cat.index["2"]] > s[cat.index["9"]] > 0
    assert s[cat.index["1"]] == 0  # no self-similarity


@pytest.mark.slow
def test_quick_run_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "bert")
    out = tmp_path / "offline.json"
    lines: list[str] = []
    report = offline.run_offline(
        data_dir / "ml-latest-small", quick=True, seeds=2, json_out=out,
        cache_dir=tmp_path / "cache", model_path=model, steps=15, out=lines.append,
    )  # fmt: skip
    assert json.loads(out.read_text()) == report
    names = set(report["results"])
    assert names == {
        "most-popular", "item-kNN (cosine)", "full (PG+contrastive)", "CE ablation",
        "text-only (no id emb)",
    }  # fmt: skip
    for name, res in report["results"].items():
        assert res["runs"] == (1 if name in ("most-popular", "item-kNN (cosine)") else 2)
        for part in ("test", "val"):
            for metric in offline.METRICS:
                assert 0.0 <= res[part][metric]["mean"] <= 1.0
                assert res[part][metric]["std"] >= 0.0
    table = "\n".join(lines)
    assert "HR@10" in table
    assert "NDCG@20" in table
    assert "CE ablation" in table
    # the second run reads every item vector from the cache
    report2 = offline.run_offline(
        data_dir / "ml-latest-small", quick=True, seeds=1, cache_dir=tmp_path / "cache",
        model_path=model, steps=2, out=lines.append,
    )  # fmt: skip
    assert report2["results"]["most-popular"] == report["results"]["most-popular"]


def test_cli_arguments() -> None:
    import argparse

    p = argparse.ArgumentParser()
    offline.add_arguments(p)
    args = p.parse_args(["--path", "x", "--quick", "--seeds", "4", "--json", "f.json"])
    assert (args.path, args.quick, args.seeds, args.json_out) == ("x", True, 4, "f.json")
