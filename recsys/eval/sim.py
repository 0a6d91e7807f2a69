"""`recsys eval sim`: the closed loop in one process, no Kafka: recsys and its peers, ablations.

The demo's loop without the broker and the worker processes, on a simulated clock, so variants
and seeds are cheap enough to compare with paired confidence intervals:

- **recsys** is the production code path: the reward join (:class:`RewardJoin`, the demo's
  window settings), the learner (:class:`OnlineLearner` around :class:`Learner`, the learner
  worker's defaults with the demo's smaller network), checkpoints written and loaded as the
  publisher's model (:func:`load_serving_model`; the learner worker's drift monitor and
  reaction, in simulated event time, unless ``--no-drift-reaction``), and :class:`Publisher`
  for histories, masks, cold start and slates with propensities. A visit shows the newest
  slate published for the user; a user the publisher has never seen gets its cold-start
  slate (the store's ``cold_start`` row, what production serves them: the peers too rank for
  a user on first sight); only before the first batch a uniformly random one, as in the demo.
- **Peers** (:mod:`recsys.demo.arms`): random, most-popular, the ε-greedy bandit, LinUCB, Vowpal
  Wabbit and the oracle, each in its own copy of the simulated world, the same arrivals.
- **Warm start**: everyone gets the catalogue's MovieLens ratings (the demo's backfill); every
  world marks them watched.
- **Variants** of recsys (``--variants``), each the shipped defaults with one idea switched:
  ``full``; ``pg`` (the REINFORCE objective with the top-K off-policy correction instead of
  cross-entropy on clicked items), ``pg_no_offpolicy`` and ``pg_no_baseline`` (it without its
  correction or its impression baseline); ``with_contrastive`` (InfoNCE at alpha 0.1);
  ``with_text`` (the text tower, so a new item is ranked by its text from the start);
  ``text_only`` (text, no id embedding / item bias); ``no_value`` (no counted value bias in
  serving, :mod:`recsys.learner.item_value`); ``with_click_value`` (the value bias's click term
  on, weight 3); ``with_click_optimism`` (it ranked by an upper confidence bound, optimism 2: a
  bonus for items little shown, new ones first); ``no_reward_head`` (no personalised reward head,
  :class:`recsys.model.RewardHead`). full − variant > 0: the default choice pays.
- **Figures**: CTR per impression, observed (clicks) and expected (the simulator's own click
  probabilities of the slates shown: noise-free, the one the ratios use), per third of the run,
  and for new (cold-start) items; ratios recsys / arm per seed, then the mean and a t interval
  over seeds (paired: every arm sees the same users in the same order).
- **OPE**: the greedy policy of the serving model (exploration off, the newest version at each
  visit), evaluated on the slates recsys logged during the last third (IPS / SNIPS / DR of its
  slot-0 CTR), next to that policy's true value from the simulator on the same visits.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.config import Settings
from recsys.data.movielens import MovieLens, load_movielens
from recsys.demo.arms import (
    Arm,
    EpsilonGreedyArm,
    LinUCBArm,
    MostPopularArm,
    RandomArm,
    VWArm,
    reduce_vectors,
)
from recsys.demo.playback import VisitSchedule
from recsys.demo.simulator import SimConfig, UserSimulator
from recsys.drift import DriftMonitor, DriftReaction, EventClock
from recsys.encoder.catalog import ItemCatalog
from recsys.eval.ope import first_slot_ope
from recsys.events import Event, RewardRecord, Slate, item_text
from recsys.history import pad_histories
from recsys.learner.config import LearnerConfig, model_config
from recsys.learner.online import DRIFT_SIGNALS, OnlineConfig, OnlineLearner
from recsys.learner.trainer import Learner
from recsys.publisher.core import Publisher, PublisherConfig
from recsys.rewards.join import RewardJoin
from recsys.rewards.rules import RewardRules
from recsys.serving.model import ServingModel, load_serving_model

log = logging.getLogger(__name__)

ARMS = ("random", "most_popular", "epsilon_greedy", "linucb", "vw", "oracle")
VARIANTS = (
    "full",
    "pg",
    "pg_no_offpolicy",
    "pg_no_baseline",
    "with_contrastive",
    "with_text",
    "text_only",
    "no_value",
    "with_click_value",
    "with_click_optimism",
    "no_reward_head",
    "reward_batch_1",
    "head_impressions",
    "no_refit",
)

# The demo's worker settings (recsys.demo.run.worker_env): a small network, short windows.
DEMO_LEARNER = {"dim": 32, "layers": 1, "max_history": 20}
DEMO_REWARDS = {"window_ms": 20_000, "allowed_lateness_ms": 2_000, "late_retention_ms": 10_000}


def variant_overrides(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(LearnerConfig overrides, ModelConfig overrides) of a variant: the shipped defaults with
    one idea switched (on where the defaults leave it off)."""
    pg = {"objective": "reinforce"}
    table: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "full": ({}, {}),
        "pg": (pg, {}),
        "pg_no_offpolicy": (pg | {"off_policy_correction": False}, {}),
        "pg_no_baseline": (pg | {"impression_baseline": False}, {}),
        "with_contrastive": ({"contrastive": "infonce", "alpha": 0.1}, {}),
        "with_text": ({}, {"use_text": True}),
        "text_only": ({}, {"use_text": True, "use_id_embedding": False, "item_bias": False}),
        # No counted value bias in serving: the policy network alone.
        "no_value": ({"organic_value_weight": 0.0, "click_value_weight": 0.0}, {}),
        # The policy network and the value bias, no reward head.
        "no_reward_head": ({"reward_head_weight": 0.0}, {}),
        # The CTR counted from impressions on top of the organic term.
        "with_click_value": ({"click_value_weight": 3.0}, {}),
        # That click term ranked by an upper bound (an exploration bonus for little-shown items).
        "with_click_optimism": ({"click_value_weight": 3.0, "click_value_optimism": 2.0}, {}),
        # The reward head fitted on the policy's own batch only (the default fits 8 batches).
        "reward_batch_1": ({"reward_batch_multiplier": 1}, {}),
        # The reward head fitted to impressions too, at organic feedback's weight.
        "head_impressions": ({"reward_impression_weight": 1.0}, {}),
        # The reward head by gradient steps alone, no exact refits.
        "no_refit": ({"reward_refit_every": 0}, {}),
    }
    if name not in table:
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    return table[name]


