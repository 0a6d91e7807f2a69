"""Learner throughput: a full Learner.step against a bare forward+backward+step, same run.

The full step samples from the replay buffer, computes the off-policy top-K correction weights
(with the behaviour head's β), the policy-gradient and contrastive losses (dense next-item InfoNCE
and NT-Xent over two augmented views) and takes the optimizer step, with the non-finite guard.
The reference is the same network on one fixed batch already on the device: forward (user state,
item tower, logits over all items), cross-entropy, backward, AdamW step. ``ratio`` = full samples/s
over bare samples/s (target >= 0.8). Peak memory is reported with the replay buffer filled to its
capacity (1M rewards by default). The reward head's exact refit
(:mod:`recsys.learner.reward_refit`, every ``reward_refit_every`` steps) is timed on its own over
the filled buffer and reported amortised over its interval, as a multiple of one full step.

    python benchmarks/learner_throughput.py [--device auto|cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys.learner.config import LearnerConfig
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig
from recsys.replay_buffer import Transitions
from recsys.serving.device import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_refit(learner: Learner) -> float:
    """Seconds of one exact refit of the reward head over the whole buffer."""
    _sync(learner.device)
    t0 = time.perf_counter()
    learner.refit_reward_head()
    _sync(learner.device)
    return time.perf_counter() - t0


def _fill_buffer(learner: Learner, n: int, items: int, chunk: int = 65536) -> float:
    """Add ``n`` synthetic rewards in chunks; returns seconds of ``add`` per million."""
    g = torch.Generator().manual_seed(0)
    hl = learner.model_cfg.max_history
    dev = learner.device
    spent = 0.0
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        lengths = torch.randint(0, hl + 1, (b, 1), generator=g)
        hist = torch.randint(0, items, (b, hl), generator=g)
        hist = torch.where(torch.arange(hl).unsqueeze(0) >= hl - lengths, hist, -1)
        batch = Transitions(
            history=hist,
            item=torch.randint(0, items, (b,), generator=g),
            reward=(torch.rand(b, generator=g) < 0.3).float(),
            propensity=torch.where(torch.rand(b, generator=g) < 0.5, 0.05, float("nan")),
            position=torch.randint(0, 10, (b,), generator=g),
            user=torch.randint(0, 1 << 16, (b,), generator=g),
        )
        batch = batch.to(dev)
        _sync(dev)
        t0 = time.perf_counter()
        learner.buffer.add(batch)
        _sync(dev)
        spent += time.perf_counter() - t0
    return spent / max(n, 1) * 1e6


def _time_full(learner: Learner, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        learner.step()
    _sync(learner.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = learner.step()
        assert out is not None
        assert out["skipped"] == 0.0
    _sync(learner.device)
    return steps * learner.cfg.batch_size / (time.perf_counter() - t0)


def _time_bare(learner: Learner, steps: int, warmup: int) -> float:
    """Forward + backward + AdamW step of the same network on one fixed device batch."""
    model = copy.deepcopy(learner.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=learner.cfg.lr)
    batch = learner.buffer.sample(learner.cfg.batch_size)
    dev = learner.device
    amp = learner.cfg.amp and dev.type == "cuda"

    def one() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(batch.history)
            loss = F.cross_entropy(logits.float(), batch.item)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        one()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(dev)
    return steps * learner.cfg.batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--items", type=int, default=None, help="catalogue size (default by device)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default by device)")
    p.add_argument("--history", type=int, default=50, help="history length N")
    p.add_argument("--dim", type=int, default=64, help="model width d")
    p.add_argument("--buffer", type=int, default=1_000_000, help="replay buffer capacity, filled")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="alternating measurements; best kept")
    p.add_argument(
        "--augment-views",
        type=int,
        default=LearnerConfig.augment_views,
        help="1: NT-Xent between the state and one augmented view; 2: two augmented views",
    )
    p.add_argument(
        "--reward-batch-multiplier",
        type=int,
        default=LearnerConfig.reward_batch_multiplier,
        help="batches of replayed rows the reward head fits per step",
    )
    p.add_argument("--json", dest="json_out", default=None, help="also write figures here")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    items = args.items or (100_000 if cuda else 10_000)
    batch = args.batch or (2048 if cuda else 256)
    steps = args.steps or (50 if cuda else 10)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)

    model_cfg = ModelConfig(
        text_dim=384, dim=args.dim, max_history=args.history, item_capacity=items,
        adaptor_hidden=128, dropout=0.1,
    )  # fmt: skip
    learner_cfg = LearnerConfig(
        batch_size=batch,
        buffer_capacity=args.buffer,
        device=str(device),
        softmax="full",
        augment_views=args.augment_views,
        reward_batch_multiplier=args.reward_batch_multiplier,
        reward_refit_every=0,  # timed on its own below, amortised over its interval
    )
    learner = Learner(model_cfg, learner_cfg)
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((items, 384), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    learner.catalog.put_vectors([f"i{k}" for k in range(items)], vecs)
    learner.sync_items()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    insert_us = _fill_buffer(learner, args.buffer, items)
    assert len(learner.buffer) == args.buffer

    full, bare = [], []
    for _ in range(args.repeats):  # alternate, so drifting clocks or load hit both alike
        full.append(_time_full(learner, steps, args.warmup))
        bare.append(_time_bare(learner, steps, args.warmup))
    full_sps, bare_sps = max(full), max(bare)
    ratio = full_sps / bare_sps
    refit_s = min(_time_refit(learner) for _ in range(args.repeats))
    every = LearnerConfig.reward_refit_every
    step_s = batch / full_sps

    buffer_mb = learner.buffer.nbytes / 2**20
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    name = torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()}"
    rows = [
        ("device", f"{name}{' (bf16 autocast)' if cuda else ''}"),
        ("items / batch / history / d", f"{items} / {batch} / {args.history} / {args.dim}"),
        ("augmented views (NT-Xent)", f"{args.augment_views} x {learner_cfg.augment_rows} rows"),
        ("reward head rows per step", f"{args.reward_batch_multiplier} x {batch}"),
        ("full Learner.step samples/s", f"{full_sps:,.0f}"),
        ("bare fwd+bwd+step samples/s", f"{bare_sps:,.0f}"),
        ("ratio (target >= 0.8)", f"{ratio:.3f}"),
        (
            f"reward head refit (whole buffer, every {every} steps)",
            f"{refit_s:.2f} s = {refit_s / every / step_s:.2f} x a step, amortised",
        ),
        ("replay buffer (1 row/reward)", f"{args.buffer:,} rewards, {buffer_mb:,.0f} MiB"),
        ("buffer insert", f"{insert_us:.2f} s per million rewards"),
        ("peak RSS", f"{peak_rss_mb:,.0f} MiB (before buffer {rss0:,.0f} MiB)"),
    ]
    if gpu_peak_mb is not None:
        rows.append(("peak GPU memory", f"{gpu_peak_mb:,.0f} MiB"))
    width = max(len(k) for k, _ in rows)
    print("learner throughput")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    report = {
        "benchmark": "learner_throughput",
        "device": name,
        "bf16": cuda,
        "items": items,
        "batch": batch,
        "history": args.history,
        "dim": args.dim,
        "augment_views": args.augment_views,
        "augment_rows": learner_cfg.augment_rows,
        "reward_batch_multiplier": args.reward_batch_multiplier,
        "full_samples_per_s": full_sps,
        "bare_samples_per_s": bare_sps,
        "full_runs": full,
        "bare_runs": bare,
        "ratio": ratio,
        "reward_refit_s": refit_s,
        "reward_refit_every": every,
        "reward_refit_per_step": refit_s / every / step_s,
        "buffer_capacity": args.buffer,
        "buffer_mib": buffer_mb,
        "buffer_insert_s_per_million": insert_us,
        "peak_rss_mib": peak_rss_mb,
        "peak_gpu_mib": gpu_peak_mb,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
