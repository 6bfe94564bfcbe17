"""The Sokoban built-in: reverse-play rooms, the BFS solver and expert, held-out rooms, frames, the
image-blind baselines and a short agent run."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from test_envs import short_agent_run

from vlm_rl.envs import ENVS, make_env
from vlm_rl.envs import sokoban as sk
from vlm_rl.envs.baselines import (
    SokobanStates,
    sokoban_baselines,
    sokoban_best_sequence,
    sokoban_blind_success,
)

FIXED_SEED = 100_000  # the first held-out room
FIXED_ROOM = (
    "######",
    "#.   #",
    "#   ##",
    "# $ ##",
    "# @ ##",
    "######",
)
FIXED_PLAN = ["up", "up", "right", "up", "left"]  # push the box up twice, walk round it, push it left


def brute_force_shortest(room: sk.Room, longest: int) -> int | None:
    """The length of the shortest of all 4 ** k action sequences (k = 0, 1, ...) that solves `room`."""
    for length in range(longest + 1):
        for actions in itertools.product(sk.ACTIONS, repeat=length):
            state = room
            for action in actions:
                state = state.move(action)
            if state.solved:
                return length
    return None


def test_a_seed_gives_its_room_and_the_solver_plan_solves_it():
    room = sk.generate_room(FIXED_SEED)
    assert room.xsb() == FIXED_ROOM and sk.generate_room(FIXED_SEED) == room
    assert sk.solve(room) == tuple(FIXED_PLAN)
    for action in FIXED_PLAN[:-1]:
        room = room.move(action)
        assert not room.solved
    assert room.xsb()[1] == "#.$@ #"
    assert room.move("left").solved and room.move("left").xsb()[1] == "#*@  #"


def test_moves_push_one_box_and_walls_and_boxes_block():
    room = sk.Room.from_xsb(["#######", "#@$$. #", "#  $  #", "#######"])
    assert room.move("up") == room and room.move("left") == room  # walls
    assert room.move("right") == room  # a box against a box stays, and so does the player
    below = room.move("down").move("right")
    assert below.player == (2, 2) and below.boxes == room.boxes
    assert below.move("up") == below  # a box against a wall stays
    pushed = below.move("right")
    assert pushed.player == (2, 3) and pushed.boxes == {(1, 2), (1, 3), (2, 4)}
    assert pushed.xsb() == ("#######", "# $$. #", "#  @$ #", "#######")


def test_solver_finds_none_for_a_dead_room_and_nothing_for_a_solved_one():
    dead = sk.Room.from_xsb(["#####", "#$  #", "#  .#", "# @ #", "#####"])  # the box sits in a corner
    assert sk.solve(dead) is None
    assert sk.solve(sk.Room.from_xsb(["#####", "#*@ #", "#####"])) == ()


@pytest.mark.parametrize("seeds", [range(0, 40), range(100_020, 100_060)])
def test_the_expert_plan_is_as_short_as_brute_force(seeds):
    checked = 0
    for seed in seeds:
        room = sk.generate_room(seed)
        shortest = brute_force_shortest(room, 6)  # 4 ** 7 sequences: longer ones are left to the BFS
        plan = sk.solve(room)
        if shortest is None:
            assert len(plan) > 6, (seed, room.xsb(), plan)
            continue
        assert len(plan) == shortest, (seed, room.xsb(), plan)
        checked += 1
    assert checked >= 25


def test_reverse_played_rooms_are_always_solvable_and_never_start_solved():
    for dim, boxes, seeds in [((6, 6), 1, range(400)), ((5, 5), 1, range(100)), ((7, 7), 2, range(20))]:
        for seed in seeds:
            room = sk.generate_room(seed, dim, boxes)
            assert len(room.boxes) == len(room.targets) == boxes
            assert all(row[0] == row[-1] == sk.WALL for row in room.cells)
            assert set(room.cells[0]) == set(room.cells[-1]) == {sk.WALL}
            plan = sk.solve(room)
            assert plan, (dim, seed, room.xsb())


def test_a_scripted_policy_solves_the_fixed_room_through_gymnasium():
    env = sk.SokobanEnv()
    frame, info = env.reset(seed=FIXED_SEED)
    assert frame.shape == env.observation_space.shape == (96, 96, 3) and info == {"success": False}
    assert env.action_space.n == 4
    for k, action in enumerate(FIXED_PLAN):
        frame, reward, terminated, truncated, info = env.step(sk.ACTIONS.index(action))
        last = k == len(FIXED_PLAN) - 1
        assert (reward, terminated, truncated, info["success"]) == (float(last), last, False, last)
    assert env.observation_space.contains(frame)


def test_the_turn_env_plays_text_penalises_invalid_replies_and_truncates():
    env = make_env("sokoban", invalid_penalty=0.5)
    turn = env.reset(seed=FIXED_SEED)
    assert turn.text == sk.INSTRUCTION and env.max_turns == ENVS["sokoban"].max_turns == 12
    result = env.step("I push")
    assert not result.valid and result.reward == -0.5 and result.action == ""
    assert env.env.unwrapped.room.xsb() == FIXED_ROOM  # nothing stepped
    results = [
        env.step(f"<action>{word.upper()}</action>") for word in ["north", "up", "right", "up", "west"]
    ]
    assert [r.action for r in results] == FIXED_PLAN
    assert results[-1].terminated and results[-1].reward == 1.0 and env.success(results)
    env.reset(seed=FIXED_SEED)
    results = [env.step("down") for _ in range(env.max_turns)]  # walks into the wall every turn
    assert results[-1].truncated and not results[-1].terminated and not env.success(results)


def test_expert_turns_solve_held_out_rooms_in_the_fewest_moves():
    from vlm_rl.rl.agent import expert_dataset

    env = make_env("sokoban")
    seeds = list(ENVS["sokoban"].eval_seeds[:20])
    dataset = expert_dataset(env, ENVS["sokoban"].expert, seeds)
    lengths = [len(sk.solve(sk.generate_room(seed))) for seed in seeds]
    assert len(dataset) == sum(lengths) and set(dataset["answer"]) <= set(sk.ACTIONS)
    assert dataset["answer"][: len(FIXED_PLAN)] == FIXED_PLAN
    for seed, length in zip(seeds, lengths, strict=True):
        env.reset(seed=seed)
        results = []
        while not results or not results[-1].done:
            results.append(env.step(ENVS["sokoban"].expert(env)))
        assert env.success(results) and len(results) == length


def test_held_out_rooms_are_never_training_rooms():
    spec = ENVS["sokoban"]
    assert len(spec.eval_seeds) == 100 and not set(spec.train_seeds) & set(spec.eval_seeds)
    held_out = {sk.puzzle(sk.generate_room(seed)) for seed in spec.eval_seeds}
    assert len(held_out) == 100  # distinct puzzles
    training = {sk.puzzle(sk.generate_room(seed)) for seed in spec.train_seeds[::3]}
    assert not held_out & training
    assert len(spec.train_seeds) > 9000  # few training seeds are lost to the held-out puzzles
    # the puzzle ignores the player: the same walls, target and box elsewhere are the same puzzle
    room = sk.generate_room(FIXED_SEED)
    assert sk.puzzle(sk.Room(room.cells, room.boxes, (1, 2))) == sk.puzzle(room)
    assert sk.puzzle(room) == tuple(row.replace("@", " ") for row in FIXED_ROOM)


def test_flat_frames_give_each_patch_of_the_tiny_model_one_cell():
    from transformers import AutoConfig

    from vlm_rl.models.tiny import ensure_tiny

    vision = AutoConfig.from_pretrained(ensure_tiny("tiny-llava-agent")).vision_config
    side, patch = vision.image_size, vision.patch_size
    assert side // patch == 6 - 2  # a 6x6 room's inside (its border is always wall) is the patch grid
    env = make_env("sokoban")
    images = [env.reset(seed=FIXED_SEED).image]
    rooms = [env.env.unwrapped.room]
    for action in FIXED_PLAN:  # the box moves, the player stands on the target, the box reaches it
        images.append(env.step(action).turn.image)
        rooms.append(env.env.unwrapped.room)
    for image, room in zip(images, rooms, strict=True):
        assert image.size == (side, side)
        pixels = np.asarray(image).reshape(4, patch, 4, patch, 3)
        inside = [row[1:-1] for row in room.xsb()[1:-1]]
        for row, col in itertools.product(range(4), repeat=2):
            cell = pixels[row, :, col].reshape(-1, 3)
            assert (cell == cell[0]).all() and tuple(cell[0]) == sk.COLORS[inside[row][col]], (row, col)
    on_target = sk.Room.from_xsb(["######", "#+$  #", "#    #", "#    #", "#    #", "######"])
    pixels = np.asarray(sk.draw_room(on_target, 32))
    assert tuple(pixels[0, 0]) == sk.COLORS[sk.PLAYER_ON_TARGET] != sk.COLORS[sk.PLAYER]
    assert tuple(pixels[0, 8]) == sk.COLORS[sk.BOX]
    assert tuple(np.asarray(images[-1])[0, 0]) == sk.COLORS[sk.BOX_ON_TARGET]


def test_the_instruction_uses_only_words_the_tiny_agent_model_knows():
    from vlm_rl.envs import words_of
    from vlm_rl.models.families import FAMILIES, TINY_FAMILIES
    from vlm_rl.models.tiny import build_tokenizer, tiny_vocabulary

    known = tiny_vocabulary("tiny-llava-agent")
    assert set(words_of(sk.INSTRUCTION, *sk.ACTIONS)) <= known
    family = FAMILIES[TINY_FAMILIES["tiny-llava"].model_type]
    agent_envs = {name: spec for name, spec in ENVS.items() if spec.tiny_model == "tiny-llava-agent"}
    others = [" ".join(spec.words) for name, spec in agent_envs.items() if name != "sokoban"]
    everything = [" ".join(spec.words) for spec in agent_envs.values()]
    # adding Sokoban changes no token id of the tiny agent model (its measured figures stand)
    assert build_tokenizer(family, others).get_vocab() == build_tokenizer(family, everything).get_vocab()


def test_blind_success_by_hand_on_a_corridor():
    corridor = SokobanStates.of([sk.Room.from_xsb(["#####", "#@$.#", "#####"])])
    uniform = np.full((1, 4), 0.25)
    # one turn: right (1/4); two turns: right now, or a blocked move (3/4) then right
    assert sokoban_blind_success(corridor, uniform, 1)[0] == pytest.approx(0.25)
    assert sokoban_blind_success(corridor, uniform, 2)[0] == pytest.approx(0.25 + 0.75 * 0.25)
    assert sokoban_blind_success(corridor, np.array([[0, 0, 0, 1.0]]), 1)[0] == 1.0
    success, moves = sokoban_best_sequence(corridor, 3)
    assert success == 1.0 and len(moves) == 3 and "right" in moves


def test_sokoban_baselines_on_held_out_rooms():
    seeds = list(ENVS["sokoban"].eval_seeds[:20])
    figures = sokoban_baselines(seeds)
    assert figures["expert"] == 1.0
    assert figures["expert_length"] == pytest.approx(
        np.mean([len(sk.solve(sk.generate_room(s))) for s in seeds])
    )
    assert 0 < figures["random"] <= figures["best_blind"] < figures["best_sequence"] < 1
    assert len(figures["best_sequence_moves"]) == 12
    env = make_env("sokoban")  # the sequence scores what it says when played through the env
    wins = []
    for seed in seeds:
        env.reset(seed=seed)
        moves = iter(figures["best_sequence_moves"])
        while not (result := env.step(next(moves))).done:
            pass
        wins.append(env.success(result))
    assert np.mean(wins) == figures["best_sequence"]


def test_the_agent_recipe_warm_starts_and_runs_two_rl_steps_on_sokoban(tmp_path, capsys):
    result = short_agent_run("sokoban", tmp_path / "run")
    out = capsys.readouterr().out
    assert "after the 2-step warm start" in out and "4 rooms never seen in training" in out
    assert set(result["baselines"]) == {"random", "best_blind", "best_sequence"}
    assert "eval/success_rate" in result["after"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len([r for r in rows if "reward/mean" in r]) == 2
    episodes = [json.loads(line) for line in (tmp_path / "run" / "episodes.jsonl").open()]
    assert episodes and all(set(e["actions"]) <= {*sk.ACTIONS, ""} for e in episodes)
    assert all(e["turns"] <= 12 for e in episodes)
