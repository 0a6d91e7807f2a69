"""The demo report: report.md, summary.json (every figure in the report) and PNG plots."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ArmSeries:
    """Per-interval counts for one policy arm of the closed-loop harness.

    ``t`` is seconds since the demo started; ``expected`` sums the simulator's true click
    probabilities of the shown slates (noise-free CTR), ``clicks`` the sampled clicks.
    """

    t: list[float] = field(default_factory=list)
    impressions: list[int] = field(default_factory=list)
    clicks: list[int] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)
    new_impressions: list[int] = field(default_factory=list)  # of items released live
    new_expected: list[float] = field(default_factory=list)

    def add(
        self,
        t: float,
        impressions: int,
        clicks: int,
        expected: float,
        new_impressions: int = 0,
        new_expected: float = 0.0,
    ) -> None:
        self.t.append(t)
        self.impressions.append(impressions)
        self.clicks.append(clicks)
        self.expected.append(expected)
        self.new_impressions.append(new_impressions)
        self.new_expected.append(new_expected)

    def new_item_ctr(self) -> float:
        """Expected CTR of the impressions of items released during the run (cold start)."""
        n = sum(self.new_impressions)
        return sum(self.new_expected) / n if n else math.nan

    def ctr(self, since: float = 0.0, expected: bool = True) -> float:
        """CTR over the intervals at or after ``since`` (NaN with no impressions)."""
        imp = sum(n for t, n in zip(self.t, self.impressions, strict=True) if t >= since)
        num = self.expected if expected else self.clicks
        hits = sum(c for t, c in zip(self.t, num, strict=True) if t >= since)
        return hits / imp if imp else math.nan


@dataclass
class DemoResult:
    """Everything the demo measured; the report is a view of this."""

    minutes: float
    arms: dict[str, ArmSeries]
    events_sent: int = 0
    freshness_s: list[float] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)
    drift_marks: list[tuple[float, str]] = field(default_factory=list)
    shift_at_s: float | None = None
    model_versions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        elapsed = max((t for arm in self.arms.values() for t in arm.t), default=0.0)
        last_third = elapsed * 2 / 3
        ctr_all = {name: arm.ctr() for name, arm in self.arms.items()}
        ctr_last = {name: arm.ctr(last_third) for name, arm in self.arms.items()}
        clicks_last = {name: arm.ctr(last_third, expected=False) for name, arm in self.arms.items()}
        ours = ctr_last.get("recsys", math.nan)
        ratios = {
            f"recsys_over_{name}": ours / v if v and not math.isnan(v) else math.nan
            for name, v in ctr_last.items()
            if name != "recsys"
        }
        first_third = elapsed / 3
        ctr_first = {name: _ctr_between(arm, 0.0, first_third) for name, arm in self.arms.items()}
        oracle_first = ctr_first.get("oracle", math.nan)
        oracle_last = ctr_last.get("oracle", math.nan)
        fresh = np.asarray(self.freshness_s, dtype=float)
        pct = {f"p{q}": float(np.percentile(fresh, q)) for q in (50, 95, 99)} if fresh.size else {}
        return {
            "minutes": self.minutes,
            "elapsed_s": elapsed,
            "events_sent": self.events_sent,
            "events_per_s": self.events_sent / elapsed if elapsed else 0.0,
            "ctr_expected_overall": ctr_all,
            "ctr_expected_last_third": ctr_last,
            "ctr_sampled_last_third": clicks_last,
            "ratios_last_third": ratios,
            "ctr_expected_first_third": ctr_first,
            "recsys_over_oracle_first_third": ctr_first.get("recsys", math.nan) / oracle_first
            if oracle_first
            else math.nan,
            "recsys_over_oracle_last_third": ours / oracle_last if oracle_last else math.nan,
            "new_item_ctr_expected": {n: a.new_item_ctr() for n, a in self.arms.items()},
            "new_item_impression_share": {
                n: sum(a.new_impressions) / max(sum(a.impressions), 1) for n, a in self.arms.items()
            },
            "freshness_s": {**pct, "n": int(fresh.size)},
            "model_versions": len(set(self.model_versions)),
            "last_model_version": self.model_versions[-1] if self.model_versions else None,
            "drift_detections": [{"t_s": t, "signal": s} for t, s in self.drift_marks],
            "preference_shift_at_s": self.shift_at_s,
            "losses_logged": len(self.losses),
            "notes": self.notes,
            **self.extra,
        }


def write_report(result: DemoResult, out: Path) -> Path:
    """Write report.md, summary.json and plots into ``out``; returns the report path."""
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    plots = _plot(result, out)
    report = out / "report.md"
    report.write_text(_markdown(summary, plots))
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, float | np.floating) and math.isnan(value):
        return None
    return str(value)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _markdown(summary: dict[str, Any], plots: list[str]) -> str:
    lines = [
        "# recsys closed-loop demo",
        "",
        f"{_fmt(summary['elapsed_s'], 0)} s of simulated traffic; "
        f"{summary['events_sent']} events sent ({_fmt(summary['events_per_s'], 1)} events/s); "
        f"{summary['model_versions']} model versions served.",
        "",
        "Each policy arm serves the same simulated users (fitted on MovieLens ratings) in its own",
        "copy of the simulated world; CTR is the simulator's true click probability of the shown",
        "slates (noise-free), per impression. `recsys` is the live system: broker, reward worker,",
        "learner and publisher as separate processes.",
        "",
        "| policy | CTR overall | CTR last third | sampled CTR last third |",
        "|---|---|---|---|",
    ]
    for name in summary["ctr_expected_overall"]:
        lines.append(
            f"| {name} | {_fmt(summary['ctr_expected_overall'][name])} "
            f"| {_fmt(summary['ctr_expected_last_third'][name])} "
            f"| {_fmt(summary['ctr_sampled_last_third'][name])} |"
        )
    lines += ["", "| ratio (last third) | value |", "|---|---|"]
    for name, value in summary["ratios_last_third"].items():
        lines.append(f"| {name} | {_fmt(value, 3)} |")
    lines += [
        "",
        "recsys / oracle: first third "
        f"{_fmt(summary.get('recsys_over_oracle_first_third'), 3)}, last third "
        f"{_fmt(summary.get('recsys_over_oracle_last_third'), 3)}.",
        "",
        "| policy | new-item CTR | new-item share of impressions |",
        "|---|---|---|",
    ]
    for name, v in summary.get("new_item_ctr_expected", {}).items():
        share = summary.get("new_item_impression_share", {}).get(name, math.nan)
        lines.append(f"| {name} | {_fmt(v)} | {_fmt(100 * share, 1)}% |")
    ope = summary.get("ope")
    if ope:
        lines += ["", _ope_line(ope)]
    ceilings = summary.get("ceilings_at_start")
    if ceilings:
        fixed = ceilings["best_fixed_slate"] / ceilings["oracle"]
        lines += [
            "",
            "What is reachable (the simulator's truth at the start, no fatigue): the oracle's CTR "
            f"{_fmt(ceilings['oracle'])}; the best single slate shown to everyone "
            f"{_fmt(ceilings['best_fixed_slate'])} ({_fmt(fixed, 2)}× the oracle), the most any "
            f"non-personalised policy can get; random {_fmt(ceilings['random'])}.",
        ]
    fresh = summary["freshness_s"]
    lines += [
        "",
        f"Freshness (event time → slate published), n={fresh.get('n', 0)}: "
        f"p50 {_fmt(fresh.get('p50'), 3)} s, p95 {_fmt(fresh.get('p95'), 3)} s, "
        f"p99 {_fmt(fresh.get('p99'), 3)} s.",
        "",
        f"Drift detections: {len(summary['drift_detections'])}"
        + (
            f" (preference shift injected at {_fmt(summary['preference_shift_at_s'], 0)} s)"
            if summary["preference_shift_at_s"] is not None
            else ""
        ),
        "",
    ]
    for note in summary["notes"]:
        lines.append(f"- {note}")
    lines.append("")
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    return "\n".join(lines)


def _ope_line(ope: dict[str, Any]) -> str:
    parts = [
        f"{n.upper()} {_fmt(ope[n]['value'])} [{_fmt(ope[n]['low'])}, {_fmt(ope[n]['high'])}]"
        for n in ("ips", "snips", "dr")
        if n in ope
    ]
    return (
        "OPE on recsys's own logs (last third): slot-0 CTR of the greedy policy of the newest "
        f"model version (exploration off): true {_fmt(ope['true']['value'])}; "
        + "; ".join(parts)
        + f" ({int(ope['rounds']['matches'])} of {int(ope['rounds']['value'])} rounds match)."
    )


def _plot(result: DemoResult, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, arm in result.arms.items():
        if not arm.t:
            continue
        times, ctr = _rolling_ctr(arm)
        ax.plot(times, ctr, label=name, linewidth=2.2 if name == "recsys" else 1.4)
    for mark, signal in result.drift_marks:
        ax.axvline(mark, color="red", alpha=0.3, linestyle=":")
        ax.annotate(
            signal, (mark, ax.get_ylim()[1]), fontsize=7, color="red", rotation=90, va="top"
        )
    if result.shift_at_s is not None:
        ax.axvline(result.shift_at_s, color="black", linestyle="--", label="preference shift")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("CTR (true click probability per impression)")
    ax.set_title("CTR over time: recsys against baselines in the same harness")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ctr.png", dpi=110)
    plt.close(fig)
    written.append("ctr.png")

    oracle = result.arms.get("oracle")
    if oracle is not None and oracle.t:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        _, ctr_o = _rolling_ctr(oracle)
        for name, arm in result.arms.items():
            if name == "oracle" or not arm.t:
                continue
            times, ctr = _rolling_ctr(arm)
            n = min(len(times), len(ctr), len(ctr_o))
            with np.errstate(invalid="ignore", divide="ignore"):
                ax.plot(
                    times[:n],
                    ctr[:n] / ctr_o[:n],
                    label=name,
                    linewidth=2.2 if name == "recsys" else 1.4,
                )
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("CTR / oracle CTR (rolling)")
        ax.set_title("Ratio to the oracle over time")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "ratio_to_oracle.png", dpi=110)
        plt.close(fig)
        written.append("ratio_to_oracle.png")

        fig, ax = plt.subplots(figsize=(8, 3.8))
        names = [n for n, a in result.arms.items() if a.t]
        values = [result.arms[n].new_item_ctr() for n in names]
        ax.bar(names, [0.0 if math.isnan(v) else v for v in values], color="tab:green")
        shares = [sum(result.arms[n].new_impressions) / max(sum(result.arms[n].impressions), 1)
                  for n in names]  # fmt: skip
        for x, (v, sh) in enumerate(zip(values, shares, strict=True)):
            label = "n/a" if math.isnan(v) else f"{v:.3f}\n{100 * sh:.1f}% imp."
            ax.annotate(label, (x, 0.0 if math.isnan(v) else v), ha="center", va="bottom",
                        fontsize=7)  # fmt: skip
        ax.set_ylabel("expected CTR of new items")
        ax.set_title("Cold start: items released during the run (CTR and share of impressions)")
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        fig.savefig(out / "new_items.png", dpi=110)
        plt.close(fig)
        written.append("new_items.png")

    if result.freshness_s:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.hist(result.freshness_s, bins=40, color="tab:blue")
        p99 = float(np.percentile(np.asarray(result.freshness_s), 99))
        ax.axvline(p99, color="red", linestyle="--", label=f"p99 {p99:.2f} s")
        ax.set_xlabel("seconds from event to published slate")
        ax.set_ylabel("slates")
        ax.set_title("Freshness")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "freshness.png", dpi=110)
        plt.close(fig)
        written.append("freshness.png")

    if result.losses:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        keys = sorted({k for row in result.losses for k in row} - {"t", "step"})
        loss_times = [row.get("t", i) for i, row in enumerate(result.losses)]
        for key in keys:
            ax.plot(loss_times, [row.get(key, math.nan) for row in result.losses], label=key)
        for mark_t, _ in result.drift_marks:
            ax.axvline(mark_t, color="red", alpha=0.3, linestyle=":")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("loss")
        ax.set_title("Learner losses")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=110)
        plt.close(fig)
        written.append("loss.png")
    return written


def _ctr_between(arm: ArmSeries, since: float, until: float) -> float:
    imp = sum(n for t, n in zip(arm.t, arm.impressions, strict=True) if since <= t < until)
    hits = sum(e for t, e in zip(arm.t, arm.expected, strict=True) if since <= t < until)
    return hits / imp if imp else math.nan


def _rolling_ctr(arm: ArmSeries, window: int = 10) -> tuple[np.ndarray, np.ndarray]:
    imp = np.convolve(np.asarray(arm.impressions, float), np.ones(window), mode="valid")
    exp = np.convolve(np.asarray(arm.expected, float), np.ones(window), mode="valid")
    t = np.asarray(arm.t[window - 1 :] if len(arm.t) >= window else arm.t[-1:], float)
    if imp.size == 0 or len(arm.t) < window:  # fewer intervals than the window: one point
        total = max(sum(arm.impressions), 1)
        return np.asarray(arm.t[-1:]), np.asarray([sum(arm.expected) / total])
    with np.errstate(invalid="ignore", divide="ignore"):
        return t, np.where(imp > 0, exp / imp, np.nan)
