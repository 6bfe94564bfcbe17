"""Build the combined reward of an RL run from names and weights (the config's reward fields)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlm_rl.rewards.compose import CombinedReward, RewardComponent
from vlm_rl.rewards.model import CONFIG_NAME, RewardModel
from vlm_rl.rewards.rules import RULE_REWARDS

logger = logging.getLogger(__name__)


def load_reward_model(path: str, device: torch.device | str = "cpu") -> RewardModel:
    """Load a reward model, or fail with the command that trains it."""
    local = Path(path)
    looks_local = local.exists() or path.startswith((".", "/")) or path.count("/") != 1
    if looks_local and not (local / CONFIG_NAME).exists():
        raise FileNotFoundError(
            f"reward model not found at {path!r}. Train it first:\n"
            f"    accelerate launch recipes/train_reward_model.py --output_dir {local.parent if local.name in ('final', 'best') else local}\n"
            "(or point --reward_model_path at a trained reward model folder or hub repo)"
        )
    model = RewardModel.from_pretrained(path)
    model.scorer.to(device)
    return model


def build_reward(
    *,
    reward_model_path: str | None = None,
    reward_model_weight: float = 1.0,
    rule_rewards: list[str] | tuple[str, ...] = (),
    rule_reward_weights: list[float] | tuple[float, ...] | None = None,
    normalize: bool = False,
    device: torch.device | str = "cpu",
) -> CombinedReward:
    """A CombinedReward from a reward-model path and rule-reward names with their weights."""
    weights = list(rule_reward_weights) if rule_reward_weights else [1.0] * len(rule_rewards)
    components = []
    for name, weight in zip(rule_rewards, weights, strict=True):
        if name not in RULE_REWARDS:
            raise ValueError(f"unknown rule reward {name!r}; choose among {sorted(RULE_REWARDS)}")
        components.append(RewardComponent(name, RULE_REWARDS[name], weight=weight, normalize=normalize))
    if reward_model_path:
        reward_model = load_reward_model(reward_model_path, device)
        components.append(
            RewardComponent("reward_model", reward_model, weight=reward_model_weight, normalize=normalize)
        )
    if not components:
        raise ValueError("no reward: give --reward_model_path and/or --rule_rewards")
    return CombinedReward(components)
