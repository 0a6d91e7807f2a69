"""Generate the Grafana dashboards and the Kubernetes PrometheusRule from one source of truth.

    .venv/bin/python deploy/generate.py            # rewrite deploy/grafana/*.json and the rule CR
    .venv/bin/python deploy/generate.py --check    # exit 1 if a committed file is out of date

Dashboards are plain Grafana JSON (schemaVersion 39, Grafana >= 10) with a ``datasource``
template variable of type prometheus, so they import as they are, through the UI or the
Grafana sidecar (deploy/k8s/base/kustomization.yaml turns them into a ConfigMap).
"""

# PromQL expressions read better unbroken than split across string fragments.
# ruff: noqa: E501

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
GRAFANA = DEPLOY / "grafana"
RULES = DEPLOY / "prometheus" / "recsys-alerts.yml"
RULE_CR = DEPLOY / "k8s" / "base" / "prometheusrule.yaml"

DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def _panel(
    kind: str, title: str, targets: list[tuple[str, str]], unit: str, desc: str
) -> dict[str, Any]:
    panel: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "targets": [_target(e, lg, chr(ord("A") + i)) for i, (e, lg) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
    }
    return panel


def ts(title: str, targets: list[tuple[str, str]], unit: str = "short", desc: str = "") -> Any:
    return _panel("timeseries", title, targets, unit, desc)


def stat(title: str, targets: list[tuple[str, str]], unit: str = "short", desc: str = "") -> Any:
    return _panel("stat", title, targets, unit, desc)


def dashboard(uid: str, title: str, panels: list[dict[str, Any]]) -> dict[str, Any]:
    # Two panels per row, 12 units wide, 8 high; ids and positions are assigned here so the
    # panel lists above stay readable.
    laid_out = []
    for i, panel in enumerate(panels):
        laid_out.append(
            {"id": i + 1, "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}}
            | panel
        )
    return {
        "uid": uid,
        "title": title,
        "tags": ["recsys"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["recsys"], "asDropdown": True, "title": "recsys"}
        ],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                }
            ]
        },
        "panels": laid_out,
    }


