"""Rewards: the multimodal reward model, its trainer, rule rewards and their composition."""

from vlm_rl.rewards.model import RewardModel, RewardScorer

__all__ = ["RewardModel", "RewardScorer"]