@dataclass(frozen=True)
class SimRun:
    """One closed-loop run's parameters."""

    seconds: float = 240.0  # simulated live seconds (the demo's 4 minutes)
    visits_per_s: float = 15.0
    k: int = 10
    n_items: int = 1000
    seed: int = 0
    checkpoint_every_s: float = 5.0  # simulated; the demo's RECSYS_LEARNER__CHECKPOINT_EVERY_S
    warm_chunk: int = 500  # backfill rewards per learner poll during the warm-up
    temperature: float | None = None  # publisher temperature (None: the setting's default)
    exploration: str | None = None  # publisher exploration mode (None: the setting's default)
    epsilon: float | None = None
    # The arms' settings: each the best of 3-6 values on seed 0 under the shipped rules
    # (the 300 s cooldown), as recsys's temperature and cooldown were chosen.
    vw_lambda: float = 100.0
    eg_epsilon: float = 0.2  # the ε-greedy arm's ε
    linucb_alpha: float = 0.3
    warm_limit: int | None = None  # the first N backfill ratings only (smoke tests); None: all
    curve_temperatures: tuple[float, ...] = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)
    cold_start_temperature: float | None = None  # publisher's (None: the setting's default)
    cooldown_s: float | None = None  # serving cooldown of recsys and the arms (None: setting's)
    learner: tuple[tuple[str, int | float], ...] = ()  # LearnerConfig overrides for every variant
    drift_reaction: bool = True  # the learner worker's drift monitor and reaction


