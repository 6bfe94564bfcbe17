"""Sokoban on a new random room every episode, generated as gym-sokoban, RAGEN and VAGEN do.

Protocol:
- instruction: `INSTRUCTION` ("make the yellow shape reach the green target . action : up , down ,
  left or right ?"; every word one the tiny agent model already knows); the image shows the room;
- actions: "up", "down", "left", "right" (0-3); aliases "north", "south", "west", "east"; walking
  into a box pushes it when the cell beyond is free; a reply with none of them steps nothing and
  costs `invalid_penalty`;
- reward: 1.0 when every box stands on a target, else 0.0 (sparse, as the other built-ins; the
  turn discount of the agent recipes already prefers short solutions);
- termination: every box on a target; truncation after `max_turns` (default 3 * (size - 2), 12 at
  6x6: a shortest solution is 4.1 moves on average and at most 11 on the held-out rooms, 13 on the
  training rooms);
- success: every box on a target.

Rooms (gym-sokoban's `room_utils`, seeded): a random walk carves the floor of a `dim`-sized room
whose border is wall; the player and one target per box are placed on the floor; from that solved
state the player plays backwards (moves that pull a box behind it) in a depth-first search of
`search_depth`, and the state whose boxes lie farthest from their targets (a box on no target, the
player on none) becomes the start; as in VAGEN, the player then wanders up to 3 steps half the
time. A room whose box cannot be pulled is drawn again, from the same seed's random stream: a seed
always gives the same room. Rooms built backwards are always solvable; `solve` (breadth-first
search over player and box positions) finds a shortest plan, which is the expert and the measure of
difficulty. Rooms are written in the standard XSB text format (`#` wall, `.` target, `$` box, `*`
box on a target, `@` player, `+` player on a target).

6x6 one-box rooms repeat (10,000 seeds draw 6,423 distinct rooms, 4,201 distinct puzzles: walls,
target and box), so `EVAL_SEEDS` are the first 100 seeds from 100,000 with distinct puzzles and
`TRAIN_SEEDS` (9,425 of 0-9,999) exclude every seed that draws one of those puzzles, wherever its
player starts: no held-out puzzle is seen in training (at the defaults). Both are computed on first
use (about 5 s: ~10,000 rooms).

`render="flat"` (the default) draws the room's inside (its border is always wall) as flat colours,
one cell per 8x8 patch at 32x32 for 6x6 rooms (`COLORS`); `render="env"` draws the whole room in
gym-sokoban's "tiny world" colours, 16 px a cell, resized to `image_size`.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium
import numpy as np
from PIL import Image

from vlm_rl.envs.adapter import ActionParser, TurnEnv
from vlm_rl.envs.grid import MOVES, draw_grid

INSTRUCTION = "make the yellow shape reach the green target . action : up , down , left or right ?"
ACTIONS = ["up", "down", "left", "right"]
ALIASES = {"north": "up", "south": "down", "west": "left", "east": "right"}

WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET = "#", " ", ".", "$", "*", "@", "+"
COLORS: dict[str, tuple[int, int, int]] = {
    WALL: (0, 0, 0),  # black
    FLOOR: (255, 255, 255),  # white
    TARGET: (0, 255, 0),  # green
    BOX: (255, 255, 0),  # yellow
    BOX_ON_TARGET: (0, 128, 128),  # teal
    PLAYER: (255, 0, 0),  # red
    PLAYER_ON_TARGET: (255, 0, 255),  # magenta: the target under the player stays visible
}
"""XSB letter -> RGB of the flat frames."""
TINY_WORLD_COLORS: dict[str, tuple[int, int, int]] = {
    WALL: (0, 0, 0),
    FLOOR: (243, 248, 238),
    TARGET: (254, 126, 125),
    BOX_ON_TARGET: (254, 95, 56),
    BOX: (142, 121, 56),
    PLAYER: (160, 212, 56),
    PLAYER_ON_TARGET: (219, 212, 56),
}
"""gym-sokoban's `room_to_tiny_world_rgb` palette, for `render="env"`."""

Cell = tuple[int, int]
MAX_REVERSE_STATES = 300_000
"""gym-sokoban's cap on the states one reverse play explores (a 6x6 one-box room has at most 240)."""
MAX_DRAWS = 1000
"""Rooms `generate_room` draws for a seed before it gives up (a 6x6 one-box room needs 1.1 on average)."""


