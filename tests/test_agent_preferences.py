"""`vlm-rl agent-preferences`: turn preference pairs from an env's episodes, a reward model on them,
and the agent scoring its turns with that model exactly as the pairs were built."""

from __future__ import annotations

import json
import random
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch

from vlm_rl import cli, envs
from vlm_rl.envs.adapter import TurnEnv
from vlm_rl.envs.frozenlake import INSTRUCTION
from vlm_rl.recipes import agent_preferences
from vlm_rl.rl.agent import AgentContext, expert_pairs, return_pairs, turn_example

FROZENLAKE = envs.ENVS["frozenlake"]
SMALL = ["--num_threads", "1", "--report_to", "none", "--eval_steps", "0"]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- pairs --------------------------------------------------------------------------------------
def test_expert_pairs_choose_the_experts_move_over_each_worse_one_at_the_same_state():
    # Seed 0's map:  S F F F     from the start only "right" is on a shortest path: "down" falls in
    #                H H F F     the hole, "left" and "up" bump into the edge (a wasted turn).
    #                F H H F     Seed 6's map:  S F H F   "down" and "right" are both shortest: the
    #                H F F G                    F F F F   expert says "down", and "right" is no
    #                                           F F F H   worse, so it is never "rejected".
    #                                           F F F G
    rows = expert_pairs(
        lambda: envs.make_env("frozenlake"),
        FROZENLAKE.expert,
        [0, 6],
        random_action_prob=0.0,
        rng=random.Random(0),
    )
    first_turns = {
        seed: [(r["chosen"], r["rejected"]) for r in rows if r["seed"] == seed and r["turn"] == 0]
        for seed in (0, 6)
    }
    assert first_turns == {
        0: [("right", "left"), ("right", "down"), ("right", "up")],
        6: [("down", "left"), ("down", "up")],
    }
    env = envs.make_env("frozenlake")
    start = turn_example(env.reset(seed=0), [], [], AgentContext())
    for row in rows:
        assert row["chosen"] != row["rejected"]
        assert row["prompt"] == start["prompt"]  # the turn's prompt as the agent builds it
        assert row["prompt"][0]["content"][-1]["text"] == INSTRUCTION
    seed_0_first = [r for r in rows if r["seed"] == 0 and r["turn"] == 0]
    assert all(
        np.array_equal(np.asarray(r["images"][0]), np.asarray(start["images"][0])) for r in seed_0_first
    )
    # the expert's path on seed 0 (random_action_prob 0): one state per turn, each with its rows
    assert sorted({r["turn"] for r in rows if r["seed"] == 0}) == list(range(6))


class TwoDoors(gymnasium.Env):
    """One turn: "left" wins 1.0, "right" and "up" win nothing; the same picture every time."""

    action_names = ["left", "right", "up"]

    def __init__(self):
        self.observation_space = gymnasium.spaces.Box(0, 255, (16, 16, 3), np.uint8)
        self.action_space = gymnasium.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.full((16, 16, 3), 90, np.uint8), {}

    def step(self, action):
        return np.full((16, 16, 3), 90, np.uint8), float(action == 0), True, False, {}


def test_return_pairs_choose_the_action_whose_episodes_returned_more_and_drop_ties():
    env = TurnEnv(TwoDoors(), max_turns=1)
    moves = iter(["right", "left", "up", "left"] * 2)
    rows = return_pairs(env, lambda env, turn: next(moves), [3, 4], episodes_per_seed=4)
    # "right" and "up" returned 0.0 both: a tie, no row
    assert [(r["seed"], r["chosen"], r["rejected"]) for r in rows] == [
        (3, "left", "right"),
        (3, "left", "up"),
    ] + [
        (4, "left", "right"),
        (4, "left", "up"),
    ]


def test_pairs_only_writes_the_trainers_format_from_training_seeds_and_checks_on_held_out_ones(
    tmp_path, capsys
):
    args = [
        "agent-preferences",
        "--pairs_only",
        "--num_seeds",
        "6",
        "--eval_episodes",
        "4",
        "--output_dir",
        str(tmp_path),
    ]
    assert cli.main(args) == 0
    train, held_out = (
        read_rows(tmp_path / "pairs" / "train.jsonl"),
        read_rows(tmp_path / "pairs" / "held_out.jsonl"),
    )
    assert {r["seed"] for r in train} <= set(FROZENLAKE.train_seeds[:6])
    assert {r["seed"] for r in held_out} <= set(FROZENLAKE.eval_seeds[:4])
    assert {r["seed"] for r in train}.isdisjoint(FROZENLAKE.eval_seeds)
    assert all((tmp_path / "pairs" / r["images"][0]).is_file() for r in train + held_out)
    assert "held-out seeds of frozenlake, none of the 6 training seeds" in capsys.readouterr().out

    from vlm_rl.data.loaders import load_task_dataset

    loaded = load_task_dataset(str(tmp_path / "pairs" / "train.jsonl"), "train", kind="preference")
    assert len(loaded) == len(train) and {"prompt", "images", "chosen", "rejected"} <= set(
        loaded.column_names
    )


