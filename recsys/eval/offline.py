"""Offline evaluation on MovieLens: chronological leave-one-out, full ranking, vs baselines.

Protocol: each user's ratings in time order (ties keep file order); the last is the test item,
the second-last the validation item, the rest train (users with fewer than 3 ratings train
only). Every catalogue item is ranked, the user's already-seen items excluded (train, and the
validation item for the test ranking). Reported: HR@10, NDCG@10, HR@20, NDCG@20 on test (and
validation), mean ± std over seeds.

Rewards: every rating is an interaction the user chose (a positive), weighted by how much the
user liked it compared to their own average: ``R = clip(1 + 0.5·(rating − user mean), 0.1, 2)``
(user mean over training ratings). So the history (positive items, recsys.history) is the user's
rated items, and the policy gradient leans towards items rated above the user's mean.

Compared in one run: most-popular, item-kNN (cosine over the train interaction matrix, user
score = sum of similarities to the user's items), the full model (top-K off-policy REINFORCE,
β from the behaviour head since MovieLens logs no propensity, plus InfoNCE / CL4SRec contrastive
terms), the same network trained with plain cross-entropy (no PG, no contrastive: the ablation),
and a text-only variant (no id embeddings). Each network is trained through the public
:class:`~recsys.learner.Learner` API: ``observe`` the training ratings in time order, then
``step`` (500 steps of 256 samples, about 1.3 passes over the training ratings, so that the
whole comparison, 9 trainings, fits in ~15 minutes on 2 CPU cores; two training processes of
one thread each). Item vectors come from the packaged all-MiniLM-L6-v2 through the on-disk
cache (about a minute to encode the 9,742 titles the first time).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.data.movielens import MovieLens, load_movielens
from recsys.encoder.catalog import ItemCatalog
from recsys.encoder.text import TextEncoder
from recsys.events import RewardRecord
from recsys.history import pad_histories
from recsys.learner.config import LearnerConfig
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig

log = logging.getLogger(__name__)

KS = (10, 20)
METRICS = tuple(f"{m}@{k}" for k in KS for m in ("HR", "NDCG"))


@dataclass(frozen=True)
class Split:
    """Leave-one-out split, in catalogue indices."""

    users: list[str]  # users with a val and a test item
    train: dict[str, list[tuple[int, float, int]]]  # user -> [(item, reward, ts)] in time order
    val: list[int]  # per evaluated user
    test: list[int]
    num_items: int


def make_split(data: MovieLens, catalog: ItemCatalog, reward_scale: float = 0.5) -> Split:
    """Chronological leave-one-out; ratings are already in stable time order."""
    seqs: dict[str, list[tuple[int, float, int]]] = {}
    for u, it, r, t in zip(
        data.user.tolist(),
        data.item.tolist(),
        data.rating.tolist(),
        data.ts_ms.tolist(),
        strict=True,
    ):
        seqs.setdefault(str(u), []).append((catalog.index_of(str(it)), r, t))
    train: dict[str, list[tuple[int, float, int]]] = {}
    users, val, test = [], [], []
    for u, seq in seqs.items():
        tr = seq[:-2] if len(seq) >= 3 else seq
        mean = sum(r for _, r, _ in tr) / len(tr)
        train[u] = [(i, min(2.0, max(0.1, 1.0 + reward_scale * (r - mean))), t) for i, r, t in tr]
        if len(seq) >= 3:
            users.append(u)
            val.append(seq[-2][0])
            test.append(seq[-1][0])
    return Split(users, train, val, test, len(catalog))


def rank_metrics(scores: torch.Tensor, targets: torch.Tensor, exclude: list[list[int]]) -> dict:
    """Per-metric means over users. ``scores [U, I]``; excluded items never outrank the target."""
    scores = scores.clone().float()
    for u, items in enumerate(exclude):
        if items:
            scores[u, items] = float("-inf")
    tgt = scores.gather(1, targets.unsqueeze(1))
    rank = (scores > tgt).sum(1).float()  # 0-based; ties broken in the target's favour
    out = {}
    for k in KS:
        hit = rank < k
        out[f"HR@{k}"] = hit.float().mean().item()
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(rank + 2.0), 0.0).mean().item()
    return out


def _tiebreak(scores: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scores.double() + 1e-6 * torch.rand(scores.shape, generator=g, dtype=torch.float64)


def evaluate(
    score_fn: Callable[[list[list[int]]], torch.Tensor], split: Split, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Validation and test metrics of a scorer ``histories -> [U, I]``."""
    train_items = [[i for i, _, _ in split.train[u]] for u in split.users]
    res = {}
    for name, targets, hist in (
        ("val", split.val, train_items),
        ("test", split.test, [[*h, v] for h, v in zip(train_items, split.val, strict=True)]),
    ):
        scores = _tiebreak(score_fn(hist), seed)
        res[name] = rank_metrics(scores, torch.tensor(targets), hist)
    return res


