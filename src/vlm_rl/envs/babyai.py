"""BabyAI's GoTo levels (minigrid) as built-ins: a new layout and mission every episode.

Levels (`LEVELS`): "gotoredballnodists" (`BabyAI-GoToRedBallNoDists-v0`: a red ball alone in an 8x8
room, walls included) and "gotoobj" (`BabyAI-GoToObj-v0`: one object of 6 colours x 3 types, and
the mission names it). The layout is minigrid's, drawn from the episode's seed.

Protocol:
- instruction: `INSTRUCTION` ("action : left , right or forward ?") followed by the episode's
  mission, e.g. "action : left , right or forward ? go to the red ball" (the mission changes every
  episode in GoToObj, so it is in every turn's prompt); `blank_mission=True` leaves it out (the
  mission-blind control: the same frames, no instruction of what to reach);
- the image: the agent's egocentric view as minigrid draws it (`get_pov_render`), 7x7 cells at
  8 px = 56x56, one cell per 8x8 patch, the agent at the bottom centre facing up; cells it cannot
  see (behind walls) are black; nothing is resized (`render="env"`: the whole room instead, 64x64,
  the view highlighted);
- actions: "left", "right" (turn in place), "forward" (a step; a wall or the object blocks it), as
  minigrid's actions 0-2 (pickup, drop, toggle and done do nothing for a GoTo mission);
- reward: 1.0 when the agent faces the object after an action, else 0.0 (sparse like the other
  built-ins; minigrid's own 1 - 0.9 * steps / max_steps is replaced); a reply with no action word
  steps nothing and costs `invalid_penalty`;
- termination: success; truncation after `max_turns` (`MAX_TURNS` = 14). The expert's longest
  solution is 11 moves on the training seeds of both levels (10 and 9 on the held-out seeds of
  GoToRedBallNoDists and GoToObj; mean 4.8 and 4.9 there), and the agent sees only its 7x7 view, so
  it may need a few more turns to find the object.

Held-out seeds (`EVAL_SEEDS[level]`): the first 100 seeds from 100,000 with distinct layouts (agent
position and direction, object position, colour and type); `TRAIN_SEEDS[level]` are the seeds of
0-9,999 whose layout is none of them: no held-out layout is seen in training. Both are computed on
first use (about 5 s a level). minigrid is imported on first use too (`pip install minigrid`).

The expert (`solve`) is a breadth-first search over (position, direction) with the three actions
to a state that faces the object: a shortest plan, given the whole room (the policy sees its view
only).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import gymnasium
import numpy as np
from PIL import Image

from vlm_rl.envs.adapter import TurnEnv

LEVELS: dict[str, str] = {
    "gotoredballnodists": "BabyAI-GoToRedBallNoDists-v0",
    "gotoobj": "BabyAI-GoToObj-v0",
}
"""The built-in BabyAI levels: the name after "babyai-" -> minigrid's gymnasium id."""
ACTIONS = ["left", "right", "forward"]
INSTRUCTION = "action : left , right or forward ?"
COLORS = ("red", "green", "blue", "purple", "yellow", "grey")
"""minigrid's `COLOR_NAMES`: the colours a GoToObj mission names."""
OBJECT_TYPES = ("ball", "box", "key")
"""The objects a GoToObj mission names."""
MISSION_WORDS = ("go", "to", "the", *COLORS, *OBJECT_TYPES)
"""Every word of the two levels' missions ("go to the {colour} {type}")."""
CELL_PIXELS = 8
VIEW_CELLS = 7
"""minigrid's agent view: 7x7 cells, the agent at the bottom centre."""
MAX_TURNS = 14

DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1))
"""minigrid's `DIR_TO_VEC`: direction 0 faces +x (east), 1 +y (south), 2 west, 3 north; "left" turns
to direction - 1."""
SEARCH_ORDER = ("forward", "left", "right")
"""The order the expert tries actions in: among shortest plans it steps forward first."""

State = tuple[tuple[int, int], int]
"""(agent position (x, y), direction)."""
Layout = tuple[tuple[int, int], int, tuple[int, int], str, str]
"""(agent position, direction, object position, object colour, object type)."""