@dataclass(frozen=True)
class Room:
    """A Sokoban state: `cells` the fixed room (rows of `#`, ` `, `.`), `boxes` and `player` (row, column)."""

    cells: tuple[str, ...]
    boxes: frozenset[Cell]
    player: Cell

    @classmethod
    def from_xsb(cls, rows: Sequence[str]) -> Room:
        """A room from XSB rows enclosed by walls, e.g. ["#####", "#@$.#", "#####"]."""
        fixed = {WALL: WALL, FLOOR: FLOOR, TARGET: TARGET, BOX: FLOOR, PLAYER: FLOOR}
        fixed.update({BOX_ON_TARGET: TARGET, PLAYER_ON_TARGET: TARGET})
        cells = tuple("".join(fixed[letter] for letter in row) for row in rows)
        found = {(i, j): letter for i, row in enumerate(rows) for j, letter in enumerate(row)}
        players = [cell for cell, letter in found.items() if letter in (PLAYER, PLAYER_ON_TARGET)]
        if len(players) != 1:
            raise ValueError(f"an XSB room needs one player (@ or +), found {len(players)} in {list(rows)}")
        boxes = frozenset(cell for cell, letter in found.items() if letter in (BOX, BOX_ON_TARGET))
        return cls(cells, boxes, players[0])

    def xsb(self) -> tuple[str, ...]:
        """The room as XSB rows."""
        rows = [list(row) for row in self.cells]
        for i, j in self.boxes:
            rows[i][j] = BOX_ON_TARGET if self.cells[i][j] == TARGET else BOX
        i, j = self.player
        rows[i][j] = PLAYER_ON_TARGET if self.cells[i][j] == TARGET else PLAYER
        return tuple("".join(row) for row in rows)

    @property
    def targets(self) -> frozenset[Cell]:
        return _targets(self.cells)

    @property
    def solved(self) -> bool:
        return self.boxes == self.targets

    def _free(self, cell: Cell) -> bool:
        return self.cells[cell[0]][cell[1]] != WALL and cell not in self.boxes

    def move(self, action: str) -> Room:
        """The room after the player steps `action`, pushing a box it walks into when the cell beyond
        is free; the same room when the step is blocked (a wall, or a box against a wall or box)."""
        di, dj = MOVES[action]
        step = (self.player[0] + di, self.player[1] + dj)
        if self.cells[step[0]][step[1]] == WALL:
            return self
        if step not in self.boxes:
            return Room(self.cells, self.boxes, step)
        beyond = (step[0] + di, step[1] + dj)
        if not self._free(beyond):
            return self
        return Room(self.cells, (self.boxes - {step}) | {beyond}, step)

    def pull(self, action: str) -> tuple[Room, Cell | None]:
        """Reverse play: the player steps `action` onto a free cell, pulling a box from the cell behind
        it along; (the new room, the cell the pulled box came from or None)."""
        di, dj = MOVES[action]
        step = (self.player[0] + di, self.player[1] + dj)
        if not self._free(step):
            return self, None
        behind = (self.player[0] - di, self.player[1] - dj)
        if behind not in self.boxes:
            return Room(self.cells, self.boxes, step), None
        return Room(self.cells, (self.boxes - {behind}) | {self.player}, step), behind


@functools.lru_cache(maxsize=256)
def _targets(cells: tuple[str, ...]) -> frozenset[Cell]:
    return frozenset((i, j) for i, row in enumerate(cells) for j, c in enumerate(row) if c == TARGET)


@functools.lru_cache(maxsize=4096)
def solve(room: Room) -> tuple[str, ...] | None:
    """A shortest action sequence that puts every box on a target (breadth-first over player and box
    positions, actions tried in `ACTIONS` order); () when solved already, None when unsolvable."""
    if room.solved:
        return ()
    came_from: dict[Room, tuple[Room, str] | None] = {room: None}
    queue = deque([room])
    while queue:
        state = queue.popleft()
        for action in ACTIONS:
            following = state.move(action)
            if following in came_from:
                continue
            came_from[following] = (state, action)
            if following.solved:
                plan = []
                while (link := came_from[following]) is not None:
                    following, step = link
                    plan.append(step)
                return tuple(reversed(plan))
            queue.append(following)
    return None


def topology(
    rng: np.random.Generator, dim: tuple[int, int], p_change_directions: float, steps: int
) -> list[str]:
    """gym-sokoban's `room_topology_generation`: a random walk inside the border stamps one of five
    3x3 masks (a line, a corner, a block) as floor at each step; the border stays wall."""
    rows, cols = dim
    masks = [
        [(0, -1), (0, 0), (0, 1)],
        [(-1, 0), (0, 0), (1, 0)],
        [(0, -1), (0, 0), (1, 0)],
        [(0, -1), (0, 0), (1, -1), (1, 0)],
        [(0, 0), (0, 1), (1, 0)],
    ]
    directions = [(1, 0), (0, 1), (-1, 0), (0, -1)]
    direction = directions[rng.integers(4)]
    position = (int(rng.integers(1, rows - 1)), int(rng.integers(1, cols - 1)))
    floor: set[Cell] = set()
    for _ in range(steps):
        if rng.random() < p_change_directions:
            direction = directions[rng.integers(4)]
        position = (
            min(max(position[0] + direction[0], 1), rows - 2),
            min(max(position[1] + direction[1], 1), cols - 2),
        )
        floor.update((position[0] + di, position[1] + dj) for di, dj in masks[rng.integers(len(masks))])
    inside = {(i, j) for i, j in floor if 0 < i < rows - 1 and 0 < j < cols - 1}
    return ["".join(FLOOR if (i, j) in inside else WALL for j in range(cols)) for i in range(rows)]


