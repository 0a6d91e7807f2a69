"""Drift detection on real data: the Open Bandit Dataset sample, reward rate halved halfway.

For each seed:

* shifted stream: ``--events`` rows bootstrap-resampled from the OBD sample (its real clicks),
  then ``--events`` rows bootstrap-resampled from the same sample after removing a random half
  of its click rows' clicks (click set to 0): the reward rate halves at the change point.
* unshifted stream: ``2 * --events`` rows bootstrap-resampled from the unchanged sample.
* popularity (second table): first half as above; second half resampled only from the rows of
  a random half of the items, so the item-popularity distribution shifts at the change point.

Each stream goes through :class:`recsys.drift.DriftMonitor` one event at a time
(``update("reward_rate", click)`` / ``update_item(item_id)``). Reported per seed: the delay from
the change point to the first detection after it, detections before it (false alarms on the
shifted stream), and detections on the unshifted stream (false alarms).

The sample has 38 clicks in 10,000 rows (CTR 0.38%): a halving to 0.19% is a small absolute change,
so the stream must be long (default 200,000 events per half).

``ratio`` in the JSON: median detection delay over the events per half (the fraction of the
post-change stream the detector needs).

    python benchmarks/drift_detection.py --seeds 20 --json drift.json
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from recsys import datasets
from recsys.drift import DriftMonitor

DEFAULT_DATA = datasets.path("obd") / "all.csv"


@dataclass(frozen=True)
class Obd:
    clicks: np.ndarray  # int8, one per logged row
    items: np.ndarray  # int, item_id per row


def load_obd(path: Path) -> Obd:
    clicks: list[int] = []
    items: list[int] = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            clicks.append(int(row["click"]))
            items.append(int(row["item_id"]))
    if not clicks:
        raise ValueError(f"{path} has no rows")
    return Obd(np.asarray(clicks, dtype=np.int8), np.asarray(items, dtype=np.int64))


def thinned_clicks(clicks: np.ndarray, keep: float, rng: np.random.Generator) -> np.ndarray:
    """The same rows with a random (1 - keep) share of the click rows set to no-click."""
    out = clicks.copy()
    clicked = np.flatnonzero(out)
    n_drop = round(len(clicked) * (1.0 - keep))
    out[rng.choice(clicked, size=n_drop, replace=False)] = 0
    return out


def reward_stream(
    data: Obd, events: int, seed: int, keep: float | None
) -> tuple[np.ndarray, int | None]:
    """Bootstrap a click stream; with ``keep`` set, the second half has that share of clicks."""
    rng = np.random.default_rng(seed)
    n = len(data.clicks)
    if keep is None:
        return data.clicks[rng.integers(0, n, size=2 * events)], None
    before = data.clicks[rng.integers(0, n, size=events)]
    after = thinned_clicks(data.clicks, keep, rng)[rng.integers(0, n, size=events)]
    return np.concatenate([before, after]), events


def popularity_stream(data: Obd, events: int, seed: int) -> tuple[np.ndarray, int]:
    """Item ids; after the change only the rows of a random half of the items are drawn."""
    rng = np.random.default_rng(seed)
    n = len(data.items)
    kinds = np.unique(data.items)
    kept = rng.choice(kinds, size=len(kinds) // 2, replace=False)
    rows_after = np.flatnonzero(np.isin(data.items, kept))
    before = data.items[rng.integers(0, n, size=events)]
    after = data.items[rows_after[rng.integers(0, len(rows_after), size=events)]]
    return np.concatenate([before, after]), events


def detections(monitor: DriftMonitor, stream: np.ndarray, signal: str) -> list[int]:
    found = []
    if signal == "item_popularity":
        for i, item in enumerate(stream.tolist()):
            if monitor.update_item(str(item)):
                found.append(i)
    else:
        for i, value in enumerate(stream.tolist()):
            if monitor.update(signal, float(value)):
                found.append(i)
    return found


@dataclass
class SeedResult:
    seed: int
    delay: int | None  # events from the change point to the first detection at/after it
    false_alarms_before_change: int
    false_alarms_unshifted: int


def run_seed(
    data: Obd,
    seed: int,
    events: int,
    signal: str,
    keep: float = 0.5,
    delta: float = 0.002,
    popularity_window: int = 5000,
    popularity_threshold: float = 0.25,
) -> SeedResult:
    def monitor() -> DriftMonitor:
        return DriftMonitor(
            ("reward_rate",),
            delta=delta,
            popularity_window=popularity_window,
            popularity_threshold=popularity_threshold,
        )

    if signal == "item_popularity":
        shifted, change = popularity_stream(data, events, seed)
        rng = np.random.default_rng(seed + 1_000_003)
        unshifted = data.items[rng.integers(0, len(data.items), size=2 * events)]
    else:
        shifted, change_or_none = reward_stream(data, events, seed, keep)
        assert change_or_none is not None
        change = change_or_none
        unshifted, _ = reward_stream(data, events, seed + 1_000_003, None)
    hits = detections(monitor(), shifted, signal)
    after = [h for h in hits if h >= change]
    return SeedResult(
        seed=seed,
        delay=after[0] - change if after else None,
        false_alarms_before_change=sum(1 for h in hits if h < change),
        false_alarms_unshifted=len(detections(monitor(), unshifted, signal)),
    )


def summarize(results: list[SeedResult], events: int) -> dict[str, object]:
    delays = [r.delay for r in results if r.delay is not None]
    fa = [r.false_alarms_unshifted for r in results]
    fa_before = [r.false_alarms_before_change for r in results]
    median = float(statistics.median(delays)) if delays else None
    return {
        "seeds": len(results),
        "detected": len(delays),
        "delay_median": median,
        "delay_p90": float(np.percentile(delays, 90)) if delays else None,
        "delay_max": max(delays) if delays else None,
        "false_alarms_unshifted_total": sum(fa),
        "false_alarms_unshifted_max_per_seed": max(fa),
        "seeds_with_false_alarm_unshifted": sum(1 for f in fa if f),
        "false_alarms_before_change_total": sum(fa_before),
        "ratio": median / events if median is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--path", type=Path, default=DEFAULT_DATA, help="OBD all.csv")
    ap.add_argument("--seeds", type=int, default=20, help="number of seeds (>= 1)")
    ap.add_argument("--events", type=int, default=200_000, help="events per half of a stream")
    ap.add_argument("--keep", type=float, default=0.5, help="share of clicks kept after change")
    ap.add_argument("--delta", type=float, default=0.002, help="ADWIN delta")
    # Not a multiple of the 5,000-event popularity window, so the change falls mid-window.
    ap.add_argument("--popularity-events", type=int, default=52_500, help="per half, popularity")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    # Each detection logs a warning; the table says the same thing once per seed.
    logging.basicConfig(level=logging.ERROR)
    if args.seeds < 1 or args.events < 1 or not 0 <= args.keep < 1:
        ap.error("--seeds and --events must be >= 1, --keep in [0, 1)")

    data = load_obd(args.path)
    print(
        f"OBD sample {args.path}: {len(data.clicks)} rows, {int(data.clicks.sum())} clicks "
        f"(CTR {data.clicks.mean():.4%}); {args.seeds} seeds"
    )
    report: dict[str, object] = {"data": str(args.path), "rows": len(data.clicks)}
    cases = [
        ("reward_rate", args.events, f"CTR x{args.keep:g} at the change point"),
        ("item_popularity", args.popularity_events, "half of the items vanish"),
    ]
    for signal, events, what in cases:
        t0 = time.perf_counter()
        results = [
            run_seed(data, seed, events, signal, keep=args.keep, delta=args.delta)
            for seed in range(args.seeds)
        ]
        summary = summarize(results, events)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        summary["events_per_half"] = events
        summary["shift"] = what
        summary["per_seed"] = [asdict(r) for r in results]
        report[signal] = summary
        print(f"\n{signal}: {events} events per half, {what} (ADWIN delta={args.delta})")
        print(f"{'seed':>4} {'delay':>8} {'FA before':>9} {'FA unshifted':>12}")
        for r in results:
            delay = "missed" if r.delay is None else str(r.delay)
            print(
                f"{r.seed:>4} {delay:>8} {r.false_alarms_before_change:>9} "
                f"{r.false_alarms_unshifted:>12}"
            )
        print(
            f"detected {summary['detected']}/{summary['seeds']}; delay median "
            f"{summary['delay_median']}, p90 {summary['delay_p90']}, max {summary['delay_max']}; "
            f"false alarms on unshifted streams: {summary['false_alarms_unshifted_total']} total, "
            f"max {summary['false_alarms_unshifted_max_per_seed']} per seed; "
            f"ratio (median delay / events per half) {summary['ratio']}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
