"""FrozenLake on a new random map every episode (gymnasium `FrozenLake-v1`).

Protocol:
- instruction: `INSTRUCTION` ("frozen lake . reach the goal and avoid the holes . action : left ,
  down , right or up ?"); the image shows the map and the agent;
- actions: "left", "down", "right", "up" (gymnasium's 0-3); aliases "west", "south", "east",
  "north"; a reply with none of them steps nothing and costs `invalid_penalty`;
- reward: gymnasium's, 1.0 on reaching the goal, else 0.0;
- termination: the goal or a hole; truncation after `max_turns` turns (default 2 * (size - 1) + 2,
  two more than every map's shortest path, 6 moves at size 4);
- success: the agent stands on the goal.

Maps come from `generate_random_map(size, p, seed)` with the episode's seed, so every map has a
path from start (top left) to goal (bottom right) and a seed always gives the same map. 4x4 layouts
repeat often (10,000 seeds draw only 1,593 distinct maps), so `EVAL_SEEDS` are 100 seeds with
distinct layouts and `TRAIN_SEEDS` (6,735 of 0-9,999) exclude every seed that draws one of them:
the held-out maps are never seen in training (at the default size 4 and p 0.8).
`render="flat"` (the default) draws the map as flat colours, one cell per 8x8 patch at 32x32
(`vlm_rl.envs.grid.COLORS`: start blue, ice white, hole black, goal green, agent red);
`render="env"` is gymnasium's sprite frame resized to `image_size`.
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv, generate_random_map
from PIL import Image

from vlm_rl.envs.adapter import ActionParser, TurnEnv
from vlm_rl.envs.grid import draw_grid, shortest_first_moves

INSTRUCTION = "frozen lake . reach the goal and avoid the holes . action : left , down , right or up ?"
ACTIONS = ["left", "down", "right", "up"]
ALIASES = {"west": "left", "south": "down", "east": "right", "north": "up"}


def _held_out_split(
    size: int = 4, p: float = 0.8, eval_maps: int = 100
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(train seeds, held-out seeds) whose maps never coincide: 4x4 maps repeat often (10,000 seeds
    draw only ~1,600 distinct layouts), so the held-out seeds are the first `eval_maps` seeds from
    100,000 with distinct layouts, and the train seeds are those of 0-9,999 whose layout is none of
    them. "Held-out" then means maps never seen in training (at the default size and p)."""
    eval_seeds, eval_layouts = [], set()
    seed = 100_000
    while len(eval_seeds) < eval_maps:
        layout = tuple(generate_random_map(size, p, seed=seed))
        if layout not in eval_layouts:
            eval_layouts.add(layout)
            eval_seeds.append(seed)
        seed += 1
    train = tuple(s for s in range(10_000) if tuple(generate_random_map(size, p, seed=s)) not in eval_layouts)
    return train, tuple(eval_seeds)


TRAIN_SEEDS, EVAL_SEEDS = _held_out_split()


class RandomFrozenLake(gymnasium.Env):
    """FrozenLake-v1 whose `reset(seed=...)` draws a new random map from the seed.

    The current game is `self.lake` (a gymnasium `FrozenLakeEnv`); `desc` and `position` read it.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self, size: int = 4, p: float = 0.8, is_slippery: bool = False, render_mode: str | None = "rgb_array"
    ) -> None:
        self.size, self.p, self.is_slippery, self.render_mode = size, p, is_slippery, render_mode
        self.observation_space = gymnasium.spaces.Discrete(size * size)
        self.action_space = gymnasium.spaces.Discrete(4)
        self.lake = self._lake(generate_random_map(size, p, seed=0))

    def _lake(self, desc: list[str]) -> FrozenLakeEnv:
        return FrozenLakeEnv(desc=desc, is_slippery=self.is_slippery, render_mode=self.render_mode)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        map_seed = seed if seed is not None else int(self.np_random.integers(2**31))
        self.lake = self._lake(generate_random_map(self.size, self.p, seed=map_seed))
        return self.lake.reset(seed=map_seed)

    def step(self, action: int):
        return self.lake.step(action)

    def render(self):
        return self.lake.render()

    def close(self) -> None:
        self.lake.close()

    @property
    def desc(self) -> list[str]:
        """The map as rows of letters (S start, F frozen, H hole, G goal)."""
        return [b"".join(row).decode() for row in self.lake.desc]

    @property
    def position(self) -> tuple[int, int]:
        """The agent's (row, column)."""
        return divmod(int(self.lake.s), self.lake.ncol)


def draw_lake(env: RandomFrozenLake, size: int) -> Image.Image:
    """The flat frame of the current map and agent (size x size RGB)."""
    return draw_grid(env.desc, env.position, size)


def optimal_actions(env: RandomFrozenLake) -> list[str]:
    """The moves that start a shortest path to the goal from the agent's cell ([] on the goal or a hole)."""
    return shortest_first_moves(env.desc).get(env.position, [])


def expert(env: TurnEnv) -> str:
    """The first move of a shortest path (ties: left, down, right, up), for warm starts and baselines."""
    moves = optimal_actions(env.env.unwrapped)
    return moves[0] if moves else ACTIONS[0]


def solved(env: RandomFrozenLake) -> bool:
    row, col = env.position
    return env.desc[row][col] == "G"


def make_frozenlake(
    *,
    size: int = 4,
    p: float = 0.8,
    slippery: bool = False,
    render: Literal["flat", "env"] = "flat",
    image_size: int | None = 32,
    max_turns: int | None = None,
    **adapter_options: Any,
) -> TurnEnv:
    """FrozenLake turns on random `size` x `size` maps (`p`: probability a cell is ice).

    `slippery` moves as intended only a third of the time (gymnasium's `is_slippery`);
    `adapter_options` go to `TurnEnv` (invalid_penalty, default_action, ...).
    """
    if render not in ("flat", "env"):
        raise ValueError(f"render must be 'flat' or 'env', not {render!r}")
    frame_size = image_size or 8 * size
    return TurnEnv(
        RandomFrozenLake(size, p, is_slippery=slippery),
        actions=ACTIONS,
        instruction=INSTRUCTION,
        frame=(lambda env, obs: draw_lake(env, frame_size)) if render == "flat" else None,
        image_size=image_size,
        success=solved,
        parser=ActionParser(ACTIONS, aliases=ALIASES),
        max_turns=max_turns if max_turns is not None else 2 * (size - 1) + 2,
        **adapter_options,
    )
