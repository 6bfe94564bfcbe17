"""Train a multimodal reward model from preference pairs (image, prompt, chosen, rejected).

    accelerate launch recipes/train_reward_model.py
    accelerate launch --config_file recipes/accelerate/multi_cpu.yaml recipes/train_reward_model.py
    accelerate launch recipes/train_reward_model.py --config reward_models/caption_preference.yaml \
        --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct --dataset my_pairs.jsonl --output_dir reward_models/mine

With no arguments it trains the default reward model (reward_models/caption_preference.yaml:
easy-vqa caption pairs, the offline tiny LLaVA) on CPU and prints its held-out pairwise accuracy.
The model is written to <output_dir>/final (and the best evaluation to <output_dir>/best).
"""

import logging
import sys
from pathlib import Path

from trl import TrlParser

from vlm_rl.rewards.trainer import RewardTrainingConfig, train_reward_model

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "reward_models" / "caption_preference.yaml"


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    (config,) = TrlParser((RewardTrainingConfig,)).parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    metrics = train_reward_model(config)

    from accelerate import PartialState

    if PartialState().is_main_process:
        print(
            f"held-out pairwise accuracy: {metrics['eval/accuracy_before']:.3f} before -> "
            f"{metrics['eval/accuracy']:.3f} after ({int(metrics['eval/pairs'])} pairs on unseen images, "
            f"{int(metrics['train/steps'])} steps); model saved to {Path(config.output_dir) / 'final'}"
        )
        if config.push_to_hub:
            from vlm_rl.hub import push_after_training

            print(push_after_training(config))
    return metrics


if __name__ == "__main__":
    main()