def popularity_scorer(split: Split) -> Callable[[list[list[int]]], torch.Tensor]:
    counts = torch.zeros(split.num_items)
    for seq in split.train.values():
        for i, _, _ in seq:
            counts[i] += 1
    return lambda hists: counts.unsqueeze(0).expand(len(hists), -1).clone()


def item_knn_scorer(split: Split) -> Callable[[list[list[int]]], torch.Tensor]:
    """Cosine item-item similarity on the binary train matrix; score = Σ sim to the history."""
    users = list(split.train)
    rows = [ui for ui, u in enumerate(users) for _ in split.train[u]]
    cols = [i for u in users for i, _, _ in split.train[u]]
    x = torch.zeros(len(users), split.num_items)
    x[rows, cols] = 1.0
    norms = x.sum(0).sqrt().clamp(min=1e-12)
    sim = (x.T @ x) / norms.unsqueeze(0) / norms.unsqueeze(1)
    sim.fill_diagonal_(0.0)

    def score(hists: list[list[int]]) -> torch.Tensor:
        h = torch.zeros(len(hists), split.num_items)
        for b, items in enumerate(hists):
            h[b, items] = 1.0
        return h @ sim

    return score


def train_network(
    split: Split,
    catalog: ItemCatalog,
    model_cfg: ModelConfig,
    learner_cfg: LearnerConfig,
    steps: int,
    progress: Callable[[str], None] | None = None,
) -> Learner:
    """Train a Learner on the split's training ratings (observed in global time order)."""
    learner = Learner(model_cfg, learner_cfg, catalog)
    records = [
        RewardRecord(f"{u}:{k}", u, catalog.ids[i], r, t, "organic")
        for u, seq in split.train.items()
        for k, (i, r, t) in enumerate(seq)
    ]
    records.sort(key=lambda rec: rec.ts)  # stable: per-user order kept
    for start in range(0, len(records), 4096):
        learner.observe(records[start : start + 4096])
    t0 = time.time()
    for s in range(steps):
        out = learner.step()
        if progress and out and (s + 1) % max(1, steps // 5) == 0:
            progress(f"    step {s + 1}/{steps} loss {out['loss']:.3f} ({time.time() - t0:.0f}s)")
    return learner


def network_scorer(learner: Learner) -> Callable[[list[list[int]]], torch.Tensor]:
    def score(hists: list[list[int]]) -> torch.Tensor:
        n = learner.model_cfg.max_history
        out = []
        for start in range(0, len(hists), 512):
            items, _ = pad_histories(hists[start : start + 512], n, learner.device)
            out.append(learner.scores(items).cpu())
        return torch.cat(out)

    return score


def variants(
    model_cfg: ModelConfig, learner_cfg: LearnerConfig
) -> dict[str, tuple[ModelConfig, LearnerConfig]]:
    """The networks compared: full model, its cross-entropy ablation, text-only."""
    return {
        "full (PG+contrastive)": (model_cfg, learner_cfg),
        "CE ablation": (model_cfg, replace(learner_cfg, objective="ce", contrastive="none")),
        "text-only (no id emb)": (replace(model_cfg, use_id_embedding=False), learner_cfg),
    }


def default_configs(
    num_items: int, text_dim: int, quick: bool, device: str
) -> tuple[ModelConfig, LearnerConfig, int]:
    model_cfg = ModelConfig(
        text_dim=text_dim,
        dim=64,
        max_history=50,
        item_capacity=max(num_items, 1),
        adaptor_hidden=64,
        num_layers=2,
        num_heads=2,
        dropout=0.1,
    )
    learner_cfg = LearnerConfig(
        batch_size=256,
        lr=1e-3,
        buffer_capacity=200_000,
        recent_capacity=0,
        recent_fraction=0.0,
        softmax="full",
        alpha=1.0,
        augment_weight=0.1,
        augment_rows=32,
        augment_views=2,
        device=device,
    )
    steps = 60 if quick else 500
    return model_cfg, learner_cfg, steps


def _subset_quick(data: MovieLens, max_users: int = 40) -> MovieLens:
    keep_users = np.unique(data.user)[:max_users]
    mask = np.isin(data.user, keep_users)
    items = set(data.item[mask].tolist())
    movies = tuple(m for m in data.movies if int(m.item_id) in items)
    return replace(
        data,
        user=data.user[mask],
        item=data.item[mask],
        rating=data.rating[mask],
        ts_ms=data.ts_ms[mask],
        movies=movies,
    )


def run_offline(
    path: str | Path,
    quick: bool = False,
    seeds: int = 3,
    json_out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    model_path: str | Path | None = None,
    device: str = "cpu",
    steps: int | None = None,
    workers: int | None = None,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the whole comparison; prints a table and returns (and optionally writes) the figures.

    ``workers`` > 1 trains the networks in that many processes with one thread each (on a
    2-core machine, two single-thread trainings beat one two-thread training).
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    t_start = time.time()
    data = load_movielens(path)
    if quick:
        data = _subset_quick(data)
    out(
        f"MovieLens {path}: {len(data)} ratings, {len(np.unique(data.user))} users, "
        f"{len(data.movies)} movies{' (quick subset)' if quick else ''}"
    )
    t0 = time.time()
    encoder = TextEncoder(model_path, device=device)
    cache = Path(cache_dir) if cache_dir else _default_cache_dir()
    catalog = ItemCatalog(encoder, cache)
    catalog.upsert(data.movies)
    out(
        f"item vectors: {len(catalog)} items via {encoder.name} ({time.time() - t0:.0f}s, "
        f"cache {cache})"
    )
    split = make_split(data, catalog)
    out(f"split: {len(split.users)} users evaluated, {split.num_items} items ranked")
    model_cfg, learner_cfg, default_steps = default_configs(
        len(catalog), catalog.dim, quick, device
    )
    steps = default_steps if steps is None else steps

    results: dict[str, list[dict[str, dict[str, float]]]] = {}
    results["most-popular"] = [evaluate(popularity_scorer(split), split)]
    results["item-kNN (cosine)"] = [evaluate(item_knn_scorer(split), split)]
    jobs = [
        (name, mcfg, replace(lcfg, seed=seed), steps)
        for name, (mcfg, lcfg) in variants(model_cfg, learner_cfg).items()
        for seed in range(seeds)
    ]
    if workers is None:
        workers = 1 if quick else min(2, os.cpu_count() or 1)
    workers = max(1, min(workers, len(jobs)))
    out(f"training {len(jobs)} networks ({steps} steps each, {workers} worker(s))")
    for name, _, _, _ in jobs:
        results.setdefault(name, [])
    if workers == 1:
        for job in jobs:
            t1 = time.time()
            name, res = _train_and_evaluate(split, catalog, *job)
            results[name].append(res)
            out(f"  {name} seed {job[2].seed}: {_fmt_one(res['test'])} ({time.time() - t1:.0f}s)")
    else:
        ctx = multiprocessing.get_context("spawn")
        state = (split, catalog.ids, np.ascontiguousarray(catalog.vectors))
        with ProcessPoolExecutor(workers, ctx, initializer=_init_worker, initargs=state) as ex:
            futures = {ex.submit(_worker_job, *job): job for job in jobs}
            for fut in as_completed(futures):
                name, res = fut.result()
                results[name].append(res)
                job = futures[fut]
                out(
                    f"  {name} seed {job[2].seed}: {_fmt_one(res['test'])} "
                    f"({time.time() - t_start:.0f}s elapsed)"
                )
    summary = _summarise(results)
    out("")
    out(format_table(summary))
    report = {
        "dataset": str(path),
        "quick": quick,
        "seeds": seeds,
        "steps": steps,
        "users": len(split.users),
        "items": split.num_items,
        "reward": "clip(1 + 0.5*(rating - user mean), 0.1, 2)",
        "model_config": model_cfg.to_dict(),
        "learner_config": learner_cfg.to_dict(),
        "seconds": round(time.time() - t_start, 1),
        "results": summary,
    }
    out(f"total {report['seconds']:.0f}s")
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))
    return report


