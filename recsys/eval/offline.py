"""Offline evaluation on MovieLens: chronological leave-one-out, full ranking, recsys vs peers.

Protocol: each user's ratings in time order (ties keep file order); the last is the test item,
the second-last the validation item, the rest train (users with fewer than 3 ratings train
only). Every catalogue item is ranked, the user's already-seen items excluded (train, and the
validation item for the test ranking). Reported: HR@10, NDCG@10, HR@20, NDCG@20 on test (and
validation), mean ± std over seeds; the same on the users whose test item is *cold* (fewer than
5 training interactions); for each ablation the paired per-user bootstrap 95% CI of its NDCG@10
difference to the full model.

Rewards: every rating is an interaction the user chose (a positive), weighted by how much the
user liked it compared to their own average: ``R = clip(1 + 0.5·(rating − user mean), 0.1, 2)``
(user mean over training ratings). So the history (positive items, recsys.history) is the user's
rated items, and the policy gradient (with its batch-mean baseline) leans towards items rated
above the batch's mean. MovieLens logs no propensity, so the off-policy weight is 1 (see
:func:`recsys.objectives.correction_weights`).

Compared in one run, on the same split, candidates and seen-item masking: recsys (kind
``ours``), its ablations (``ablation``: the same network with cross-entropy instead of the policy
gradient and the same other terms; with the contrastive term, which the shipped defaults leave
off (``alpha`` 0), or without it where it is on; without the text tower; without id
embeddings) and the peers of :mod:`recsys.eval.peers` (``peer``: most-popular,
item-kNN, EASE, implicit's ALS and BPR, SASRec with cross-entropy at every position).

recsys is the shipped learner: ``ModelConfig`` defaults and the learner worker's
``LearnerConfig`` (``LearnerConfig.from_settings`` of the default settings), trained through
:meth:`~recsys.learner.Learner.step` on per-user sequence windows (each user's training
sequence cut into non-overlapping windows of ``max_history + 1`` items, put in the replay
buffer: every item is a prediction target once per epoch). Training runs whole epochs and
stops early when validation NDCG@10 has not improved for ``patience`` epochs; the best epoch's
weights are kept and the test set is read once, at the end. SASRec gets the same epochs and
early stopping (never before :data:`MIN_EPOCHS`). Peers are tuned on validation over the grids
in :mod:`recsys.eval.peers`; recsys and SASRec were tuned on validation over the same
learning-rate grid (:data:`SASREC_LR`), recsys's result being the shipped defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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
from recsys.eval import peers
from recsys.history import pad_histories
from recsys.learner.config import LearnerConfig, model_config
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig
from recsys.replay_buffer import Transitions

log = logging.getLogger(__name__)

KS = (10, 20)
METRICS = tuple(f"{m}@{k}" for k in KS for m in ("HR", "NDCG"))
COLD_BELOW = 5  # a test item with fewer training interactions is cold
MIN_EPOCHS = 8  # early stopping never stops a network before this many epochs
# Learning rates tuned on validation NDCG@10 (ml-latest-small, batch 128, the same grid
# {1e-3, 3e-3} and epoch budget for both): recsys's is the shipped LearnerSettings.lr (1e-3;
# 3e-3 made the text tower hurt), SASRec's best was 3e-3.
SASREC_LR = 3e-3
# The contrastive weight of the "+ contrastive" ablation when the shipped alpha is 0 (the
# alpha the learner shipped with before the offline ablation turned it off).
ABLATION_ALPHA = 0.1
Scorer = peers.Scorer


@dataclass(frozen=True)
class Split:
    """Leave-one-out split, in catalogue indices."""

    users: list[str]  # users with a val and a test item
    train: dict[str, list[tuple[int, float, int]]]  # user -> [(item, reward, ts)] in time order
    val: list[int]  # per evaluated user
    test: list[int]
    num_items: int

    def train_items(self) -> list[list[int]]:
        """Training items of every user, the evaluated users first (in ``users`` order)."""
        rest = [u for u in self.train if u not in set(self.users)]
        return [[i for i, _, _ in self.train[u]] for u in [*self.users, *rest]]

    def train_counts(self) -> np.ndarray:
        counts = np.zeros(self.num_items, dtype=np.int64)
        for seq in self.train.values():
            for i, _, _ in seq:
                counts[i] += 1
        return counts


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


# --- ranking ---------------------------------------------------------------------------------


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, exclude: list[list[int]]
) -> np.ndarray:
    """0-based rank of each user's target among the non-excluded items. ``scores [U, I]``;
    excluded items never outrank the target; ties are broken in the target's favour (add a
    random tie-break first, see :func:`evaluate`)."""
    scores = scores.clone().float()
    for u, items in enumerate(exclude):
        if items:
            scores[u, items] = float("-inf")
    tgt = scores.gather(1, targets.unsqueeze(1))
    return (scores > tgt).sum(1).numpy()


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """HR@k and NDCG@k (k in :data:`KS`) means over users; NaN for no users."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in KS:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean()) if len(ranks) else math.nan
        gain = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
        out[f"NDCG@{k}"] = float(gain.mean()) if len(ranks) else math.nan
    return out


