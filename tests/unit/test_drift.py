"""Drift detectors: API, metrics export, the reaction, and detection on the real OBD sample."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from prometheus_client import REGISTRY

from recsys import datasets
from recsys.config import load_settings
from recsys.drift import (
    DetectorKind,
    DriftMonitor,
    DriftReaction,
    PopularityShift,
    make_detector,
    psi,
)
from recsys.testing import drift as drift_streams

OBD = datasets.path("obd") / "all.csv"


def _sample(name: str, labels: dict[str, str]) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_constructor_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="delta"):
        make_detector("adwin", delta=0)
    with pytest.raises(ValueError, match="ph_threshold"):
        make_detector("page_hinkley", ph_threshold=-1)
    with pytest.raises(ValueError, match="kind"):
        make_detector("cusum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="signals"):
        DriftMonitor(["user_42_ctr"])
    with pytest.raises(ValueError, match="window"):
        PopularityShift(window=1)
    with pytest.raises(ValueError, match="duration_s"):
        DriftReaction(duration_s=-1)
    with pytest.raises(ValueError, match="exploration_factor"):
        DriftReaction(exploration_factor=0.5)


def test_unknown_signal_is_a_key_error() -> None:
    monitor = DriftMonitor(["loss"])
    with pytest.raises(KeyError, match="mean_reward"):
        monitor.update("mean_reward", 1.0)


@pytest.mark.parametrize("kind", ["adwin", "page_hinkley"])
def test_mean_shift_fires_and_is_exported(kind: DetectorKind) -> None:
    rng = np.random.default_rng(7)
    stream = np.concatenate([rng.normal(1.0, 0.1, 3000), rng.normal(3.0, 0.1, 3000)])
    before = _sample("recsys_drift_detected_total", {"signal": "loss"})
    monitor = DriftMonitor(["loss"], detector=kind, ph_threshold=20.0, clock=lambda: 1234.5)
    hits = [i for i, v in enumerate(stream) if monitor.update("loss", float(v))]
    assert hits, "a 20-sigma jump must be detected"
    assert 3000 <= hits[0] < 3200
    assert all(h >= 3000 for h in hits), f"false alarms before the change: {hits}"
    assert monitor.detections["loss"] == len(hits)
    assert _sample("recsys_drift_detected_total", {"signal": "loss"}) - before == len(hits)
    assert _sample("recsys_drift_last_detected_timestamp_seconds", {"signal": "loss"}) == 1234.5
    if kind == "adwin":
        # ADWIN drops the old window on detection: its estimate follows the new level.
        assert monitor.estimate("loss") == pytest.approx(3.0, abs=0.1)


def test_non_finite_values_are_ignored() -> None:
    monitor = DriftMonitor(["loss"])
    for _ in range(100):
        monitor.update("loss", 1.0)
    assert monitor.update("loss", math.nan) is False
    assert monitor.update("loss", math.inf) is False
    assert monitor.estimate("loss") == pytest.approx(1.0)


def test_psi_known_values() -> None:
    same = Counter({"a": 50, "b": 50})
    assert psi(same, same) == 0.0
    shifted = Counter({"a": 90, "b": 10})
    expected = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert psi(same, shifted) == pytest.approx(expected)
    with pytest.raises(ValueError, match="non-empty"):
        psi(Counter(), same)


def test_popularity_shift_on_obd_items() -> None:
    bench = drift_streams
    data = bench.load_obd(OBD)
    hits = []
    monitor = DriftMonitor(["reward_rate"], popularity_window=2000, popularity_threshold=0.25)
    stream, change = bench.popularity_stream(data, 10_000, seed=3)
    estimates = []
    for i, item in enumerate(stream.tolist()):
        if monitor.update_item(str(item)):
            hits.append(i)
            estimates.append(monitor.estimate("item_popularity"))
    # Windows close every 2,000 events and 10,000 is a multiple: the first post-change window
    # closes 1,999 events after the change. Once both windows are post-change, PSI falls again.
    assert hits == [change + 1999]
    assert monitor.last_signal == "item_popularity"
    assert estimates[0] > 0.25
    assert monitor.estimate("item_popularity") < 0.25


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reward_rate_drop_on_obd_detected_with_no_false_alarm(seed: int) -> None:
    """Smaller, stronger version of benchmarks/drift_detection.py: every click removed after
    30,000 bootstrapped OBD events (CTR 0.38% -> 0). The benchmark runs the halving over 20 seeds.
    """
    bench = drift_streams
    data = bench.load_obd(OBD)
    result = bench.run_seed(data, seed, events=30_000, signal="reward_rate", keep=0.0)
    assert result.delay is not None, "drop to zero CTR not detected"
    assert result.delay < 15_000
    assert result.false_alarms_before_change == 0
    assert result.false_alarms_unshifted == 0


def test_reaction_scales_for_its_duration_then_stops() -> None:
    now = [100.0]
    reaction = DriftReaction(
        duration_s=60, exploration_factor=3.0, lr_factor=0.5, clock=lambda: now[0]
    )
    assert (reaction.active, reaction.exploration_factor, reaction.lr_factor) == (False, 1.0, 1.0)
    assert _sample("recsys_drift_reaction_active", {}) == 0
    reaction.trigger("reward_rate")
    assert reaction.active
    assert (reaction.exploration_factor, reaction.lr_factor) == (3.0, 0.5)
    assert _sample("recsys_drift_reaction_active", {}) == 1
    assert _sample("recsys_drift_reaction_factor", {"target": "exploration"}) == 3.0
    now[0] += 59
    assert reaction.active
    now[0] += 2
    assert not reaction.active
    assert reaction.lr_factor == 1.0
    assert _sample("recsys_drift_reaction_active", {}) == 0
    assert _sample("recsys_drift_reaction_factor", {"target": "learning_rate"}) == 1.0


def test_from_settings_uses_the_drift_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_DRIFT__DETECTOR", "page_hinkley")
    monkeypatch.setenv("RECSYS_DRIFT__REACTION_DURATION_S", "0")
    settings = load_settings()
    monitor = DriftMonitor.from_settings(settings.drift)
    assert monitor.signals == ("reward_rate", "mean_reward", "loss", "top_score")
    assert math.isnan(monitor.estimate("loss"))  # Page-Hinkley has no estimate
    reaction = DriftReaction.from_settings(settings.drift)
    reaction.trigger("loss")  # duration 0: disabled
    assert not reaction.active
