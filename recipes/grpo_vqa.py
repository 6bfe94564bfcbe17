"""GRPO (or RLOO) for a VLM: answer easy-vqa colour and shape questions, rewarded by rule.

    accelerate launch recipes/grpo_vqa.py
    accelerate launch --config_file recipes/accelerate/multi_cpu.yaml recipes/grpo_vqa.py
    accelerate launch recipes/grpo_vqa.py --algorithm rloo
    accelerate launch recipes/grpo_vqa.py --reward_model_path reward_models/caption_preference/final \
        --reward_model_weight 0.2          # a multi-objective example: rules + learned reward

The recipe is src/vlm_rl/recipes/grpo_vqa.py (`vlm-rl grpo` from an installed wheel is the same
run); its default config is recipes/configs/grpo_vqa.yaml.
"""

from vlm_rl.recipes.grpo_vqa import main

if __name__ == "__main__":
    import sys

    from vlm_rl.errors import run_entry_point

    sys.exit(run_entry_point(main, sys.argv[1:], prog="grpo_vqa.py"))
