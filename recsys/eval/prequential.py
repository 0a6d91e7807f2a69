"""Prequential (test-then-learn) evaluation on the time-ordered MovieLens stream.

Every rating, in timestamp order, is first a test: rank every item for that user (their rated
items excluded) with the model as it is now, and record whether the rated item is in the top 10
(HR@10, NDCG@10). Then it is training data. Our model learns through exactly the path the
learner worker uses (:class:`~recsys.learner.online.OnlineLearner`: dedupe, replay buffer,
the step budget per new reward), in chunks of events: all events of a chunk are tested with
the model as of the chunk's start (histories are exact per event), then learned from.

Baselines in the same run, both per event: recent popularity (counts over a sliding window of
the last events) and incremental matrix factorisation for positive-only feedback (ISGD,
Vinagre, Jorge & Gama, UMAP 2014). Rewards follow the offline evaluation: every rating is a
chosen item, weighted ``clip(1 + 0.5·(rating − user's running mean), 0.1, 2)``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.data.movielens import MovieLens, load_movielens
from recsys.encoder.catalog import ItemCatalog
from recsys.encoder.text import TextEncoder
from recsys.eval.offline import _default_cache_dir, _subset_quick, default_configs, ndcg_at
from recsys.events import Event, EventParser, RewardRecord
from recsys.learner.config import LearnerConfig
from recsys.learner.online import OnlineConfig, OnlineLearner
from recsys.learner.trainer import Learner
from recsys.serving.model import policy_scores

K = 10


@dataclass
class Tally:
    """HR@10 / NDCG@10 sums, overall and per window, and every event's rank (for the paired
    interval: 8 bytes an event)."""

    windows: int
    total: int
    hits: np.ndarray = field(init=False)
    ndcg: np.ndarray = field(init=False)
    count: np.ndarray = field(init=False)
    ranks: array[int] = field(init=False)

    def __post_init__(self) -> None:
        self.hits = np.zeros(self.windows)
        self.ndcg = np.zeros(self.windows)
        self.count = np.zeros(self.windows)
        self.ranks = array("q")

    def add(self, position: int, rank: int) -> None:
        w = min(self.windows - 1, position * self.windows // max(self.total, 1))
        self.count[w] += 1
        self.ranks.append(rank)
        if rank < K:
            self.hits[w] += 1
            self.ndcg[w] += 1.0 / math.log2(rank + 2)

    def summary(self) -> dict[str, Any]:
        n = max(self.count.sum(), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "HR@10": float(self.hits.sum() / n),
                "NDCG@10": float(self.ndcg.sum() / n),
                "per_window": {
                    "HR@10": (self.hits / self.count).tolist(),
                    "NDCG@10": (self.ndcg / self.count).tolist(),
                    "events": self.count.astype(int).tolist(),
                },
            }


class RecentPopularity:
    """Scores items by how often they were rated in the last ``window`` events."""

    def __init__(self, num_items: int, window: int = 5000) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.counts = np.zeros(num_items)
        self.recent: deque[int] = deque()
        self.window = window

    def scores(self, user: int) -> np.ndarray:
        del user
        return self.counts

    def update(self, user: int, item: int) -> None:
        del user
        self.counts[item] += 1
        self.recent.append(item)
        if len(self.recent) > self.window:
            self.counts[self.recent.popleft()] -= 1


class ISGD:
    """Incremental SGD matrix factorisation for positive-only feedback (Vinagre et al. 2014).

    Each observed (user, item) pushes ``p_u · q_i`` towards 1:
    ``e = 1 − p_u·q_i;  p_u += η(e·q_i − λ·p_u);  q_i += η(e·p_u − λ·q_i)``.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        factors: int = 16,
        lr: float = 0.05,
        reg: float = 0.01,
        seed: int = 0,
    ) -> None:
        if factors < 1:
            raise ValueError(f"factors must be >= 1, got {factors}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg}")
        rng = np.random.default_rng(seed)
        self.P = rng.normal(0, 0.1, (num_users, factors))
        self.Q = rng.normal(0, 0.1, (num_items, factors))
        self.lr, self.reg = lr, reg

    def scores(self, user: int) -> np.ndarray:
        return self.Q @ self.P[user]

    def update(self, user: int, item: int) -> None:
        p, q = self.P[user].copy(), self.Q[item].copy()
        err = 1.0 - p @ q
        self.P[user] += self.lr * (err * q - self.reg * p)
        self.Q[item] += self.lr * (err * p - self.reg * q)


