"""PPO for a VLM: caption easy-vqa shapes, rewarded by the learned multimodal reward model.

    accelerate launch recipes/ppo_caption.py
    accelerate launch --config_file recipes/accelerate/multi_cpu.yaml recipes/ppo_caption.py
    accelerate launch recipes/ppo_caption.py --config recipes/configs/ppo_caption.yaml --total_steps 1000

The recipe is src/vlm_rl/recipes/ppo_caption.py (`vlm-rl ppo` from an installed wheel is the same
run); with no --reward_model_path it trains reward_models/caption_preference first if missing.
"""

from vlm_rl.recipes.ppo_caption import main

if __name__ == "__main__":
    import sys

    from vlm_rl.errors import run_entry_point

    sys.exit(run_entry_point(main, sys.argv[1:], prog="ppo_caption.py"))
