"""A real learner checkpoint of a tiny model, for the tests that load models."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsys.learner.config import LearnerConfig
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """The small network the checkpoint and model-store tests save and load."""
    fields: dict[str, Any] = {
        "text_dim": 8,
        "dim": 16,
        "max_history": 10,
        "item_capacity": 64,
        "adaptor_hidden": 16,
        "num_layers": 1,
        "num_heads": 2,
        "use_text": False,
    }
    return ModelConfig(**{**fields, **overrides})


def tiny_learner(seed: int = 0) -> Learner:
    """An untrained learner over :func:`tiny_model_config`, on the CPU."""
    return Learner(tiny_model_config(), LearnerConfig(device="cpu", seed=seed, keep_checkpoints=10))


def make_checkpoint(root: Path, step: int, items: list[str], seed: int = 0) -> Path:
    """Save an untrained tiny model over catalogue ``items`` as version ``step`` under ``root``."""
    learner = tiny_learner(seed)
    for i in items:
        learner.catalog.index_of(i)
    learner.step_count = step
    return learner.save_checkpoint(root, offsets={})


def edit_manifest(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite checkpoint ``path``'s manifest.json after ``edit(manifest)``, as a tamperer would."""
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
