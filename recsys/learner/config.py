"""The learner's hyper-parameters (:class:`LearnerConfig`), validated at construction."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from recsys.config import LearnerSettings
from recsys.errors import ConfigError
from recsys.model import MODEL_SIZE_BOUNDS, ModelConfig

log = logging.getLogger(__name__)


# Fields older checkpoints may carry that no longer mean anything (the sampled next-item InfoNCE
# they tuned was replaced by the every-position cross-entropy); from_dict drops them.
RETIRED_FIELDS = frozenset({"augment_weight", "contrast_all_positions", "contrast_negatives"})


@dataclass(frozen=True)
class LearnerConfig:
    """Learner hyper-parameters; validated at construction, errors name the parameter.

    The dataclass defaults are the full model, every idea on (the policy gradient included);
    the worker ships :meth:`from_settings` (cross-entropy on clicked items: the policy gradient
    showed no gain, README) with :func:`model_config` (no text tower, for the same reason).

    Switches for ablations (see :mod:`recsys.learner.trainer`):
    ``mask_history`` (π over the allowed set, history items masked as the publisher excludes
    them), ``impression_baseline`` (REINFORCE advantage ``R − mean R``: ignored impressions lose
    probability), ``off_policy_correction`` (top-K weight ``min(π/β, c)·λ_K`` on rows with a
    logged propensity), ``contrastive`` ("none" turns the contrastive term off),
    ``sequence_weight`` (0 turns the every-position next-item term off); text and id towers are
    ``ModelConfig.use_text`` / ``use_id_embedding`` / ``item_bias``.

    Memory bounds: ``max_users`` users' histories are held (LRU by last event), ``max_items``
    item ids (at most ``ModelConfig``'s item_capacity bound, 2^24).
    """

    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    objective: Literal["reinforce", "ce"] = "reinforce"
    pg_weight: float = 1.0
    topk: int = 10
    weight_cap: float = 10.0
    behaviour_weight: float = 0.0
    sequence_weight: float = 1.0
    mask_history: bool = True
    impression_baseline: bool = True
    off_policy_correction: bool = True
    alpha: float = 1.0
    contrastive: Literal["infonce", "hinge", "none"] = "infonce"
    augment_views: int = 2
    augment_rows: int = 64
    normalize_weights: bool = True
    contrast_temperature: float = 0.1
    hinge_margin: float = 0.5
    softmax: Literal["auto", "full", "sampled"] = "auto"
    sampled_above: int = 4096
    num_negatives: int = 1024
    behaviour_negatives: int = 2048
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
    max_users: int = 200_000
    max_items: int = 1_000_000
    # The serving-only value bias (recsys.learner.item_value): weight of the standardised
    # organic mean reward, weight of log(CTR / mean CTR) from impressions, and their priors.
    # The click term is off by default: in `recsys eval sim` (3 seeds, 2 and 4 minutes of
    # traffic) it did not add to the organic term (README, sim row); 3 is the weight tried.
    # The reward head (recsys.model.RewardHead): weight of its loss (0: no head), L2 on the
    # factors it uses (0.05: above 0.1 on each of 3 seeds of `recsys eval sim`, +0.0007
    # expected CTR, CI including 0), and the weight of its p·q in the serving scores (30: the
    # best of 10 / 30 / 60 / 100 for greedy slates after the warm start, seed 0).
    reward_head_weight: float = 1.0
    # Rows of the reward head's loss per step, in batches sampled from the replay buffer: the
    # head is a table lookup, so its rows cost next to nothing beside the transformer's, and a
    # factor row needs many samples (1: the policy's own batch).
    reward_batch_multiplier: int = 8
    reward_l2: float = 0.13
    reward_serving_weight: float = 50.0
    # Weight in the head's loss of rows with a logged propensity (impressions, and the
    # feedback joined to them) against organic feedback's 1. An impression's outcome is not on
    # a rating's scale: the top items of a user, rated +1.5 by the ratings they resemble, come
    # back as 0 when ignored (97% of them), and fitting both with one factor pulls the user's
    # factor away from their taste. At 0 (the default) the head fits organic feedback alone;
    # the policy's own loss learns from impressions.
    reward_impression_weight: float = 0.0
    # Every this many steps, exact alternating least-squares sweeps of the reward head over
    # the whole replay buffer (recsys.learner.reward_refit; 0: gradient steps only).
    reward_refit_every: int = 50
    reward_refit_sweeps: int = 2
    organic_value_weight: float = 8.0
    click_value_weight: float = 0.0
    # Optimism c of the click term: rank by the CTR's upper bound ctr + c·sd, a bonus for items
    # little shown. Off: at weight 3 and c 2 it moved new items from 0.8% to 0.9% of
    # impressions and the last third by -0.0003 [-0.0032, +0.0025] (`recsys eval sim`, seeds
    # 1-3, variant with_click_optimism); the serving scores' spread dwarfs it.
    click_value_optimism: float = 0.0
    organic_value_prior: float = 5.0
    click_value_prior: float = 20.0

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
            "batch_size",
            "topk",
            "sampled_above",
            "num_negatives",
            "buffer_capacity",
            "min_buffer",
            "keep_checkpoints",
            "reward_batch_multiplier",
            "max_users",
            "max_items",
        ):
            check(n, pos_int(getattr(self, n)), "an int >= 1")
        for n in ("reward_refit_every", "reward_refit_sweeps"):
            v = getattr(self, n)
            check(n, isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0")
        for n in (
            "weight_decay",
            "pg_weight",
            "behaviour_weight",
            "alpha",
            "hinge_margin",
            "sequence_weight",
            "organic_value_weight",
            "click_value_weight",
            "click_value_optimism",
            "reward_head_weight",
            "reward_l2",
            "reward_serving_weight",
            "reward_impression_weight",
        ):
            check(n, nonneg(getattr(self, n)), "a finite number >= 0")
        for n in (
            "lr",
            "weight_cap",
            "contrast_temperature",
            "grad_clip",
            "organic_value_prior",
            "click_value_prior",
        ):
            check(n, nonneg(getattr(self, n)) and getattr(self, n) > 0, "a finite number > 0")
        check("objective", self.objective in ("reinforce", "ce"), "'reinforce' or 'ce'")
        check(
            "contrastive",
            self.contrastive in ("infonce", "hinge", "none"),
            "'infonce', 'hinge' or 'none'",
        )
        check("augment_views", self.augment_views in (1, 2), "1 or 2")
        for n in ("mask_history", "impression_baseline", "off_policy_correction", "amp"):
            check(n, isinstance(getattr(self, n), bool), "a bool")
        check("softmax", self.softmax in ("auto", "full", "sampled"), "'auto', 'full' or 'sampled'")
        check("recent_fraction", 0.0 <= self.recent_fraction <= 1.0, "in [0, 1]")
        rc = self.recent_capacity
        check(
            "recent_capacity",
            rc is None or (isinstance(rc, int) and 0 <= rc <= self.buffer_capacity),
            "None or an int in [0, buffer_capacity]",
        )
        item_bound = MODEL_SIZE_BOUNDS["item_capacity"]
        check("max_items", self.max_items <= item_bound, f"at most {item_bound} (item_capacity)")
        check("device", isinstance(self.device, str) and bool(self.device), "a device string")

    @classmethod
    def from_settings(cls, s: LearnerSettings) -> LearnerConfig:
        """The learner worker's configuration: these defaults plus the ``RECSYS_LEARNER__*``
        settings that override them."""
        return cls(
            batch_size=s.batch_size,
            lr=s.lr,
            alpha=s.alpha,
            objective=s.objective,
            topk=s.topk,
            weight_cap=s.weight_cap,
            buffer_capacity=s.buffer_capacity,
            device=s.device,
            keep_checkpoints=s.keep_checkpoints,
            reward_batch_multiplier=s.reward_batch_multiplier,
            reward_impression_weight=s.reward_impression_weight,
            reward_refit_every=s.reward_refit_every,
            max_users=s.max_users,
            max_items=s.max_items,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnerConfig:
        known = {f.name for f in fields(cls)}
        retired = set(d) & RETIRED_FIELDS
        if retired:
            log.info("LearnerConfig: ignoring retired fields %s", sorted(retired))
            d = {k: v for k, v in d.items() if k not in retired}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"LearnerConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


def model_config(
    s: LearnerSettings, text_dim: int, item_capacity: int | None = None
) -> ModelConfig:
    """The learner worker's model: its settings' width, depth, history and towers.

    ``item_capacity`` (None: the setting) sizes the item tables up front, as offline evaluation
    does for a catalogue it knows.
    """
    return ModelConfig(
        text_dim=text_dim,
        dim=s.dim,
        num_layers=s.layers,
        max_history=s.max_history,
        item_capacity=s.item_capacity if item_capacity is None else item_capacity,
        use_text=s.text,
        use_id_embedding=s.id_embeddings,
    )