@dataclass
class Tally:
    """Impressions, clicks and expected clicks per simulated second."""

    impressions: list[int] = field(default_factory=list)
    clicks: list[int] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)
    new_impressions: list[int] = field(default_factory=list)
    new_clicks: list[int] = field(default_factory=list)
    new_expected: list[float] = field(default_factory=list)

    def open(self) -> None:
        for lst in (self.impressions, self.clicks, self.new_impressions, self.new_clicks):
            lst.append(0)
        self.expected.append(0.0)
        self.new_expected.append(0.0)

    def record(
        self, world: UserSimulator, slate: Slate, events: list[Event], p: np.ndarray, new: set[str]
    ) -> None:
        clicked = {e.item_id for e in events if e.type == "click"}
        self.impressions[-1] += len(slate.items)
        self.clicks[-1] += len(clicked)
        self.expected[-1] += float(p.sum())
        for s, pe in zip(slate.items, p.tolist(), strict=True):
            if s.item_id in new:
                self.new_impressions[-1] += 1
                self.new_clicks[-1] += s.item_id in clicked
                self.new_expected[-1] += pe

    def summary(self) -> dict[str, float]:
        n = len(self.impressions)
        third = max(n // 3, 1)
        imp = np.asarray(self.impressions, dtype=float)
        out: dict[str, float] = {}
        for name, sl in (
            ("all", slice(0, n)),
            ("first", slice(0, third)),
            ("last", slice(n - third, n)),
        ):
            i = imp[sl].sum()
            out[f"ctr_{name}"] = float(np.sum(self.clicks[sl]) / i) if i else math.nan
            out[f"expected_ctr_{name}"] = float(np.sum(self.expected[sl]) / i) if i else math.nan
        ni = float(np.sum(self.new_impressions))
        out["new_item_impressions"] = ni
        out["new_item_ctr"] = float(np.sum(self.new_clicks) / ni) if ni else math.nan
        out["new_item_expected_ctr"] = float(np.sum(self.new_expected) / ni) if ni else math.nan
        return out


def _slate_probabilities(world: UserSimulator, slate: Slate, now_ms: int) -> np.ndarray:
    """Per slot, the true click probability (examination × attractiveness) before responding."""
    ids = [s.item_id for s in slate.items]
    attr = world.click_probabilities(slate.user_id, ids, now_ms)
    return attr * world.examination(np.array([s.position for s in slate.items]))


class _Recsys:
    """The recsys path in one process: reward join -> learner -> checkpoint -> publisher."""

    def __init__(
        self,
        settings: Settings,
        catalog_vectors: dict[str, np.ndarray],
        learner_over: dict[str, Any],
        model_over: dict[str, Any],
        run: SimRun,
        root: Path,
        clock: Callable[[], float],
    ) -> None:
        s = settings.learner
        model_cfg = replace(model_config(s, settings.encoder.dim), **model_over)
        learner_cfg = replace(
            LearnerConfig.from_settings(s),
            device="cpu",
            keep_checkpoints=2,
            seed=run.seed,
            **(dict(run.learner) | learner_over),
        )
        self.learner = Learner(model_cfg, learner_cfg, ItemCatalog(dim=settings.encoder.dim))
        # The learner worker's drift monitor and reaction, its duration in event time (here the
        # simulated clock; the warm start's MovieLens times are years earlier).
        events = EventClock()
        drift = None
        reaction = None
        if run.drift_reaction:
            drift = DriftMonitor.from_settings(settings.drift, DRIFT_SIGNALS)
            reaction = DriftReaction.from_settings(settings.drift, clock=events)
        self.online = OnlineLearner(
            self.learner,
            root,
            OnlineConfig(replay_ratio=s.replay_ratio, max_steps_per_batch=s.max_steps_per_batch),
            drift=drift,
            reaction=reaction,
            event_clock=events,
        )
        self.vectors = catalog_vectors
        self.join = RewardJoin.from_settings(settings.rewards)
        pub_cfg = PublisherConfig.from_settings(settings)
        over: dict[str, Any] = {"device": "cpu", "seed": run.seed}
        if run.temperature is not None:
            over["temperature"] = run.temperature
        if run.exploration is not None:
            over["exploration"] = run.exploration
        if run.epsilon is not None:
            over["epsilon"] = run.epsilon
        if run.cold_start_temperature is not None:
            over["cold_start_temperature"] = run.cold_start_temperature
        over["cooldown_s"] = _cooldown_s(run, settings)
        self.pub_cfg = replace(pub_cfg, **over)
        self.model: ServingModel | None = None
        self.publisher = Publisher(
            self.pub_cfg, lambda: self.model, RewardRules.from_settings(settings.rewards), clock
        )
        self.latest: dict[str, Slate] = {}
        # The publisher's slate for users it has never seen (the store's ``cold_start`` row,
        # what production serves them); None until the first batch.
        self.cold_slate: Slate | None = None
        self.offset = 0
        self.steps = 0
        self.losses: list[dict[str, float]] = []

    def add_items(self, item_ids: Sequence[str]) -> None:
        have = [i for i in item_ids if i in self.vectors]
        if have:
            self.learner.catalog.put_vectors(have, np.stack([self.vectors[i] for i in have]))

    def rewards(self, events: Iterable[Event]) -> list[RewardRecord]:
        out: list[RewardRecord] = []
        for e in events:
            out.extend(self.join.update(e, self.offset))
            self.offset += 1
        return out

    def learn(self, records: list[RewardRecord]) -> None:
        results = self.online.train(self.online.add_rewards(records))
        self.steps += len(results)
        for r in results:
            if not r.get("skipped"):
                self.losses.append(
                    {k: float(v) for k, v in r.items() if isinstance(v, int | float)}
                )

    def checkpoint(self) -> None:
        path = self.online.checkpoint({})
        if path is not None:
            self.model = load_serving_model(path, self.pub_cfg.policy_kwargs())

    def publish(self, events: list[Event]) -> None:
        self.publisher.observe(events)
        while True:
            batch = self.publisher.compute()
            if batch is None:
                break
            for w in batch.slates:
                self.latest[w.slate.user_id] = w.slate
            if batch.cold_start is not None:
                self.cold_slate = batch.cold_start
            self.publisher.committed(batch)
            if not self.publisher.refreshing and not self.publisher.pending:
                break

    def greedy_top1(
        self, model: ServingModel, users: Sequence[str], now_ms: int
    ) -> list[str | None]:
        """The greedy policy of ``model`` at slot 0 for each user, over the publisher's
        allowed set (watched items and those in their cooldown masked)."""
        ids = self.publisher.item_ids
        return [
            greedy_top1(
                model,
                u,
                [ids[i] for i in self.publisher.histories.get(u)],
                [ids[i] for i in self.publisher.not_allowed(u, now_ms)],
            )
            for u in users
        ]


def greedy_top1(
    model: ServingModel, user_id: str, history: Sequence[str], excluded: Sequence[str]
) -> str | None:
    """A model version's greedy slot-0 item for a user's history (item ids), ``excluded``
    items (the user's watched ones and those in their cooldown) masked; None when the history
    has no item the model knows (the cold-start policy serves it)."""
    hist = [model.index[i] for i in history if i in model.index]
    if not hist:
        return None
    items, _ = pad_histories([hist], model.max_history)
    with torch.inference_mode():
        states = model.user_states(items, model.buckets([user_id]))
        scores = (states @ model.policy.item_matrix.T)[0]
        for i in excluded:
            j = model.index.get(i)
            if j is not None:
                scores[j] = -math.inf
        return model.item_ids[int(scores.argmax())]


def exploration_curve(
    rs: _Recsys,
    world: UserSimulator,
    now_ms: int,
    temperatures: Sequence[float],
    users: int = 200,
    draws: int = 5,
) -> dict[str, float]:
    """Expected CTR per impression of the current model's slates, greedy and Boltzmann at each
    temperature, for the ``users`` most active users (what exploration costs right now)."""
    model = rs.model
    if model is None:
        return {}
    order = np.argsort(-world._arrival, kind="stable")[:users]
    ids = [world.user_ids[int(u)] for u in order]
    weights = world._arrival[order] / world._arrival[order].sum()
    kept = rs.publisher.cfg
    out: dict[str, float] = {}
    try:
        for label, exploration, temp in [("greedy", "greedy", 1.0)] + [
            (f"T={t:g}", "boltzmann", t) for t in temperatures
        ]:
            model.policy.exploration = exploration  # type: ignore[assignment]
            rs.publisher.cfg = replace(kept, temperature=temp)
            total = 0.0
            for _ in range(draws if exploration != "greedy" else 1):
                slates = rs.publisher._rank_users(ids, model, model.version, now_ms)
                by_user = {w.slate.user_id: w.slate for w in slates}
                ctr = np.array(
                    [
                        _slate_probabilities(world, by_user[u], now_ms).sum()
                        / max(len(by_user[u].items), 1)
                        if u in by_user
                        else np.nan
                        for u in ids
                    ]
                )
                total += float(np.nansum(weights * ctr) / weights[~np.isnan(ctr)].sum())
            out[label] = total / (draws if exploration != "greedy" else 1)
    finally:
        rs.publisher.cfg = kept
        model.policy.exploration = kept.exploration
        model.policy.temperature = kept.temperature
    return out


def item_vectors(sim: UserSimulator, cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """The frozen text encoder's vector of every simulated item (cached on disk)."""
    from recsys.encoder.text import TextEncoder
    from recsys.eval.offline import _default_cache_dir

    catalog = ItemCatalog(
        TextEncoder(device="cpu"), Path(cache_dir) if cache_dir else _default_cache_dir()
    )
    catalog.upsert_texts([(it.item_id, item_text(it)) for it in sim.items])
    return {i: catalog.vectors[catalog.index[i]].copy() for i in sim.item_ids}


def run_seed(
    ml: MovieLens,
    run: SimRun,
    variants: Sequence[str],
    arms: Sequence[str],
    vectors: dict[str, np.ndarray] | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One seed: every arm once, every recsys variant once, the same arrivals for all."""
    start_ms = 1_700_000_000_000
    sim_cfg = SimConfig(seed=run.seed, n_items=run.n_items, start_ms=start_ms)
    probe = UserSimulator(ml, sim_cfg)
    vectors = vectors if vectors is not None else item_vectors(probe)
    initial = [probe.item_ids[j] for j in np.flatnonzero(probe.release_ms <= start_ms)]
    initial_set = set(initial)
    warm = [e for e in ml.events() if e.item_id in initial_set][: run.warm_limit]
    for user_id, items in _watched(warm).items():
        probe.mark_consumed(user_id, items)
    new_items = set(probe.item_ids) - initial_set
    n_visits = int(run.seconds * run.visits_per_s)
    arrival_rng = np.random.default_rng(run.seed + 1)
    arrivals = [probe.next_user(arrival_rng) for _ in range(n_visits)]
    out: dict[str, Any] = {
        "seed": run.seed,
        "arms": {},
        "variants": {},
        "ceilings": probe.ceilings(run.k, start_ms),
    }

    ids = probe.item_ids
    order = sorted(range(len(ids)), key=lambda j: (ids[j] not in initial_set, j))
    raw = np.stack([vectors[ids[j]] for j in order])
    reduced = reduce_vectors(raw, fit_rows=len(initial))
    features = {ids[j]: reduced[n] for n, j in enumerate(order)}
    for name in arms:
        t0 = time.monotonic()
        tally = _run_arm(name, probe, warm, arrivals, run, features, initial, new_items)
        out["arms"][name] = tally.summary() | {
            "series": _series(tally),
            "wall_s": time.monotonic() - t0,
        }
        progress(
            f"  seed {run.seed} {name:15s} expected CTR last third "
            f"{out['arms'][name]['expected_ctr_last']:.4f} ({time.monotonic() - t0:.0f} s)"
        )
    for variant in variants:
        over = variant_overrides(variant)
        t0 = time.monotonic()
        res = _run_recsys(probe, warm, arrivals, run, vectors, initial, new_items, *over)
        res["wall_s"] = time.monotonic() - t0
        out["variants"][variant] = res
        progress(
            f"  seed {run.seed} recsys/{variant:8s} expected CTR last third "
            f"{res['expected_ctr_last']:.4f} ({res['wall_s']:.0f} s, {res['steps']} steps)"
        )
    return out


def _watched(events: Iterable[Event]) -> dict[str, list[str]]:
    watched: dict[str, list[str]] = {}
    for e in events:
        watched.setdefault(e.user_id, []).append(e.item_id)
    return watched


def _series(t: Tally) -> dict[str, list[float]]:
    return {
        "impressions": list(map(float, t.impressions)),
        "clicks": list(map(float, t.clicks)),
        "expected": t.expected,
        "new_impressions": list(map(float, t.new_impressions)),
        "new_clicks": list(map(float, t.new_clicks)),
    }


def make_arm(
    name: str, items: list[str], run: SimRun, features: dict[str, np.ndarray], settings: Settings
) -> Arm:
    rules = RewardRules.from_settings(settings.rewards)
    kw: dict[str, Any] = {
        "rules": rules,
        "history_len": settings.learner.max_history,
        "cooldown_ms": round(1000 * _cooldown_s(run, settings)),
    }
    if name == "random":
        return RandomArm(items, run.k, seed=run.seed, **kw)
    if name == "most_popular":
        return MostPopularArm(items, run.k, seed=run.seed, **kw)
    if name == "epsilon_greedy":
        return EpsilonGreedyArm(items, run.k, epsilon=run.eg_epsilon, seed=run.seed, **kw)
    if name == "linucb":
        return LinUCBArm(items, run.k, features, alpha=run.linucb_alpha, seed=run.seed, **kw)
    if name == "vw":
        return VWArm(items, run.k, features, lam=run.vw_lambda, seed=run.seed, **kw)
    raise ValueError(f"unknown arm {name!r}; choose from {ARMS}")


def _cooldown_s(run: SimRun, settings: Settings) -> float:
    """The serving cooldown recsys and every arm play by: the run's, else the setting's."""
    return settings.publisher.cooldown_s if run.cooldown_s is None else run.cooldown_s


def demo_settings() -> Settings:
    """The settings the demo gives its workers (defaults, a smaller network, short windows)."""
    return Settings(learner=DEMO_LEARNER, rewards=DEMO_REWARDS)


def _run_arm(
    name: str,
    probe: UserSimulator,
    warm: list[Event],
    arrivals: list[str],
    run: SimRun,
    features: dict[str, np.ndarray],
    initial: list[str],
    new_items: set[str],
) -> Tally:
    world = copy.deepcopy(probe)
    rng = np.random.default_rng(run.seed + 10)
    tally = Tally()
    arm = None if name == "oracle" else make_arm(name, initial, run, features, demo_settings())
    if arm is not None:
        arm.warm_start(warm)
    start = world.config.start_ms
    schedule = VisitSchedule(start, run.visits_per_s)
    released = start
    for v, user in enumerate(arrivals):
        now_ms = schedule.at_ms(v)
        if v % int(run.visits_per_s) == 0:
            tally.open()
            fresh = world.released_between(released, now_ms)
            if fresh and arm is not None:
                arm.add_items([i.item_id for i in fresh])
            released = now_ms
        rid = f"{name}-{v}"
        s = (
            world.oracle_slate(user, run.k, now_ms, rid)
            if arm is None
            else arm.slate(user, now_ms, rid)
        )
        p = _slate_probabilities(world, s, now_ms)
        events = world.respond(s, now_ms, rng)
        tally.record(world, s, events, p, new_items)
        if arm is not None:
            arm.update(events)
    return tally


def _run_recsys(
    probe: UserSimulator,
    warm: list[Event],
    arrivals: list[str],
    run: SimRun,
    vectors: dict[str, np.ndarray],
    initial: list[str],
    new_items: set[str],
    learner_over: dict[str, Any],
    model_over: dict[str, Any],
) -> dict[str, Any]:
    world = copy.deepcopy(probe)
    rng = np.random.default_rng(run.seed + 10)
    rng_cold = np.random.default_rng(run.seed + 2)
    start = world.config.start_ms
    now = {"ms": start}
    root = Path(tempfile.mkdtemp(prefix="recsys-eval-sim-"))
    torch.manual_seed(run.seed)
    try:
        rs = _Recsys(
            demo_settings(), vectors, learner_over, model_over, run, root, lambda: now["ms"] / 1000
        )
        rs.add_items(initial)
        # Warm-up: the backfill through the reward join in poll-sized chunks, then a model.
        for n in range(0, len(warm), run.warm_chunk):
            chunk = warm[n : n + run.warm_chunk]
            rs.learn(rs.rewards(chunk))
            rs.publisher.observe(chunk)
        warm_steps = rs.steps
        rs.checkpoint()
        curve = exploration_curve(rs, world, start, run.curve_temperatures)
        rs.publish([])
        tally = Tally()
        n_visits = len(arrivals)
        per_s = int(run.visits_per_s)
        third = (n_visits // per_s) // 3 * per_s
        ope_start = n_visits - third
        target: ServingModel | None = None
        ope: dict[str, list[Any]] = {k: [] for k in ("reward", "prop", "logged", "target", "true")}
        pending: list[Event] = []
        schedule = VisitSchedule(start, run.visits_per_s)
        released = start
        last_ckpt = start
        for v, user in enumerate(arrivals):
            now_ms = schedule.at_ms(v)
            now["ms"] = now_ms
            if v % per_s == 0:
                if v:  # the second's events: join, learn, publish (slates reach the next second)
                    rs.learn(rs.rewards(sorted(pending, key=lambda e: e.ts)))
                    if now_ms - last_ckpt >= run.checkpoint_every_s * 1000:
                        rs.checkpoint()
                        last_ckpt = now_ms
                    rs.publish(pending)
                    pending = []
                tally.open()
                fresh = world.released_between(released, now_ms)
                if fresh:
                    rs.add_items([i.item_id for i in fresh])
                released = now_ms
            if v >= ope_start:
                # The target is "the serving model without exploration", so it follows the
                # model versions: a target frozen at one version disagrees with the newer
                # versions' slates more and more, and IPS then rests on a few huge weights.
                target = rs.model
            # As production serves: the user's newest slate, else the publisher's cold-start
            # slate for users it has never seen, else (before any batch) a random one.
            slate = (
                rs.latest.get(user)
                or rs.cold_slate
                or world.random_slate(user, run.k, now_ms, rng_cold)
            )
            slate = Slate(f"sim-{v}", user, slate.model_version, now_ms, slate.items)
            p = _slate_probabilities(world, slate, now_ms)
            if target is not None and slate.model_version not in ("cold-start",) and slate.items:
                (top,) = rs.greedy_top1(target, [user], now_ms)
                if top is not None:
                    first = slate.items[0]
                    ope["prop"].append(first.propensity)
                    ope["logged"].append(first.item_id)
                    ope["target"].append(top)
                    exam0 = float(world.examination(np.array([0]))[0])
                    ope["true"].append(
                        float(world.click_probabilities(user, [top], now_ms)[0]) * exam0
                    )
            events = world.respond(slate, now_ms, rng)
            if target is not None and len(ope["prop"]) > len(ope["reward"]):
                clicked0 = any(e.type == "click" and e.position == 0 for e in events)
                ope["reward"].append(1.0 if clicked0 else 0.0)
            tally.record(world, slate, events, p, new_items)
            pending.extend(events)
        res: dict[str, Any] = tally.summary()
        res["series"] = _series(tally)
        res["steps"] = rs.steps
        res["warm_steps"] = warm_steps
        res["exploration_curve_at_start"] = curve
        res["losses"] = rs.losses[-2000:]
        if ope["prop"]:
            est = first_slot_ope(
                np.asarray(ope["reward"]),
                np.asarray(ope["prop"]),
                np.asarray(ope["logged"]) == np.asarray(ope["target"]),
                np.asarray(ope["logged"]),
                np.asarray(ope["target"]),
            )
            res["ope"] = est | {"true": {"value": float(np.mean(ope["true"]))}}
        return res
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- aggregation ---------------------------------------------------------------------------------


def t_interval(x: Sequence[float]) -> dict[str, float]:
    """Mean and 95% t interval over seeds."""
    from scipy import stats

    a = np.asarray([v for v in x if math.isfinite(v)], dtype=float)
    if len(a) == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    m = float(a.mean())
    if len(a) < 2:
        return {"mean": m, "low": math.nan, "high": math.nan, "n": 1}
    h = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return {"mean": m, "low": m - h, "high": m + h, "n": len(a)}


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(b) else math.nan


def summarise(seeds: list[dict[str, Any]], metric: str = "expected_ctr") -> dict[str, Any]:
    """Ratios recsys(full) / arm per seed (paired), ablation deltas, and their intervals."""
    out: dict[str, Any] = {
        "ratios_last_third": {},
        "ratios_last_third_observed": {},
        "ablations": {},
        "ope": {},
    }
    full = [s["variants"].get("full") for s in seeds]
    if all(full):
        arms = sorted(set.intersection(*[set(s["arms"]) for s in seeds])) if seeds else []
        for arm in arms:
            for key, m in (("ratios_last_third", metric), ("ratios_last_third_observed", "ctr")):
                per = [
                    _ratio(f[f"{m}_last"], s["arms"][arm][f"{m}_last"])
                    for f, s in zip(full, seeds, strict=True)
                ]
                out[key][f"recsys_over_{arm}"] = t_interval(per) | {"per_seed": per}
        if "oracle" in arms:
            first = [
                _ratio(f[f"{metric}_first"], s["arms"]["oracle"][f"{metric}_first"])
                for f, s in zip(full, seeds, strict=True)
            ]
            last = [
                _ratio(f[f"{metric}_last"], s["arms"]["oracle"][f"{metric}_last"])
                for f, s in zip(full, seeds, strict=True)
            ]
            out["oracle_ratio_first_third"] = t_interval(first) | {"per_seed": first}
            out["oracle_ratio_last_minus_first"] = t_interval(np.subtract(last, first).tolist())
        variants = sorted(set.union(*[set(s["variants"]) for s in seeds]) - {"full"})
        for v in variants:
            runs = [s["variants"].get(v) for s in seeds]
            if not all(runs):  # merged runs that did not all run it
                continue
            d = [f[f"{metric}_last"] - r[f"{metric}_last"] for f, r in zip(full, runs, strict=True)]
            out["ablations"][v] = {"full_minus_variant": t_interval(d) | {"per_seed": d}}
        for name in ("ips", "snips", "dr"):
            vals = [
                f["ope"][name]["value"] - f["ope"]["true"]["value"]
                for f in full
                if f and "ope" in f and name in f["ope"]
            ]
            inside = [
                f["ope"][name]["low"] <= f["ope"]["true"]["value"] <= f["ope"][name]["high"]
                for f in full
                if f and "ope" in f and name in f["ope"]
            ]
            out["ope"][name] = {
                "estimate_minus_true": t_interval(vals),
                "true_inside_ci": f"{sum(inside)}/{len(inside)}",
            }
    return out


def render(result: dict[str, Any]) -> str:
    seeds = result["seeds"]
    lines = [
        f"recsys eval sim: {len(seeds)} seed(s), {result['run']['seconds']:.0f} simulated s at "
        f"{result['run']['visits_per_s']:g} visits/s, k={result['run']['k']}"
    ]
    lines.append("")
    lines.append(
        f"{'policy':24s} {'exp CTR 1st':>11s} {'exp CTR last':>12s} {'CTR last':>9s} "
        f"{'new-item exp CTR':>16s}"
    )
    names: list[tuple[str, str]] = [("variants", v) for v in seeds[0]["variants"]] + [
        ("arms", a) for a in seeds[0]["arms"]
    ]
    for kind, name in names:
        rows = [s[kind].get(name, {}) for s in seeds]

        def mean(key: str, rows: list[dict[str, Any]] = rows) -> float:
            vals = np.array([r.get(key, math.nan) for r in rows], dtype=float)
            return float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan

        label = ("recsys/" + name) if kind == "variants" else name
        lines.append(
            f"{label:24s} {mean('expected_ctr_first'):11.4f} {mean('expected_ctr_last'):12.4f} "
            f"{mean('ctr_last'):9.4f} {mean('new_item_expected_ctr'):16.4f}"
        )
    summ = result["summary"]
    lines.append("")
    lines.append(
        "last third, recsys(full) / arm, expected CTR (mean [95% t CI] over seeds; observed CTR "
        "in brackets):"
    )
    for key, ci in summ["ratios_last_third"].items():
        obs = summ["ratios_last_third_observed"].get(key, {})
        lines.append(
            f"  {key:28s} {ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]   (observed "
            f"{obs.get('mean', math.nan):.3f})"
        )
    if "oracle_ratio_first_third" in summ:
        f = summ["oracle_ratio_first_third"]
        d = summ["oracle_ratio_last_minus_first"]
        lines.append(
            f"  ratio to oracle, first third  {f['mean']:.3f}; last − first {d['mean']:+.3f} "
            f"[{d['low']:+.3f}, {d['high']:+.3f}]"
        )
    if summ["ablations"]:
        lines.append("")
        lines.append("ablations: full − variant, expected CTR last third (paired by seed):")
        for v, a in summ["ablations"].items():
            ci = a["full_minus_variant"]
            lines.append(f"  {v:16s} {ci['mean']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]")
    if summ["ope"]:
        lines.append("")
        lines.append(
            "OPE of greedy recsys (the serving model, exploration off), slot-0 CTR on recsys's "
            "own logs:"
        )
        for s in seeds:
            o = s["variants"].get("full", {}).get("ope")
            if not o:
                continue
            parts = [
                f"{n} {o[n]['value']:.4f} [{o[n]['low']:.4f}, {o[n]['high']:.4f}]"
                for n in ("ips", "snips", "dr")
                if n in o
            ]
            lines.append(
                f"  seed {s['seed']}: true {o['true']['value']:.4f} | "
                + " | ".join(parts)
                + f" | matches {int(o['rounds']['matches'])}/{int(o['rounds']['value'])}"
            )
        for n, v in summ["ope"].items():
            lines.append(
                f"  {n}: estimate − true {v['estimate_minus_true']['mean']:+.4f}, true value "
                f"inside the CI in {v['true_inside_ci']} seeds"
            )
    return "\n".join(lines)


def run_sim(
    path: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    variants: Sequence[str] = VARIANTS,
    arms: Sequence[str] = ARMS,
    run: SimRun | None = None,
    json_out: str | Path | None = None,
    progress: Callable[[str], None] = print,
    threads: int = 1,
) -> dict[str, Any]:
    """Every seed, every arm and variant; prints the table, writes ``json_out``.

    ``threads``: torch threads (1: on a shared machine more threads make steps much slower).
    """
    torch.set_num_threads(threads)
    base = run or SimRun()
    ml = load_movielens(path)
    vectors: dict[str, np.ndarray] | None = None
    results = []
    for seed in seeds:
        r = replace(base, seed=seed)
        if vectors is None:
            vectors = item_vectors(UserSimulator(ml, SimConfig(seed=seed, n_items=r.n_items)))
        results.append(run_seed(ml, r, variants, arms, vectors, progress))
    out = {"run": base.__dict__, "seeds": results, "summary": summarise(results)}
    progress(render(out))
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=1, default=float))
    return out


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from several ``run_sim`` outputs (e.g. one process per seed)."""
    seeds = [s for part in parts for s in part["seeds"]]
    return {"run": parts[0]["run"], "seeds": seeds, "summary": summarise(seeds)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `recsys eval sim`."""
    from recsys import datasets

    p.add_argument(
        "--path",
        default=datasets.path("ml-latest-small"),
        help="MovieLens folder (default: the packaged latest-small)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds S..S+N-1")
    p.add_argument("--seed-start", type=int, default=0, help="first seed S")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="no run: merge these --json outputs (e.g. one per seed) into one table",
    )
    p.add_argument("--seconds", type=float, default=240.0, help="simulated live seconds per run")
    p.add_argument("--visits-per-s", type=float, default=15.0)
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS} ('' for none)"
    )
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {ARMS} ('' for none)")
    p.add_argument("--temperature", type=float, default=None, help="publisher temperature")
    p.add_argument("--exploration", default=None, choices=["boltzmann", "epsilon", "greedy"])
    p.add_argument("--epsilon", type=float, default=None)
    p.add_argument(
        "--cold-temperature", type=float, default=None, help="publisher cold-start temperature"
    )
    p.add_argument(
        "--cooldown",
        type=float,
        default=None,
        help="serving cooldown in seconds, for recsys and every arm (default: the setting's)",
    )
    p.add_argument(
        "--learner",
        default="",
        help="LearnerConfig overrides for every variant, e.g. click_value_weight=2,lr=3e-3",
    )
    p.add_argument(
        "--no-drift-reaction",
        action="store_true",
        help="without the learner's drift monitor and reaction (exploration and lr boost)",
    )
    p.add_argument("--vw-lambda", type=float, default=100.0, help="VW softmax lambda")
    p.add_argument("--eg-epsilon", type=float, default=0.2, help="the ε-greedy arm's ε")
    p.add_argument("--linucb-alpha", type=float, default=0.3, help="LinUCB bonus weight")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--warm-limit", type=int, default=None, help="first N backfill ratings only")
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures here")


def _number(text: str) -> int | float:
    """A ``--learner`` value: an int where it reads as one (LearnerConfig's int fields reject
    floats), else a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def run_from_args(args: argparse.Namespace) -> int:
    def split(s: str) -> list[str]:
        return [x for x in s.split(",") if x]

    run = SimRun(
        seconds=args.seconds,
        visits_per_s=args.visits_per_s,
        temperature=args.temperature,
        exploration=args.exploration,
        epsilon=args.epsilon,
        vw_lambda=args.vw_lambda,
        eg_epsilon=args.eg_epsilon,
        linucb_alpha=args.linucb_alpha,
        warm_limit=args.warm_limit,
        cold_start_temperature=args.cold_temperature,
        cooldown_s=args.cooldown,
        drift_reaction=not args.no_drift_reaction,
        learner=tuple(
            (k.strip(), _number(v)) for k, v in (kv.split("=", 1) for kv in split(args.learner))
        ),
    )
    for a in split(args.arms):
        if a not in ARMS:
            print(f"unknown arm {a!r}; choose from {ARMS}", file=sys.stderr)
            return 2
    if args.merge:
        merged = merge_results([json.loads(Path(f).read_text()) for f in args.merge])
        print(render(merged))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(merged, indent=1, default=float))
        return 0
    # The learner and publisher log every checkpoint; the console is for the table.
    logging.getLogger("recsys").setLevel(logging.WARNING)
    run_sim(
        args.path,
        range(args.seed_start, args.seed_start + args.seeds),
        split(args.variants),
        split(args.arms),
        run,
        args.json_out,
        threads=args.threads,
    )
    return 0
