"""CliffWalking (gymnasium `CliffWalking-v1`): walk the 4x12 grid from start to goal along the cliff.

Protocol:
- instruction: `INSTRUCTION` ("cliff walking . reach the goal and do not fall off the cliff .
  action : up , right , down or left ?"); the image shows the grid and the agent;
- actions: "up", "right", "down", "left" (gymnasium's 0-3); aliases "north", "east", "south",
  "west"; a reply with none of them steps nothing and costs `invalid_penalty`;
- reward: gymnasium's, -1 per move and -100 for stepping into the cliff (which sends the agent back
  to the start without ending the episode);
- termination: the goal; truncation after `max_turns` (default 20; the shortest path is 13 moves);
- success: the agent reaches the goal.

The map is gymnasium's fixed one (start bottom left, goal bottom right, the cliff between): seeds
change nothing unless `slippery` (gymnasium's `is_slippery`), so held-out seeds only test slips.
`render="flat"` (the default) draws the grid in the FrozenLake colours (cliff as a hole), its 12
columns squeezed into the square image (3 per 8x8 patch at 32x32, one row per patch row);
`render="env"` is gymnasium's sprite frame (720x240) resized to the square `image_size`.
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium
from PIL import Image

from vlm_rl.envs.adapter import ActionParser, TurnEnv
from vlm_rl.envs.grid import draw_grid, shortest_first_moves

INSTRUCTION = (
    "cliff walking . reach the goal and do not fall off the cliff . action : up , right , down or left ?"
)
ACTIONS = ["up", "right", "down", "left"]
ALIASES = {"north": "up", "east": "right", "south": "down", "west": "left"}
TRAIN_SEEDS = range(0, 10_000)
EVAL_SEEDS = range(100_000, 100_200)
CELLS = ["F" * 12, "F" * 12, "F" * 12, "S" + "H" * 10 + "G"]
"""gymnasium's map as cell letters (H: the cliff)."""
_MOVES = {"up": (-1, 0), "right": (0, 1), "down": (1, 0), "left": (0, -1)}  # gymnasium's order


def position(env: gymnasium.Env) -> tuple[int, int]:
    """The agent's (row, column) in the unwrapped CliffWalking env."""
    return divmod(int(env.s), 12)


def draw_cliff(env: gymnasium.Env, size: int) -> Image.Image:
    """The flat frame of the grid and agent (size x size RGB)."""
    return draw_grid(CELLS, position(env), size)


def expert(env: TurnEnv) -> str:
    """The first move of the shortest safe path (ties: up, right, down, left)."""
    moves = shortest_first_moves(CELLS, moves=_MOVES).get(position(env.env.unwrapped), [])
    return moves[0] if moves else ACTIONS[0]


def solved(env: gymnasium.Env) -> bool:
    return position(env) == (3, 11)


def make_cliffwalking(
    *,
    slippery: bool = False,
    render: Literal["flat", "env"] = "flat",
    image_size: int | None = 32,
    max_turns: int | None = 20,
    **adapter_options: Any,
) -> TurnEnv:
    """CliffWalking turns; `adapter_options` go to `TurnEnv`."""
    if render not in ("flat", "env"):
        raise ValueError(f"render must be 'flat' or 'env', not {render!r}")
    frame_size = image_size or 48
    return TurnEnv(
        gymnasium.make("CliffWalking-v1", is_slippery=slippery, render_mode="rgb_array"),
        actions=ACTIONS,
        instruction=INSTRUCTION,
        frame=(lambda env, obs: draw_cliff(env, frame_size)) if render == "flat" else None,
        image_size=image_size,
        success=solved,
        parser=ActionParser(ACTIONS, aliases=ALIASES),
        max_turns=max_turns,
        **adapter_options,
    )
