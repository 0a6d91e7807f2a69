"""Reward rules: the value of one feedback event, from settings or a TOML/YAML rules file.

    reward(feedback) = weight[type] * f_type(value)

    click, add_to_cart, purchase, skip   f = 1 (``value`` is ignored)
    dwell                                f = min(max(seconds, 0), dwell_cap_s) / dwell_cap_s
    rating                               f = rating - centre, centre by ``rating_centre``:
                                           global  rating_mean
                                           user    the user's running mean of earlier ratings,
                                                   shrunk towards rating_mean by
                                                   rating_prior_count pseudo-ratings
                                           none    0

A feedback type missing from ``weights`` weighs 0. A dwell or rating without ``value`` is
worth 0.
"""

from __future__ import annotations

import math
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import yaml

from recsys.config import DEFAULT_REWARD_WEIGHTS as DEFAULT_WEIGHTS
from recsys.errors import ConfigError
from recsys.events import FEEDBACK_TYPES

if TYPE_CHECKING:
    from recsys.config import RewardSettings

RATING_CENTRES = ("global", "user", "none")
_RULE_KEYS = frozenset(
    {"weights", "dwell_cap_s", "rating_centre", "rating_mean", "rating_prior_count"}
)


@dataclass(frozen=True)
class RewardRules:
    """How much one feedback event is worth. Immutable; validated at construction.

    Parameters
    ----------
    weights:
        Weight per feedback type (``click``, ``dwell``, ``add_to_cart``, ``purchase``,
        ``rating``, ``skip``); types left out weigh 0.
    dwell_cap_s:
        Dwell seconds at which the dwell reward saturates at its weight.
    rating_centre:
        ``global``, ``user`` or ``none`` (see the module docstring).
    rating_mean:
        The global rating centre, and the prior of the per-user mean.
    rating_prior_count:
        Pseudo-ratings at ``rating_mean`` mixed into each user's running mean.
    """

    weights: Mapping[str, float] = field(default_factory=lambda: DEFAULT_WEIGHTS)
    dwell_cap_s: float = 60.0
    rating_centre: str = "global"
    rating_mean: float = 3.0
    rating_prior_count: float = 1.0

    def __post_init__(self) -> None:
        unknown = set(self.weights) - FEEDBACK_TYPES
        if unknown:
            raise ValueError(
                f"weights: unknown feedback types {sorted(unknown)}; "
                f"allowed: {sorted(FEEDBACK_TYPES)}"
            )
        for name, w in self.weights.items():
            if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"weights[{name!r}] must be a finite number, got {w!r}")
        object.__setattr__(
            self, "weights", MappingProxyType({k: float(v) for k, v in self.weights.items()})
        )
        if not (math.isfinite(self.dwell_cap_s) and self.dwell_cap_s > 0):
            raise ValueError(f"dwell_cap_s must be a finite number > 0, got {self.dwell_cap_s}")
        if self.rating_centre not in RATING_CENTRES:
            raise ValueError(
                f"rating_centre must be one of {RATING_CENTRES}, got {self.rating_centre!r}"
            )
        if not math.isfinite(self.rating_mean):
            raise ValueError(f"rating_mean must be finite, got {self.rating_mean}")
        if not (math.isfinite(self.rating_prior_count) and self.rating_prior_count >= 0):
            raise ValueError(f"rating_prior_count must be >= 0, got {self.rating_prior_count}")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base: RewardRules | None = None
    ) -> RewardRules:
        """Rules from a mapping of the rule keys; ``weights`` merges over ``base``'s weights."""
        unknown = set(values) - _RULE_KEYS
        if unknown:
            raise ValueError(
                f"unknown reward rule keys {sorted(unknown)}; allowed {sorted(_RULE_KEYS)}"
            )
        base = base or cls()
        weights = dict(base.weights)
        extra = values.get("weights", {})
        if not isinstance(extra, Mapping):
            raise ValueError("weights must be a table of feedback type -> number")
        weights.update(extra)
        return cls(
            weights=weights,
            dwell_cap_s=_number(values, "dwell_cap_s", base.dwell_cap_s),
            rating_centre=str(values.get("rating_centre", base.rating_centre)),
            rating_mean=_number(values, "rating_mean", base.rating_mean),
            rating_prior_count=_number(values, "rating_prior_count", base.rating_prior_count),
        )

    @classmethod
    def from_file(cls, path: str | Path, base: RewardRules | None = None) -> RewardRules:
        """Rules from a ``.toml`` or ``.yaml``/``.yml`` file (keys as in :meth:`from_mapping`).

        Raises ConfigError naming the file on anything unreadable or invalid.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        try:
            if suffix not in (".toml", ".yaml", ".yml"):
                raise ValueError("expected a .toml, .yaml or .yml file")
            text = path.read_text(encoding="utf-8")
            data: Any = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text) or {}
            if not isinstance(data, Mapping):
                raise ValueError("expected a table/mapping at the top level")
            return cls.from_mapping(data, base)
        except (OSError, ValueError, yaml.YAMLError) as exc:  # TOMLDecodeError is a ValueError
            raise ConfigError(f"reward rules file {path}: {exc}") from None

    @classmethod
    def from_settings(cls, settings: RewardSettings) -> RewardRules:
        """Rules from the ``rewards`` settings section, then its ``rules_file`` if set."""
        try:
            rules = cls(
                weights=dict(settings.weights),
                dwell_cap_s=settings.dwell_cap_s,
                rating_centre=settings.rating_centre,
                rating_mean=settings.rating_mean,
                rating_prior_count=settings.rating_prior_count,
            )
        except ValueError as exc:
            raise ConfigError(f"RECSYS_REWARDS: {exc}") from None
        if settings.rules_file is not None:
            rules = cls.from_file(settings.rules_file, base=rules)
        return rules

    # -- values --------------------------------------------------------------------------------
    def value(self, event_type: str, value: float | None, centre: float | None = None) -> float:
        """Reward of one feedback event. ``centre`` overrides the rating centre (user mode).

        Always finite: a rating so extreme that the arithmetic overflows is clipped to the
        largest float of its sign.
        """
        w = self.weights.get(event_type, 0.0)
        if event_type == "dwell":
            if value is None:
                return 0.0
            return w * min(max(value, 0.0), self.dwell_cap_s) / self.dwell_cap_s
        if event_type == "rating":
            if value is None:
                return 0.0
            if centre is None:
                centre = self.rating_mean if self.rating_centre == "global" else 0.0
            r = w * (value - centre)
            if not math.isfinite(r):
                r = 0.0 if math.isnan(r) else math.copysign(sys.float_info.max, r)
            return r
        return w

    def user_centre(self, count: int, total: float) -> float:
        """The user-mode rating centre after ``count`` earlier ratings summing to ``total``."""
        n = self.rating_prior_count + count
        if n <= 0:
            return self.rating_mean
        return (self.rating_prior_count * self.rating_mean + total) / n


def _number(values: Mapping[str, Any], key: str, default: float) -> float:
    v = values.get(key, default)
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise ValueError(f"{key} must be a number, got {v!r}")
    return float(v)
