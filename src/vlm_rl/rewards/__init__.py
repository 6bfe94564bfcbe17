"""Rewards: the multimodal reward model, its trainer, rule rewards and their composition.

The reward model (which imports transformers) is loaded lazily so rule rewards stay cheap to import.
"""

from vlm_rl.rewards.compose import (
    CombinedReward,
    NonFiniteRewardError,
    RewardComponent,
    RewardError,
    RewardResult,
)
from vlm_rl.rewards.rules import RULE_REWARDS

__all__ = [
    "RULE_REWARDS",
    "CombinedReward",
    "NonFiniteRewardError",
    "RewardComponent",
    "RewardError",
    "RewardModel",
    "RewardResult",
]


def __getattr__(name: str):
    if name in ("RewardModel", "RewardScorer"):
        from vlm_rl.rewards import model

        return getattr(model, name)
    raise AttributeError(name)
