"""Train a multimodal reward model from preference pairs (image, prompt, chosen, rejected).

    accelerate launch recipes/train_reward_model.py
    accelerate launch --config_file recipes/accelerate/multi_cpu.yaml recipes/train_reward_model.py
    accelerate launch recipes/train_reward_model.py --config reward_models/caption_preference.yaml \
        --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct --dataset my_pairs.jsonl --output_dir reward_models/mine

The recipe is src/vlm_rl/recipes/train_reward_model.py (`vlm-rl train-reward-model` from an
installed wheel is the same run); with no --config it trains the default reward model
(reward_models/caption_preference.yaml) and prints its held-out pairwise accuracy.
"""

from vlm_rl.recipes.train_reward_model import main

if __name__ == "__main__":
    import sys

    from vlm_rl.errors import run_entry_point

    sys.exit(run_entry_point(main, sys.argv[1:], prog="train_reward_model.py"))
