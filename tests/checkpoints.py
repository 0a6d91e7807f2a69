"""A real learner checkpoint of a tiny model, for the tests that load models."""

from __future__ import annotations

from pathlib import Path

from recsys.learner import Learner, LearnerConfig
from recsys.model import ModelConfig


def make_checkpoint(root: Path, step: int, items: list[str], seed: int = 0) -> Path:
    """Save an untrained tiny model over catalogue ``items`` as version ``step`` under ``root``."""
    cfg = ModelConfig(
        text_dim=8,
        dim=16,
        max_history=10,
        item_capacity=64,
        adaptor_hidden=16,
        num_layers=1,
        num_heads=2,
        use_text=False,
    )
    learner = Learner(cfg, LearnerConfig(device="cpu", seed=seed, keep_checkpoints=10))
    for i in items:
        learner.catalog.index_of(i)
    learner.step_count = step
    return learner.save_checkpoint(root, offsets={})
