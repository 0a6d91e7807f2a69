"""Soak: millions of distinct synthetic users through the learner's state; memory stays bounded.

Fast-forwarded: reward records go straight into :meth:`OnlineLearner.add_rewards` (reward-id
dedupe, user histories, item tables, replay buffer), with no Kafka and no gradient steps, so
the state sees years of distinct users in minutes. Each new user brings ``--events-per-user``
rewards (an ignored impression, clicks, an organic rating); a fixed set of ``--heavy-users``
users keeps coming back (their histories fill to ``retain``). Resident memory (VmRSS) is
sampled at ``--rows`` points; the table shows it beside the caches' entries and evictions.

Pass criteria (printed): RSS stays under ``--cap-mib`` (default 4096: the smallest learner pod
limit in deploy/, the local overlay's; the base is 16 GiB) and grows less than 10% from the
first row after warm-up (the history cache full and ``--warmup-users`` streamed) to the
largest later sample. ``ratio`` in ``--json`` is that largest sample over the warm-up one.

``--publisher`` soaks the publisher's state instead: the same users as impression + click
events through :meth:`Publisher.observe` (no store, no model version: cold-start slates), every
due batch computed and committed, so the dirty set drains as in the worker.

Bytes per user at the bound are measured apart, with tracemalloc, on ``UserHistories`` filled
with ``--probe-users`` users of 1, 10 and ``retain`` entries (what a history costs, user id and
LRU slot included); bytes per item from RSS around ``--probe-items`` items put into a fresh
learner's tables and one gradient step.

    python benchmarks/soak_users.py [--users 10000000] [--max-users 200000] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys.config import LearnerSettings, PublisherSettings
from recsys.encoder.catalog import ItemCatalog
from recsys.events import Event, RewardRecord
from recsys.history import UserHistories, impression_key
from recsys.learner.config import LearnerConfig
from recsys.learner.online import OnlineLearner
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig
from recsys.publisher.core import Publisher, PublisherConfig


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def records(
    users: int,
    batch_users: int,
    events_per_user: int,
    items: int,
    heavy_users: int,
    heavy_share: float,
    seed: int,
) -> Iterator[tuple[int, list[RewardRecord]]]:
    """Batches of reward records: (users streamed so far, records), in event-time order.

    Per new user: one ignored impression (reward 0), then clicks (1.0) on other impressions,
    the last event an organic rating (0.5, no request id). ``heavy_share`` of each batch's
    records come from ``heavy_users`` returning users.
    """
    rng = np.random.default_rng(seed)
    ts = 1_700_000_000_000
    n = 0
    for start in range(0, users, batch_users):
        stop = min(users, start + batch_users)
        count = (stop - start) * events_per_user
        extra = int(count * heavy_share)
        picks = rng.zipf(1.3, count + extra) % items  # popular items dominate, as in real logs
        out: list[RewardRecord] = []
        k = 0
        for u in range(start, stop):
            user = f"user-{u:09d}"
            for e in range(events_per_user):
                item = f"item-{picks[k]}"
                n += 1
                ts += 1
                if e == 0:
                    out.append(RewardRecord(f"r{n}", user, item, 0.0, ts, "default", 0.1, 0,
                                            "v1", f"q{n}"))  # fmt: skip
                elif e == events_per_user - 1 and e > 1:
                    out.append(RewardRecord(f"r{n}", user, item, 0.5, ts, "organic"))
                else:
                    out.append(RewardRecord(f"r{n}", user, item, 1.0, ts, "joined", 0.1, 1,
                                            "v1", f"q{n}"))  # fmt: skip
                k += 1
        for h in rng.integers(0, heavy_users, extra) if heavy_users else ():
            n += 1
            ts += 1
            out.append(RewardRecord(f"r{n}", f"heavy-{h:06d}", f"item-{picks[k]}", 1.0, ts,
                                    "joined", 0.1, 2, "v1", f"q{n}"))  # fmt: skip
            k += 1
        yield stop, out


def bytes_per_user(max_len: int, retain: int, probe_users: int) -> dict[int, float]:
    """tracemalloc bytes per user of a bounded UserHistories at ``probe_users`` users."""
    out: dict[int, float] = {}
    for entries in (1, 10, retain):
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        h = UserHistories(max_len, retain, max_users=probe_users, name="soak_probe")
        for u in range(probe_users):
            user = f"user-{u:09d}"
            for j in range(entries):
                h.add(user, j % 9973, 1_700_000_000_000 + j, 1.0, impression_key(f"q{u}-{j}", "x"))
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(h) == probe_users
        out[entries] = (after - before) / probe_users
        del h
    return out


def bytes_per_item(model_cfg: ModelConfig, n: int) -> float:
    """RSS bytes per item of the learner's item tables at ``n`` items (the catalogue's vectors
    and ids, the model's rows, their AdamW state after one step, the counts); ``n`` a power of
    two, so no rows are allocated beyond ``n``."""
    learner = Learner(model_cfg, LearnerConfig(device="cpu"), ItemCatalog(dim=384))
    gc.collect()
    before = rss_mib()
    vecs = np.random.default_rng(0).standard_normal((n, 384), dtype=np.float32)
    learner.catalog.put_vectors([f"probe-{i}" for i in range(n)], vecs)
    del vecs
    learner.observe([RewardRecord("r", "u", "probe-0", 1.0, 1, "joined", 0.5, 0)])
    learner.step()  # allocates the optimizer state of every item row
    gc.collect()
    return (rss_mib() - before) * 2**20 / n


def events(
    users: int, batch_users: int, items: int, heavy_users: int, heavy_share: float, seed: int
) -> Iterator[tuple[int, list[Event]]]:
    """The publisher's twin of :func:`records`: per new user an impression and a click on it."""
    rng = np.random.default_rng(seed)
    ts = 1_700_000_000_000
    n = 0
    for start in range(0, users, batch_users):
        stop = min(users, start + batch_users)
        extra = int((stop - start) * 2 * heavy_share)
        picks = rng.zipf(1.3, stop - start + extra) % items
        out: list[Event] = []
        for k, u in enumerate(range(start, stop)):
            user, item = f"user-{u:09d}", f"item-{picks[k]}"
            n += 2
            ts += 2
            out.append(Event(f"e{n}", "impression", user, item, ts, f"q{n}", 0, 0.1))
            out.append(Event(f"e{n + 1}", "click", user, item, ts + 1, f"q{n}", 0))
        for k, h in enumerate(rng.integers(0, heavy_users, extra) if heavy_users else ()):
            n += 1
            ts += 1
            item = f"item-{picks[stop - start + k]}"
            out.append(Event(f"e{n}", "click", f"heavy-{h:06d}", item, ts))
        yield stop, out


