"""Run by tests/test_agent_processes.py under `accelerate launch --num_processes 2`: a short PPO agent
run on FrozenLake (3 steps, 4 maps x 2 episodes per step: 2 maps per rank), then each rank writes
a hash of its final trainable weights and what it played.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/agent_run.py OUT_DIR [VLLM_URL]

With VLLM_URL the episodes are sampled by that server (a stand-in in the tests), one step off.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from vlm_rl.distributed import make_accelerator
from vlm_rl.envs import ENVS, make_env
from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.rewards.compose import CombinedReward
from vlm_rl.rl.agent import AgentTrainer, env_reward
from vlm_rl.rl.config import RLConfig

SPEC = ENVS["frozenlake"]


def main(output_dir: Path, vllm_url: str | None = None) -> None:
    torch.set_num_threads(1)
    accelerator = make_accelerator()
    config = RLConfig(
        algorithm="ppo",
        model_name_or_path="tiny-llava-agent",
        prompts_per_step=4,
        samples_per_prompt=2,
        max_new_tokens=2,
        minibatch_size=8,
        total_steps=3,
        learning_rate=1e-3,
        missing_eos_penalty=0.1,
        eval_steps=0,
        save_steps=0,
        output_dir=str(output_dir / "run"),
        report_to="none",
        sample_log_steps=1,
        **(
            dict(rollout_engine="vllm", vllm_url=vllm_url, async_rollouts=True, train_projector=False)
            if vllm_url
            else {}
        ),
    )
    torch.manual_seed(0)
    with accelerator.main_process_first():
        model, processor = load_model(config.model_name_or_path)
    policy = wrap_with_lora(model, r=8, alpha=16, train_projector=config.train_projector)
    initial = {k: v.detach().clone() for k, v in policy.named_parameters() if v.requires_grad}
    trainer = AgentTrainer(
        config,
        policy,
        processor,
        CombinedReward([env_reward]),
        lambda: make_env("frozenlake"),
        SPEC.train_seeds,
        list(SPEC.eval_seeds[:4]),
        max_turns=SPEC.max_turns,
        accelerator=accelerator,
    )
    trainer.train()
    trainer.save_final()
    state = {k: v.detach() for k, v in trainer.unwrapped.named_parameters() if v.requires_grad}
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].cpu().numpy().tobytes())
    policy_moved = any(
        not torch.equal(state[k], initial[k.removeprefix("policy.")])
        for k in state
        if k.startswith("policy.")
    )
    (output_dir / f"rank{accelerator.process_index}.json").write_text(
        json.dumps(
            {
                "step": trainer.step,
                "weights_sha256": digest.hexdigest(),
                "policy_moved": policy_moved,
                "last_step_seeds": sorted({e.seed for e in trainer.last_episodes}),
                "last_step_episodes": len(trainer.last_episodes),
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