def _train_and_evaluate(
    split: Split,
    catalog: ItemCatalog,
    name: str,
    model_cfg: ModelConfig,
    learner_cfg: LearnerConfig,
    steps: int,
) -> tuple[str, dict[str, dict[str, float]]]:
    learner = train_network(split, catalog, model_cfg, learner_cfg, steps)
    return name, evaluate(network_scorer(learner), split, learner_cfg.seed)


_WORKER: dict[str, Any] = {}


def _init_worker(split: Split, ids: list[str], vectors: np.ndarray) -> None:
    torch.set_num_threads(1)
    catalog = ItemCatalog(dim=vectors.shape[1])
    catalog.put_vectors(ids, vectors)
    _WORKER.update(split=split, catalog=catalog)


def _worker_job(
    name: str, model_cfg: ModelConfig, learner_cfg: LearnerConfig, steps: int
) -> tuple[str, dict[str, dict[str, float]]]:
    return _train_and_evaluate(
        _WORKER["split"], _WORKER["catalog"], name, model_cfg, learner_cfg, steps
    )


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "recsys" / "item-vectors"


def _summarise(results: dict[str, list[dict[str, dict[str, float]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, runs in results.items():
        summary[name] = {}
        for part in ("test", "val"):
            summary[name][part] = {
                m: {
                    "mean": float(np.mean([r[part][m] for r in runs])),
                    "std": float(np.std([r[part][m] for r in runs])),
                }
                for m in METRICS
            }
        summary[name]["runs"] = len(runs)
    return summary


def _fmt_one(metrics: dict[str, float]) -> str:
    return " ".join(f"{m} {metrics[m]:.4f}" for m in METRICS)


def format_table(summary: dict[str, Any], part: str = "test") -> str:
    head = f"{'model':<24}" + "".join(f"{m:>18}" for m in METRICS) + f"{'runs':>6}"
    lines = [f"{part} (mean ± std over runs)", head, "-" * len(head)]
    for name, res in summary.items():
        cells = "".join(
            f"{res[part][m]['mean']:>11.4f} ± {res[part][m]['std']:.3f}" for m in METRICS
        )
        lines.append(f"{name:<24}{cells}{res['runs']:>6}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from recsys import datasets

    p.add_argument(
        "--path",
        default=datasets.path("ml-latest-small"),
        help="MovieLens folder (ml-latest, ml-1m or ml-100k; default: the packaged latest-small)",
    )
    p.add_argument("--quick", action="store_true", help="a small user subset, few steps (tests)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per network (>= 1)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures here")
    p.add_argument("--cache-dir", default=None, help="item vector cache (default ~/.cache/recsys)")
    p.add_argument("--model-path", default=None, help="text encoder dir (default: packaged MiniLM)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--steps", type=int, default=None, help="gradient steps per network")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="training processes (default: 2 for a full run when 2+ cores, 1 with --quick)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    run_offline(
        args.path,
        quick=args.quick,
        seeds=args.seeds,
        json_out=args.json_out,
        cache_dir=args.cache_dir,
        model_path=args.model_path,
        device=args.device,
        steps=args.steps,
        workers=args.workers,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="recsys eval offline", description=__doc__.split("\n")[0])
    add_arguments(p)
    logging.basicConfig(level=logging.WARNING)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
