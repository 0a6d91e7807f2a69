"""`recsys eval sim`: variants map to real switches, paired summaries, and a tiny closed loop."""

from __future__ import annotations

import math

import pytest

from recsys.eval import sim


def test_variants_map_to_learner_and_model_switches():
    from dataclasses import fields

    from recsys.learner.config import LearnerConfig
    from recsys.model import ModelConfig

    have = {f.name for f in fields(LearnerConfig)}
    model = {f.name for f in fields(ModelConfig)}
    for v in sim.VARIANTS:
        learner, mod = sim.variant_overrides(v)
        assert set(learner) <= have
        assert set(mod) <= model
        LearnerConfig(**learner)
        ModelConfig(**mod)
    assert sim.variant_overrides("full") == ({}, {})
    assert sim.variant_overrides("pg") == ({"objective": "reinforce"}, {})
    with pytest.raises(ValueError, match="unknown variant"):
        sim.variant_overrides("nope")


def test_t_interval_and_paired_summary():
    ci = sim.t_interval([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0
    assert ci["low"] < 2.0 < ci["high"]
    assert math.isnan(sim.t_interval([1.0])["low"])

    def arm(e: float) -> dict[str, float]:
        return {"expected_ctr_last": e, "expected_ctr_first": e, "ctr_last": e, "ctr_first": e}

    seeds = [
        {
            "seed": s,
            "arms": {"oracle": arm(0.1), "random": arm(0.01 * (1 + s))},
            "variants": {"full": arm(0.02), "ce": arm(0.015)},
        }
        for s in range(3)
    ]
    out = sim.summarise(seeds)
    per = out["ratios_last_third"]["recsys_over_random"]["per_seed"]
    assert per == pytest.approx([2.0, 1.0, 2 / 3])
    assert out["ratios_last_third"]["recsys_over_oracle"]["mean"] == pytest.approx(0.2)
    assert out["ablations"]["ce"]["full_minus_variant"]["mean"] == pytest.approx(0.005)


@pytest.mark.slow
def test_a_tiny_closed_loop_runs_every_arm_and_recsys(tmp_path):
    from recsys import datasets

    out = sim.run_sim(
        datasets.path("ml-latest-small"),
        seeds=[0],
        variants=["full"],
        arms=["random", "most_popular", "oracle"],
        run=sim.SimRun(seconds=4, warm_limit=600, n_items=200),
        json_out=tmp_path / "sim.json",
        progress=lambda s: None,
    )
    (seed,) = out["seeds"]
    assert seed["arms"]["oracle"]["expected_ctr_all"] > seed["arms"]["random"]["expected_ctr_all"]
    assert seed["variants"]["full"]["steps"] > 0
    assert (tmp_path / "sim.json").is_file()
