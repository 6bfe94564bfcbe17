"""GRPO (or RLOO) for a VLM: answer easy-vqa colour and shape questions, rewarded by rule.

    accelerate launch recipes/grpo_vqa.py
    accelerate launch --config_file recipes/accelerate/multi_cpu.yaml recipes/grpo_vqa.py
    accelerate launch recipes/grpo_vqa.py --algorithm rloo
    accelerate launch recipes/grpo_vqa.py --reward_model_path reward_models/caption_preference/final \
        --reward_model_weight 0.2          # a multi-objective example: rules + learned reward

Reward: a verifiable exact-match reward on the one-word answer plus a format reward (one word),
optionally a learned reward model as a weighted third component. With no arguments it runs
offline on CPU (tiny LLaVA, optional short supervised warm start) and prints held-out accuracy
before and after RL.
"""

import logging
import sys
from pathlib import Path

import torch
from trl import TrlParser

from vlm_rl.data.loaders import load_task_dataset
from vlm_rl.distributed import make_accelerator
from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.rewards.build import build_reward
from vlm_rl.rewards.rules import normalize_text
from vlm_rl.rl.config import RLConfig, WarmStartConfig
from vlm_rl.rl.trainer import RLTrainer
from vlm_rl.sft import supervised_warm_start

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "grpo_vqa.yaml"


def vqa_metrics(completions: list[str], columns: dict[str, list]) -> dict[str, float]:
    """Held-out task metric: the normalised answer equals the reference answer."""
    if "answer" not in columns:
        return {}
    correct = [
        normalize_text(c) == normalize_text(a) for c, a in zip(completions, columns["answer"], strict=True)
    ]
    return {"accuracy": sum(correct) / max(len(correct), 1)}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    config, warm = TrlParser((RLConfig, WarmStartConfig)).parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    accelerator = make_accelerator(config.gradient_accumulation_steps)
    torch.manual_seed(config.seed)

    # Reward: exact match + format (+ the learned reward model if given)
    reward = build_reward(
        reward_model_path=config.reward_model_path,
        reward_model_weight=config.reward_model_weight,
        rule_rewards=config.rule_rewards,
        rule_reward_weights=config.rule_reward_weights,
        normalize=config.normalize_rewards,
        device=accelerator.device,
    )

    # Model: base + LoRA (reference = adapter disabled)
    with accelerator.main_process_first():  # the first build of a tiny model writes the cache
        model, processor = load_model(config.model_name_or_path)
    policy = wrap_with_lora(
        model, r=config.lora_r, alpha=config.lora_alpha, train_projector=config.train_projector
    )

    # Dataset: colour and shape questions, held-out questions on unseen images
    train_dataset = load_task_dataset(
        config.dataset, "train", num_samples=config.max_train_prompts, seed=config.seed
    )
    eval_dataset = load_task_dataset(
        config.dataset, "test", num_samples=config.max_eval_prompts, seed=config.seed
    )

    # Training: optional short supervised warm start, then RL
    trainer = RLTrainer(
        config, policy, processor, reward, train_dataset, eval_dataset, vqa_metrics, accelerator
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
        if base is not None:
            print(
                f"base policy: accuracy {base.get('eval/accuracy', float('nan')):.3f}; after the {warm.warm_start_steps}-step "
                f"warm start (RL starts here): {before.get('eval/accuracy', float('nan')):.3f}"
            )
        print(
            f"held-out ({len(eval_dataset)} questions on unseen images): accuracy {before.get('eval/accuracy', float('nan')):.3f} -> "
            f"{after.get('eval/accuracy', float('nan')):.3f}, reward {before['eval/reward']:.3f} -> {after['eval/reward']:.3f}; "
            f"adapter saved to {final}"
        )

    if config.push_to_hub and accelerator.is_main_process:
        from vlm_rl.hub import push_or_explain

        print(
            push_or_explain(
                config.output_dir,
                config.hub_model_id,
                private=config.hub_private,
                revision=config.hub_revision,
            )
        )
    return result


if __name__ == "__main__":
    main()
