"""vlm_rl.envs: the turn adapter, its parser, the built-in environments and FrozenLake's baselines."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_rl.envs import ENVS, ActionParser, TurnEnv, make_env
from vlm_rl.envs.baselines import frozenlake_baselines
from vlm_rl.envs.frozenlake import RandomFrozenLake
from vlm_rl.envs.grid import COLORS

SEED = ENVS["frozenlake"].eval_seeds[0]  # a fixed map (right of the start is ice)


def play(env: TurnEnv, seed: int, reply) -> list:
    """Play one episode with reply(env) -> text; the StepResults."""
    env.reset(seed=seed)
    results = []
    while not results or not results[-1].done:
        results.append(env.step(reply(env)))
    return results


def short_agent_run(env: str, output_dir) -> dict:
    """`vlm-rl agent --env <env>` shortened to seconds (2 warm-start steps on 4 seeds' expert turns,
    2 RL steps of 2 seeds, 4 held-out episodes): the recipe's result."""
    from vlm_rl.recipes.ppo_agent import main

    return main(
        [
            "--env", env,
            "--output_dir", str(output_dir),
            "--total_steps", "2",
            "--prompts_per_step", "2",
            "--eval_episodes", "4",
            "--eval_steps", "0",
            "--save_steps", "0",
            "--sample_log_steps", "1",
            "--warm_start_steps", "2",
            "--expert_warm_start_seeds", "4",
            "--num_threads", "1",
            "--report_to", "none",
        ]
    )  # fmt: skip


def test_expert_solves_a_fixed_map_through_text():
    env = make_env("frozenlake")
    expert = ENVS["frozenlake"].expert
    results = play(env, SEED, lambda env: f"<action>{expert(env).upper()}</action>")
    assert [r.valid for r in results] == [True] * 6  # every 4x4 map's shortest path is 6 moves
    assert results[-1].terminated and not results[-1].truncated
    assert sum(r.reward for r in results) == 1.0
    assert results[-1].info["success"] and env.success(results) and env.success(results[-1].info)
    assert not any(r.info["success"] for r in results[:-1])
    with pytest.raises(RuntimeError, match="reset"):
        env.step("down")


def test_invalid_replies_are_penalised_counted_and_step_nothing_by_default():
    env = make_env("frozenlake", invalid_penalty=0.5)
    first = env.reset(seed=SEED)
    lake = env.env.unwrapped
    for text in ("jump", "", "<action>fly</action> down"):  # a tag without a valid word is invalid
        result = env.step(text)
        assert not result.valid and result.info["invalid_action"] and result.action == ""
        assert result.reward == -0.5 and lake.position == (0, 0)
        assert (np.asarray(result.turn.image) == np.asarray(first.image)).all()
    assert result.info["turn"] == 3
    results = [env.step("nothing") for _ in range(env.max_turns - 3)]
    assert results[-1].truncated and not results[-1].terminated and not env.success(results)
    assert sum(r.info["invalid_action"] for r in results) == env.max_turns - 3


def test_invalid_reply_steps_the_default_action():
    env = make_env("frozenlake", default_action="right")
    env.reset(seed=SEED)
    assert env.env.unwrapped.desc[0][1] != "H"
    result = env.step("I cannot decide")
    assert not result.valid and result.action == "right" and result.reward == -0.1
    assert env.env.unwrapped.position == (0, 1)


def test_parser_forgives_case_punctuation_and_finds_tags_and_keys():
    parse = ActionParser(["left", "down", "right", "up"], aliases={"west": "left"})
    assert parse("LEFT.") == parse(" left!\n") == parse("Left") == "left"
    assert parse("go down, then right") == "down"  # the first valid word wins
    assert parse("<action> Right </action>, then left") == "right"
    assert parse("<answer>up") == "up"  # an unclosed tag
    assert parse('{"thoughts": "left is a hole", "action": "down"}') == "down"
    assert parse("Action: WEST") == "left"
    assert parse("upward leftover") is None and parse("") is None
    strict = ActionParser(["left", "right"], strict=True)
    assert strict("left") is None and strict("<action>left</action>") == "left"
    symbols = ActionParser(["+", "-"])
    assert symbols("action: +1") == "+" and symbols('"action": "-"') == "-"
    with pytest.raises(ValueError, match="jump"):
        ActionParser(["left"], aliases={"hop": "jump"})


@pytest.mark.parametrize("name", sorted(ENVS))
@pytest.mark.parametrize("render", ["flat", "env"])
def test_builtins_render_rgb_images_headless(name, render):
    env = make_env(name, render=render)
    turn = env.reset(seed=ENVS[name].train_seeds[0])
    side = 32 if not name.startswith("babyai-") else {"flat": 56, "env": 64}[render]  # minigrid's 8 px cells
    assert turn.image.mode == "RGB" and turn.image.size == (side, side)
    assert turn.text.startswith(env.instruction) and set(env.actions) <= set(ENVS[name].words)
    assert env.max_turns == ENVS[name].max_turns
    pixels = np.asarray(turn.image)
    assert pixels.std() > 10  # not blank
    big = make_env(name, render=render, image_size=64).reset(seed=0)
    assert big.image.size == (64, 64)