def reverse_play(solved: Room, search_depth: int) -> Room | None:
    """The start state gym-sokoban/VAGEN keep: a depth-first search of pulls (at most `search_depth`
    deep) from the solved room, scored by (boxes pulled in turn) x (sum of each box's Manhattan
    distance from its target), 0 while any target holds a box or the player; the first best state,
    or None when no pull moves a box."""
    best: list[Any] = [0, None]
    seen: set[Room] = set()

    def search(room: Room, origin: dict[Cell, Cell], swaps: int, last: Cell | None, ttl: int) -> None:
        ttl -= 1
        if ttl <= 0 or room in seen or len(seen) >= MAX_REVERSE_STATES:
            return
        seen.add(room)
        clear = not (room.targets & (room.boxes | {room.player}))
        score = swaps * sum(abs(b[0] - t[0]) + abs(b[1] - t[1]) for b, t in origin.items()) if clear else 0
        if score > best[0]:
            best[:] = [score, room]
        for action in ACTIONS:
            following, pulled = room.pull(action)
            if pulled is None:
                search(following, origin, swaps, last, ttl)
                continue
            moved = dict(origin)
            moved[room.player] = moved.pop(pulled)  # box position -> its target
            target = moved[room.player]
            search(following, moved, swaps + (target != last), target, ttl)

    search(solved, {box: box for box in solved.boxes}, 0, None, search_depth)
    return best[1]


def wander(room: Room, rng: np.random.Generator, max_steps: int = 3) -> Room:
    """VAGEN's `add_random_player_movement`: half the time the player walks 1 to `max_steps` random
    steps onto free cells it has not stood on (each further step with probability 1/2), so it does
    not always start beside the box it last pulled."""
    if rng.random() > 0.5:
        return room
    visited = {room.player}
    for _ in range(max_steps):
        options = []
        for action in ACTIONS:
            following = room.move(action)
            if following.boxes == room.boxes and following.player not in visited:
                options.append(following)
        if not options:
            break
        room = options[rng.integers(len(options))]
        visited.add(room.player)
        if rng.random() > 0.5:
            break
    return room


def generate_room(
    seed: int,
    dim: tuple[int, int] = (6, 6),
    num_boxes: int = 1,
    *,
    p_change_directions: float = 0.35,
    walk_steps: int | None = None,
    search_depth: int = 100,
) -> Room:
    """The start room of `seed` (the same seed, the same room): a topology (`walk_steps` default
    int(1.7 * (h + w)), gym-sokoban's), targets, reverse play, VAGEN's wander; redrawn from the seed's
    random stream until reverse play moves a box."""
    rng = np.random.default_rng(seed)
    walk_steps = walk_steps if walk_steps is not None else int(1.7 * (dim[0] + dim[1]))
    for _ in range(MAX_DRAWS):
        cells = topology(rng, dim, p_change_directions, walk_steps)
        free = [(i, j) for i, row in enumerate(cells) for j, c in enumerate(row) if c == FLOOR]
        if len(free) <= num_boxes + 1:
            continue
        player, *targets = (free[k] for k in rng.choice(len(free), num_boxes + 1, replace=False))
        rows = [list(row) for row in cells]
        for i, j in targets:
            rows[i][j] = TARGET
        solved = Room(tuple("".join(row) for row in rows), frozenset(targets), player)
        start = reverse_play(solved, search_depth)
        if start is not None:
            return wander(start, rng)
    raise ValueError(
        f"no {dim[0]}x{dim[1]} room with {num_boxes} movable boxes in {MAX_DRAWS} draws (seed {seed})"
    )


def puzzle(room: Room) -> tuple[str, ...]:
    """A room's walls, targets and boxes (XSB rows without the player): the layout that held-out
    rooms never share with training rooms."""
    i, j = room.player
    return tuple(
        row if k != i else row[:j] + room.cells[i][j] + row[j + 1 :] for k, row in enumerate(room.xsb())
    )


class _LazySeeds(Sequence[int]):
    """Seeds of the held-out split (0: training, 1: held out), computed on first use, not at import."""

    def __init__(self, part: int) -> None:
        self._part = part

    def __getitem__(self, index):
        return _held_out_split()[self._part][index]

    def __len__(self) -> int:
        return len(_held_out_split()[self._part])

    def __iter__(self) -> Iterator[int]:
        return iter(_held_out_split()[self._part])

    def __repr__(self) -> str:
        return f"<{len(self)} Sokoban seeds from {self[0]}>"


