"""VLM agents over multi-turn episodes: batched rollouts, the agent trainer, resume, run folder.
Real gymnasium environments and real training steps on the tiny agent VLM."""

from __future__ import annotations

import json

import pytest
import torch

from vlm_rl.envs import ENVS, make_env
from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.rewards.compose import CombinedReward
from vlm_rl.rl.agent import (
    AgentContext,
    AgentTrainer,
    env_reward,
    expert_dataset,
    play_episodes,
    turn_example,
)
from vlm_rl.rl.config import RLConfig

SPEC = ENVS["frozenlake"]
SEEDS = list(SPEC.train_seeds[:6])


def make_agent_trainer(tmp_path, **overrides) -> AgentTrainer:
    torch.manual_seed(0)
    settings = dict(
        algorithm="ppo",
        model_name_or_path="tiny-llava-agent",
        prompts_per_step=4,
        samples_per_prompt=2,
        max_new_tokens=2,
        minibatch_size=32,
        total_steps=2,
        lr_decay_steps=4,  # the same schedule for a 2-step first half and a 4-step run
        eval_steps=0,
        save_steps=0,
        learning_rate=1e-3,
        missing_eos_penalty=0.1,
        output_dir=str(tmp_path / "run"),
        report_to="none",
        sample_log_steps=1,
    )
    settings.update(overrides)
    model, processor = load_model("tiny-llava-agent")
    policy = wrap_with_lora(model, r=8, alpha=16)
    return AgentTrainer(
        RLConfig(**settings),
        policy,
        processor,
        CombinedReward([env_reward]),
        lambda: make_env("frozenlake"),
        SPEC.train_seeds,
        list(SPEC.eval_seeds[:8]),
        max_turns=SPEC.max_turns,
    )


def trainable_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.named_parameters() if v.requires_grad}


def test_batched_episodes_equal_one_at_a_time():
    """One batched generate per turn over the live episodes (finished ones leave the batch) plays
    exactly what one episode at a time plays: same actions and rewards (greedy decoding)."""
    model, processor = load_model("tiny-llava-agent")
    policy = wrap_with_lora(model, r=8, alpha=16)
    with torch.no_grad():  # a non-trivial policy: B != 0
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    options = dict(max_turns=SPEC.max_turns, max_new_tokens=2, greedy=True)
    rollout, batch, batched = play_episodes(
        policy, processor, [make_env("frozenlake") for _ in SEEDS], SEEDS, **options
    )
    single = [
        play_episodes(policy, processor, [make_env("frozenlake")], [seed], **options)[2][0] for seed in SEEDS
    ]
    assert [e.actions for e in batched] == [e.actions for e in single]
    assert [e.rewards for e in batched] == [e.rewards for e in single]
    lengths = {e.turns for e in batched}
    assert len(rollout) == sum(e.turns for e in batched) == len(batch.prompts)
    assert rollout.turn_index.max().item() + 1 == max(lengths)
    # every turn row knows its episode and position; env rewards ride along as a column
    for row in range(len(rollout)):
        episode = batched[rollout.episode_index[row]]
        assert batch.columns["env_reward"][row] == episode.rewards[rollout.turn_index[row]]


def test_context_policy_adds_frames_and_action_history():
    env = make_env("frozenlake")
    turn = env.reset(seed=SEEDS[0])
    frames, actions = [turn.image, turn.image], ["down", "right", "up"]
    example = turn_example(turn, frames, actions, AgentContext(frames=2, actions=2))
    assert len(example["images"]) == 2
    content = example["prompt"][0]["content"]
    assert [c["type"] for c in content] == ["image", "image", "text"]
    assert content[-1]["text"].endswith("history : right up")
    assert len(turn_example(turn, [], [], AgentContext())["images"]) == 1


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_agent_steps_train_and_record_episodes(tmp_path, algorithm):
    trainer = make_agent_trainer(tmp_path, algorithm=algorithm)
    before = trainable_state(trainer)
    result = trainer.train()
    assert {"eval/success_rate", "eval/return", "eval/length", "eval/invalid_action_rate"} <= result[
        "after"
    ].keys()
    assert any(not torch.equal(v, before[k]) for k, v in trainable_state(trainer).items()), "nothing trained"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 2
    for key in (
        "episodes/success_rate",
        "episodes/return",
        "episodes/length",
        "episodes/invalid_action_rate",
    ):
        assert key in steps[-1], key
    if algorithm == "ppo":
        assert "objective/explained_variance" in steps[-1] and "loss/value" in steps[-1]
    episodes = [json.loads(line) for line in (tmp_path / "run" / "episodes.jsonl").open()]
    assert len(episodes) == 2 * 4 * 2 and {"actions", "rewards", "success", "replies"} <= episodes[0].keys()
    assert len(list((tmp_path / "run" / "episodes").glob("*.png"))) == 2 * 4