def test_flat_frozenlake_gives_each_patch_one_cell():
    env = make_env("frozenlake")
    turn = env.reset(seed=SEED)
    pixels = np.asarray(turn.image).reshape(4, 8, 4, 8, 3)
    desc = env.env.unwrapped.desc
    for row in range(4):
        for col in range(4):
            patch = pixels[row, :, col].reshape(-1, 3)
            assert (patch == patch[0]).all()
            assert tuple(patch[0]) == COLORS["A" if (row, col) == (0, 0) else desc[row][col]]


def test_train_and_eval_seeds_do_not_overlap():
    for spec in ENVS.values():
        assert not set(spec.train_seeds) & set(spec.eval_seeds), spec.name
        assert len(spec.eval_seeds) >= 100


def test_maps_follow_their_seed_and_every_map_is_solvable():
    lake = RandomFrozenLake()
    lake.reset(seed=5)
    first = lake.desc
    lake.reset(seed=6)
    lake.reset(seed=5)
    assert lake.desc == first
    env = make_env("frozenlake")
    for seed in list(ENVS["frozenlake"].eval_seeds)[:20]:
        assert env.success(play(env, seed, ENVS["frozenlake"].expert))


def test_unknown_env_names_it_and_the_choices():
    with pytest.raises(ValueError, match=r"'nethack'.*frozenlake"):
        make_env("nethack")
    with pytest.raises(ValueError, match="no_such_module"):
        make_env("no_such_module:Env")


def test_an_env_class_by_import_path_and_a_gymnasium_id():
    env = make_env(
        "vlm_rl.envs.numberline:NumberLineEnv", actions=["+", "-"], env_kwargs={"style": "bars"}, max_turns=20
    )
    env.reset(seed=3)
    line = env.env.unwrapped
    steps = abs(line.target - line.current)
    results = play(env, 3, lambda env: "+" if env.env.unwrapped.current < env.env.unwrapped.target else "-")
    assert len(results) == steps and env.success(results)  # default success: a positive reward
    cliff = make_env("CliffWalking-v1", actions=["up", "right", "down", "left"], max_turns=20)
    assert cliff.instruction == "action : up , right , down , left ?" and cliff.max_turns == 20
    assert cliff.reset(seed=0).image.size == (32, 32)
    assert cliff.step("action: up").action == "up"


def test_numberline_expert_solves_it_in_the_fewest_moves():
    env = make_env("numberline")
    for seed in range(10):
        env.reset(seed=seed)
        distance = abs(env.env.unwrapped.target - env.env.unwrapped.current)
        results = play(env, seed, ENVS["numberline"].expert)
        assert len(results) == distance and env.success(results) and results[-1].reward == 1.0


def test_cliffwalking_expert_walks_the_shortest_safe_path():
    env = make_env("cliffwalking")
    results = play(env, 0, ENVS["cliffwalking"].expert)
    assert [r.action for r in results] == ["up"] + ["right"] * 11 + ["down"]
    assert env.success(results) and sum(r.reward for r in results) == -13


def test_frozenlake_baselines_order():
    figures = frozenlake_baselines(range(100_000, 100_010))
    assert figures["expert"] == 1.0
    assert 0 < figures["random"] < figures["best_blind"] <= figures["best_sequence"] < 1
    assert figures["best_blind_probs"]["left"] == figures["best_blind_probs"]["up"] == 0.0
    assert len(figures["best_sequence_moves"]) == 8


@pytest.mark.parametrize("slippery", [False, True])
def test_the_beam_search_finds_the_best_sequence_where_every_one_can_be_tried(slippery):
    from gymnasium.envs.toy_text.frozen_lake import generate_random_map

    from vlm_rl.envs.baselines import beam_sequence_success, sequence_success

    maps = [generate_random_map(4, 0.8, seed=s) for s in range(100_000, 100_030)]
    every = sequence_success(maps, 6, slippery)
    found, moves = beam_sequence_success(maps, 6, slippery)
    assert found == pytest.approx(every.max(), abs=1e-5) and len(moves) == 6
    assert every[int("".join(map(str, moves)), 4)] == pytest.approx(found, abs=1e-5)  # its moves score it


def test_frozenlake_6x6_baselines_take_seconds_not_minutes():
    figures = frozenlake_baselines(range(100_000, 100_010), size=6)  # 12 turns: a beam search
    assert 0 < figures["best_blind"] <= figures["best_sequence"] < figures["expert"] == 1.0
    assert len(figures["best_sequence_moves"]) == 12


def test_frozenlake_held_out_maps_are_never_training_maps():
    from gymnasium.envs.toy_text.frozen_lake import generate_random_map

    from vlm_rl.envs import frozenlake

    held_out = {tuple(generate_random_map(4, 0.8, seed=s)) for s in frozenlake.EVAL_SEEDS}
    assert len(held_out) == len(frozenlake.EVAL_SEEDS) == 100  # distinct layouts
    train = {tuple(generate_random_map(4, 0.8, seed=s)) for s in frozenlake.TRAIN_SEEDS[::7]}
    assert not held_out & train
    assert len(frozenlake.TRAIN_SEEDS) > 5000
