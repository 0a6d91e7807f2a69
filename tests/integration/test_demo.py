"""`recsys demo` end to end, short: broker, four worker processes, simulator, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_from_an_empty_directory_writes_a_complete_report(tmp_path: Path) -> None:
    """No --data, cwd a fresh temp dir with no ../shared beside it: the installed package alone
    must be enough. A subprocess of the CLI, so the demo's module path does not matter. (One
    demo run for both checks: each costs a broker, four workers and a minute.)"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = ["demo", "--minutes", "0.75", "--visits-per-s", "4", "--no-warm-start"]
    args += ["--out", "report"]
    proc = subprocess.run(
        [sys.executable, "-m", "recsys", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The simulator's users came from the packaged MovieLens copy, loaded in full.
    assert "recsys/datasets/ml-latest-small (ml-latest): 100836 ratings, 9742 movies" in proc.stderr
    out = tmp_path / "report"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["events_sent"] > 100
    assert set(summary["ctr_expected_overall"]) == {
        "recsys", "random", "most_popular", "epsilon_greedy", "linucb", "vw", "oracle"
    }  # fmt: skip
    # The oracle knows the true click probabilities: nothing may beat it in its own world.
    ctr = summary["ctr_expected_overall"]
    assert all(ctr["oracle"] >= v for v in ctr.values())
    ceilings = summary["ceilings_at_start"]
    assert ceilings["oracle"] > ceilings["best_fixed_slate"] > ceilings["random"] > 0
    assert summary["slates_received"] > 0, "the publisher pushed slates into the loop"
    assert summary["freshness_s"]["n"] > 0
    report = (out / "report.md").read_text()
    assert "| recsys |" in report
    assert "best single slate shown to everyone" in report
    for plot in ("ctr.png", "freshness.png"):
        assert (out / plot).stat().st_size > 1000
    for worker in ("encoder", "reward", "learner", "publisher"):
        assert "Traceback" not in (out / "logs" / f"{worker}.log").read_text()


def test_the_app_shows_unseen_users_the_stored_cold_start_slate(
    kafka_settings, topic_prefix, tmp_path
):
    """As in production: no slate pushed for the user yet -> the store's cold_start row."""
    from recsys.demo.run import _SlateFeed, store_url
    from recsys.events import Slate, SlateItem
    from recsys.kafka import create_topics
    from recsys.store import Store

    topic = f"{topic_prefix}.recs"
    create_topics(kafka_settings, [topic], 1)
    feed = _SlateFeed(kafka_settings, topic, store_url(tmp_path))
    try:
        assert feed.cold_start() is None  # nothing stored yet: the app falls back to random
        cold = Slate("r1", "", "v000000000003", 1, (SlateItem("m1", 0.5, 0.25, 0),))
        with Store(store_url(tmp_path)) as store:
            store.save_batch([], cold_start=cold)
        feed._cold_read = float("-inf")  # skip the refresh interval
        got = feed.cold_start()
        assert got is not None
        assert got.items == cold.items
        assert got.model_version == "v000000000003"
    finally:
        feed.close()