def _gains(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-event HR@10 and NDCG@10 of 0-based ranks."""
    return {"HR@10": (ranks < K).astype(np.float64), "NDCG@10": ndcg_at(ranks, K)}


def paired_user_interval(
    a: Sequence[int],
    b: Sequence[int],
    users: Sequence[int],
    seed: int = 0,
    resamples: int = 2000,
) -> dict[str, dict[str, float]]:
    """HR@10 and NDCG@10 of ranks ``a`` minus ranks ``b`` (the same events), with a 95% CI from
    a bootstrap over users: a user's events are resampled together, since one user's tests are
    not independent of each other -> ``{metric: {"diff", "lo", "hi"}}``.

    >>> iv = paired_user_interval([0, 0, 50, 0], [50, 50, 50, 0], [0, 0, 1, 2])
    >>> round(iv["HR@10"]["diff"], 2)
    0.5
    """
    ra, rb = np.asarray(a), np.asarray(b)
    u = np.unique(np.asarray(users), return_inverse=True)[1]
    n_users = int(u.max()) + 1 if len(u) else 0
    events = np.bincount(u, minlength=n_users).astype(np.float64)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_users, np.full(n_users, 1.0 / max(n_users, 1)), size=resamples)
    out = {}
    ga, gb = _gains(ra), _gains(rb)
    for metric in ga:
        per_user = np.bincount(u, weights=ga[metric] - gb[metric], minlength=n_users)
        boot = (weights @ per_user) / np.maximum(weights @ events, 1.0)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        diff = float(per_user.sum() / max(events.sum(), 1.0))
        out[metric] = {"diff": diff, "lo": float(lo), "hi": float(hi)}
    return out


def rank_of(scores: np.ndarray, target: int, exclude: list[int], rng: np.random.Generator) -> int:
    """0-based rank of ``target`` among non-excluded items; ties broken uniformly at random.

    (Ties in the target's favour would hand a cold model with all-equal scores free hits.)
    """
    s = scores[target]
    above = int((scores > s).sum())
    ties = int((scores == s).sum()) - 1
    if exclude:
        ex = scores[exclude]
        above -= int((ex > s).sum())
        ties -= int((ex == s).sum())
    return above + int(rng.integers(0, max(ties, 0) + 1))


def stream_prefix(data: MovieLens, n: int) -> MovieLens:
    """The first ``n`` ratings of the time-ordered stream (movies kept whole)."""
    return replace(
        data, user=data.user[:n], item=data.item[:n], rating=data.rating[:n], ts_ms=data.ts_ms[:n]
    )


def chunk_histories(
    users: list[str], items: list[int], seen: dict[str, list[int]], max_len: int
) -> list[list[int]]:
    """Each event's history (last ``max_len`` items) just before it, chunk events included.

    ``seen`` holds the histories as of the chunk's start and is not changed. Only the model is
    as of the chunk's start; a user's earlier events in the same chunk are already in the
    history, as the publisher would see them. (Histories frozen at the chunk's start would
    hand the model inputs up to a chunk stale while the baselines learn from every event.)
    """
    out: list[list[int]] = []
    live: dict[str, list[int]] = {}
    for user, item in zip(users, items, strict=True):
        h = live.setdefault(user, list(seen.get(user, [])[-max_len:]))
        out.append(h[-max_len:])
        h.append(item)
    return out


def _kafka_events(data: MovieLens) -> Iterator[Event]:
    """The stream through the embedded broker: replayed, consumed back, validated."""
    from kafka.structs import TopicPartition

    from recsys.broker import EmbeddedBroker
    from recsys.config import KafkaSettings
    from recsys.data.backfill import replay
    from recsys.kafka import create_topics, make_consumer, make_producer

    parser = EventParser(max_clock_skew_ms=0)
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
        # One partition keeps the global time order that prequential evaluation is defined on.
        create_topics(kafka, ["prequential.events"], partitions=1)
        producer = make_producer(kafka)
        replay(data.events(), producer, "prequential.events", progress=False)
        producer.close()
        consumer = make_consumer(kafka, None)
        tp = TopicPartition("prequential.events", 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        remaining = len(data)
        try:
            while remaining > 0:
                for records in consumer.poll(timeout_ms=1000, max_records=5000).values():
                    for r in records:
                        event = parser.parse(r.value)
                        remaining -= 1
                        if isinstance(event, Event):
                            yield event
        finally:
            consumer.close()


def run_prequential(
    path: str | Path,
    chunk: int = 512,
    windows: int = 10,
    json_out: str | Path | None = None,
    plot: str | Path | None = None,
    via_kafka: bool = False,
    quick: bool = False,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    seed: int = 0,
    dim: int = 32,
    layers: int = 1,
    history: int = 20,
    replay_ratio: float = 8.0,
    limit: int | None = None,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the comparison; prints a table and returns (and optionally writes) the figures."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    t_start = time.time()
    data = load_movielens(path)
    if quick:
        data = _subset_quick(data)
    if limit is not None:
        data = stream_prefix(data, limit)
    encoder = TextEncoder(device=device)
    catalog = ItemCatalog(encoder, Path(cache_dir) if cache_dir else _default_cache_dir())
    catalog.upsert(data.movies)
    for item in np.unique(data.item).tolist():
        catalog.index_of(str(item))
    users = {str(u): j for j, u in enumerate(np.unique(data.user).tolist())}
    n_items = len(catalog)
    out(
        f"MovieLens {path}: {len(data)} ratings, {len(users)} users, {n_items} items"
        f"{' (quick subset)' if quick else ''}{f' (first {limit} events)' if limit else ''}"
        f"{' via the embedded broker' if via_kafka else ''}"
    )

    torch.manual_seed(seed)
    model_cfg, learner_cfg, _ = default_configs(n_items, catalog.dim, quick, device)
    # Test-then-learn pays for every step in wall time: a lighter network than offline's.
    model_cfg = replace(model_cfg, dim=dim, num_layers=layers, max_history=history)
    # The learner worker's replay buffer (LearnerConfig's defaults: a recent ring of a quarter
    # of the capacity, half of every batch drawn from it), not the offline evaluation's
    # uniform reservoir: on this drifting stream, replay uniform over all the past keeps the
    # model on old tastes.
    worker = LearnerConfig()
    learner_cfg = replace(
        learner_cfg,
        seed=seed,
        buffer_capacity=worker.buffer_capacity,
        recent_capacity=worker.recent_capacity,
        recent_fraction=worker.recent_fraction,
    )
    learner = Learner(model_cfg, learner_cfg, catalog)
    ckpt_dir = tempfile.mkdtemp(prefix="prequential-")
    # The budget is replay_ratio samples per event: the per-batch step cap (which bounds a
    # worker's catch-up after a stall) is set so that it does not bind on a chunk.
    steps_per_chunk = math.ceil(chunk * replay_ratio / learner_cfg.batch_size)
    online = OnlineLearner(
        learner,
        ckpt_dir,
        OnlineConfig(replay_ratio=replay_ratio, max_steps_per_batch=max(16, steps_per_chunk)),
    )
    baselines: dict[str, RecentPopularity | ISGD] = {
        "recent popularity": RecentPopularity(n_items),
        "ISGD (incremental MF)": ISGD(len(users), n_items, seed=seed),
    }
    tallies = {name: Tally(windows, len(data)) for name in ("recsys", *baselines)}
    seen: dict[str, list[int]] = {}
    rating_sum: dict[str, tuple[int, float]] = {}
    events: Iterable[Event] = _kafka_events(data) if via_kafka else data.events()
    position = 0
    batch: list[Event] = []
    rng = np.random.default_rng(seed)
    event_users = array("q")  # each tested event's user, for the paired interval

    def flush(batch: list[Event]) -> None:
        nonlocal position
        idx = [catalog.index[e.item_id] for e in batch]
        hists = chunk_histories([e.user_id for e in batch], idx, seen, model_cfg.max_history)
        # Test the whole chunk with the model as it is now, histories exact per event.
        learner.sync_items()
        scores = policy_scores(learner.model, hists).numpy()
        records = []
        for b, (e, item) in enumerate(zip(batch, idx, strict=True)):
            history = seen.setdefault(e.user_id, [])
            u = users[e.user_id]
            ours = scores[b]
            event_users.append(u)
            tallies["recsys"].add(position, rank_of(ours, item, history, rng))
            for name, model in baselines.items():
                tallies[name].add(position, rank_of(model.scores(u), item, history, rng))
                model.update(u, item)
            count, total = rating_sum.get(e.user_id, (0, 0.0))
            mean = total / count if count else 3.5
            reward = min(2.0, max(0.1, 1.0 + 0.5 * ((e.value or mean) - mean)))
            rating_sum[e.user_id] = (count + 1, total + (e.value or 0.0))
            records.append(RewardRecord(e.event_id, e.user_id, e.item_id, reward, e.ts, "organic"))
            history.append(item)
            position += 1
        # ...then learn from it, through the learner worker's own path.
        online.train(online.add_rewards(records))

    t0 = time.time()
    for event in events:
        batch.append(event)
        if len(batch) == chunk:
            flush(batch)
            batch = []
            if position % (chunk * 10) == 0:
                hr = tallies["recsys"].hits.sum() / max(tallies["recsys"].count.sum(), 1)
                out(
                    f"  {position}/{len(data)} events, HR@10 so far {hr:.4f} "
                    f"({time.time() - t0:.0f}s, {learner.step_count} steps)"
                )
    if batch:
        flush(batch)

    summary = {name: t.summary() for name, t in tallies.items()}
    paired = {
        name: paired_user_interval(tallies["recsys"].ranks, tallies[name].ranks, event_users, seed)
        for name in baselines
    }
    out("")
    out(format_table(summary))
    out("recsys minus baseline (95% CI, bootstrap over users):")
    for name, iv in paired.items():
        out(
            f"  {name:24s} "
            + "  ".join(
                f"{m} {v['diff']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]" for m, v in iv.items()
            )
        )
    report = {
        "dataset": str(path),
        "quick": quick,
        "via_kafka": via_kafka,
        "events": position,
        "chunk": chunk,
        "windows": windows,
        "steps": learner.step_count,
        "limit": limit,
        "model": {"dim": dim, "layers": layers, "history": history, "replay_ratio": replay_ratio},
        "reward": "clip(1 + 0.5*(rating - running user mean), 0.1, 2)",
        "seconds": round(time.time() - t_start, 1),
        "results": summary,
        "recsys_minus": paired,
    }
    out(f"total {report['seconds']:.0f}s, {learner.step_count} gradient steps")
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))
    if plot:
        _plot(summary, Path(plot))
        out(f"plot: {plot}")
    return report


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"{'method':24s} {'HR@10':>8s} {'NDCG@10':>8s}   HR@10 per window", "-" * 78]
    for name, res in summary.items():
        windows = " ".join(f"{v:.3f}" for v in res["per_window"]["HR@10"])
        lines.append(f"{name:24s} {res['HR@10']:8.4f} {res['NDCG@10']:8.4f}   {windows}")
    return "\n".join(lines)


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, res in summary.items():
        hr = res["per_window"]["HR@10"]
        ax.plot(range(1, len(hr) + 1), hr, marker="o", label=f"{name} ({res['HR@10']:.3f})")
    ax.set_xlabel("window of the time-ordered stream")
    ax.set_ylabel("HR@10 (test, then learn)")
    ax.set_title("Prequential evaluation on MovieLens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `recsys eval prequential`."""
    from recsys import datasets

    p.add_argument(
        "--path",
        default=datasets.path("ml-latest-small"),
        help="MovieLens folder (ml-latest, ml-1m or ml-100k; default: the packaged latest-small)",
    )
    p.add_argument("--chunk", type=int, default=512, help="events tested together, then learned")
    p.add_argument("--windows", type=int, default=10, help="windows for the per-window figures")
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures here")
    p.add_argument("--plot", default="prequential.png", help="PNG of HR@10 per window")
    p.add_argument("--kafka", action="store_true", help="stream through the embedded broker")
    p.add_argument("--quick", action="store_true", help="a small user subset (tests)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--cache-dir", default=None, help="item vector cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=32, help="model width")
    p.add_argument("--layers", type=int, default=1, help="user-state transformer layers")
    p.add_argument("--history", type=int, default=20, help="history length N")
    p.add_argument("--replay-ratio", type=float, default=8.0, help="training samples per event")
    p.add_argument("--limit", type=int, default=None, help="only the first N events (iteration)")


def run_from_args(args: argparse.Namespace) -> int:
    run_prequential(
        args.path,
        chunk=args.chunk,
        windows=args.windows,
        json_out=args.json_out,
        plot=args.plot,
        via_kafka=args.kafka,
        quick=args.quick,
        device=args.device,
        cache_dir=args.cache_dir,
        seed=args.seed,
        dim=args.dim,
        layers=args.layers,
        history=args.history,
        replay_ratio=args.replay_ratio,
        limit=args.limit,
    )
    return 0
