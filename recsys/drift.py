"""Drift detectors over named learning signals, and the learner's reaction to a detection.

    monitor = DriftMonitor.from_settings(settings.drift)
    if monitor.update("reward_rate", 1.0 if clicked else 0.0):
        reaction.trigger("reward_rate")
    monitor.update_item(item_id)            # popularity shift between windows (PSI)

Numeric signals go through a river detector each (ADWIN by default, Page-Hinkley by choice).
The item-popularity signal compares the item-frequency distribution of consecutive windows with
the population stability index. Every detection is counted in
``recsys_drift_detected_total{signal}``; the detector's estimate and the time of the last detection
are gauges. Signal names are a fixed set, so the label stays bounded.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from river import drift as river_drift

from recsys import metrics

if TYPE_CHECKING:
    from recsys.config import DriftSettings

log = logging.getLogger(__name__)

DetectorKind = Literal["adwin", "page_hinkley"]

#: Numeric signals a monitor may watch. Fixed, so ``signal`` labels stay bounded.
NUMERIC_SIGNALS: tuple[str, ...] = ("reward_rate", "mean_reward", "loss", "top_score")
#: The item-popularity distribution signal fed by :meth:`DriftMonitor.update_item`.
POPULARITY_SIGNAL = "item_popularity"


def make_detector(
    kind: DetectorKind = "adwin",
    *,
    delta: float = 0.002,
    ph_threshold: float = 50.0,
    ph_min_instances: int = 30,
) -> Any:
    """A fresh river drift detector. ``delta`` is ADWIN's confidence (smaller: fewer alarms)."""
    if kind == "adwin":
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        return river_drift.ADWIN(delta=delta)
    if kind == "page_hinkley":
        if ph_threshold <= 0:
            raise ValueError(f"ph_threshold must be > 0, got {ph_threshold}")
        if ph_min_instances < 1:
            raise ValueError(f"ph_min_instances must be >= 1, got {ph_min_instances}")
        return river_drift.PageHinkley(min_instances=ph_min_instances, threshold=ph_threshold)
    raise ValueError(f"kind must be 'adwin' or 'page_hinkley', got {kind!r}")


def psi(reference: Counter[str], current: Counter[str], epsilon: float = 1e-4) -> float:
    """Population stability index between two count tables: Σ (p−q)·ln(p/q).

    Proportions are floored at ``epsilon`` so an item missing from one window costs a bounded
    amount instead of infinity.
    """
    n_ref = sum(reference.values())
    n_cur = sum(current.values())
    if n_ref == 0 or n_cur == 0:
        raise ValueError("psi needs two non-empty windows")
    total = 0.0
    for key in reference.keys() | current.keys():
        p = max(current.get(key, 0) / n_cur, epsilon)
        q = max(reference.get(key, 0) / n_ref, epsilon)
        total += (p - q) * math.log(p / q)
    return total


class PopularityShift:
    """Drift in which items are popular: PSI between consecutive tumbling windows of item ids.

    ``update(item_id)`` returns True on the observation that closes a window whose PSI against
    the previous window exceeds ``threshold``. Memory is bounded by two windows' distinct ids.
    """

    def __init__(self, window: int = 5000, threshold: float = 0.25) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.window = window
        self.threshold = threshold
        self._reference: Counter[str] | None = None
        self._current: Counter[str] = Counter()
        self._seen = 0
        self.estimation = 0.0
        self.drift_detected = False
        self.window_closed = False  # True after the update that closed a window

    def update(self, item_id: str) -> bool:
        self.drift_detected = False
        self._current[item_id] += 1
        self._seen += 1
        self.window_closed = self._seen == self.window
        if not self.window_closed:
            return False
        if self._reference is not None:
            self.estimation = psi(self._reference, self._current)
            self.drift_detected = self.estimation > self.threshold
        self._reference, self._current, self._seen = self._current, Counter(), 0
        return self.drift_detected


