"""PPO (or GRPO/RLOO) for a VLM agent in a visual environment (FrozenLake, NumberLine, ...).

    accelerate launch recipes/ppo_agent.py                      # FrozenLake random 4x4 maps, PPO
    accelerate launch recipes/ppo_agent.py --config recipes/configs/grpo_agent.yaml   # GRPO + GiGPO
    accelerate launch recipes/ppo_agent.py --env numberline

The recipe is src/vlm_rl/recipes/ppo_agent.py (`vlm-rl agent` from an installed wheel is the same
run); its default config is recipes/configs/ppo_agent.yaml.
"""

from vlm_rl.recipes.ppo_agent import main

if __name__ == "__main__":
    import sys

    from vlm_rl.errors import run_entry_point

    sys.exit(run_entry_point(main, sys.argv[1:], prog="ppo_agent.py"))
