"""Publisher throughput: a full refresh of 10,000 users over the ml-latest-small catalogue.

Setup: a real learner checkpoint (``dim`` 64, id embeddings, the 9,742 ml-latest-small movie
ids as the catalogue) loaded with the publisher's loader, and 10,000 users whose histories are
real MovieLens positive ratings (≥ 4 stars, time order, last 50; users beyond the 610 in the
data reuse a random real user's sequence cut at a random point). Measured in the same run, on
the same user-state and item tensors, repetitions interleaved (median reported):

* ``bare``:            ``states @ items.T`` + ``topk(k)`` (best of chunked and unchunked)
* ``rank <mode>``:     the publisher's ranking kernel given the states, for each exploration
                       mode: consumed-item masking, sampling, exact propensities
* ``slates <mode>``:   the same plus the per-user slate objects the publisher builds
* ``refresh``:         ``Publisher.compute()`` for all users after a version change (the
                       configured mode): histories -> user states (the model's transformer
                       encoder) -> ranking -> slates
* ``serialise``:       ``Slate.to_bytes()`` of every slate of a refresh (what goes to Kafka)

``ratio <mode>`` = ``rank <mode>`` users/s over bare users/s (target ≥ 0.8); ``ratio_slates``
and ``ratio_refresh`` likewise (the refresh is dominated by the user encoder, which the bare
reference does not run).

    .venv/bin/python benchmarks/publisher_throughput.py --json publisher_throughput.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recsys import datasets  # noqa: E402
from recsys.history import pad_histories  # noqa: E402
from recsys.learner.trainer import Learner, LearnerConfig  # noqa: E402
from recsys.model import ModelConfig  # noqa: E402
from recsys.policy import Policy  # noqa: E402
from recsys.publisher.core import Publisher, PublisherConfig  # noqa: E402
from recsys.serving.model import load_serving_model  # noqa: E402


def load_movielens(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    with open(path / "movies.csv", newline="", encoding="utf-8") as f:
        items = [row["movieId"] for row in csv.DictReader(f)]
    seqs: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with open(path / "ratings.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if float(row["rating"]) >= 4.0:
                seqs[row["userId"]].append((int(row["timestamp"]), row["movieId"]))
    return items, {u: [i for _, i in sorted(s)] for u, s in seqs.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=datasets.path("ml-latest-small"))
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument(
        "--exploration", default="boltzmann", choices=["boltzmann", "epsilon", "greedy"]
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    items, seqs = load_movielens(args.data)
    real = list(seqs.values())
    histories = []
    for n in range(args.users):
        s = real[n] if n < len(real) else real[rng.integers(len(real))]
        cut = len(s) if n < len(real) else int(rng.integers(1, len(s) + 1))
        histories.append(s[:cut][-50:])

    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelConfig(
            text_dim=8,
            dim=args.dim,
            max_history=50,
            item_capacity=len(items),
            use_text=False,
            num_layers=2,
            num_heads=2,
        )
        learner = Learner(cfg, LearnerConfig(device="cpu", keep_checkpoints=1))
        for i in items:
            learner.catalog.index_of(i)
        path = learner.save_checkpoint(tmp, offsets={})
        pcfg = PublisherConfig(
            k=args.k,
            history_len=50,
            exploration=args.exploration,
            refresh_batch_users=args.users,
            device=args.device,
            seed=0,
        )
        model = load_serving_model(path, pcfg.policy_kwargs())

    index = model.index
    hist_idx, _ = pad_histories([[index[i] for i in h] for h in histories], 50)
    states = model.user_states(hist_idx)
    item_matrix = model.policy.item_matrix
    dev = item_matrix.device
    states_d, hist_d = states.to(dev), hist_idx.to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        with torch.inference_mode():
            torch.topk(states_d @ item_matrix.T, args.k, dim=1)
        sync()

    def bare_chunked() -> None:
        with torch.inference_mode():
            for s in range(0, len(states_d), model.policy.chunk_size):
                torch.topk(states_d[s : s + model.policy.chunk_size] @ item_matrix.T, args.k, dim=1)
        sync()

    users = [f"user-{n}" for n in range(args.users)]
    modes = ("greedy", "epsilon", "boltzmann")
    policies = {
        m: Policy(item_matrix, **{**pcfg.policy_kwargs(), "exploration": m, "device": dev})
        for m in modes
    }

    def rank_fn(mode: str, slates: bool) -> Callable[[], None]:
        def run() -> None:
            r = policies[mode].rank(states_d, args.k, exclude=hist_d)
            if slates:
                for u, row in zip(users, r.rows(), strict=True):
                    Publisher._slate(u, model.version, 0, row, model.item_ids, "model")
            sync()

        return run

    pub = Publisher(pcfg, lambda: model)
    pub.restore((), {}, users)
    for u, h in zip(users, histories, strict=True):
        for j, item in enumerate(h):
            pub._add_positive(u, j, item, f"{u}-{j}")
    last: list[Any] = []

    def refresh() -> None:
        pub._serving = None
        pub._restored = True  # as after a version change: every known user is recomputed
        batch = pub.compute()
        assert batch is not None
        assert len(batch.slates) == args.users
        last[:] = batch.slates
        sync()

    def serialise() -> None:
        for w in last:
            w.slate.to_bytes()

    fns: dict[str, Callable[[], None]] = {"bare": bare, "bare_chunked": bare_chunked}
    for m in modes:
        fns[f"rank {m}"] = rank_fn(m, slates=False)
        fns[f"slates {m}"] = rank_fn(m, slates=True)
    fns["refresh"] = refresh
    fns["serialise"] = serialise
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(args.repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ups = {k: args.users / v for k, v in med.items()}
    bare_ups = max(ups["bare"], ups["bare_chunked"])
    ratios = {k: v / bare_ups for k, v in ups.items()}
    result = {
        "users": args.users,
        "items": len(items),
        "dim": args.dim,
        "k": args.k,
        "refresh_exploration": args.exploration,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "bare_users_per_s": bare_ups,
        "users_per_s": ups,
        "ratio": {m: ratios[f"rank {m}"] for m in modes},
        "ratio_slates": {m: ratios[f"slates {m}"] for m in modes},
        "ratio_refresh": ratios["refresh"],
        "seconds": times,
    }
    print(
        f"publisher throughput: {args.users} users x {len(items)} items, d={args.dim}, "
        f"k={args.k}, refresh in {args.exploration} mode, {dev}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'path':34s} {'users/s':>12s} {'median s':>10s} {'/ bare':>8s}")
    for name in fns:
        print(f"{name:34s} {ups[name]:12,.0f} {med[name]:10.3f} {ratios[name]:8.3f}")
    print(
        "ratio (rank / bare, target >= 0.8): "
        + ", ".join(f"{m} {ratios[f'rank {m}']:.3f}" for m in modes)
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
