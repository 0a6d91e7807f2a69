"""The online learner's own logic: dedupe by reward_id, the step budget, checkpoint cadence."""

from __future__ import annotations

import pytest

from recsys import checkpoint as ckpt
from recsys.drift import DriftMonitor, DriftReaction, EventClock
from recsys.encoder.catalog import ItemCatalog
from recsys.events import ItemVector, RewardRecord
from recsys.learner.config import LearnerConfig
from recsys.learner.online import OnlineConfig, OnlineLearner, RecentIds
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path, clock, **config) -> OnlineLearner:
    model = ModelConfig(text_dim=8, dim=8, max_history=5, item_capacity=16, adaptor_hidden=8,
                        num_heads=2, num_layers=1)  # fmt: skip
    learner = Learner(model, LearnerConfig(batch_size=8, device="cpu", seed=0),
                      ItemCatalog(dim=8))  # fmt: skip
    return OnlineLearner(learner, tmp_path, OnlineConfig(**config), clock=clock)


def rewards(n: int, start: int = 0) -> list[RewardRecord]:
    return [
        RewardRecord(f"r{k}", f"u{k % 3}", f"i{k % 5}", 1.0, 1000 + k, "joined", 0.2, 0)
        for k in range(start, start + n)
    ]


def test_duplicates_are_dropped_by_reward_id(tmp_path):
    online = make(tmp_path, Clock())
    assert online.add_rewards(rewards(10)) == 10
    assert online.add_rewards(rewards(10)) == 0
    assert online.add_rewards(rewards(5, start=8)) == 3
    assert online.duplicates == 12


def test_step_budget_follows_new_samples(tmp_path):
    online = make(tmp_path, Clock(), replay_ratio=2.0, max_steps_per_batch=3)
    online.add_rewards(rewards(20))
    assert len(online.train(4)) == 1  # ceil(4 * 2 / 8)
    assert len(online.train(12)) == 3  # ceil(12 * 2 / 8)
    assert len(online.train(1000)) == 3  # capped
    assert online.train(0) == []
    assert online.version == 7


def test_checkpoint_cadence_and_dedupe_survive_restart(tmp_path):
    clock = Clock()
    online = make(tmp_path, clock, checkpoint_every_steps=5, checkpoint_every_s=60)
    online.add_vectors([ItemVector("i0", "m", "k0", tuple(float(x) for x in range(8)))])
    assert not online.checkpoint_due()
    online.add_rewards(rewards(20))
    online.train(8)  # one step
    assert not online.checkpoint_due()
    clock.t = 61.0
    assert online.checkpoint_due()
    path = online.checkpoint({"rewards:0": 20})
    assert path is not None
    assert not online.checkpoint_due()
    manifest = ckpt.read_manifest(path)
    assert manifest["offsets"] == {"rewards:0": 20}

    resumed, offsets = OnlineLearner.resume(tmp_path, lambda: pytest.fail("must resume"))
    assert offsets == {"rewards:0": 20}
    assert resumed.version == online.version
    assert resumed.add_rewards(rewards(20)) == 0, "reward ids seen before the checkpoint"
    assert resumed.learner.catalog.vectors[resumed.learner.catalog.index["i0"]][1] == 1.0


def test_vectors_of_the_wrong_width_are_ignored(tmp_path):
    online = make(tmp_path, Clock())
    assert online.add_vectors([ItemVector("i0", "m", "k", (1.0, 2.0))]) == 0
    assert "i0" not in online.learner.catalog


def test_recent_ids_forget_the_oldest():
    ids = RecentIds(3)
    assert all(ids.add(k) for k in "abc")
    assert not ids.add("a")
    assert ids.add("d")
    assert "a" not in ids
    assert "d" in ids
    assert ids.newest(2) == ["c", "d"]
    with pytest.raises(ValueError, match="capacity"):
        RecentIds(0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("replay_ratio", 0), ("max_steps_per_batch", 0), ("checkpoint_every_s", 0),
     ("dedupe_persisted", -1)],
)  # fmt: skip
def test_config_is_validated(field, value):
    with pytest.raises(ValueError, match=field):
        OnlineConfig(**{field: value})


def test_a_drift_reaction_lasts_its_duration_in_event_time(tmp_path):
    """A detection made while replaying history (a backfill: years of events in a minute)
    expires with that history, so the live traffic after it is served without the boost; a
    detection in live time lasts its 300 s of event time."""
    events = EventClock()
    reaction = DriftReaction(duration_s=300, exploration_factor=2.0, lr_factor=2.0, clock=events)
    online = make(tmp_path, Clock())
    online.reaction, online.event_clock = reaction, events

    def at(ts_ms: int, n: int) -> list[RewardRecord]:
        return [
            RewardRecord(f"{ts_ms}-{k}", "u1", f"i{k}", 1.0, ts_ms, "organic") for k in range(n)
        ]

    history_ms, live_ms = 1_000_000_000_000, 1_700_000_000_000
    online.add_rewards(at(history_ms, 3))
    reaction.trigger("item_popularity")
    online.add_rewards(at(history_ms + 200_000, 3))  # 200 s of history later: still on
    assert reaction.exploration_factor == 2.0
    online.add_rewards(at(live_ms, 3))  # the live phase: the history's reaction is over
    assert reaction.exploration_factor == 1.0
    online.train(8)
    path = online.checkpoint({})
    assert path is not None
    assert ckpt.read_manifest(path)["extra"]["exploration_factor"] == 1.0
    reaction.trigger("reward_rate")  # a live detection
    online.add_rewards(at(live_ms + 299_000, 3))
    assert reaction.lr_factor == 2.0
    online.add_rewards(at(live_ms + 301_000, 3))
    assert reaction.lr_factor == 1.0


@pytest.mark.parametrize(("kind", "watched"), [("joined", True), ("organic", False)])
def test_the_reward_signals_watch_shown_items_only(tmp_path, kind, watched):
    """Mean reward and reward rate are per impression: organic feedback (a ratings backfill)
    has another scale, and its share changing is not drift in what users do with slates."""
    online = make(tmp_path, Clock())
    online.drift = DriftMonitor(("mean_reward", "reward_rate"))
    for batch in range(200):  # the reward rate jumps from 0 to 1 halfway
        value = 1.0 if batch >= 100 else 0.0
        online.add_rewards(
            [
                RewardRecord(f"{batch}-{k}", f"u{k}", f"i{k % 5}", value, 1000 * batch, kind)
                for k in range(5)
            ]
        )
    fired = online.drift.detections["reward_rate"] + online.drift.detections["mean_reward"]
    assert (fired > 0) is watched
