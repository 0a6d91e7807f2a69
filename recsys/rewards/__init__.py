"""Rewards: reward rules, the streaming attribution-window join, and its offline reference.

- :mod:`recsys.rewards.rules`: what one feedback event is worth (settings or a TOML/YAML file).
- :mod:`recsys.rewards.join`: :class:`RewardJoin`, the per-partition streaming join with crash-safe
  commit offsets.
- :mod:`recsys.rewards.oracle`: :func:`offline_join`, the same join computed offline
  (:func:`offline_join_for`: with a reward worker's settings).
"""

from recsys.rewards.join import (
    LATE_RULES,
    RewardJoin,
    default_reward_id,
    encode_reward,
    feedback_reward_id,
)
from recsys.rewards.oracle import offline_join, offline_join_for
from recsys.rewards.rules import DEFAULT_WEIGHTS, RewardRules

__all__ = [
    "DEFAULT_WEIGHTS",
    "LATE_RULES",
    "RewardJoin",
    "RewardRules",
    "default_reward_id",
    "encode_reward",
    "feedback_reward_id",
    "offline_join",
    "offline_join_for",
]
