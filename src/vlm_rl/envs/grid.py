"""Grid worlds drawn flat and solved by breadth-first search (FrozenLake, CliffWalking).

A flat frame gives each cell one saturated colour, so at 32x32 with 8x8 patches each image token of
a 4x4 grid sees exactly one whole cell: the tiny default VLM reads a cell from one patch, where
gymnasium's sprites downscaled to 32 px blur into near-identical greys.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "S": (0, 0, 255),  # start: blue
    "F": (255, 255, 255),  # free (frozen ice, grass): white
    "H": (0, 0, 0),  # hole, cliff: black
    "G": (0, 255, 0),  # goal: green
    "A": (255, 0, 0),  # the agent: red, drawn over its cell
}
"""Cell letter -> RGB of the flat frames."""

MOVES: dict[str, tuple[int, int]] = {"left": (0, -1), "down": (1, 0), "right": (0, 1), "up": (-1, 0)}
"""Action word -> (row, column) step."""


def draw_grid(
    cells: Sequence[str],
    agent: tuple[int, int],
    size: int,
    colors: Mapping[str, tuple[int, int, int]] = COLORS,
) -> Image.Image:
    """A size x size image of `cells` (rows of cell letters) with the agent at (row, column).

    Cell edges fall on round(i * size / n), so a 4-row grid at 32 px gives 8 px rows exactly; a grid
    that is not square is stretched to the square.
    """
    rows, cols = len(cells), len(cells[0])
    image = Image.new("RGB", (size, size))
    ys = [round(i * size / rows) for i in range(rows + 1)]
    xs = [round(j * size / cols) for j in range(cols + 1)]
    for i, row in enumerate(cells):
        for j, letter in enumerate(row):
            color = colors["A"] if (i, j) == agent else colors[letter]
            image.paste(color, (xs[j], ys[i], xs[j + 1], ys[i + 1]))
    return image


def shortest_first_moves(
    cells: Sequence[str], goal: str = "G", blocked: str = "H", moves: Mapping[str, tuple[int, int]] = MOVES
) -> dict[tuple[int, int], list[str]]:
    """(row, column) -> the moves (in `moves` order) that start a shortest path to a `goal` cell
    without entering a `blocked` cell; cells that cannot reach the goal are absent, goal cells map
    to []. A move off the grid leaves the agent in place, so it never starts a shortest path.

    >>> shortest_first_moves(["SF", "HG"])[(0, 0)]
    ['right']
    """
    rows, cols = len(cells), len(cells[0])
    distance: dict[tuple[int, int], int] = {}
    queue: deque[tuple[int, int]] = deque()
    for i in range(rows):
        for j in range(cols):
            if cells[i][j] in goal:
                distance[(i, j)] = 0
                queue.append((i, j))
    while queue:  # backwards from the goals: moves are reversible on a grid
        i, j = queue.popleft()
        for di, dj in moves.values():
            cell = (i - di, j - dj)
            if 0 <= cell[0] < rows and 0 <= cell[1] < cols and cell not in distance:
                if cells[cell[0]][cell[1]] not in blocked:
                    distance[cell] = distance[(i, j)] + 1
                    queue.append(cell)
    first: dict[tuple[int, int], list[str]] = {}
    for (i, j), steps in distance.items():
        first[(i, j)] = [
            word for word, (di, dj) in moves.items() if distance.get((i + di, j + dj), -1) == steps - 1
        ]
    return first