def dashboards() -> dict[str, dict[str, Any]]:
    ingestion = dashboard(
        "recsys-ingestion",
        "recsys / ingestion",
        [
            ts(
                "Events consumed /s",
                [
                    (
                        f"sum by (worker, topic) (rate(recsys_events_consumed_total[{RATE}]))",
                        "{{worker}} {{topic}}",
                    )
                ],
                "ops",
            ),
            ts(
                "Events rejected /s by worker and reason",
                [
                    (
                        f"sum by (reason, worker) (rate(recsys_events_rejected_total[{RATE}]))",
                        "{{worker}}: {{reason}}",
                    )
                ],
                "ops",
                "Validation failures; each is also written to the dead-letter topic.",
            ),
            ts(
                "Dead-lettered and duplicate events /s",
                [
                    (f"sum by (reason) (rate(recsys_events_dlq_total[{RATE}]))", "DLQ {{reason}}"),
                    (f"sum(rate(recsys_events_duplicate_total[{RATE}]))", "duplicates"),
                ],
                "ops",
            ),
            ts(
                "Consumer lag by topic",
                [("sum by (worker, topic) (recsys_consumer_lag)", "{{worker}} {{topic}}")],
                "short",
                "Messages behind the log end. Rising lag: scale out (up to one replica per partition).",
            ),
            ts(
                "Consumer lag by partition",
                [("max by (topic, partition) (recsys_consumer_lag)", "{{topic}}/{{partition}}")],
            ),
            ts(
                "Committed-offset lag by worker and topic",
                [
                    (
                        "sum by (worker, topic) (recsys_consumer_committed_lag)",
                        "{{worker}} {{topic}}",
                    )
                ],
                "short",
                "Messages after the committed offset: what a restart or rebalance would re-read. "
                "Far above the consumer lag means the commit is held back.",
            ),
            ts(
                "Batch processing time p50 / p99",
                [
                    (
                        f"histogram_quantile(0.5, sum by (le, worker) (rate(recsys_batch_seconds_bucket[{RATE}])))",
                        "p50 {{worker}}",
                    ),
                    (
                        f"histogram_quantile(0.99, sum by (le, worker) (rate(recsys_batch_seconds_bucket[{RATE}])))",
                        "p99 {{worker}}",
                    ),
                ],
                "s",
            ),
            ts(
                "Paused partitions (back-pressure)",
                [("sum by (worker) (recsys_paused_partitions)", "{{worker}}")],
            ),
            ts(
                "Producers replaced (wedged flush)",
                [
                    (
                        f"sum by (worker) (increase(recsys_producers_replaced_total[{RATE}]))",
                        "{{worker}}",
                    )
                ],
                "short",
                "A flush that did not finish in time: the worker replaced its producer and "
                "re-read the batch. Repeated during a broker outage; otherwise worth a look.",
            ),
            ts(
                "Bounded caches: entries / capacity",
                [
                    (
                        "max by (job, cache) (recsys_cache_entries) / "
                        "max by (job, cache) (recsys_cache_capacity)",
                        "{{job}} {{cache}}",
                    )
                ],
                "percentunit",
                "Per-user and per-item state held in memory against its bound (RECSYS_*__MAX_*).",
            ),
            ts(
                "Cache evictions /s",
                [
                    (
                        f"sum by (job, cache) (rate(recsys_cache_evictions_total[{RATE}]))",
                        "{{job}} {{cache}}",
                    )
                ],
                "ops",
                "Evicted entries; a user evicted from a store-backed cache is reloaded on the "
                "next event.",
            ),
            stat(
                "Workers up",
                [('sum by (job) (up{job=~".*recsys.*"})', "{{job}}")],
                desc="Scrape targets answering /metrics.",
            ),
        ],
    )
    rewards = dashboard(
        "recsys-rewards",
        "recsys / rewards",
        [
            ts(
                "Rewards emitted /s by kind",
                [(f"sum by (kind) (rate(recsys_rewards_emitted_total[{RATE}]))", "{{kind}}")],
                "ops",
            ),
            ts(
                "Mean reward by kind",
                [
                    (
                        f"(sum by (kind) (rate(recsys_reward_positive_sum_total[{RATE}])) - "
                        f"sum by (kind) (rate(recsys_reward_negative_sum_total[{RATE}]))) / "
                        f"sum by (kind) (rate(recsys_rewards_emitted_total[{RATE}]))",
                        "{{kind}}",
                    )
                ],
            ),
            ts(
                "Feedback events /s by type",
                [(f"sum by (type) (rate(recsys_feedback_events_total[{RATE}]))", "{{type}}")],
                "ops",
            ),
            ts(
                "Late feedback /s",
                [
                    (f"sum(rate(recsys_feedback_late_total[{RATE}]))", "late feedback"),
                    (f"sum(rate(recsys_impressions_late_total[{RATE}]))", "late impressions"),
                ],
                "ops",
                "Feedback arriving after the attribution window plus allowed lateness, and "
                "impressions arriving after everything remembered of them (no outcome).",
            ),
            ts("Open attribution windows", [("sum(recsys_open_windows)", "open")]),
            ts("Dedupe memory (event_ids)", [("sum(recsys_dedupe_entries)", "event_ids")]),
        ],
    )
    learner = dashboard(
        "recsys-learner",
        "recsys / learner",
        [
            ts(
                "Gradient steps /s and samples /s",
                [
                    (f"sum(rate(recsys_learner_steps_total[{RATE}]))", "steps/s"),
                    (f"sum(rate(recsys_learner_samples_total[{RATE}]))", "samples/s"),
                ],
                "ops",
            ),
            ts("Loss by term", [("max by (loss) (recsys_learner_loss)", "{{loss}}")]),
            ts(
                "Skipped non-finite steps",
                [(f"sum(increase(recsys_learner_skipped_steps_total[{RATE}]))", "skipped")],
            ),
            ts(
                "Reward head refit seconds (p50, max)",
                [
                    (
                        "histogram_quantile(0.5, sum by (le) "
                        f"(rate(recsys_learner_reward_refit_seconds_bucket[{RATE}])))",
                        "p50",
                    ),
                    (
                        "histogram_quantile(1.0, sum by (le) "
                        f"(rate(recsys_learner_reward_refit_seconds_bucket[{RATE}])))",
                        "max",
                    ),
                ],
                "s",
            ),
            ts(
                "Replay buffer fill",
                [
                    (
                        "sum(recsys_replay_buffer_size) / sum(recsys_replay_buffer_capacity)",
                        "fill",
                    )
                ],
                "percentunit",
            ),
            stat(
                "Checkpoint age",
                [("time() - max(recsys_checkpoint_timestamp_seconds)", "age")],
                "s",
                "Seconds since the newest checkpoint; alert RecsysNoCheckpoint fires past 15 min.",
            ),
            ts(
                "Checkpoints written",
                [(f"sum(increase(recsys_checkpoints_written_total[{RATE}]))", "checkpoints")],
            ),
            ts("Model version in use", [("max by (worker) (recsys_model_version)", "{{worker}}")]),
            ts(
                "Model store calls",
                [
                    (
                        f"sum by (op, result) (increase(recsys_model_store_operations_total[{RATE}]))",
                        "{{op}} {{result}}",
                    )
                ],
                "short",
                "publish: the learner's uploads; sync: publishers (and a learner starting on an "
                "empty volume) downloading new versions. Alert RecsysModelStoreFailing fires when "
                "calls fail and none succeed for 10 min.",
            ),
            stat(
                "Since the last model store success",
                [
                    (
                        "time() - max by (op) (recsys_model_store_last_success_timestamp_seconds)",
                        "{{op}}",
                    )
                ],
                "s",
                "Seconds since a publish (learner) or sync (publishers) last succeeded.",
            ),
            ts(
                "Model store call p99",
                [
                    (
                        "histogram_quantile(0.99, sum by (le, op) "
                        f"(rate(recsys_model_store_seconds_bucket[{RATE}])))",
                        "{{op}}",
                    )
                ],
                "s",
            ),
            ts(
                "Drift reaction factors",
                [("max by (target) (recsys_drift_reaction_factor)", "{{target}}")],
                desc="Multipliers on exploration and learning rate; 1 when no reaction is active.",
            ),
        ],
    )
    publisher = dashboard(
        "recsys-publisher",
        "recsys / publisher and encoder",
        [
            ts(
                "Slates published /s",
                [(f"sum(rate(recsys_slates_published_total[{RATE}]))", "slates/s")],
                "ops",
            ),
            ts(
                "Freshness p50 / p90 / p99 (target p99 < 2 s)",
                [
                    (
                        f"histogram_quantile({q}, sum by (le) (rate(recsys_freshness_seconds_bucket[{RATE}])))",
                        f"p{int(q * 100)}",
                    )
                    for q in (0.5, 0.9, 0.99)
                ],
                "s",
                "Event time of the triggering event to slate published.",
            ),
            ts("Mean top-1 score", [("avg(recsys_top_score_mean)", "top score")]),
            ts(
                "Model swaps (hot reloads)",
                [(f"sum(increase(recsys_model_swaps_total[{RATE}]))", "swaps")],
            ),
            ts(
                "Fenced publisher batches",
                [(f"sum(increase(recsys_store_fenced_batches_total[{RATE}]))", "fenced")],
                "short",
                "Batches the store refused because another replica had stored newer state of "
                "their partition: a replica that lost partitions while it worked. Its batch is "
                "re-read; a steady rate means replicas fight over partitions.",
            ),
            ts(
                "Items encoded /s and cache hits /s",
                [
                    (f"sum(rate(recsys_items_encoded_total[{RATE}]))", "encoded"),
                    (f"sum(rate(recsys_item_cache_hits_total[{RATE}]))", "cache hits"),
                ],
                "ops",
            ),
            ts(
                "Item cache hit ratio",
                [
                    (
                        f"sum(rate(recsys_item_cache_hits_total[{RATE}])) / "
                        f"(sum(rate(recsys_item_cache_hits_total[{RATE}])) + sum(rate(recsys_items_encoded_total[{RATE}])))",
                        "hit ratio",
                    )
                ],
                "percentunit",
            ),
            ts(
                "Unknown items /s (id-only)",
                [(f"sum(rate(recsys_items_unknown_total[{RATE}]))", "unknown")],
                "ops",
            ),
        ],
    )
    drift = dashboard(
        "recsys-drift",
        "recsys / drift",
        [
            ts(
                "Drift detections by signal",
                [
                    (
                        f"sum by (signal) (increase(recsys_drift_detected_total[{RATE}]))",
                        "{{signal}}",
                    )
                ],
            ),
            ts(
                "Detector estimate by signal",
                [("max by (signal) (recsys_drift_estimate)", "{{signal}}")],
                desc="ADWIN: mean of the current window; item_popularity: PSI of the last window.",
            ),
            stat(
                "Time since last detection",
                [
                    (
                        "time() - max by (signal) (recsys_drift_last_detected_timestamp_seconds)",
                        "{{signal}}",
                    )
                ],
                "s",
            ),
            stat("Drift reaction active", [("max(recsys_drift_reaction_active)", "active")]),
            ts(
                "Drift reactions started",
                [
                    (
                        f"sum by (signal) (increase(recsys_drift_reactions_total[{RATE}]))",
                        "{{signal}}",
                    )
                ],
            ),
            ts(
                "Reward rate and top score (the monitored signals)",
                [
                    (
                        f"(sum(rate(recsys_reward_positive_sum_total[{RATE}])) - "
                        f"sum(rate(recsys_reward_negative_sum_total[{RATE}]))) / "
                        f"sum(rate(recsys_rewards_emitted_total[{RATE}]))",
                        "mean reward",
                    ),
                    ("avg(recsys_top_score_mean)", "mean top score"),
                ],
            ),
        ],
    )
    return {
        "ingestion.json": ingestion,
        "rewards.json": rewards,
        "learner.json": learner,
        "publisher.json": publisher,
        "drift.json": drift,
    }


def prometheus_rule() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    cr = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "recsys-alerts", "labels": {"app.kubernetes.io/part-of": "recsys"}},
        "spec": {"groups": groups},
    }
    header = (
        "# Generated from deploy/prometheus/recsys-alerts.yml by deploy/generate.py; do not edit.\n"
    )
    return header + yaml.dump(cr, Dumper=_BlockDumper, sort_keys=False, width=120)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, as in the source rule file."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def outputs() -> dict[Path, str]:
    files = {GRAFANA / name: json.dumps(d, indent=2) + "\n" for name, d in dashboards().items()}
    files[RULE_CR] = prometheus_rule()
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    args = ap.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(DEPLOY.parent)}")
    for path in stale:
        print(f"stale: {path.relative_to(DEPLOY.parent)}; run deploy/generate.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
