"""GRPO (or RLOO) for a VLM: answer easy-vqa colour and shape questions, rewarded by rule.

    vlm-rl grpo
    accelerate launch recipes/grpo_vqa.py                        # the same, from a source checkout
    vlm-rl grpo --algorithm rloo
    vlm-rl grpo --reward_model_path reward_models/caption_preference/final \
        --reward_model_weight 0.2          # a multi-objective example: rules + learned reward

Reward: a verifiable exact-match reward on the one-word answer plus a format reward (one word),
optionally a learned reward model as a weighted third component. With no arguments it runs
offline on CPU (tiny LLaVA, optional short supervised warm start; configs/grpo_vqa.yaml) and
prints held-out accuracy before and after RL.
"""

from __future__ import annotations

from vlm_rl.recipes import CONFIGS, check_rl_inputs, parse_config
from vlm_rl.rl.config import RLConfig, WarmStartConfig
from vlm_rl.rl.pipeline import reward_from_config, run_rl, start
from vlm_rl.tasks.easy_vqa import vqa_metrics

DEFAULT_CONFIG = CONFIGS / "grpo_vqa.yaml"


def main(argv: list[str] | None = None) -> dict:
    config, warm = parse_config((RLConfig, WarmStartConfig), argv, DEFAULT_CONFIG, recipe="grpo_vqa")
    check_rl_inputs(config)  # before anything is loaded
    accelerator = start(config)

    # Reward: exact match + format (+ the learned reward model if given)
    reward = reward_from_config(config, accelerator.device)
    # Policy, colour/shape questions (held out: unseen images), warm start, RL (native, or TRL's
    # GRPOTrainer with --trainer trl, vLLM with --use_vllm), report, push
    return run_rl(
        config,
        warm,
        reward,
        vqa_metrics,
        accelerator,
        metric="accuracy",
        held_out="questions on unseen images",
    )