@functools.cache
def _held_out_split(eval_rooms: int = 100) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(train seeds, held-out seeds) of 6x6 one-box rooms that never share a puzzle: the first
    `eval_rooms` seeds from 100,000 with distinct puzzles, and the seeds of 0-9,999 whose puzzle is
    none of them."""
    eval_seeds, eval_puzzles = [], set()
    seed = 100_000
    while len(eval_seeds) < eval_rooms:
        layout = puzzle(generate_room(seed))
        if layout not in eval_puzzles:
            eval_puzzles.add(layout)
            eval_seeds.append(seed)
        seed += 1
    train = tuple(s for s in range(10_000) if puzzle(generate_room(s)) not in eval_puzzles)
    return train, tuple(eval_seeds)


TRAIN_SEEDS: Sequence[int] = _LazySeeds(0)
EVAL_SEEDS: Sequence[int] = _LazySeeds(1)


class SokobanEnv(gymnasium.Env):
    """Sokoban whose `reset(seed=...)` draws a new random room from the seed (`generate_room`).

    Observations are gym-sokoban's "tiny world" RGB frames, 16 px a cell; `room` is the current
    `Room`. Actions 0-3 are up, down, left, right.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        dim: tuple[int, int] = (6, 6),
        num_boxes: int = 1,
        search_depth: int = 100,
        render_mode: str | None = "rgb_array",
    ) -> None:
        if min(dim) < 5:
            raise ValueError(f"a room needs at least 5x5 cells (its border is wall), not {dim}")
        self.dim, self.num_boxes, self.search_depth = tuple(dim), num_boxes, search_depth
        self.render_mode = render_mode
        self.observation_space = gymnasium.spaces.Box(0, 255, (dim[0] * 16, dim[1] * 16, 3), dtype=np.uint8)
        self.action_space = gymnasium.spaces.Discrete(4)
        self.room = generate_room(0, self.dim, num_boxes, search_depth=search_depth)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        room_seed = seed if seed is not None else int(self.np_random.integers(2**31))
        self.room = generate_room(room_seed, self.dim, self.num_boxes, search_depth=self.search_depth)
        return self.render(), {"success": False}

    def step(self, action: int):
        self.room = self.room.move(ACTIONS[int(action)])
        solved = self.room.solved
        return self.render(), float(solved), solved, False, {"success": solved}

    def render(self) -> np.ndarray:
        return np.asarray(draw_room(self.room, 16 * max(self.dim), inside=False, colors=TINY_WORLD_COLORS))


def draw_room(
    room: Room, size: int, *, inside: bool = True, colors: dict[str, tuple[int, int, int]] = COLORS
) -> Image.Image:
    """A size x size image of `room`, one flat colour a cell; `inside` leaves out the border, which
    is always wall (a 6x6 room's 4x4 inside at 32 px: one cell per 8x8 patch)."""
    rows = room.xsb()
    if inside:
        rows = tuple(row[1:-1] for row in rows[1:-1])
    return draw_grid(rows, (-1, -1), size, colors)  # no agent overlay: the XSB letters hold the player


def expert(env: TurnEnv) -> str:
    """The first action of a shortest solution (`solve`; ties: up, down, left, right); "up" where the
    room can no longer be solved (a box pushed into a corner)."""
    plan = solve(env.env.unwrapped.room)
    return plan[0] if plan else ACTIONS[0]


def solved(env: SokobanEnv) -> bool:
    return env.room.solved


def make_sokoban(
    *,
    size: int = 6,
    num_boxes: int = 1,
    render: Literal["flat", "env"] = "flat",
    image_size: int | None = 32,
    max_turns: int | None = None,
    **adapter_options: Any,
) -> TurnEnv:
    """Sokoban turns on random `size` x `size` rooms (border included) with `num_boxes` boxes;
    `adapter_options` go to `TurnEnv` (invalid_penalty, default_action, ...)."""
    if render not in ("flat", "env"):
        raise ValueError(f"render must be 'flat' or 'env', not {render!r}")
    frame_size = image_size or 8 * (size - 2)
    return TurnEnv(
        SokobanEnv((size, size), num_boxes),
        actions=ACTIONS,
        instruction=INSTRUCTION,
        frame=(lambda env, obs: draw_room(env.room, frame_size)) if render == "flat" else None,
        image_size=image_size,
        success=solved,
        parser=ActionParser(ACTIONS, aliases=ALIASES),
        max_turns=max_turns if max_turns is not None else 3 * (size - 2),
        **adapter_options,
    )
