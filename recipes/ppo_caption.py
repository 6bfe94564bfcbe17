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

import sys
from pathlib import Path

from accelerate import Accelerator
from trl import TrlParser

from vlm_rl.rl.config import RLConfig, WarmStartConfig
from vlm_rl.rl.pipeline import reward_from_config, run_rl, start
from vlm_rl.tasks.easy_vqa import caption_metrics

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "ppo_caption.yaml"
DEFAULT_REWARD_MODEL = ROOT / "reward_models" / "caption_preference" / "final"


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
    accelerator = start(config)

    # Reward: the learned reward model (+ any rule rewards named in the config)
    if config.reward_model_path is None or Path(config.reward_model_path) == DEFAULT_REWARD_MODEL.relative_to(
        ROOT
    ):
        config.reward_model_path = str(DEFAULT_REWARD_MODEL)
        ensure_default_reward_model(DEFAULT_REWARD_MODEL, accelerator)
    reward = reward_from_config(config, accelerator.device)

    # Policy, captioning prompts (held out: unseen images), warm start, PPO, report, push
    return run_rl(
        config,
        warm,
        reward,
        caption_metrics,
        accelerator,
        metric="caption_accuracy",
        held_out="unseen images",
    )


if __name__ == "__main__":
    main()