class DriftMonitor:
    """One detector per named signal; exports detections, estimates and last-detection times.

    ``update(signal, value)`` feeds one observation and returns True when that observation made
    the detector fire. ``drift_detected`` is the result of the last update (any signal).
    Non-finite values are ignored (a NaN loss is counted elsewhere, as a skipped step).
    """

    def __init__(
        self,
        signals: Iterable[str] = NUMERIC_SIGNALS,
        *,
        detector: DetectorKind = "adwin",
        delta: float = 0.002,
        ph_threshold: float = 50.0,
        ph_min_instances: int = 30,
        popularity_window: int = 5000,
        popularity_threshold: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        wanted = tuple(signals)
        unknown = [s for s in wanted if s not in NUMERIC_SIGNALS]
        if unknown:
            raise ValueError(f"signals must be among {NUMERIC_SIGNALS}, got unknown {unknown}")
        self._detectors = {
            s: make_detector(
                detector,
                delta=delta,
                ph_threshold=ph_threshold,
                ph_min_instances=ph_min_instances,
            )
            for s in wanted
        }
        self._popularity = PopularityShift(popularity_window, popularity_threshold)
        self._clock = clock
        # Export zero counts from the start: Prometheus' increase() cannot see a first detection
        # on a series that appears already at 1.
        for signal in (*wanted, POPULARITY_SIGNAL):
            metrics.DRIFT_DETECTED.labels(signal=signal)
        self.detections: Counter[str] = Counter()
        self.drift_detected = False
        self.last_signal: str | None = None

    @classmethod
    def from_settings(
        cls, settings: DriftSettings, signals: Iterable[str] = NUMERIC_SIGNALS
    ) -> DriftMonitor:
        return cls(
            signals,
            detector=settings.detector,
            delta=settings.delta,
            ph_threshold=settings.ph_threshold,
            ph_min_instances=settings.ph_min_instances,
            popularity_window=settings.popularity_window,
            popularity_threshold=settings.popularity_threshold,
        )

    @property
    def signals(self) -> tuple[str, ...]:
        return tuple(self._detectors)

    def update(self, signal: str, value: float) -> bool:
        detector = self._detectors.get(signal)
        if detector is None:
            raise KeyError(f"signal {signal!r} is not monitored (monitored: {self.signals})")
        self.drift_detected = False
        if not math.isfinite(value):
            return False
        detector.update(value)
        if detector.drift_detected:
            self._fired(signal)
        elif isinstance(detector, river_drift.ADWIN):
            # ADWIN's estimate is the mean of its window: worth exporting on every check.
            # Page-Hinkley has no public estimate, so its gauge moves only on detections.
            metrics.DRIFT_ESTIMATE.labels(signal=signal).set(detector.estimation)
        return self.drift_detected

    def update_item(self, item_id: str) -> bool:
        """Feed one item observation (an impression or a click) to the popularity signal."""
        self.drift_detected = False
        if self._popularity.update(item_id):
            self._fired(POPULARITY_SIGNAL)
        elif self._popularity.window_closed:
            metrics.DRIFT_ESTIMATE.labels(signal=POPULARITY_SIGNAL).set(self._popularity.estimation)
        return self.drift_detected

    def estimate(self, signal: str) -> float:
        """ADWIN: mean of the current window; popularity: last PSI; Page-Hinkley: NaN."""
        if signal == POPULARITY_SIGNAL:
            return self._popularity.estimation
        detector = self._detectors[signal]
        return float(getattr(detector, "estimation", math.nan))

    def _fired(self, signal: str) -> None:
        self.drift_detected = True
        self.last_signal = signal
        self.detections[signal] += 1
        estimate = self.estimate(signal)
        metrics.DRIFT_DETECTED.labels(signal=signal).inc()
        metrics.DRIFT_LAST_TIMESTAMP.labels(signal=signal).set(self._clock())
        if math.isfinite(estimate):
            metrics.DRIFT_ESTIMATE.labels(signal=signal).set(estimate)
        log.warning("drift detected on %s (estimate %.6g)", signal, estimate)


class EventClock:
    """Stream time: the newest event time seen, in seconds (``-inf`` before any).

    What a :class:`DriftReaction` counts its duration in for the learner: live, event time
    follows the wall clock; in a replayed backfill (years of history in a minute) a detection
    expires with the history it was made in, instead of boosting the first minutes of live
    traffic.

    >>> clock = EventClock()
    >>> clock.advance(1_700_000_005_000); clock.advance(1_700_000_001_000)
    >>> clock()
    1700000005.0
    """

    def __init__(self) -> None:
        self._s = -math.inf

    def advance(self, ts_ms: int) -> None:
        """An event at ``ts_ms`` (epoch ms) was seen; older ones do not move the clock back."""
        self._s = max(self._s, ts_ms / 1000.0)

    def __call__(self) -> float:
        return self._s


class DriftReaction:
    """For ``duration_s`` after a detection, scale exploration and the learning rate up.

    The learner asks ``exploration_factor`` / ``lr_factor`` (1.0 when inactive) before each step;
    a detection during an active reaction extends it. State shows as
    ``recsys_drift_reaction_active`` and ``recsys_drift_reaction_factor{target}``.
    """

    def __init__(
        self,
        duration_s: float = 300.0,
        exploration_factor: float = 2.0,
        lr_factor: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, got {duration_s}")
        if exploration_factor < 1:
            raise ValueError(f"exploration_factor must be >= 1, got {exploration_factor}")
        if lr_factor <= 0:
            raise ValueError(f"lr_factor must be > 0, got {lr_factor}")
        self.duration_s = duration_s
        self._exploration = exploration_factor
        self._lr = lr_factor
        self._clock = clock
        self._until = -math.inf
        self._was_active = False
        self._export(False)

    @classmethod
    def from_settings(
        cls, settings: DriftSettings, clock: Callable[[], float] = time.monotonic
    ) -> DriftReaction:
        return cls(
            settings.reaction_duration_s,
            settings.reaction_exploration_factor,
            settings.reaction_lr_factor,
            clock,
        )

    def trigger(self, signal: str) -> None:
        if self.duration_s == 0:
            return
        self._until = self._clock() + self.duration_s
        metrics.DRIFT_REACTIONS.labels(signal=signal).inc()
        log.warning(
            "drift on %s: exploration x%.3g, learning rate x%.3g for %.0f s",
            signal,
            self._exploration,
            self._lr,
            self.duration_s,
        )
        self._export(True)

    @property
    def active(self) -> bool:
        on = self._clock() < self._until
        if on != self._was_active:
            if not on:
                log.info("drift reaction over: exploration and learning rate back to normal")
            self._export(on)
        return on

    @property
    def exploration_factor(self) -> float:
        return self._exploration if self.active else 1.0

    @property
    def lr_factor(self) -> float:
        return self._lr if self.active else 1.0

    def _export(self, on: bool) -> None:
        self._was_active = on
        metrics.DRIFT_REACTION_ACTIVE.set(1 if on else 0)
        metrics.DRIFT_REACTION_FACTOR.labels(target="exploration").set(
            self._exploration if on else 1.0
        )
        metrics.DRIFT_REACTION_FACTOR.labels(target="learning_rate").set(self._lr if on else 1.0)