def ndcg_at(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-user NDCG@k from 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def rank_metrics(scores: torch.Tensor, targets: torch.Tensor, exclude: list[list[int]]) -> dict:
    """Per-metric means over users. ``scores [U, I]``; excluded items never outrank the target."""
    return metrics_from_ranks(target_ranks(scores, targets, exclude))


def _tiebreak(scores: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scores.double() + 1e-6 * torch.rand(scores.shape, generator=g, dtype=torch.float64)


def eval_histories(split: Split, part: str) -> list[list[int]]:
    """What each evaluated user's history is when ``part`` ('val' or 'test') is ranked."""
    train_items = [[i for i, _, _ in split.train[u]] for u in split.users]
    if part == "val":
        return train_items
    return [[*h, v] for h, v in zip(train_items, split.val, strict=True)]


def evaluate_part(scorer: Scorer, split: Split, part: str, seed: int = 0) -> np.ndarray:
    """Ranks ``[U]`` of the ``part`` targets ('val' or 'test'), seen items excluded."""
    hist = eval_histories(split, part)
    scores = _tiebreak(scorer(range(len(split.users)), hist), seed)
    targets = torch.tensor(split.val if part == "val" else split.test)
    return target_ranks(scores, targets, hist)


def evaluate(
    score_fn: Scorer, split: Split, seed: int = 0, test_fn: Scorer | None = None
) -> dict[str, Any]:
    """Validation and test metrics (and per-user test ranks) of scorers ``(users, hists)``."""
    val = evaluate_part(score_fn, split, "val", seed)
    test = evaluate_part(test_fn or score_fn, split, "test", seed)
    return {
        "val": metrics_from_ranks(val),
        "test": metrics_from_ranks(test),
        "test_ranks": test.tolist(),
    }


# --- recsys: the shipped learner, trained on per-user sequence windows ------------------------


def sequence_windows(split: Split, max_history: int) -> Transitions:
    """Each user's training sequence as non-overlapping windows of ``max_history + 1`` items:
    the history (left-padded) and its next item with that rating's reward; the last window
    ends at the user's last training item."""
    hists: list[list[int]] = []
    items: list[int] = []
    rewards: list[float] = []
    n = max_history + 1
    for seq in split.train.values():
        end = len(seq)
        while end > 0:
            start = max(0, end - n)
            w = seq[start:end]
            hists.append([i for i, _, _ in w[:-1]])
            items.append(w[-1][0])
            rewards.append(w[-1][1])
            end = start
    h, _ = pad_histories(hists, max_history)
    return Transitions(
        history=h,
        item=torch.tensor(items),
        reward=torch.tensor(rewards, dtype=torch.float32),
        propensity=torch.full((len(items),), math.nan),
        position=torch.full((len(items),), -1),
    )


def network_scorer(learner: Learner) -> Scorer:
    def score(users: Sequence[int], hists: Sequence[Sequence[int]]) -> torch.Tensor:
        n = learner.model_cfg.max_history
        out = []
        for start in range(0, len(hists), 512):
            items, _ = pad_histories(hists[start : start + 512], n, learner.device)
            out.append(learner.scores(items).cpu())
        return torch.cat(out)

    return score


def early_stopping(
    run_epoch: Callable[[], None],
    val_ndcg: Callable[[], float],
    get_state: Callable[[], Any],
    set_state: Callable[[Any], None],
    max_epochs: int,
    patience: int,
    min_epochs: int = 0,
) -> tuple[int, list[float]]:
    """Run epochs until validation NDCG@10 has not improved for ``patience`` epochs (never
    before ``min_epochs``: the first epochs' curve is flat noise) or ``max_epochs``; restore
    the best epoch's state -> (best epoch, 1-based; curve)."""
    best, best_epoch, best_state, curve = -1.0, 0, get_state(), []
    for epoch in range(1, max_epochs + 1):
        run_epoch()
        v = val_ndcg()
        curve.append(v)
        if v > best:
            best, best_epoch, best_state = v, epoch, get_state()
        elif epoch - best_epoch >= patience and epoch >= min_epochs:
            break
    set_state(best_state)
    return best_epoch, curve


def _fit(
    run_epoch: Callable[[], None],
    scorer: Scorer,
    net: torch.nn.Module,
    split: Split,
    seed: int,
    max_epochs: int,
    patience: int,
) -> dict[str, Any]:
    """Epochs of ``run_epoch`` under :func:`early_stopping` on validation NDCG@10, ``net``
    left at its best epoch -> ``{"best_epoch", "epochs", "val_curve"}``."""

    def val_ndcg() -> float:
        return float(ndcg_at(evaluate_part(scorer, split, "val", seed)).mean())

    best, curve = early_stopping(
        run_epoch,
        val_ndcg,
        lambda: _state_copy(net),
        net.load_state_dict,
        max_epochs,
        patience,
        min_epochs=min(MIN_EPOCHS, max_epochs),
    )
    return {"best_epoch": best, "epochs": len(curve), "val_curve": curve}


def _state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_network(
    split: Split,
    catalog: ItemCatalog,
    model_cfg: ModelConfig,
    learner_cfg: LearnerConfig,
    max_epochs: int,
    patience: int = 3,
) -> tuple[Learner, dict[str, Any]]:
    """Train a Learner on the split's per-user sequence windows with early stopping."""
    learner = Learner(model_cfg, learner_cfg, catalog)
    learner.sync_items()
    windows = sequence_windows(split, model_cfg.max_history)
    learner.buffer.add(windows)
    steps = max(1, math.ceil(len(windows) / learner_cfg.batch_size))

    def run_epoch() -> None:
        for _ in range(steps):
            learner.step()

    scorer = network_scorer(learner)
    fit = _fit(run_epoch, scorer, learner.model, split, learner_cfg.seed, max_epochs, patience)
    return learner, {**fit, "steps_per_epoch": steps}


def train_sasrec(
    split: Split, model_cfg: ModelConfig, learner_cfg: LearnerConfig, max_epochs: int, patience: int
) -> tuple[peers.SASRec, dict[str, Any]]:
    """The SASRec peer with recsys's width, depth, history, batch, negatives and epochs (its lr
    is ``learner_cfg.lr``: run_offline passes its own tuned :data:`SASREC_LR`)."""
    rec = peers.SASRec(
        split.num_items,
        dim=model_cfg.dim,
        max_len=model_cfg.max_history,
        layers=model_cfg.num_layers,
        heads=model_cfg.num_heads,
        dropout=model_cfg.dropout,
        lr=learner_cfg.lr,
        batch_size=learner_cfg.batch_size,
        num_negatives=learner_cfg.num_negatives,
        seed=learner_cfg.seed,
    )
    chunks = peers.sequence_chunks(
        [[i for i, _, _ in s] for s in split.train.values()], model_cfg.max_history + 1
    )
    steps = max(1, math.ceil(len(chunks) / learner_cfg.batch_size))

    def run_epoch() -> None:
        for _ in range(steps):
            rec.step(chunks)

    def scorer(users: Sequence[int], hists: Sequence[Sequence[int]]) -> torch.Tensor:
        return rec.scores(hists)

    fit = _fit(run_epoch, scorer, rec.net, split, learner_cfg.seed, max_epochs, patience)
    return rec, {**fit, "steps_per_epoch": steps}


# --- what is compared ------------------------------------------------------------------------

OURS = "recsys"
SASREC = "SASRec (CE, every position)"


Networks = dict[str, tuple[str, ModelConfig, LearnerConfig]]


def _ablation(
    shipped_has_it: bool,
    without: tuple[str, ModelConfig, LearnerConfig],
    with_it: tuple[str, ModelConfig, LearnerConfig],
) -> Networks:
    """One idea's ablation, ``(name, model cfg, learner cfg)``: the shipped model without the
    idea when it has it, with it when it leaves it off."""
    name, model_cfg, learner_cfg = without if shipped_has_it else with_it
    return {name: ("ablation", model_cfg, learner_cfg)}


def variants(model_cfg: ModelConfig, learner_cfg: LearnerConfig) -> Networks:
    """The networks compared: the full model and one ablation per idea -> name: (kind, cfgs).

    An idea the shipped defaults leave off (the policy gradient, the contrastive term at
    ``alpha`` 0, the text tower) is ablated the other way round: the shipped model *with* it."""
    m, lc = model_cfg, learner_cfg
    return {
        OURS: ("ours", m, lc),
        **_ablation(
            lc.objective == "reinforce",
            ("CE, same other terms (no PG)", m, replace(lc, objective="ce")),
            ("+ PG (REINFORCE, top-K correction)", m, replace(lc, objective="reinforce")),
        ),
        **_ablation(
            lc.contrastive != "none" and lc.alpha > 0,
            ("no contrastive", m, replace(lc, contrastive="none")),
            (
                f"+ contrastive (InfoNCE, alpha {ABLATION_ALPHA:g})",
                m,
                replace(lc, contrastive="infonce", alpha=ABLATION_ALPHA),
            ),
        ),
        **_ablation(
            m.use_text,
            ("no text (id only)", replace(m, use_text=False), lc),
            ("+ text (gated residual)", replace(m, use_text=True), lc),
        ),
        "no id (text only)": (
            "ablation",
            replace(m, use_text=True, use_id_embedding=False),
            lc,
        ),
    }


def shipped_learner_config(device: str) -> LearnerConfig:
    """The learner worker's configuration (its default settings), on ``device``."""
    from recsys.config import LearnerSettings

    return replace(LearnerConfig.from_settings(LearnerSettings()), device=device)


def default_configs(
    num_items: int, text_dim: int, quick: bool, device: str
) -> tuple[ModelConfig, LearnerConfig, int]:
    """``(ModelConfig, LearnerConfig, max epochs)``: the shipped defaults, sized to the data."""
    from recsys.config import LearnerSettings

    model_cfg = model_config(LearnerSettings(), text_dim, max(num_items, 1))
    return model_cfg, shipped_learner_config(device), 2 if quick else 40


def peer_models(seed: int = 0) -> dict[str, Any]:
    return {
        "most-popular": peers.MostPopular(),
        "item-kNN (cosine)": peers.ItemKNN(),
        "EASE": peers.EASE(),
        "ALS (implicit)": peers.ImplicitMF("als", seed),
        "BPR (implicit)": peers.ImplicitMF("bpr", seed),
    }


def fit_peer(model: Any, split: Split, seed: int = 0) -> dict[str, Any]:
    """Tune ``model`` over its grid on validation, then rank the test items once."""
    rows = split.train_items()
    best: tuple[float, dict[str, Any], Any] | None = None
    for params in model.grid:
        scorer = model.fit(rows, split.num_items, **params)
        v = float(ndcg_at(evaluate_part(scorer, split, "val", seed)).mean())
        if best is None or v > best[0]:
            best = (v, params, scorer)
    assert best is not None
    _, params, scorer = best
    test_scorer = scorer
    if isinstance(model, peers.ImplicitMF):  # a user vector needs refitting to see the val item
        with_val = [[*r, v] for r, v in zip(rows, split.val, strict=False)] + rows[len(split.val) :]
        test_scorer = model.fit(with_val, split.num_items, **params)
    res = evaluate(scorer, split, seed, test_fn=test_scorer)
    res["params"] = params
    return res


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


Job = tuple[str, str, ModelConfig, LearnerConfig, int, int]  # name, kind, cfgs, epochs, patience


def run_offline(
    path: str | Path,
    quick: bool = False,
    seeds: int = 3,
    json_out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    model_path: str | Path | None = None,
    device: str = "cpu",
    max_epochs: int | None = None,
    patience: int = 3,
    workers: int | None = None,
    out: Callable[[str], None] = print,
    batch_size: int | None = None,
    lr: float | None = None,
    threads: int | None = None,
    ablation_seeds: int | None = None,
) -> dict[str, Any]:
    """Run the whole comparison; prints a table and returns (and optionally writes) the figures.

    ``workers`` > 1 trains the networks in that many processes with one thread each (on a
    2-core machine, two single-thread trainings beat one two-thread training); the peers are
    fitted in this process meanwhile. ``threads`` sets this process's torch threads (a loaded
    or shared machine runs best with ``workers=1, threads=1``).
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if threads is not None:
        torch.set_num_threads(max(1, threads))
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
    counts = split.train_counts()
    cold = np.array([counts[t] < COLD_BELOW for t in split.test])
    out(
        f"split: {len(split.users)} users evaluated, {split.num_items} items ranked, "
        f"{int(cold.sum())} cold test items (< {COLD_BELOW} training interactions)"
    )
    model_cfg, learner_cfg, default_epochs = default_configs(
        len(catalog), catalog.dim, quick, device
    )
    max_epochs = default_epochs if max_epochs is None else max_epochs
    if batch_size is not None:
        learner_cfg = replace(learner_cfg, batch_size=batch_size)
    if lr is not None:
        learner_cfg = replace(learner_cfg, lr=lr)

    kinds: dict[str, str] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    jobs: list[Job] = []
    nets = dict(variants(model_cfg, learner_cfg))
    nets[SASREC] = ("peer", model_cfg, replace(learner_cfg, lr=SASREC_LR))
    # recsys and SASRec first: if a run is cut short, the headline comparison is there
    order = [OURS, SASREC, *(n for n in nets if n not in (OURS, SASREC))]
    ablation_seeds = seeds if ablation_seeds is None else max(1, min(ablation_seeds, seeds))
    for s in range(seeds):
        for name in order:
            kind, mcfg, lcfg = nets[name]
            kinds[name] = kind
            if kind == "ablation" and s >= ablation_seeds:
                continue
            jobs.append((name, kind, mcfg, replace(lcfg, seed=s), max_epochs, patience))
    for name in kinds:
        runs[name] = []
    if workers is None:
        workers = 1 if quick else min(2, os.cpu_count() or 1)
    workers = max(1, min(workers, len(jobs)))
    out(
        f"training {len(jobs)} networks (<= {max_epochs} epochs, patience {patience}, "
        f"{workers} worker(s))"
    )

    def record(job: Job, res: dict[str, Any]) -> None:
        runs[job[0]].append(res)
        out(
            f"  {job[0]} seed {job[3].seed}: {_fmt_one(res['test'])} "
            f"(best epoch {res['info']['best_epoch']}/{res['info']['epochs']}, "
            f"{res['seconds']:.0f}s; {time.time() - t_start:.0f}s elapsed)"
        )

    def fit_peers() -> None:
        for name, model in peer_models().items():
            t1 = time.time()
            res = fit_peer(model, split)
            res["seconds"] = time.time() - t1
            kinds[name] = "peer"
            runs[name] = [res]
            out(f"  {name} {res['params']}: {_fmt_one(res['test'])} ({res['seconds']:.0f}s)")

    if workers == 1:
        fit_peers()
        for job in jobs:
            record(job, _train_and_evaluate(split, catalog, *job))
    else:
        ctx = multiprocessing.get_context("spawn")
        state = (split, catalog.ids, np.ascontiguousarray(catalog.vectors))
        with ProcessPoolExecutor(workers, ctx, initializer=_init_worker, initargs=state) as ex:
            futures = {ex.submit(_worker_job, *job): job for job in jobs}
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                fit_peers()
            finally:
                torch.set_num_threads(threads)
            for fut in as_completed(futures):
                record(futures[fut], fut.result())
    summary = _summarise(runs, kinds, cold)
    ablations = ablation_intervals(runs, kinds, seed=0)
    out("")
    out(format_table(summary))
    out("")
    out(format_ablations(ablations))
    best_peer = max(
        (n for n, r in summary.items() if r["kind"] == "peer"),
        key=lambda n: summary[n]["test"]["NDCG@10"]["mean"],
    )
    ratio = summary[OURS]["test"]["NDCG@10"]["mean"] / max(
        summary[best_peer]["test"]["NDCG@10"]["mean"], 1e-12
    )
    out(f"\nrecsys NDCG@10 / best peer ({best_peer}): {ratio:.3f}")
    report = {
        "dataset": str(path),
        "quick": quick,
        "seeds": seeds,
        "ablation_seeds": ablation_seeds,
        "max_epochs": max_epochs,
        "patience": patience,
        "users": len(split.users),
        "items": split.num_items,
        "cold_test_users": int(cold.sum()),
        "cold_below": COLD_BELOW,
        "reward": "clip(1 + 0.5*(rating - user mean), 0.1, 2)",
        "model_config": model_cfg.to_dict(),
        "learner_config": learner_cfg.to_dict(),
        "seconds": round(time.time() - t_start, 1),
        "results": summary,
        "ablations": ablations,
        "best_peer": best_peer,
        "ratio_to_best_peer": ratio,
        "paired_vs_best_peer": paired_interval(runs[OURS], runs[best_peer], seed=0),
    }
    out(f"total {report['seconds']:.0f}s")
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))
    return report


def _train_and_evaluate(
    split: Split,
    catalog: ItemCatalog,
    name: str,
    kind: str,
    model_cfg: ModelConfig,
    learner_cfg: LearnerConfig,
    max_epochs: int,
    patience: int,
) -> dict[str, Any]:
    t0 = time.time()
    seed = learner_cfg.seed
    if name == SASREC:
        rec, info = train_sasrec(split, model_cfg, learner_cfg, max_epochs, patience)
        res = evaluate(lambda u, h: rec.scores(h), split, seed)
    else:
        learner, info = train_network(split, catalog, model_cfg, learner_cfg, max_epochs, patience)
        res = evaluate(network_scorer(learner), split, seed)
    res["info"] = info
    res["seed"] = seed
    res["seconds"] = time.time() - t0
    return res


_WORKER: dict[str, Any] = {}


def _init_worker(split: Split, ids: list[str], vectors: np.ndarray) -> None:
    torch.set_num_threads(1)
    catalog = ItemCatalog(dim=vectors.shape[1])
    catalog.put_vectors(ids, vectors)
    _WORKER.update(split=split, catalog=catalog)


def _worker_job(
    name: str,
    kind: str,
    model_cfg: ModelConfig,
    learner_cfg: LearnerConfig,
    max_epochs: int,
    patience: int,
) -> dict[str, Any]:
    return _train_and_evaluate(
        _WORKER["split"],
        _WORKER["catalog"],
        name,
        kind,
        model_cfg,
        learner_cfg,
        max_epochs,
        patience,
    )


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "recsys" / "item-vectors"


# --- summaries and statistics ----------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def _summarise(
    runs: dict[str, list[dict[str, Any]]], kinds: dict[str, str], cold: np.ndarray
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        if not rs:
            continue
        entry: dict[str, Any] = {"kind": kinds[name], "runs": len(rs)}
        for part in ("test", "val"):
            entry[part] = {m: _mean_std([r[part][m] for r in rs]) for m in METRICS}
        cold_m = [metrics_from_ranks(np.asarray(r["test_ranks"])[cold]) for r in rs]
        entry["cold"] = {m: _mean_std([c[m] for c in cold_m]) for m in METRICS}
        if "info" in rs[0]:
            entry["best_epochs"] = [r["info"]["best_epoch"] for r in rs]
        if "params" in rs[0]:
            entry["params"] = rs[0]["params"]
        entry["seconds"] = [round(r.get("seconds", 0.0), 1) for r in rs]
        summary[name] = entry
    return summary


def paired_interval(
    a: list[dict[str, Any]],
    b: list[dict[str, Any]],
    seed: int = 0,
    resamples: int = 2000,
    k: int = 10,
) -> dict[str, float]:
    """Paired per-user bootstrap of mean NDCG@k(a) − NDCG@k(b) (each user's NDCG averaged
    over a model's seeds) -> ``{"diff", "lo", "hi"}`` (95% percentile interval)."""
    na = np.mean([ndcg_at(np.asarray(r["test_ranks"]), k) for r in a], axis=0)
    nb = np.mean([ndcg_at(np.asarray(r["test_ranks"]), k) for r in b], axis=0)
    d = na - nb
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))
    boot = d[idx].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def ablation_intervals(
    runs: dict[str, list[dict[str, Any]]], kinds: dict[str, str], seed: int = 0
) -> dict[str, dict[str, float]]:
    """recsys minus each ablation: paired per-user bootstrap CI of the NDCG@10 difference
    (recsys's runs restricted to the ablation's seeds, when an ablation ran fewer)."""
    out = {}
    for name, rs in runs.items():
        if kinds.get(name) != "ablation" or not rs or not runs.get(OURS):
            continue
        seeds = {r.get("seed") for r in rs}
        ours = [r for r in runs[OURS] if r.get("seed") in seeds] or runs[OURS]
        out[name] = paired_interval(ours, rs, seed)
    return out


def _fmt_one(metrics: dict[str, float]) -> str:
    return " ".join(f"{m} {metrics[m]:.4f}" for m in METRICS)


def format_table(summary: dict[str, Any], part: str = "test") -> str:
    cols = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
    head = (
        f"{'model':<32}{'kind':<10}"
        + "".join(f"{m:>17}" for m in cols)
        + f"{'cold HR@10':>17}{'cold NDCG@10':>17}{'runs':>6}"
    )
    lines = [f"{part} (mean ± std over runs; cold: users whose test item is cold)", head]
    lines.append("-" * len(head))
    order = sorted(summary, key=lambda n: ("ours", "ablation", "peer").index(summary[n]["kind"]))
    for name in order:
        res = summary[name]
        cells = "".join(f"{res[part][m]['mean']:>10.4f} ± {res[part][m]['std']:.3f}" for m in cols)
        cold = "".join(
            f"{res['cold'][m]['mean']:>10.4f} ± {res['cold'][m]['std']:.3f}"
            for m in ("HR@10", "NDCG@10")
        )
        lines.append(f"{name:<32}{res['kind']:<10}{cells}{cold}{res['runs']:>6}")
    return "\n".join(lines)


def format_ablations(ablations: dict[str, dict[str, float]]) -> str:
    lines = ["recsys minus ablation, test NDCG@10 (paired per-user bootstrap, 95% CI)"]
    for name, ci in ablations.items():
        verdict = "helps" if ci["lo"] > 0 else ("hurts" if ci["hi"] < 0 else "no clear effect")
        lines.append(
            f"  {name:<32} {ci['diff']:+.4f}  [{ci['lo']:+.4f}, {ci['hi']:+.4f}]  ({verdict})"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from recsys import datasets

    p.add_argument(
        "--path",
        default=datasets.path("ml-latest-small"),
        help="MovieLens folder (ml-latest, ml-1m or ml-100k; default: the packaged latest-small)",
    )
    p.add_argument("--quick", action="store_true", help="a small user subset, 2 epochs (tests)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per network (>= 1)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures here")
    p.add_argument("--cache-dir", default=None, help="item vector cache (default ~/.cache/recsys)")
    p.add_argument("--model-path", default=None, help="text encoder dir (default: packaged MiniLM)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--max-epochs", type=int, default=None, help="epoch cap (default 40; 2 quick)")
    p.add_argument("--patience", type=int, default=3, help="epochs without a better val NDCG@10")
    p.add_argument(
        "--batch-size", type=int, default=None, help="override the worker's batch size (all nets)"
    )
    p.add_argument("--lr", type=float, default=None, help="override the worker's learning rate")
    p.add_argument(
        "--ablation-seeds",
        type=int,
        default=None,
        help="seeds of each ablation (default: --seeds; the first ones, paired with recsys's)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process")
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
        max_epochs=args.max_epochs,
        patience=args.patience,
        workers=args.workers,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
        ablation_seeds=args.ablation_seeds,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="recsys eval offline", description=__doc__.split("\n")[0])
    add_arguments(p)
    logging.basicConfig(level=logging.WARNING)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
