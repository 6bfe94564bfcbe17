"""The BabyAI built-ins: minigrid's GoTo levels, the BFS expert, held-out layouts, the egocentric
frame, the mission in the prompt (and blanked), the tiny models' vocabularies and a short agent run."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from test_envs import play, short_agent_run

from vlm_rl.envs import ENVS, make_env, words_of
from vlm_rl.envs import babyai as ba

pytest.importorskip("minigrid")

ROOT = Path(__file__).resolve().parent.parent
LEVELS = [f"babyai-{level}" for level in ba.LEVELS]
FIXED_SEED = 100_000  # GoToObj's first held-out layout
FIXED_LAYOUT = ((1, 1), 1, (6, 5), "grey", "key")  # facing south from the top-left corner
FIXED_PLAN = ["forward"] * 4 + ["left"] + ["forward"] * 4  # down to row 5, turn east, walk to the key
AGENT_VOCABULARY = (74, "f76e9f4baa1740839b5de77d3d41b78e49c95ad2")
"""tiny-llava-agent's tokenizer before BabyAI (token count, sha1 of its sorted vocabulary): every
agent figure measured with it stands only while it is unchanged."""


def level_of(env):
    return env.env.unwrapped.level


def brute_force_shortest(level, longest: int) -> int | None:
    """The length of the shortest of all 3 ** k action sequences (k = 1, 2, ...) after which the
    agent faces the object (the expert's own model of the moves, `ba._step`, is checked against
    minigrid's by playing plans through the env)."""
    (target,) = level.instrs.desc.obj_poss
    start = (tuple(int(c) for c in level.agent_pos), int(level.agent_dir))
    for length in range(1, longest + 1):
        for actions in itertools.product(ba.ACTIONS, repeat=length):
            state = start
            for action in actions:
                state = ba._step(level, state, action)
            if ba._front(state) == tuple(int(c) for c in target):
                return length
    return None


def test_a_seed_gives_its_layout_and_the_expert_plan_solves_it():
    env = make_env("babyai-gotoobj")
    turn = env.reset(seed=FIXED_SEED)
    assert ba.layout(level_of(env)) == FIXED_LAYOUT and turn.text == f"{ba.INSTRUCTION} go to the grey key"
    assert ba.solve(level_of(env)) == tuple(FIXED_PLAN)
    results = [env.step(f"<action>{word.upper()}</action>") for word in FIXED_PLAN]
    assert [r.action for r in results] == FIXED_PLAN
    assert [r.reward for r in results] == [0.0] * 8 + [
        1.0
    ]  # sparse: minigrid's time-discounted reward replaced
    assert results[-1].terminated and env.success(results) and not any(r.done for r in results[:-1])
    env.reset(seed=FIXED_SEED)
    bumped = env.step("right")  # facing west, into the wall: forward is blocked
    assert bumped.reward == 0.0 and env.step("forward").turn.image == bumped.turn.image


def test_invalid_replies_are_penalised_and_episodes_truncate():
    env = make_env("babyai-gotoredballnodists", invalid_penalty=0.5)
    env.reset(seed=FIXED_SEED)
    result = env.step("I jump")
    assert not result.valid and result.reward == -0.5 and result.action == ""
    assert ba.layout(level_of(env))[:2] == FIXED_LAYOUT[:2]  # nothing stepped
    env.reset(seed=FIXED_SEED)
    results = [env.step("left") for _ in range(env.max_turns)]  # spinning in the corner never faces the ball
    assert env.max_turns == ba.MAX_TURNS == ENVS["babyai-gotoobj"].max_turns == 14
    assert results[-1].truncated and not results[-1].terminated and not env.success(results)


@pytest.mark.parametrize("name", LEVELS)
def test_the_expert_plan_is_as_short_as_brute_force_and_wins_through_the_env(name):
    env = make_env(name)
    spec = ENVS[name]
    checked = 0
    for seed in [*list(spec.train_seeds)[:12], *list(spec.eval_seeds)[:12]]:
        env.reset(seed=seed)
        plan = ba.solve(level_of(env))
        shortest = brute_force_shortest(level_of(env), 5)  # 3 ** 5 sequences; longer plans left to the BFS
        if shortest is None:
            assert len(plan) > 5, (seed, plan)
        else:
            assert len(plan) == shortest, (seed, plan)
            checked += 1
        results = play(env, seed, spec.expert)  # the plan, played by minigrid, wins on its last move
        assert env.success(results) and len(results) == len(plan), (seed, plan)
    assert checked >= 12


def test_an_agent_already_facing_the_object_needs_one_blocked_forward():
    env = make_env("babyai-gotoobj")
    env.reset(seed=FIXED_SEED)
    level = level_of(env)
    level.agent_pos, level.agent_dir = (5, 5), 0  # the key is the cell ahead
    assert ba.solve(level) == ("forward",)
    assert env.step("forward").terminated and tuple(level.agent_pos) == (5, 5)


@pytest.mark.parametrize("name", LEVELS)
def test_the_expert_never_needs_more_turns_than_the_cap(name):
    env = make_env(name)
    spec = ENVS[name]
    lengths = []
    for seed in [*list(spec.train_seeds)[::20], *spec.eval_seeds]:
        env.reset(seed=seed)
        lengths.append(len(ba.solve(level_of(env))))
    assert 1 <= min(lengths) and max(lengths) <= 11 < spec.max_turns
    assert 4 < np.mean(lengths) < 6


@pytest.mark.parametrize("name", LEVELS)
def test_held_out_layouts_are_never_training_layouts(name):
    spec = ENVS[name]
    assert len(spec.eval_seeds) == 100 and not set(spec.train_seeds) & set(spec.eval_seeds)
    env = ba.BabyAIEnv(ba.LEVELS[name.removeprefix("babyai-")])

    def layouts(seeds):
        found = []
        for seed in seeds:
            env.level.reset(seed=seed)
            found.append(ba.layout(env.level))
        return found

    held_out = layouts(spec.eval_seeds)
    assert len(set(held_out)) == 100
    assert not set(held_out) & set(layouts(list(spec.train_seeds)[::4]))
    assert len(spec.train_seeds) > 9700  # few training seeds are lost to the held-out layouts


def test_the_frame_is_the_agents_view_one_cell_per_patch():
    from minigrid.core.grid import Grid

    env = make_env("babyai-gotoobj")
    turn = env.reset(seed=FIXED_SEED + 2)  # the purple key two cells ahead, one to the right
    level = level_of(env)
    assert turn.image.size == (56, 56) and turn.image.mode == "RGB"
    grid, visible = level.gen_obs_grid()
    pixels = np.asarray(turn.image).reshape(7, 8, 7, 8, 3)
    for row, col in itertools.product(range(7), repeat=2):  # patch (row, col) is view cell (x=col, y=row)
        agent = 3 if (col, row) == (3, 6) else None  # the agent: bottom centre, facing up
        tile = Grid.render_tile(
            grid.get(col, row), agent_dir=agent, highlight=visible[col, row], tile_size=8
        ).astype(np.uint8)
        assert (pixels[row, :, col] == tile).all(), (row, col)
    key = [
        (r, c)
        for r, c in itertools.product(range(7), repeat=2)
        if grid.get(c, r) and grid.get(c, r).type == "key"
    ]
    assert key == [(4, 4)] and grid.get(4, 4).color == "purple"
    assert (np.asarray(env.render()) == turn.image).all()
    room = make_env("babyai-gotoobj", render="env").reset(seed=FIXED_SEED + 2).image
    assert room.size == (64, 64)  # the whole 8x8 room instead


def test_the_mission_is_in_every_turns_prompt_and_blank_mission_removes_it():
    env = make_env("babyai-gotoobj")
    blank = make_env("babyai-gotoobj", blank_mission=True)
    missions = set()
    for seed in list(ENVS["babyai-gotoobj"].eval_seeds)[:30]:
        turn, blank_turn = env.reset(seed=seed), blank.reset(seed=seed)
        mission = level_of(env).mission
        _, _, _, color, kind = ba.layout(level_of(env))
        assert mission == f"go to the {color} {kind}"  # it names the room's one object
        missions.add(mission)
        assert turn.text == f"{ba.INSTRUCTION} {mission}" and blank_turn.text == ba.INSTRUCTION
        assert turn.image == blank_turn.image  # the same episode, only the words differ
        step, blank_step = env.step("left"), blank.step("left")
        assert step.turn.text == turn.text and blank_step.turn.text == ba.INSTRUCTION
    assert len(missions) >= 10  # GoToObj names a new object most episodes


def test_the_words_are_minigrids_and_tiny_llava_agent_keeps_its_vocabulary():
    from minigrid.core.constants import COLOR_NAMES
    from transformers import AutoConfig

    from vlm_rl.envs import vocabulary
    from vlm_rl.models.families import FAMILIES, TINY_FAMILIES
    from vlm_rl.models.tiny import build_tokenizer, ensure_tiny, tiny_vocabulary

    assert sorted(ba.COLORS) == sorted(COLOR_NAMES)
    family = FAMILIES[TINY_FAMILIES["tiny-llava"].model_type]
    agent = build_tokenizer(family, vocabulary("tiny-llava-agent")).get_vocab()
    digest = hashlib.sha1(json.dumps(sorted(agent.items())).encode()).hexdigest()
    assert (len(agent), digest) == AGENT_VOCABULARY  # BabyAI changed no token of tiny-llava-agent
    assert "forward" not in agent and "go" not in agent
    babyai = tiny_vocabulary("tiny-llava-babyai")
    missions = [f"go to the {color} {kind}" for color in ba.COLORS for kind in ba.OBJECT_TYPES]
    assert set(agent) < babyai and set(words_of(ba.INSTRUCTION, *missions, *ba.ACTIONS)) <= babyai
    config = AutoConfig.from_pretrained(ensure_tiny("tiny-llava-babyai"))
    assert (config.vision_config.image_size, config.vision_config.patch_size, config.image_seq_length) == (
        56,
        8,
        49,
    )
    assert all(ENVS[name].tiny_model == "tiny-llava-babyai" for name in LEVELS)


def test_the_agent_recipe_picks_the_envs_tiny_model():
    from vlm_rl.errors import ConfigError
    from vlm_rl.recipes.ppo_agent import main, model_for_env

    spec = ENVS["babyai-gotoobj"]
    assert model_for_env("tiny-llava-agent", spec) == "tiny-llava-babyai"
    assert model_for_env("tiny-llava-agent@seed1", spec) == "tiny-llava-babyai@seed1"
    assert model_for_env("tiny-llava-agent", ENVS["sokoban"]) == "tiny-llava-agent"
    assert model_for_env("smol-llava", spec) == "smol-llava"
    with pytest.raises(
        ConfigError,
        match=r"tiny-llava, whose word-level vocabulary lacks \[.*'forward'\]; use its tiny model "
        r"\(--model_name_or_path tiny-llava-babyai, or leave the flag out\)",
    ):  # a tiny model named on purpose is kept, and the error names the one that fits
        main(["--env", "babyai-gotoobj", "--model_name_or_path", "tiny-llava", "--report_to", "none"])


def test_the_agent_recipe_warm_starts_and_runs_two_rl_steps_on_babyai(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    result = short_agent_run("babyai-gotoobj", tmp_path / "run")
    out = capsys.readouterr().out
    assert "after the 2-step warm start" in out and "4 layouts never seen in training" in out
    assert "the model is tiny-llava-babyai" in caplog.text
    assert (
        json.loads((tmp_path / "run" / "run_config.json").read_text())["model_name_or_path"]
        == "tiny-llava-babyai"
    )
    assert set(result["baselines"]) == {"random"} and 0 <= result["baselines"]["random"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len([r for r in rows if "reward/mean" in r]) == 2
    episodes = [json.loads(line) for line in (tmp_path / "run" / "episodes.jsonl").open()]
    assert episodes and all(set(e["actions"]) <= {*ba.ACTIONS, ""} and e["turns"] <= 14 for e in episodes)
    assert all(prompt.startswith(f"{ba.INSTRUCTION} go to the ") for e in episodes for prompt in e["prompts"])

    # benchmarks/babyai_mission.py on this run: with the mission it reproduces the run's own held-out
    # figure (the same adapter, seeds and greedy episodes)
    spec = importlib.util.spec_from_file_location("babyai_mission", ROOT / "benchmarks" / "babyai_mission.py")
    mission = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mission)
    figures = mission.main([str(tmp_path / "run"), "--env", "babyai-gotoobj", "--eval_episodes", "4"])
    assert figures["with_mission"] == {k.removeprefix("eval/"): v for k, v in result["after"].items()}
    assert (
        set(figures["mission_blanked"]) == set(figures["with_mission"])
        and figures["random"] == result["baselines"]["random"]
    )
    assert json.loads((tmp_path / "run" / "mission_blank.json").read_text()) == figures
