"""The learner's hyper-parameters (:class:`LearnerConfig`), validated at construction."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from recsys.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnerConfig:
    """Learner hyper-parameters; validated at construction, errors name the parameter."""

    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    objective: Literal["reinforce", "ce"] = "reinforce"
    pg_weight: float = 1.0
    topk: int = 10
    weight_cap: float = 10.0
    behaviour_weight: float = 1.0
    alpha: float = 1.0
    contrastive: Literal["infonce", "hinge", "none"] = "infonce"
    augment_weight: float = 0.1
    augment_views: int = 1
    augment_rows: int = 32
    contrast_all_positions: bool = True
    normalize_weights: bool = True
    contrast_temperature: float = 0.1
    hinge_margin: float = 0.5
    softmax: Literal["auto", "full", "sampled"] = "auto"
    sampled_above: int = 50_000
    num_negatives: int = 2048
    behaviour_negatives: int = 2048
    contrast_negatives: int = 256
    buffer_capacity: int = 100_000
    recent_capacity: int | None = None
    recent_fraction: float = 0.5
    min_buffer: int = 1
    grad_clip: float = 5.0
    amp: bool = True
    device: str = "auto"
    seed: int = 0
    keep_checkpoints: int = 3
    checkpoint_buffer: bool = False

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(
                    f"LearnerConfig.{name} must be {what}, got {getattr(self, name)!r}"
                )

        def pos_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        def nonneg(v: Any) -> bool:
            return isinstance(v, int | float) and math.isfinite(v) and v >= 0

        for n in (
            "augment_rows",
            "behaviour_negatives",
            "contrast_negatives",
            "batch_size",
            "topk",
            "sampled_above",
            "num_negatives",
            "buffer_capacity",
            "min_buffer",
            "keep_checkpoints",
        ):
            check(n, pos_int(getattr(self, n)), "an int >= 1")
        for n in (
            "weight_decay",
            "pg_weight",
            "behaviour_weight",
            "alpha",
            "augment_weight",
            "hinge_margin",
        ):
            check(n, nonneg(getattr(self, n)), "a finite number >= 0")
        for n in ("lr", "weight_cap", "contrast_temperature", "grad_clip"):
            check(n, nonneg(getattr(self, n)) and getattr(self, n) > 0, "a finite number > 0")
        check("objective", self.objective in ("reinforce", "ce"), "'reinforce' or 'ce'")
        check(
            "contrastive",
            self.contrastive in ("infonce", "hinge", "none"),
            "'infonce', 'hinge' or 'none'",
        )
        check("augment_views", self.augment_views in (1, 2), "1 or 2")
        check("softmax", self.softmax in ("auto", "full", "sampled"), "'auto', 'full' or 'sampled'")
        check("recent_fraction", 0.0 <= self.recent_fraction <= 1.0, "in [0, 1]")
        rc = self.recent_capacity
        check(
            "recent_capacity",
            rc is None or (isinstance(rc, int) and 0 <= rc <= self.buffer_capacity),
            "None or an int in [0, buffer_capacity]",
        )
        check("device", isinstance(self.device, str) and bool(self.device), "a device string")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"LearnerConfig: unknown fields {sorted(unknown)}")
        return cls(**d)
