"""The RL recipes' common run: policy, data, optional supervised warm start, RL, save, report, push.

A recipe (recipes/ppo_caption.py, recipes/grpo_vqa.py) parses its config, builds its reward and
names its held-out task metric; `run_rl` does the rest the same way for every algorithm.
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator

from vlm_rl.data.loaders import load_task_dataset
from vlm_rl.distributed import make_accelerator
from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.rewards.build import build_reward
from vlm_rl.rewards.compose import CombinedReward
from vlm_rl.rl.config import RLConfig, WarmStartConfig
from vlm_rl.rl.trainer import EvalMetric, RLTrainer
from vlm_rl.sft import supervised_warm_start


def start(config: RLConfig) -> Accelerator:
    """Logging, CPU threads, the accelerator and the seed: what every recipe does first."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    accelerator = make_accelerator(config.gradient_accumulation_steps)
    torch.manual_seed(config.seed)
    return accelerator


def reward_from_config(config: RLConfig, device: torch.device) -> CombinedReward:
    """The reward the config names: rule rewards and/or a learned reward model, weighted."""
    return build_reward(
        reward_model_path=config.reward_model_path,
        reward_model_weight=config.reward_model_weight,
        rule_rewards=config.rule_rewards,
        rule_reward_weights=config.rule_reward_weights,
        normalize=config.normalize_rewards,
        device=device,
    )


def run_rl(
    config: RLConfig,
    warm: WarmStartConfig,
    reward: CombinedReward,
    eval_metric: EvalMetric,
    accelerator: Accelerator,
    *,
    metric: str,
    held_out: str,
) -> dict:
    """Train and report. Returns `RLTrainer.train`'s {"before", "after"} held-out metrics.

    The policy is the base + LoRA (reference = adapter disabled, PPO critic = value head on the
    same trunk); prompts come from `config.dataset` (held-out ones on the test split). With
    `warm.warm_start_steps`, a short supervised warm start (the SFT stage of RLHF) runs first and
    the base policy's score is reported too. The main process prints `metric` (e.g.
    "caption_accuracy") and the reward before and after, for `held_out` items (e.g. "unseen
    images"), then pushes the run when `config.push_to_hub`.
    """
    with accelerator.main_process_first():  # the first build of a tiny model writes the cache
        model, processor = load_model(config.model_name_or_path)
    policy = wrap_with_lora(
        model, r=config.lora_r, alpha=config.lora_alpha, train_projector=config.train_projector
    )
    train_dataset = load_task_dataset(
        config.dataset, "train", num_samples=config.max_train_prompts, seed=config.seed
    )
    eval_dataset = load_task_dataset(
        config.dataset, "test", num_samples=config.max_eval_prompts, seed=config.seed
    )

    trainer = RLTrainer(
        config, policy, processor, reward, train_dataset, eval_dataset, eval_metric, accelerator
    )
    base = trainer.evaluate() if warm.warm_start_steps and not config.resume_from_checkpoint else None
    if base is not None:
        supervised_warm_start(
            trainer.unwrapped.policy,
            processor,
            train_dataset,
            steps=warm.warm_start_steps,
            learning_rate=warm.warm_start_learning_rate,
            batch_size=warm.warm_start_batch_size,
            seed=config.seed,
        )
    result = trainer.train()
    final = trainer.save_final(result["after"])

    if accelerator.is_main_process:
        before, after = result["before"], result["after"]
        label = metric.replace("_", " ")

        def score(metrics: dict) -> str:
            return f"{metrics.get(f'eval/{metric}', float('nan')):.3f}"

        if base is not None:
            print(
                f"base policy: {label} {score(base)}; after the {warm.warm_start_steps}-step warm start "
                f"(RL starts here): {score(before)}"
            )
        print(
            f"held-out ({len(eval_dataset)} {held_out}): {label} {score(before)} -> {score(after)}, reward "
            f"{before['eval/reward']:.3f} -> {after['eval/reward']:.3f}; adapter saved to {final}"
        )
        if config.push_to_hub:
            from vlm_rl.hub import push_after_training

            print(push_after_training(config))
    return result