def test_return_mode_plays_any_env_class(tmp_path, capsys):
    args = ["agent-preferences", "--pairs", "return", "--env", f"{__name__}:TwoDoors", "--max_turns", "1"]
    args += ["--num_seeds", "3", "--eval_episodes", "2", "--episodes_per_seed", "12", "--pairs_only"]
    assert cli.main([*args, "--output_dir", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "pairs" / "train.jsonl")
    assert {(r["chosen"], r["rejected"]) for r in rows} == {("left", "right"), ("left", "up")}
    assert {r["seed"] for r in read_rows(tmp_path / "pairs" / "held_out.jsonl")} <= {100_000, 100_001}


# -- bad inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--num_seeds", "0"], "--num_seeds"),
        (["--num_seeds", "100000"], "--num_seeds 100000: --env frozenlake has"),
        (["--random_action_prob", "1.5"], "--random_action_prob"),
        (["--pairs", "best"], "--pairs"),
        (["--dataset", "mine.jsonl"], "--dataset: agent-preferences trains on the pairs it writes"),
        (["--episodes_per_seed", "4"], "--episodes_per_seed: --pairs return only"),
        (["--pairs_only", "--learning_rate", "0.1"], "--learning_rate: --pairs_only writes the pairs"),
        (["--expert_warm_start_seeds", "5"], "--expert_warm_start_seeds"),
        (["--pairs", "return", "--random_action_prob", "0.5"], "--random_action_prob: mixes random moves"),
        (["--pairs", "expert", "--env", f"{__name__}:TwoDoors", "--max_turns", "1"], "has no expert"),
        (
            ["--pairs", "return", "--behaviour_policy", "nosuch_module:play"],
            "--behaviour_policy nosuch_module:play",
        ),
        (["--pairs", "return", "--behaviour_policy", "tests"], "--behaviour_policy 'tests'"),
        (["--env", "nosuch_env"], "nosuch_env"),
    ],
)
def test_a_bad_input_is_one_line_and_exit_2(argv, named, tmp_path, capsys):
    assert cli.main(["agent-preferences", *argv, "--output_dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert named in error and "\n" not in error, error
    assert not (tmp_path / "out" / "final").exists()


# -- the reward model: learning, and the agent scoring turns as the pairs were built ------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("turn_rm")
    args = [
        "--num_seeds",
        "60",
        "--eval_episodes",
        "30",
        "--num_epochs",
        "2",
        *SMALL,
        "--output_dir",
        str(out),
    ]
    return out, agent_preferences.main(args)


def test_the_reward_model_ranks_held_out_expert_actions_above_the_others(trained):
    """A short run learns the ranking (most of it image-blind on FrozenLake, whose goal is always
    bottom right: docs/turn_reward.md); reading the map takes the recipe's full run."""
    out, metrics = trained
    # ~1,000 pairs of 60 training maps, 62 steps (~30 s on 1 thread); ~500 pairs of 30 held-out maps
    assert metrics["eval/held_out"] == 1.0 and metrics["eval/pairs"] >= 300
    assert metrics["eval/accuracy_before"] < 0.6
    assert metrics["eval/accuracy"] >= 0.85
    assert (out / "final").is_dir()


def test_the_agent_scores_its_turns_with_the_prompt_and_frame_the_pairs_were_built_from(trained, tmp_path):
    from vlm_rl.data.collators import PreferenceCollator
    from vlm_rl.data.loaders import load_task_dataset
    from vlm_rl.models.loading import load_model
    from vlm_rl.rewards.build import build_reward
    from vlm_rl.rewards.model import RewardModel
    from vlm_rl.rewards.trainer import score_pairs
    from vlm_rl.rl.agent import play_episodes, write_pairs
    from vlm_rl.rl.components import RewardStage
    from vlm_rl.rl.config import RLConfig

    out, _ = trained
    seed = FROZENLAKE.eval_seeds[0]
    env = envs.make_env("frozenlake")
    model, processor = load_model("tiny-llava-agent")
    rollout, batch, episodes = play_episodes(
        model, processor, [env], [seed], max_turns=env.max_turns, max_new_tokens=2, greedy=True
    )
    # built: the held-out pair of this seed's first turn has the agent's prompt and frame
    built = next(
        r for r in read_rows(out / "pairs" / "held_out.jsonl") if r["seed"] == seed and r["turn"] == 0
    )
    assert built["prompt"] == batch.prompts[0]
    from PIL import Image

    with Image.open(out / "pairs" / built["images"][0]) as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(batch.images[0][0]))

    # used: the agent's reward stage (env reward + the reward model) on the played turns ...
    config = RLConfig(reward_funcs=["vlm_rl.rl.agent:env_reward"], reward_model_path=str(out / "final"))
    reward = build_reward(
        reward_model_path=config.reward_model_path, reward_funcs=config.reward_funcs, reward_weights=[1.0]
    )
    stage = RewardStage(reward, config)
    stage(rollout, batch)
    agent_scores = stage.last_components["reward_model"]
    # ... equals the trainer's score of the same turns written as pairs (chosen = the reply)
    rows = [
        {"prompt": batch.prompts[i], "images": batch.images[i], "chosen": reply, "rejected": f"{reply} up"}
        for i, reply in enumerate(rollout.completions)
    ]
    write_pairs(rows, tmp_path / "turns.jsonl")
    pairs = load_task_dataset(str(tmp_path / "turns.jsonl"), "train", kind="preference")
    rm = RewardModel.from_pretrained(str(out / "final"))
    trainer_scores, _ = score_pairs(rm.scorer.eval(), PreferenceCollator(rm.processor)(list(pairs)))
    assert len(agent_scores) == episodes[0].turns
    assert torch.allclose(agent_scores.float(), trainer_scores.float(), atol=1e-4), (
        agent_scores,
        trainer_scores,
    )
