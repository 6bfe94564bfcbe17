"""Reference success rates on FrozenLake's and Sokoban's held-out rooms, for recipes to print beside
a policy's.

Exact, not sampled: each map's transition matrices give the probability that a policy blind to the
image (a fixed distribution over moves, or a fixed move sequence) reaches the goal within
`max_turns`; the expert is played through the adapter. Start and goal are always the corners, so
a blind policy gets a good share of the maps: a policy has read the image only where it beats
`best_sequence`. Sokoban's blind policies are exact too (over every state the rooms reach); its
best fixed sequence is a beam search's, a lower bound (4 ** max_turns sequences are too many).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv, generate_random_map

from vlm_rl.envs import frozenlake, sokoban
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


EXACT_SEQUENCE_TURNS = 8
"""Up to this many turns every fixed sequence is tried (4 ** 8 = 65,536: FrozenLake 4x4's cap);
beyond, a beam search finds one (4 ** 12 at 6x6 took 9 s and 5 GB a map)."""


def beam_sequence_success(
    maps: Sequence[Sequence[str]], max_turns: int, slippery: bool = False, beam_width: int = 2048
) -> tuple[float, list[int]]:
    """(mean success, moves) of the best fixed move sequence of length `max_turns` that a beam search
    finds: a lower bound on the best. The beam keeps the sequences whose state distributions (one
    per map) put the most mass on the goal, then the most within reach of it in the turns left, then
    the least expected distance to it (shortest paths on each map, holes never reaching it)."""
    tables = [transitions(desc, slippery) for desc in maps]
    matrices = np.stack([matrix for matrix, _, _ in tables]).astype(np.float32)  # (maps, 4, S, S)
    goals = np.array([goal for _, _, goal in tables])
    n = matrices.shape[-1]
    distance = np.stack([_distances(matrix, goal) for matrix, _, goal in tables])  # (maps, S)
    state = np.zeros((1, len(maps), n), dtype=np.float32)
    state[0, np.arange(len(maps)), [start for _, start, _ in tables]] = 1.0
    moves = np.zeros((1, 0), dtype=int)
    at_goal = np.zeros((len(maps), n), dtype=np.float32)
    at_goal[np.arange(len(maps)), goals] = 1.0
    for turn in range(max_turns):
        state = np.einsum("bms,mast->bamt", state, matrices).reshape(-1, len(maps), n)
        moves = np.concatenate([np.repeat(moves, 4, axis=0), np.tile(np.arange(4), len(moves))[:, None]], 1)
        state, kept = np.unique(state.round(6), axis=0, return_index=True)
        moves = moves[kept]
        left = max_turns - turn - 1
        solved = np.einsum("bms,ms->b", state, at_goal)
        reachable = np.einsum("bms,ms->b", state, (distance <= left).astype(np.float32))
        expected = np.einsum("bms,ms->b", state, np.minimum(distance, left + 1).astype(np.float32))
        rank = np.lexsort((expected, -reachable, -solved))[:beam_width]
        state, moves = state[rank], moves[rank]
    return round(float(np.einsum("ms,ms->", state[0], at_goal)) / len(maps), 6), moves[0].tolist()


def _distances(matrix: np.ndarray, goal: int) -> np.ndarray:
    """Fewest moves from each state to `goal` along moves that can succeed (S,): `n` where none does."""
    n = matrix.shape[1]
    distance = np.full(n, n)
    distance[goal] = 0
    for step in range(1, n):
        reaches = (matrix[:, :, distance < step].sum(axis=2) > 0).any(axis=0)
        reaches[goal] = False
        newly = reaches & (distance == n)
        newly &= matrix[:, np.arange(n), np.arange(n)].min(axis=0) < 1  # not absorbing (holes)
        if not newly.any():
            break
        distance[newly] = step
    return distance


def _simplex_grid(step: float) -> np.ndarray:
    """Every distribution over 4 moves whose probabilities are multiples of `step`: (Q, 4)."""
    steps = round(1 / step)
    return (
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
    - `best_sequence`, `best_sequence_moves`: the best single fixed move sequence (all tried up to
      `EXACT_SEQUENCE_TURNS` turns; beyond, a beam search's: a lower bound);
    - `expert`: the shortest-path expert played through `make_frozenlake` (1.0 unless slippery).
    """
    seeds = list(seeds)
    max_turns = max_turns if max_turns is not None else 2 * (size - 1) + 2
    maps = [generate_random_map(size, p, seed=seed) for seed in seeds]
    grid = _simplex_grid(grid_step)
    blind = blind_success(maps, grid, max_turns, slippery)
    if max_turns <= EXACT_SEQUENCE_TURNS:
        sequences = sequence_success(maps, max_turns, slippery)
        best = int(sequences.argmax())
        best_sequence = float(sequences[best])
        digits = [(best // 4**k) % 4 for k in reversed(range(max_turns))]
    else:
        best_sequence, digits = beam_sequence_success(maps, max_turns, slippery)
    env = frozenlake.make_frozenlake(size=size, p=p, slippery=slippery, max_turns=max_turns)
    return {
        "random": float(blind_success(maps, np.full((1, 4), 0.25), max_turns, slippery)[0]),
        "best_blind": float(blind.max()),
        "best_blind_probs": dict(
            zip(frozenlake.ACTIONS, grid[blind.argmax()].round(3).tolist(), strict=True)
        ),
        "best_sequence": best_sequence,
        "best_sequence_moves": [frozenlake.ACTIONS[d] for d in digits],
        "expert": success_rate(env, lambda env, turn: frozenlake.expert(env), seeds),
    }


@dataclass(frozen=True)
class SokobanStates:
    """Every state reachable from some rooms' starts, indexed 0..N-1 (solved states absorb):
    `next_state` (N, 4) under up, down, left, right; `solved` (N,); `distance` (N,) the shortest
    plan's length, `NO_PLAN` where no plan is left (a box in a corner); `starts` (R,)."""

    next_state: np.ndarray
    solved: np.ndarray
    distance: np.ndarray
    starts: np.ndarray

    NO_PLAN = 10**6

    @classmethod
    def of(cls, rooms: Sequence[sokoban.Room]) -> SokobanStates:
        index: dict[sokoban.Room, int] = {}
        edges: list[list[int]] = []
        starts = []
        for room in rooms:
            if room in index:  # a room met before: its states are all indexed
                starts.append(index[room])
                continue
            starts.append(index.setdefault(room, len(index)))
            edges.append([])
            queue = deque([room])
            while queue:
                state = queue.popleft()
                row = edges[index[state]]
                for action in sokoban.ACTIONS:
                    following = state if state.solved else state.move(action)
                    if following not in index:
                        index[following] = len(index)
                        edges.append([])
                        queue.append(following)
                    row.append(index[following])
        states = list(index)
        next_state = np.array(edges)
        solved = np.array([state.solved for state in states])
        distance = np.full(len(states), cls.NO_PLAN)
        distance[solved] = 0
        before: list[list[int]] = [[] for _ in states]
        for state, row in enumerate(edges):
            for following in set(row):
                before[following].append(state)
        queue = deque(np.flatnonzero(solved).tolist())
        while queue:  # backwards from the solved states
            state = queue.popleft()
            for previous in before[state]:
                if distance[previous] == cls.NO_PLAN:
                    distance[previous] = distance[state] + 1
                    queue.append(previous)
        return cls(next_state, solved, distance, np.array(starts))


def sokoban_blind_success(states: SokobanStates, move_probs: np.ndarray, max_turns: int) -> np.ndarray:
    """Mean success over the rooms of `states` of each image-blind stationary policy: move_probs
    (Q, 4), each row a distribution over (up, down, left, right) -> (Q,). Exact: the probability
    over states is pushed through the deterministic moves `max_turns` times."""
    move_probs = np.atleast_2d(move_probs)
    scatters = []
    for action in range(4):  # prob (N, Q) -> summed over the states that each state is reached from
        order = np.argsort(states.next_state[:, action], kind="stable")
        targets = states.next_state[order, action]
        first = np.flatnonzero(np.r_[True, targets[1:] != targets[:-1]])
        scatters.append((order, first, targets[first]))
    prob = np.zeros((len(states.solved), len(move_probs)))  # states first: rows gather contiguously
    np.add.at(prob, states.starts, 1.0)
    for _ in range(max_turns):
        following = np.zeros_like(prob)
        for action, (order, first, targets) in enumerate(scatters):
            following[targets] += np.add.reduceat(prob[order], first, axis=0) * move_probs[:, action]
        prob = following
    return prob[states.solved].sum(axis=0) / len(states.starts)


def sokoban_best_sequence(
    states: SokobanStates, max_turns: int, beam_width: int = 4096
) -> tuple[float, list[str]]:
    """(mean success, moves) of the best fixed move sequence of length `max_turns` that a beam search
    finds: a lower bound on the best (4 ** max_turns sequences are too many to try). The beam keeps
    the joint states (one per room) with the most rooms solved, then the most still solvable in the
    turns left, then the shortest plans left."""
    joint = states.starts[None, :]  # (beam, rooms)
    moves = np.zeros((1, 0), dtype=int)
    for turn in range(max_turns):
        joint = states.next_state[joint].transpose(0, 2, 1).reshape(-1, joint.shape[1])
        moves = np.concatenate([np.repeat(moves, 4, axis=0), np.tile(np.arange(4), len(moves))[:, None]], 1)
        joint, kept = np.unique(joint, axis=0, return_index=True)
        moves = moves[kept]
        distance = states.distance[joint]
        left = max_turns - turn - 1
        solvable = (distance <= left).sum(axis=1)
        rank = np.lexsort(
            (np.minimum(distance, left + 1).sum(axis=1), -solvable, -states.solved[joint].sum(axis=1))
        )
        joint, moves = joint[rank[:beam_width]], moves[rank[:beam_width]]
    return float(states.solved[joint[0]].mean()), [sokoban.ACTIONS[m] for m in moves[0]]


def sokoban_baselines(
    seeds: Iterable[int] = sokoban.EVAL_SEEDS,
    *,
    size: int = 6,
    num_boxes: int = 1,
    max_turns: int | None = None,
    grid_step: float = 0.1,
    beam_width: int = 4096,
) -> dict[str, object]:
    """Success rates on the rooms of `seeds` (Sokoban's held-out rooms by default), as
    `frozenlake_baselines`: `random`, `best_blind` (+ `best_blind_probs`), `best_sequence` (+
    `best_sequence_moves`; beam search, a lower bound; the blind search's grid is coarser than
    FrozenLake's, as Sokoban's rooms reach ~80 states each), `expert` (played through `make_sokoban`) and
    `expert_length`, the mean length of its solutions."""
    seeds = list(seeds)
    env = sokoban.make_sokoban(size=size, num_boxes=num_boxes, max_turns=max_turns)
    max_turns = env.max_turns
    rooms = [sokoban.generate_room(seed, (size, size), num_boxes) for seed in seeds]
    states = SokobanStates.of(rooms)
    grid = np.concatenate([_simplex_grid(grid_step), np.full((1, 4), 0.25)])  # uniform, off a 0.1 grid
    blind = sokoban_blind_success(states, grid, max_turns)
    best_sequence, best_moves = sokoban_best_sequence(states, max_turns, beam_width)
    return {
        "random": float(sokoban_blind_success(states, np.full((1, 4), 0.25), max_turns)[0]),
        "best_blind": float(blind.max()),
        "best_blind_probs": dict(zip(sokoban.ACTIONS, grid[blind.argmax()].round(3).tolist(), strict=True)),
        "best_sequence": best_sequence,
        "best_sequence_moves": best_moves,
        "expert": success_rate(env, lambda env, turn: sokoban.expert(env), seeds),
        "expert_length": float(np.mean([len(sokoban.solve(room)) for room in rooms])),
    }