def soak_publisher(args: argparse.Namespace) -> list[dict[str, float]]:
    """Stream the users through :meth:`Publisher.observe`, publishing every due batch (cold
    start: no model version, no store); returns the table's rows."""
    cfg = PublisherConfig(device="cpu", max_users=args.max_users, batch_interval_s=0.0, seed=0)
    pub = Publisher(cfg, lambda: None)
    every = max(args.batch_users, args.users // args.rows)
    next_row, total, slates, rows = every, 0, 0, []
    t0 = time.perf_counter()
    print(f"{'users':>12} {'events':>12} {'RSS MiB':>8} {'in memory':>10} {'slates':>11} {'s':>7}")
    for streamed, batch in events(args.users, args.batch_users, args.items, args.heavy_users,
                                  args.heavy_share, args.seed):  # fmt: skip
        pub.observe(batch)
        total += len(batch)
        while pub.due():
            out = pub.compute()
            if out is None:
                break
            slates += len(out.slates)
            pub.committed(out)
        if streamed >= next_row or streamed == args.users:
            next_row += every
            gc.collect()
            row = {
                "users": streamed,
                "events": total,
                "rss_mib": rss_mib(),
                "users_in_memory": pub.users_in_memory,
                "slates": slates,
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            held, spent = pub.users_in_memory, row["seconds"]
            print(f"{streamed:>12,} {total:>12,} {row['rss_mib']:>8.0f} {held:>10,} "
                  f"{slates:>11,} {spent:>7.0f}", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    s = LearnerSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=10_000_000, help="distinct new users streamed")
    p.add_argument("--max-users", type=int, default=None,
                   help="the bound (default: the worker's max_users setting)")  # fmt: skip
    p.add_argument("--events-per-user", type=int, default=2, help="rewards per new user")
    p.add_argument("--items", type=int, default=10_000, help="distinct item ids")
    p.add_argument("--heavy-users", type=int, default=10_000, help="returning users")
    p.add_argument("--heavy-share", type=float, default=0.1, help="their share of records")
    p.add_argument("--batch-users", type=int, default=2_000, help="new users per observe call")
    p.add_argument("--rows", type=int, default=10, help="memory samples in the table")
    p.add_argument("--warmup-users", type=int, default=None,
                   help="users streamed before the baseline (default 2 * max-users)")  # fmt: skip
    p.add_argument("--cap-mib", type=float, default=4096.0, help="memory cap to stay under")
    p.add_argument("--probe-users", type=int, default=20_000, help="users in the bytes probe")
    p.add_argument("--probe-items", type=int, default=1 << 17, help="items in the item probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--publisher", action="store_true",
                   help="soak the publisher's state instead (max-users: its bound)")  # fmt: skip
    p.add_argument("--json", dest="json_out", default=None, help="also write figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.max_users is None:
        args.max_users = PublisherSettings().max_users if args.publisher else s.max_users
    warmup = args.warmup_users if args.warmup_users is not None else 2 * args.max_users
    if args.publisher:
        return report_publisher(args, soak_publisher(args), warmup)

    model_cfg = ModelConfig(
        text_dim=384, dim=s.dim, num_layers=s.layers, max_history=s.max_history,
        item_capacity=s.item_capacity, use_id_embedding=s.id_embeddings,
    )  # fmt: skip
    cfg = LearnerConfig(device="cpu", max_users=args.max_users, max_items=s.max_items)
    learner = Learner(model_cfg, cfg, ItemCatalog(dim=384))
    online = OnlineLearner(learner, tempfile.mkdtemp(prefix="soak-ckpt-"))
    gc.collect()
    rss0 = rss_mib()
    print(f"learner built: RSS {rss0:.0f} MiB; streaming {args.users:,} users "
          f"(bound {args.max_users:,})", flush=True)  # fmt: skip

    every = max(args.batch_users, args.users // args.rows)
    next_row = every
    rows: list[dict[str, float]] = []
    t0 = time.perf_counter()
    total = 0
    cols = [
        ("users", 12),
        ("records", 12),
        ("RSS MiB", 8),
        ("hist users", 10),
        ("evictions", 11),
        ("dedupe ids", 10),
        ("buffer", 8),
        ("items", 7),
        ("s", 7),
    ]
    print(" ".join(f"{name:>{w}}" for name, w in cols))
    gen = records(args.users, args.batch_users, args.events_per_user, args.items,
                  args.heavy_users, args.heavy_share, args.seed)  # fmt: skip
    for streamed, batch in gen:
        online.add_rewards(batch)
        total += len(batch)
        if streamed >= next_row or streamed == args.users:
            next_row += every
            learner.sync_items()  # the model's item rows are state too
            gc.collect()
            row = {
                "users": streamed,
                "records": total,
                "rss_mib": rss_mib(),
                "history_users": len(learner.histories),
                "evictions": learner.histories.evictions,
                "dedupe_ids": len(online._seen),
                "buffer": len(learner.buffer),
                "items": len(learner.catalog),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            cells = [f"{v:>{w},.0f}" for v, (_, w) in zip(row.values(), cols, strict=True)]
            print(" ".join(cells), flush=True)

    full = [r for r in rows if r["users"] >= warmup and r["history_users"] >= args.max_users]
    warm = full[0] if full else None
    peak_after = max((r["rss_mib"] for r in full), default=float("nan"))
    growth = (peak_after / warm["rss_mib"] - 1) * 100 if warm else float("nan")
    hwm = _status_mib("VmHWM")

    ckpt_dir = Path(tempfile.mkdtemp(prefix="soak-save-"))
    learner.save_checkpoint(ckpt_dir, {"rewards:0": total})
    saved = next(ckpt_dir.iterdir())
    hist_bytes = sum(
        (saved / f).stat().st_size for f in ("histories.safetensors", "histories.json")
    )
    saved_users = len(json.loads((saved / "histories.json").read_text())["users"])

    per_user = bytes_per_user(learner.histories.max_len, learner.histories.retain, args.probe_users)
    state_mib = rows[-1]["rss_mib"] - rss0 if rows else float("nan")
    per_item = bytes_per_item(model_cfg, args.probe_items)

    print()
    if warm:
        print(f"warm-up row: {warm['users']:,} users, RSS {warm['rss_mib']:.0f} MiB")
    else:
        print("warm-up never reached: stream more users than --warmup-users and --max-users")
    print(f"largest RSS after warm-up {peak_after:.0f} MiB: growth {growth:+.1f}% (target < 10%)")
    print(f"peak RSS (VmHWM) {hwm:.0f} MiB; cap {args.cap_mib:.0f} MiB: "
          f"{'under' if hwm < args.cap_mib else 'OVER'}")  # fmt: skip
    held = len(learner.histories)
    print(f"learner state over the empty learner at the end: {state_mib:.0f} MiB "
          f"(histories of {held:,} users, reward-id dedupe, the replay buffer)")  # fmt: skip
    print(f"checkpoint histories: {saved_users:,} users, {hist_bytes / 2**20:.1f} MiB")
    print(
        f"bytes per user in UserHistories ({args.probe_users:,} users, tracemalloc): "
        + ", ".join(f"{e} entries {b:,.0f} B" for e, b in per_user.items())
    )
    print(f"bytes per item in the learner's item tables ({args.probe_items:,} items, RSS): "
          f"{per_item:,.0f} B")  # fmt: skip
    print(f"throughput: {total / rows[-1]['seconds']:,.0f} records/s" if rows else "")
    ok = bool(warm) and growth < 10 and hwm < args.cap_mib
    print("PASS" if ok else "FAIL")
    if args.json_out:
        report = {
            "args": vars(args),
            "rows": rows,
            "rss_empty_mib": rss0,
            "warmup_row": warm,
            "growth_after_warmup_pct": growth,
            "peak_rss_mib": hwm,
            "checkpoint_history_users": saved_users,
            "checkpoint_history_bytes": hist_bytes,
            "bytes_per_user": per_user,
            "bytes_per_item": per_item,
            "ratio": peak_after / warm["rss_mib"] if warm else None,
            "pass": ok,
        }
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


def report_publisher(args: argparse.Namespace, rows: list[dict[str, float]], warmup: int) -> int:
    full = [r for r in rows if r["users"] >= warmup and r["users_in_memory"] >= args.max_users]
    warm = full[0] if full else None
    peak_after = max((r["rss_mib"] for r in full), default=float("nan"))
    growth = (peak_after / warm["rss_mib"] - 1) * 100 if warm else float("nan")
    hwm = _status_mib("VmHWM")
    print()
    if warm:
        print(f"warm-up row: {warm['users']:,} users, RSS {warm['rss_mib']:.0f} MiB")
    print(f"largest RSS after warm-up {peak_after:.0f} MiB: growth {growth:+.1f}% (target < 10%)")
    print(f"peak RSS (VmHWM) {hwm:.0f} MiB; cap {args.cap_mib:.0f} MiB")
    ok = bool(warm) and growth < 10 and hwm < args.cap_mib
    print("PASS" if ok else "FAIL")
    if args.json_out:
        report = {"args": vars(args), "rows": rows, "warmup_row": warm, "peak_rss_mib": hwm,
                  "growth_after_warmup_pct": growth, "pass": ok,
                  "ratio": peak_after / warm["rss_mib"] if warm else None}  # fmt: skip
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
