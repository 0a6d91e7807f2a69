"""The demo's warm-up wait: done when the newest checkpoint has learned every backfill reward."""

from __future__ import annotations

import time
from pathlib import Path

from recsys.demo.run import _wait_for_model
from recsys.learner.config import LearnerConfig
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig


class NoMetrics:
    """The learner's metrics endpoint, silent: the wait must rely on the checkpoint alone."""

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        return []


def _save(root: Path, offsets: dict[str, int]) -> None:
    cfg = ModelConfig(text_dim=8, dim=16, max_history=4, item_capacity=8, use_text=False)
    Learner(cfg, LearnerConfig(device="cpu")).save_checkpoint(root, offsets)


def test_wait_ends_when_the_newest_checkpoint_covers_the_backfill(tmp_path, capsys) -> None:
    # The learner's last checkpoint already covers everything and no other will come.
    _save(tmp_path, {"rw:0": 30, "rw:1": 20, "vectors:0": 999})
    t0 = time.monotonic()
    _wait_for_model([], NoMetrics(), tmp_path, "rw", 50, timeout_s=30)
    assert time.monotonic() - t0 < 5
    assert "time is up" not in capsys.readouterr().out


def test_wait_gives_up_when_the_checkpoint_lags(tmp_path, capsys) -> None:
    _save(tmp_path, {"rw:0": 30, "rw:1": 19, "vectors:0": 999})  # one reward short
    _wait_for_model([], NoMetrics(), tmp_path, "rw", 50, timeout_s=1.5)
    assert "time is up" in capsys.readouterr().out
