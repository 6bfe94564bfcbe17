"""Reference success rates on FrozenLake's held-out maps, for recipes to print beside a policy's.

Exact, not sampled: each map's transition matrices give the probability that a policy blind to the
image (a fixed distribution over moves, or a fixed move sequence) reaches the goal within
`max_turns`; the expert is played through the adapter. Start and goal are always the corners, so
a blind policy gets a good share of the maps: a policy has read the image only where it beats
`best_sequence`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv, generate_random_map

from vlm_rl.envs import frozenlake
from vlm_rl.envs.adapter import Turn, TurnEnv

Policy = Callable[[TurnEnv, Turn], str]
"""(env, the current turn) -> the reply text."""


def success_rate(env: TurnEnv, policy: Policy, seeds: Iterable[int]) -> float:
    """The fraction of episodes (one per seed) that `policy` wins, played turn by turn through `env`."""
    wins = []
    for seed in seeds:
        turn = env.reset(seed=seed)
        while True:
            result = env.step(policy(env, turn))
            if result.done:
                break
            turn = result.turn
        wins.append(env.success(result))
    return float(np.mean(wins))


def transitions(desc: Sequence[str], slippery: bool = False) -> tuple[np.ndarray, int, int]:
    """FrozenLake's dynamics on map `desc`: (T (4, S, S) with T[a, s, s'] = P(s' | s, a), holes and
    the goal absorbing; the start state; the goal state)."""
    lake = FrozenLakeEnv(desc=list(desc), is_slippery=slippery)
    n = lake.observation_space.n
    matrix = np.zeros((4, n, n))
    for state, action in itertools.product(range(n), range(4)):
        for prob, next_state, _, _ in lake.P[state][action]:
            matrix[action, state, next_state] += prob
    flat = "".join(desc)
    return matrix, flat.index("S"), flat.index("G")


def blind_success(
    maps: Sequence[Sequence[str]], move_probs: np.ndarray, max_turns: int, slippery: bool = False
) -> np.ndarray:
    """Mean success over `maps` of each image-blind stationary policy: move_probs (Q, 4), each row
    a distribution over (left, down, right, up) -> (Q,)."""
    move_probs = np.atleast_2d(move_probs)
    total = np.zeros(len(move_probs))
    for desc in maps:
        matrix, start, goal = transitions(desc, slippery)
        policy = np.einsum("qa,ast->qst", move_probs, matrix)
        state = np.zeros((len(move_probs), matrix.shape[1]))
        state[:, start] = 1.0
        for _ in range(max_turns):
            state = np.einsum("qs,qst->qt", state, policy)
        total += state[:, goal]
    return total / len(maps)


def sequence_success(maps: Sequence[Sequence[str]], max_turns: int, slippery: bool = False) -> np.ndarray:
    """Mean success over `maps` of every fixed move sequence of length max_turns: (4 ** max_turns,),
    sequence i's moves are i's base-4 digits, most significant first (0 left ... 3 up)."""
    total = np.zeros(4**max_turns)
    for desc in maps:
        matrix, start, goal = transitions(desc, slippery)
        state = np.zeros((1, matrix.shape[1]))
        state[0, start] = 1.0
        for _ in range(max_turns):  # (sequences so far, S) -> (sequences x 4 moves, S)
            state = np.stack([state @ matrix[a] for a in range(4)], axis=1).reshape(-1, matrix.shape[1])
        total += state[:, goal]
    return total / len(maps)


def frozenlake_baselines(
    seeds: Iterable[int] = frozenlake.EVAL_SEEDS,
    *,
    size: int = 4,
    p: float = 0.8,
    slippery: bool = False,
    max_turns: int | None = None,
    grid_step: float = 0.05,
) -> dict[str, object]:
    """Success rates on the maps of `seeds` (FrozenLake's held-out maps by default):

    - `random`: moves drawn uniformly;
    - `best_blind`, `best_blind_probs`: the best fixed move distribution (searched on a grid of
      `grid_step` over the simplex) and its probabilities;
    - `best_sequence`, `best_sequence_moves`: the best single fixed move sequence;
    - `expert`: the shortest-path expert played through `make_frozenlake` (1.0 unless slippery).
    """
    seeds = list(seeds)
    max_turns = max_turns if max_turns is not None else 2 * (size - 1) + 2
    maps = [generate_random_map(size, p, seed=seed) for seed in seeds]
    steps = round(1 / grid_step)
    grid = (
        np.array(
            [
                (a, b, c, steps - a - b - c)
                for a in range(steps + 1)
                for b in range(steps + 1 - a)
                for c in range(steps + 1 - a - b)
            ]
        )
        / steps
    )
    blind = blind_success(maps, grid, max_turns, slippery)
    sequences = sequence_success(maps, max_turns, slippery)
    best = int(sequences.argmax())
    digits = [(best // 4**k) % 4 for k in reversed(range(max_turns))]
    env = frozenlake.make_frozenlake(size=size, p=p, slippery=slippery, max_turns=max_turns)
    return {
        "random": float(blind_success(maps, np.full((1, 4), 0.25), max_turns, slippery)[0]),
        "best_blind": float(blind.max()),
        "best_blind_probs": dict(
            zip(frozenlake.ACTIONS, grid[blind.argmax()].round(3).tolist(), strict=True)
        ),
        "best_sequence": float(sequences[best]),
        "best_sequence_moves": [frozenlake.ACTIONS[d] for d in digits],
        "expert": success_rate(env, lambda env, turn: frozenlake.expert(env), seeds),
    }