class BabyAIEnv(gymnasium.Env):
    """A minigrid BabyAI level (`level_id`, e.g. "BabyAI-GoToObj-v0") with the three moving actions, a
    sparse success reward and the agent's view as a picture.

    Observations are dicts: `image` (the 56x56 egocentric view, `get_pov_render`) and `mission`
    (the instruction text). `level` is the minigrid env itself (agent_pos, agent_dir, grid, instrs).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, level_id: str, render_mode: str | None = "rgb_array") -> None:
        try:
            import minigrid  # noqa: F401  (registers the BabyAI ids)
        except ImportError as error:
            from vlm_rl.errors import ConfigError

            raise ConfigError(
                f"the BabyAI built-ins need minigrid: pip install minigrid (or pip install -e '.[envs]') ({error})"
            ) from error
        self.level = gymnasium.make(level_id).unwrapped
        self.render_mode = render_mode
        side = VIEW_CELLS * CELL_PIXELS
        self.observation_space = gymnasium.spaces.Dict(
            {
                "image": gymnasium.spaces.Box(0, 255, (side, side, 3), dtype=np.uint8),
                "mission": gymnasium.spaces.Text(max_length=200),
            }
        )
        self.action_space = gymnasium.spaces.Discrete(len(ACTIONS))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        level_seed = seed if seed is not None else int(self.np_random.integers(2**31))
        observation, _ = self.level.reset(seed=level_seed)
        return self._observation(observation["mission"]), {"success": False}

    def step(self, action: int):
        observation, reward, terminated, truncated, _ = self.level.step(int(action))
        success = bool(terminated and reward > 0)
        return (
            self._observation(observation["mission"]),
            float(success),
            terminated,
            truncated,
            {"success": success},
        )

    def render(self) -> np.ndarray:
        return self.level.get_pov_render(tile_size=CELL_PIXELS)

    def _observation(self, mission: str) -> dict[str, Any]:
        return {"image": self.render(), "mission": mission}


def layout(level: Any) -> Layout:
    """A level's start layout (agent position and direction, the object's position, colour and
    type): what held-out episodes never share with training ones."""
    (target,) = level.instrs.desc.obj_poss
    found = level.grid.get(*target)
    x, y = (int(c) for c in level.agent_pos)
    return (x, y), int(level.agent_dir), (int(target[0]), int(target[1])), found.color, found.type


def _step(level: Any, state: State, action: str) -> State:
    (x, y), direction = state
    if action == "left":
        return (x, y), (direction - 1) % 4
    if action == "right":
        return (x, y), (direction + 1) % 4
    dx, dy = DIRECTIONS[direction]
    ahead = level.grid.get(x + dx, y + dy)
    return ((x + dx, y + dy), direction) if ahead is None or ahead.can_overlap() else state


def _front(state: State) -> tuple[int, int]:
    (x, y), direction = state
    dx, dy = DIRECTIONS[direction]
    return x + dx, y + dy


def solve(level: Any) -> tuple[str, ...] | None:
    """A shortest action sequence after which the agent faces an object the mission names
    (breadth-first over (position, direction), actions in `SEARCH_ORDER`); None when none exists.

    minigrid checks the mission after every action, so even an agent already facing the object
    needs one (a blocked "forward")."""
    targets = {(int(x), int(y)) for x, y in level.instrs.desc.obj_poss}
    start: State = (tuple(int(c) for c in level.agent_pos), int(level.agent_dir))  # type: ignore[assignment]
    came_from: dict[State, tuple[State, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        for action in SEARCH_ORDER:
            following = _step(level, state, action)
            if _front(following) in targets:
                plan = [action]
                while (link := came_from[state]) is not None:
                    state, step = link
                    plan.append(step)
                return tuple(reversed(plan))
            if following not in came_from:
                came_from[following] = (state, action)
                queue.append(following)
    return None


def expert(env: TurnEnv) -> str:
    """The first action of a shortest plan (`solve`); "forward" where none exists."""
    plan = solve(env.env.unwrapped.level)
    return plan[0] if plan else "forward"


class _LazySeeds(Sequence[int]):
    """Seeds of a level's held-out split (0: training, 1: held out), computed on first use."""

    def __init__(self, level: str, part: int) -> None:
        self._level, self._part = level, part

    def __getitem__(self, index):
        return _held_out_split(self._level)[self._part][index]

    def __len__(self) -> int:
        return len(_held_out_split(self._level)[self._part])

    def __iter__(self) -> Iterator[int]:
        return iter(_held_out_split(self._level)[self._part])

    def __repr__(self) -> str:
        return f"<{len(self)} BabyAI {self._level} seeds from {self[0]}>"


@functools.cache
def _held_out_split(level: str, eval_episodes: int = 100) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(train seeds, held-out seeds) of `level` that never share a layout: the first `eval_episodes`
    seeds from 100,000 with distinct layouts, and the seeds of 0-9,999 whose layout is none of them."""
    env = BabyAIEnv(LEVELS[level])
    eval_seeds, eval_layouts = [], set()
    seed = 100_000
    while len(eval_seeds) < eval_episodes:
        env.level.reset(seed=seed)
        if (found := layout(env.level)) not in eval_layouts:
            eval_layouts.add(found)
            eval_seeds.append(seed)
        seed += 1
    train = []
    for seed in range(10_000):
        env.level.reset(seed=seed)
        if layout(env.level) not in eval_layouts:
            train.append(seed)
    return tuple(train), tuple(eval_seeds)


TRAIN_SEEDS: dict[str, Sequence[int]] = {level: _LazySeeds(level, 0) for level in LEVELS}
EVAL_SEEDS: dict[str, Sequence[int]] = {level: _LazySeeds(level, 1) for level in LEVELS}


def make_babyai(
    *,
    level: str = "gotoobj",
    blank_mission: bool = False,
    render: Literal["flat", "env"] = "flat",
    image_size: int | None = None,
    max_turns: int | None = None,
    **adapter_options: Any,
) -> TurnEnv:
    """BabyAI turns on `level` (a key of `LEVELS`); `blank_mission` leaves the mission out of the
    prompt. `render="flat"` (the default) shows the agent's 7x7-cell view, 56x56; `render="env"` the
    whole room as minigrid draws it (its view highlighted), 8 px a cell: 64x64 for the 8x8 rooms;
    `image_size` resizes either (None: as drawn). `adapter_options` go to `TurnEnv` (invalid_penalty,
    default_action, ...)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, not {level!r}")
    if render not in ("flat", "env"):
        raise ValueError(f"render must be 'flat' or 'env', not {render!r}")
    return TurnEnv(
        BabyAIEnv(LEVELS[level]),
        actions=ACTIONS,
        instruction=INSTRUCTION,
        frame=_whole_room if render == "env" else None,  # None: the observation's view
        image_size=image_size,
        describe=(lambda observation, info: "") if blank_mission else None,
        max_turns=max_turns if max_turns is not None else MAX_TURNS,
        **adapter_options,
    )


def _whole_room(env: BabyAIEnv, observation: Any) -> Image.Image:
    return Image.fromarray(env.level.get_frame(highlight=True, tile_size=CELL_PIXELS))
