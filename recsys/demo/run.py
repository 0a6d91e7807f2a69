"""`recsys demo`: the whole system in a closed loop on one machine, then a report.

The embedded broker, the encoder, reward, learner and publisher workers (subprocesses, as in
production) and a user simulator fitted on MovieLens. Users arrive at a set rate; each visit
shows the newest slate the publisher pushed for that user or, for a user it has none for, the
publisher's stored cold-start slate, as production serves them (a random slate until the
first is stored), and the simulator's impressions and feedback go back to the events topic.

The same arrivals are served, each in its own copy of the simulated world, by the peers of
:mod:`recsys.demo.arms` (random, most-popular, an ε-greedy bandit, LinUCB, Vowpal Wabbit) and by
the oracle, so every CTR in the report is measured in the same run. Only recsys's visits keep
to the wall clock; the peers play the same visits, each at its own simulated time, in the app
loop's spare time and after the live phase (:mod:`recsys.demo.playback`). Before the live phase the
system is warmed with the catalogue's MovieLens ratings (a backfill, as a deployment would
start); every peer warm-starts from the same events, and every arm masks what the user watched
exactly as recsys does.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import sys
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaProducer
from kafka.structs import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from recsys import checkpoint as ckpt
from recsys import datasets
from recsys.broker import EmbeddedBroker, free_port
from recsys.config import KafkaSettings, TopicSettings
from recsys.data.backfill import replay, replay_items
from recsys.data.movielens import MovieLens, load_movielens
from recsys.demo.arms import Arm, reduce_vectors
from recsys.demo.playback import ArmTally, PeerPlayer, VisitSchedule
from recsys.demo.report import DemoResult, write_report
from recsys.demo.simulator import SimConfig, UserSimulator
from recsys.demo.supervisor import WorkerProcess
from recsys.errors import ConfigError, RecsysError
from recsys.events import Event, Slate
from recsys.history import not_allowed
from recsys.kafka import create_topics, make_consumer, make_producer
from recsys.serving.model import load_serving_model
from recsys.serving.watcher import ModelWatcher
from recsys.store import Store

log = logging.getLogger(__name__)

WORKER_NAMES = ("encoder", "reward", "learner", "publisher")
PEERS = ("random", "most_popular", "epsilon_greedy", "linucb", "vw")
ARMS = ("recsys", *PEERS, "oracle")
COLD_REFRESH_S = 2.0  # how often the app re-reads the stored cold-start slate


@dataclass(frozen=True)
class DemoConfig:
    """Parameters of one demo run.

    ``visits_per_s``: users served per second (each sees a slate of ``k``); ``shift_at``: the
    fraction of the live phase after which users' preferences shift (None: no shift);
    ``peers_live``: play the peers during the live phase, in the app loop's spare time, so the
    progress line shows them; by default they play after it, because on a small machine their
    CPU is taken from the workers under test (2 cores: recsys's last third 0.0209 with them
    live, 0.0223 after; the peers' figures are the same either way).
    """

    minutes: float = 4.0
    out: Path = Path("demo-report")
    data: Path = field(default_factory=lambda: datasets.path("ml-latest-small"))
    visits_per_s: float = 15.0
    k: int = 10
    n_items: int = 1000
    seed: int = 0
    partitions: int = 2
    shift_at: float | None = None
    warm_start: bool = True
    peers_live: bool = False

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ConfigError(f"minutes must be > 0, got {self.minutes}")
        if not self.visits_per_s > 0:
            raise ConfigError(f"visits_per_s must be > 0, got {self.visits_per_s}")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if self.shift_at is not None and not 0 < self.shift_at < 1:
            raise ConfigError(f"shift_at must be in (0, 1), got {self.shift_at}")

    def movielens_path(self) -> Path:
        for candidate in (self.data, self.data / "ml-latest-small"):
            if (
                (candidate / "ratings.csv").is_file()
                or (candidate / "u.data").is_file()
                or (candidate / "ratings.dat").is_file()
            ):
                return candidate
        raise ConfigError(
            f"--data {self.data}: no MovieLens ratings there (ratings.csv, u.data or ratings.dat)"
        )


def store_url(out: Path) -> str:
    """The demo's SQL store: a SQLite file in the output directory."""
    return f"sqlite:///{(out / 'recsys.db').resolve()}"


def worker_env(bootstrap: str, out: Path, topics: TopicSettings, port: int) -> dict[str, str]:
    """RECSYS_* settings the demo gives every worker: short windows and fast cadences."""
    return {
        "RECSYS_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "RECSYS_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "RECSYS_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "RECSYS_TOPICS__PARTITIONS": str(topics.partitions),
        "RECSYS_STORE__URL": store_url(out),
        "RECSYS_METRICS__PORT": str(port),
        "RECSYS_LEARNER__CHECKPOINT_DIR": str((out / "checkpoints").resolve()),
        "RECSYS_LEARNER__CHECKPOINT_EVERY_S": "5",
        # A smaller network than the default: four workers and the simulator share 2 cores.
        "RECSYS_LEARNER__DIM": "32",
        "RECSYS_LEARNER__LAYERS": "1",
        "RECSYS_LEARNER__MAX_HISTORY": "20",
        "RECSYS_REWARDS__WINDOW_MS": "20000",
        "RECSYS_REWARDS__ALLOWED_LATENESS_MS": "2000",
        "RECSYS_REWARDS__LATE_RETENTION_MS": "10000",
        "RECSYS_PUBLISHER__WATCH_INTERVAL_S": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


class _Scraper:
    """Reads a worker's /metrics (the demo's window into the worker processes)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        try:
            with urllib.request.urlopen(self.url, timeout=1.0) as resp:  # noqa: S310 - loopback
                text = resp.read().decode()
        except OSError:
            return []
        return [
            (s.name, s.labels, s.value)
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        ]


def _backfill(ml: MovieLens, items: set[str]) -> list[Event]:
    """The ratings of the catalogue's initial items, as events in time order."""
    return [e for e in ml.events() if e.item_id in items]


def run_demo(cfg: DemoConfig) -> Path:
    """Run the closed loop for ``cfg.minutes`` and write the report; returns its path."""
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    # A demo starts from nothing: the broker is in memory, so old state would not match it.
    (out / "recsys.db").unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "logs", ignore_errors=True)  # the workers append to theirs
    ml = load_movielens(cfg.movielens_path())
    print(f"fitting the simulator on {len(ml)} MovieLens ratings ...", flush=True)
    probe = UserSimulator(ml, SimConfig(seed=cfg.seed, n_items=cfg.n_items))
    topics = TopicSettings(partitions=cfg.partitions)
    result = DemoResult(minutes=cfg.minutes, arms={})
    workers: list[WorkerProcess] = []
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
        create_topics(kafka, topics.all(), topics.partitions)
        ports = {name: free_port() for name in WORKER_NAMES}
        for name in WORKER_NAMES:
            env = worker_env(broker.bootstrap, out, topics, ports[name])
            workers.append(WorkerProcess(name, env, out / "logs" / f"{name}.log").start())
        producer = make_producer(kafka)
        try:
            initial = np.flatnonzero(probe.release_ms <= probe.config.start_ms)
            replay_items([probe.items[j] for j in initial], producer, topics.items)
            warm = _backfill(ml, {probe.item_ids[j] for j in initial}) if cfg.warm_start else []
            if warm:
                print(f"warm start: backfilling {len(warm)} catalogue ratings ...", flush=True)
                replay(warm, producer, topics.events, progress=False)
            if warm:
                learner = _Scraper(ports["learner"])
                _wait_for_model(
                    workers,
                    learner,
                    out / "checkpoints",
                    topics.rewards,
                    len(warm),
                    timeout_s=900,
                )
            print("warming the peers on the same backfill ...", flush=True)
            peers = _peers(cfg, probe, [probe.item_ids[j] for j in initial], warm)
            # The live phase's clock starts now: release times and the shift count from here.
            live_ms = int(time.time() * 1000)
            shift_ms = None
            if cfg.shift_at is not None:
                shift_ms = live_ms + int(cfg.shift_at * cfg.minutes * 60_000)
            sim_cfg = SimConfig(
                seed=cfg.seed, n_items=cfg.n_items, start_ms=live_ms, shift_at_ms=shift_ms
            )
            first = UserSimulator(ml, sim_cfg)
            worlds = {arm: copy.deepcopy(first) for arm in ARMS}
            watched: dict[str, list[str]] = {}
            for e in warm:
                watched.setdefault(e.user_id, []).append(e.item_id)
            for world in worlds.values():
                for user_id, items in watched.items():
                    world.mark_consumed(user_id, items)  # nobody re-watches their history
            ceilings = worlds["oracle"].ceilings(cfg.k, live_ms)
            result = _live(
                cfg, kafka, topics, producer, worlds, warm, workers, ports, peers, live_ms
            )
            result.extra["ceilings_at_start"] = ceilings
        except KeyboardInterrupt:
            print("\ninterrupted: stopping workers and writing the report", flush=True)
        finally:
            producer.close()
            for w in reversed(workers):
                w.stop()
    report = write_report(result, out)
    print(f"report: {report.resolve()}")
    return report


def _wait_for_model(
    workers: list[WorkerProcess],
    learner: _Scraper,
    checkpoint_dir: Path,
    rewards_topic: str,
    backfill: int,
    timeout_s: float,
) -> None:
    """Until the newest checkpoint holds the model learned from every backfill reward.

    The checkpoint's own offsets say what it has learned from (the rewards topic is new, so its
    offsets count rewards); waiting for "one more checkpoint" instead hangs when the learner's
    last checkpoint already covered everything and it has nothing left to save.
    """
    deadline = time.monotonic() + timeout_s
    last = -1.0
    while time.monotonic() < deadline:
        for w in workers:
            if not w.alive:
                raise RecsysError(f"{w.name} worker exited ({w.returncode}):\n{w.tail()}")
        consumed = 0.0
        for name, labels, value in learner.samples():
            if name == "recsys_events_consumed_total" and labels.get("topic") == rewards_topic:
                consumed = value
        if consumed != last:
            print(f"  warm-up: learner has {int(consumed)}/{backfill} backfill rewards", flush=True)
            last = consumed
        latest = ckpt.find_latest(checkpoint_dir)
        if latest is not None:
            offsets = latest[1].get("offsets", {})
            learned = sum(v for k, v in offsets.items() if k.rpartition(":")[0] == rewards_topic)
            if learned >= backfill:
                return
        time.sleep(1.0)
    # A slow machine should still get its demo: go live with whatever the learner has so far.
    print("  warm-up: time is up; going live with the model as it is", flush=True)


def _live(
    cfg: DemoConfig,
    kafka: KafkaSettings,
    topics: TopicSettings,
    producer: KafkaProducer,
    worlds: dict[str, UserSimulator],
    warm: list[Event],
    workers: list[WorkerProcess],
    ports: dict[str, int],
    baselines: dict[str, Arm],
    live_ms: int,
) -> DemoResult:
    """The live phase: visits on a fixed schedule from ``live_ms``, each arm in its own world.

    Visit ``i`` happens at ``live_ms + i / visits_per_s`` on the schedule clock, and items are
    released before the first visit at or after their release time. Every arm's world sees the
    same users at the same scheduled times, so the peers and the oracle come out the same in
    every run; only recsys's slates depend on how fast the workers were.
    """
    sim = worlds["recsys"]
    schedule = VisitSchedule(live_ms, cfg.visits_per_s)
    arms = {name: ArmTally(world) for name, world in worlds.items()}
    rngs = {name: np.random.default_rng(cfg.seed + 10 + i) for i, name in enumerate(ARMS)}
    peers = PeerPlayer(baselines, {n: arms[n] for n in baselines}, arms["oracle"], rngs, cfg.k)
    ope = _OPELog(cfg, sim, list(baselines["random"].items), warm)
    slates = _SlateFeed(kafka, topics.recommendations, store_url(cfg.out))
    learner, publisher = _Scraper(ports["learner"]), _Scraper(ports["publisher"])
    rng_arrival = np.random.default_rng(cfg.seed + 1)
    rng_cold = np.random.default_rng(cfg.seed + 2)
    result = DemoResult(minutes=cfg.minutes, arms={name: arm.series for name, arm in arms.items()})
    # The monotonic clock of the schedule's start; setting up the worlds took a moment since.
    started = time.monotonic() - max(0.0, time.time() - live_ms / 1000)
    released_until = live_ms
    last_event_wall: dict[str, float] = {}
    drift_seen: Counter[str] = Counter()
    sent = 0
    visit = 0
    next_tick = started + 1.0
    window: deque[tuple[float, int]] = deque(maxlen=10)
    lag_s: list[float] = []  # per tick: how late the loop reached it (its visits wait as long)
    printed_at = 0.0
    interrupted = False
    try:
        while (elapsed := time.monotonic() - started) < cfg.minutes * 60:
            for w in workers:
                if not w.alive:
                    raise RecsysError(f"{w.name} worker exited ({w.returncode}):\n{w.tail()}")
            for user_id, wall in slates.poll():
                if user_id in last_event_wall:
                    result.freshness_s.append(wall - last_event_wall.pop(user_id))
            # One batch of visits per tick keeps to the rate without a sleep per visit.
            while visit < schedule.due(elapsed):
                now_ms, second = schedule.at_ms(visit), schedule.second(visit)
                visit += 1
                new_items = sim.released_between(released_until, now_ms)
                released_until = now_ms
                if new_items:
                    replay_items(new_items, producer, topics.items)
                    peers.release([i.item_id for i in new_items])
                user = sim.next_user(rng_arrival)
                rid = f"demo-{visit}"
                slate = (
                    slates.latest.get(user)
                    or slates.cold_start()
                    or sim.random_slate(user, cfg.k, now_ms, rng_cold)
                )
                slate = Slate(rid, user, slate.model_version, now_ms, slate.items)
                ope.before(slate, now_ms, elapsed)
                events = arms["recsys"].show(slate, now_ms, rngs["recsys"], second)
                ope.after(events)
                for e in events:
                    producer.send(topics.events, key=e.key, value=e.to_bytes())
                sent += len(events)
                if any(e.type != "impression" for e in events):
                    last_event_wall[user] = time.time()
                peers.visit(second, user, now_ms, rid)
            arms["recsys"].close_until(int(elapsed))
            if time.monotonic() >= next_tick:
                lag_s.append(time.monotonic() - next_tick)
                next_tick += 1.0
                t = time.monotonic() - started
                window.append((t, sent))
                _scrape(learner, publisher, t, result, drift_seen)
                if sys.stdout.isatty() or t - printed_at >= 10:  # a log line per 10 s
                    printed_at = t
                    _progress(t, cfg, result, window, slates, peers.backlog)
            next_visit = started + (schedule.at_ms(visit) - live_ms) / 1000
            if cfg.peers_live:  # the time until the next visit is due; recsys's visits first
                peers.play(deadline=min(next_visit, next_tick))
            if not cfg.peers_live or not peers.backlog:
                time.sleep(max(0.0, min(0.01, next_visit - time.monotonic())))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping workers and writing the report", flush=True)
    finally:
        slates.close()
    _finish_peers(peers, interrupted)
    end = math.ceil(cfg.minutes * 60)
    arms["recsys"].close_until(end)
    peers.close_until(end)
    result.extra["peer_backlog_max"] = peers.max_backlog
    result.events_sent = sent
    result.model_versions = slates.versions
    if cfg.shift_at is not None:
        result.shift_at_s = cfg.shift_at * cfg.minutes * 60
    result.extra["warm_start_ratings"] = len(warm)
    result.extra["visits"] = visit
    _record_lag(result, lag_s)
    est = ope.estimate()
    if est:
        result.extra["ope"] = est
    result.extra["visits_per_s"] = cfg.visits_per_s
    result.extra["slates_received"] = slates.received
    return result


class _SlateFeed:
    """Follows the recommendations topic: the newest slate per user, with arrival times; and
    the store's cold-start slate, what the app shows a user with none (as in production)."""

    def __init__(self, kafka: KafkaSettings, topic: str, store_url: str) -> None:
        self.store_url = store_url
        self._store: Store | None = None
        self._cold: Slate | None = None
        self._cold_read = -math.inf
        self.consumer = make_consumer(kafka, None)
        parts = self.consumer.partitions_for_topic(topic) or set()
        self.consumer.assign([TopicPartition(topic, p) for p in parts])
        self.latest: dict[str, Slate] = {}
        self.versions: list[str] = []
        self.received = 0

    def poll(self) -> Iterable[tuple[str, float]]:
        arrived = []
        for records in self.consumer.poll(timeout_ms=0, max_records=5000).values():
            for r in records:
                # The producer's create time, not the time this loop got to it: a backlog of
                # full-refresh slates behind a busy simulator tick is the harness's lag, not
                # the pipeline's.
                produced_at = r.timestamp / 1000.0
                try:
                    slate = Slate.from_bytes(r.value)
                except ValueError:
                    continue
                self.latest[slate.user_id] = slate
                self.received += 1
                if not self.versions or self.versions[-1] != slate.model_version:
                    self.versions.append(slate.model_version)
                arrived.append((slate.user_id, produced_at))
        return arrived

    def cold_start(self) -> Slate | None:
        """The publisher's stored cold-start slate, re-read every :data:`COLD_REFRESH_S`."""
        now = time.monotonic()
        if now - self._cold_read >= COLD_REFRESH_S:
            self._cold_read = now
            try:
                if self._store is None:
                    self._store = Store(self.store_url)
                stored = self._store.get_cold_start()
            except Exception as exc:  # the publisher may still be creating the schema
                log.debug("cold-start slate not readable yet: %s", exc)
            else:
                self._cold = stored.slate if stored is not None else self._cold
        return self._cold

    def close(self) -> None:
        self.consumer.close()
        if self._store is not None:
            self._store.close()


class _OPELog:
    """OPE on recsys's own logs: over the last third, the target is the greedy policy of the
    newest model version (reloaded as checkpoints appear, at most every ``RELOAD_S``: the
    serving model with exploration off); each recsys visit logs the shown slot-0 item, its
    logged propensity, whether it was clicked, the target's slot-0 item for the user's state,
    and the simulator's true click probability of that item at slot 0."""

    RELOAD_S = 5.0  # the demo's checkpoint cadence (RECSYS_LEARNER__CHECKPOINT_EVERY_S)

    def __init__(
        self, cfg: DemoConfig, world: UserSimulator, items: list[str], warm: list[Event]
    ) -> None:
        from recsys.demo.arms import RandomArm
        from recsys.eval.sim import demo_settings

        self.cfg = cfg
        self.world = world
        self.start_s = cfg.minutes * 60 * 2 / 3
        # Bookkeeping only: histories, watched items and the publisher's cooldown.
        cooldown_ms = round(1000 * demo_settings().publisher.cooldown_s)
        self.tracker = RandomArm(items, cfg.k, cooldown_ms=cooldown_ms)
        self.tracker.warm_start(warm)
        # The publisher's own watcher, polled from the loop: it verifies only a version newer
        # than the one it holds.
        self.watcher = ModelWatcher(
            cfg.out / "checkpoints", lambda p: load_serving_model(p, {"device": "cpu"})
        )
        self.checked_s = -math.inf
        self.rows: dict[str, list[Any]] = {k: [] for k in ("r", "p", "a", "t", "v")}
        self._pending: str | None = None

    def before(self, slate: Slate, now_ms: int, elapsed: float) -> None:
        self._pending = None
        if elapsed >= self.start_s and elapsed - self.checked_s >= self.RELOAD_S:
            self.checked_s = elapsed
            try:
                self.watcher.poll()
            except RecsysError as exc:
                log.warning("OPE target not loaded: %s", exc)
        model = self.watcher.current
        # As in `recsys eval sim`: the app's random first slates are not the served policy.
        if model is None or not slate.items or slate.model_version == "cold-start":
            return
        from recsys.eval.sim import greedy_top1

        u, tr = slate.user_id, self.tracker
        top = greedy_top1(
            model,
            u,
            [tr.items[i] for i in tr.histories.get(u)],
            [tr.items[i] for i in not_allowed(tr.watched.get(u), tr.shown.recent(u, now_ms))],
        )
        if top is None or top not in self.world._item_index:
            return
        first = slate.items[0]
        exam0 = float(self.world.examination(np.array([0]))[0])
        true = float(self.world.click_probabilities(u, [top], now_ms)[0]) * exam0
        for key, val in zip("patv", (first.propensity, first.item_id, top, true), strict=True):
            self.rows[key].append(val)
        self._pending = first.item_id

    def after(self, events: list[Event]) -> None:
        if self._pending is not None:
            clicked = any(e.type == "click" and e.position == 0 for e in events)
            self.rows["r"].append(1.0 if clicked else 0.0)
            self._pending = None
        self.tracker.update(events)

    def estimate(self) -> dict[str, Any]:
        if not self.rows["r"]:
            return {}
        from recsys.eval.ope import first_slot_ope

        a = np.asarray(self.rows["a"])
        t = np.asarray(self.rows["t"])
        est: dict[str, Any] = first_slot_ope(
            np.asarray(self.rows["r"]), np.asarray(self.rows["p"]), a == t, a, t
        )
        est["true"] = {"value": float(np.mean(self.rows["v"]))}
        if self.watcher.current is not None:
            est["target_version"] = self.watcher.current.version  # the last one
        return est


def _peers(
    cfg: DemoConfig, sim: UserSimulator, live_items: list[str], warm: list[Event]
) -> dict[str, Arm]:
    """The peers of :mod:`recsys.demo.arms`, warm-started from recsys's own backfill, on the
    frozen text encoder's item vectors and the demo workers' settings (history length, rules)."""
    from recsys.eval.sim import SimRun, demo_settings, item_vectors, make_arm

    vectors = item_vectors(sim)
    ids = sim.item_ids
    initial = set(live_items)
    order = sorted(range(len(ids)), key=lambda j: (ids[j] not in initial, j))
    reduced = reduce_vectors(np.stack([vectors[ids[j]] for j in order]), fit_rows=len(initial))
    features = {ids[j]: reduced[n] for n, j in enumerate(order)}
    run = SimRun(k=cfg.k, seed=cfg.seed)
    settings = demo_settings()
    peers = {}
    for name in PEERS:
        arm = make_arm(name, live_items, run, features, settings)
        arm.warm_start(warm)
        peers[name] = arm
    return peers


def _scrape(
    learner: _Scraper,
    publisher: _Scraper,
    t: float,
    result: DemoResult,
    drift_seen: Counter[str],
) -> None:
    losses: dict[str, float] = {"t": t}
    for name, labels, value in learner.samples():
        if name == "recsys_learner_loss" and math.isfinite(value):
            losses[labels.get("loss", "loss")] = value
        elif name == "recsys_learner_steps_total":
            losses["step"] = value
        elif name == "recsys_drift_detected_total":
            signal = labels.get("signal", "?")
            if value > drift_seen[signal]:
                result.drift_marks.append((t, signal))
                drift_seen[signal] = int(value)
    if len(losses) > 2:
        result.losses.append(losses)
    del publisher  # freshness is measured end to end by the harness itself


def _finish_peers(peers: PeerPlayer, interrupted: bool) -> None:
    """After the live phase: the peers play the visits they are still behind on."""
    if interrupted or not peers.backlog:
        return
    print(f"peers: playing the {peers.backlog} visits they have not played yet ...", flush=True)
    started = time.monotonic()
    peers.drain()
    print(f"peers: done in {time.monotonic() - started:.0f} s", flush=True)


LAG_WARN_S = 2.0  # a loop this late serves visits from slates this old: figures not comparable


def _record_lag(result: DemoResult, lag_s: list[float]) -> None:
    """The app loop's lateness per tick into the summary, and a note when it fell behind: the
    simulated app shares the machine with the workers (the peers only get its spare time), and
    a late loop serves its visits in bursts from stale slates."""
    if not lag_s:
        return
    lag = np.asarray(lag_s)
    result.extra["loop_lag_s"] = {"p50": float(np.median(lag)), "max": float(lag.max())}
    late = float((lag > LAG_WARN_S).mean())
    if late > 0.05:
        result.notes.append(
            f"The demo loop fell behind real time (lag p50 {np.median(lag):.1f} s, max "
            f"{lag.max():.1f} s; {late:.0%} of ticks over {LAG_WARN_S:.0f} s): visits were served "
            "in bursts from stale slates, so these ratios do not measure the policies. Run on a "
            "quieter or larger machine, or with --visits-per-s lower; `recsys eval sim` runs the "
            "same loop without the wall clock."
        )


def _progress(
    t: float,
    cfg: DemoConfig,
    result: DemoResult,
    window: deque[tuple[float, int]],
    slates: _SlateFeed,
    peer_backlog: int,
) -> None:
    rate = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0]) if len(window) > 1 else 0
    # Each arm's last 30 s of visits played so far (the peers may be behind recsys).
    ctr = {
        name: arm.ctr(max(0.0, (arm.t[-1] if arm.t else t) - 30))
        for name, arm in result.arms.items()
    }
    fresh = np.percentile(result.freshness_s[-500:], 99) if result.freshness_s else math.nan
    model = slates.versions[-1] if slates.versions else "-"
    peers = (
        f" pop {ctr['most_popular']:.3f} eps {ctr['epsilon_greedy']:.3f}"
        f" lin {ctr['linucb']:.3f} vw {ctr['vw']:.3f}"
        f" rand {ctr['random']:.3f} oracle {ctr['oracle']:.3f}"
    )
    line = (
        f"[{t:5.0f}/{cfg.minutes * 60:.0f}s] {rate:6.0f} ev/s | CTR(30s) recsys {ctr['recsys']:.3f}"
        f"{peers if cfg.peers_live else ''} | model {model}"
        f" | fresh p99 {fresh:.2f}s | drift {len(result.drift_marks)}"
        f" | peers {'behind ' + str(peer_backlog) if cfg.peers_live else 'after the live phase'}"
    )
    if sys.stdout.isatty():
        print("\r" + line[:200], end="", flush=True)
    else:
        print(line, flush=True)
