"""PPO for a VLM: caption easy-vqa shapes, rewarded by the learned multimodal reward model.

    accelerate launch recipes/ppo_caption.py
    accelerate launch --config_file recipes/accelerate/multi_cpu.yaml recipes/ppo_caption.py
    accelerate launch recipes/ppo_caption.py --config recipes/configs/ppo_caption.yaml --total_steps 1000

With no arguments: the offline tiny LLaVA, easy-vqa captioning prompts ("Describe the shape."),
reward from reward_models/caption_preference (trained first if missing), PPO with a value head on
the policy's trunk and the reference = the base with the adapter disabled. It prints held-out
reward and caption accuracy (colour and shape both right, judged by rule, not by the reward model)
before and after RL, and saves the adapter to <output_dir>/final.
Real model: --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct (and a reward model trained for it).
"""

import logging
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from trl import TrlParser

from vlm_rl.data.loaders import load_task_dataset
from vlm_rl.distributed import make_accelerator
from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.rewards.build import build_reward
from vlm_rl.rewards.rules import caption_accuracy
from vlm_rl.rl.config import RLConfig, WarmStartConfig
from vlm_rl.rl.trainer import RLTrainer
from vlm_rl.sft import supervised_warm_start

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "ppo_caption.yaml"
DEFAULT_REWARD_MODEL = ROOT / "reward_models" / "caption_preference" / "final"


def caption_metrics(completions: list[str], columns: dict[str, list]) -> dict[str, float]:
    """Held-out task metric: the caption is exactly "<color> <shape>" of the image (easy-vqa labels)."""
    if not {"color", "shape"} <= columns.keys():
        return {}
    correct = [
        caption_accuracy(c, color, shape)
        for c, color, shape in zip(completions, columns["color"], columns["shape"], strict=True)
    ]
    return {"caption_accuracy": sum(correct) / max(len(correct), 1)}


def ensure_default_reward_model(path: Path, accelerator: Accelerator) -> None:
    if (path / "reward_config.json").exists():
        return
    if accelerator.is_main_process:
        print(
            f"reward model {path} not found: training the default one first (recipes/train_reward_model.py)"
        )
    sys.path.insert(0, str(ROOT / "recipes"))
    from train_reward_model import main as train_reward_model_main

    train_reward_model_main(["--output_dir", str(path.parent)])
    accelerator.wait_for_everyone()


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

    # Reward: the learned reward model (+ any rule rewards named in the config)
    if config.reward_model_path is None or Path(config.reward_model_path) == DEFAULT_REWARD_MODEL.relative_to(
        ROOT
    ):
        config.reward_model_path = str(DEFAULT_REWARD_MODEL)
        ensure_default_reward_model(DEFAULT_REWARD_MODEL, accelerator)
    reward = build_reward(
        reward_model_path=config.reward_model_path,
        reward_model_weight=config.reward_model_weight,
        rule_rewards=config.rule_rewards,
        rule_reward_weights=config.rule_reward_weights,
        normalize=config.normalize_rewards,
        device=accelerator.device,
    )

    # Model: base + LoRA (reference = adapter disabled, critic = value head on the same trunk)
    with accelerator.main_process_first():  # the first build of a tiny model writes the cache
        model, processor = load_model(config.model_name_or_path)
    policy = wrap_with_lora(
        model, r=config.lora_r, alpha=config.lora_alpha, train_projector=config.train_projector
    )

    # Dataset: easy-vqa captioning, held-out prompts on unseen images
    train_dataset = load_task_dataset(
        config.dataset, "train", num_samples=config.max_train_prompts, seed=config.seed
    )
    eval_dataset = load_task_dataset(
        config.dataset, "test", num_samples=config.max_eval_prompts, seed=config.seed
    )

    # Training: a short supervised warm start (the SFT stage of RLHF), then PPO
    trainer = RLTrainer(
        config, policy, processor, reward, train_dataset, eval_dataset, caption_metrics, accelerator
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
                f"base policy: caption accuracy {base.get('eval/caption_accuracy', float('nan')):.3f}; after the "
                f"{warm.warm_start_steps}-step warm start (RL starts here): {before.get('eval/caption_accuracy', float('nan')):.3f}"
            )
        print(
            f"held-out ({len(eval_dataset)} unseen images): caption accuracy {before.get('eval/caption_accuracy', float('nan')):.3f} -> "
            f"{after.get('eval/caption_accuracy', float('nan')):.3f}, reward {before['eval/reward']:.3f} -> {after['eval/reward']:.3f}; "
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