def test_agent_resume_gives_the_same_weights(tmp_path):
    straight = make_agent_trainer(tmp_path / "straight", total_steps=4, save_steps=2, sample_log_steps=0)
    straight.train()
    first = make_agent_trainer(tmp_path / "resumed", total_steps=2, save_steps=2, sample_log_steps=0)
    first.train()
    torch.manual_seed(99)  # a different process state: the checkpoint must restore everything
    second = make_agent_trainer(
        tmp_path / "resumed", total_steps=4, save_steps=2, sample_log_steps=0, resume_from_checkpoint="latest"
    )
    second.train()
    expected, resumed = trainable_state(straight), trainable_state(second)
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


def test_expert_turns_make_a_supervised_dataset():
    env = make_env("frozenlake")
    dataset = expert_dataset(env, SPEC.expert, SEEDS[:3])
    assert set(dataset["answer"]) <= set(env.actions)
    # the expert reaches the goal: every map's shortest path is 6 moves
    assert len(dataset) == 3 * 6
    assert {"prompt", "images", "answer"} <= set(dataset.column_names)


@pytest.mark.slow
@pytest.mark.learning
def test_ppo_agent_recipe_learns_to_read_held_out_maps(tmp_path, learning_seed):
    """The agent recipe, shortened: after a 30-step warm start on expert turns, 60 PPO steps must
    raise greedy success on held-out FrozenLake maps (never seen in training) by at least 0.2 and
    beat the best image-blind policy on the same maps."""
    from vlm_rl.recipes.ppo_agent import main

    result = main(
        [
            "--output_dir", str(tmp_path / "agent"),
            "--seed", str(learning_seed),
            "--total_steps", "60",
            "--lr_decay_steps", "200",
            "--eval_steps", "0",
            "--save_steps", "0",
            "--sample_log_steps", "0",
            "--eval_episodes", "50",
            "--warm_start_steps", "30",
            "--num_threads", "1",
            "--report_to", "none",
        ]
    )  # fmt: skip
    before, after = result["before"]["eval/success_rate"], result["after"]["eval/success_rate"]
    assert after >= before + 0.2, (before, after)
    assert after > result["baselines"]["best_blind"], (after, result["baselines"])


def test_a_learned_reward_model_scores_each_turn(tmp_path):
    """Env reward + a (here untrained) multimodal reward model on each turn's image and reply,
    composed with weights: each component is logged, and the total is their weighted sum."""
    from vlm_rl.rewards.compose import RewardComponent
    from vlm_rl.rewards.model import RewardModel

    reward_model = RewardModel.from_base("tiny-llava-agent", lora_r=4, lora_alpha=8)
    reward = CombinedReward(
        [RewardComponent("env_reward", env_reward), RewardComponent("reward_model", reward_model, weight=0.5)]
    )
    trainer = make_agent_trainer(tmp_path)
    trainer.rewards.reward = reward
    rollout, batch, _ = trainer.sample(0)
    rewards, metrics = trainer.compute_rewards(rollout, batch)
    assert {"rewards/env_reward/mean", "rewards/reward_model/mean"} <= metrics.keys()
    turn_images = [batch.images[int(i)] for i in rollout.prompt_index]
    scores = reward_model.score(
        turn_images, [batch.prompts[int(i)] for i in rollout.prompt_index], rollout.completions
    )
    expected = torch.tensor(batch.columns["env_reward"]) + 0.5 * torch.tensor(scores)
    expected -= trainer.config.missing_eos_penalty * (~rollout.ended).float()
    torch.testing.assert_close(rewards, expected, rtol=1e-5, atol=1e-5)


def test_context_length_guard_names_the_flags():
    from vlm_rl.rl.agent import check_context_length

    model, _ = load_model("tiny-llava-agent")
    limit = model.config.get_text_config().max_position_embeddings
    check_context_length(model, limit)
    with pytest.raises(ValueError, match="--context_frames, --context_actions or --max_new_tokens"):
        check_context_length(model, limit + 1)
