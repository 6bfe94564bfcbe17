"""The built-in environments by name, and `make_env` for them, gymnasium ids and import paths."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from vlm_rl.envs import babyai, cliffwalking, frozenlake, numberline, sokoban
from vlm_rl.envs.adapter import TurnEnv, words_of
from vlm_rl.envs.external import make_external
from vlm_rl.errors import ConfigError


@dataclass(frozen=True)
class EnvSpec:
    """A built-in environment: how to make it and what its protocol needs.

    `make(**options)` returns a `TurnEnv`; `train_seeds` and `eval_seeds` (held out) never overlap
    (a range, a tuple, or Sokoban's sequence computed on first use);
    `max_turns` is the episode cap with the default options; `words` are every word of the
    protocol (instruction and actions), for the tiny models' vocabulary; `expert(env)` is the
    optimal (shortest-path) action word in the env's current state, for warm starts and baselines;
    `tiny_model` is the offline tiny model whose vocabulary is built with these words (the agent
    recipe's default model for this env; tiny-llava-agent's words never change when an env of
    another tiny model is added).
    """

    name: str
    make: Callable[..., TurnEnv]
    train_seeds: Sequence[int]
    eval_seeds: Sequence[int]
    max_turns: int
    words: list[str]
    expert: Callable[[TurnEnv], str] | None = None
    tiny_model: str = "tiny-llava-agent"


def _builtin(name: str, module: ModuleType, make: Callable[..., TurnEnv], max_turns: int) -> EnvSpec:
    words = words_of(module.INSTRUCTION, *module.ACTIONS)
    return EnvSpec(name, make, module.TRAIN_SEEDS, module.EVAL_SEEDS, max_turns, words, module.expert)


ENVS: dict[str, EnvSpec] = {
    "frozenlake": _builtin("frozenlake", frozenlake, frozenlake.make_frozenlake, max_turns=8),
    "numberline": _builtin("numberline", numberline, numberline.make_numberline, max_turns=10),
    "cliffwalking": _builtin("cliffwalking", cliffwalking, cliffwalking.make_cliffwalking, max_turns=20),
    "sokoban": _builtin("sokoban", sokoban, sokoban.make_sokoban, max_turns=12),
    **{
        f"babyai-{level}": EnvSpec(
            f"babyai-{level}",
            functools.partial(babyai.make_babyai, level=level),
            babyai.TRAIN_SEEDS[level],
            babyai.EVAL_SEEDS[level],
            babyai.MAX_TURNS,
            words_of(babyai.INSTRUCTION, *babyai.MISSION_WORDS, *babyai.ACTIONS),
            babyai.expert,
            tiny_model="tiny-llava-babyai",
        )
        for level in babyai.LEVELS
    },
}
"""Built-in name -> its spec (protocols in the modules' docstrings)."""


def vocabulary(tiny_model: str | None = None) -> list[str]:
    """Texts whose words the built-in protocols use (the `vocabulary()` contract of `vlm_rl.tasks`):
    every built-in's, or with `tiny_model` only those of the built-ins whose `EnvSpec.tiny_model` it is."""
    return [" ".join(spec.words) for spec in ENVS.values() if tiny_model in (None, spec.tiny_model)]


BUILTIN_OPTIONS = {"size": ("--env_size", '{"size": 6}'), "slippery": ("--slippery", '{"is_slippery": true}')}
"""Options only the built-ins take: the `vlm-rl agent` flag that sets each, and an --env_kwargs
example of what other envs take instead."""


def make_env(
    name: str,
    *,
    actions: Sequence[str] | None = None,
    instruction: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> TurnEnv:
    """A `TurnEnv` from a built-in name ("frozenlake"), a gymnasium id ("MiniGrid-Empty-5x5-v0"),
    gymnasium's "module:EnvId" or an import path "pkg.module:Class" (or a factory).

    For a built-in, `options` are its make function's (e.g. `size=`, `render=`, `invalid_penalty=`,
    `max_turns=`); `actions`, `instruction` and `env_kwargs` belong to the other kinds, whose
    protocol the user supplies (`vlm_rl.envs.external.make_external`: `env_kwargs` go to the env,
    `render=` and `max_turns=` to the turns, other `options` to `TurnEnv`). An argument that does
    not apply to the kind is a `ConfigError` naming the `vlm-rl agent` flag that sets it.
    """
    if name in ENVS:
        for flag, value in (
            ("--actions", actions),
            ("--instruction", instruction),
            ("--env_kwargs", env_kwargs),
        ):
            if value is not None:
                raise ConfigError(
                    f"{flag}: --env {name} is a built-in with its own protocol; {flag} applies to gymnasium "
                    "ids and env classes only"
                )
        _check_builtin_options(name, options)
        return ENVS[name].make(**options)
    for option, (flag, example) in BUILTIN_OPTIONS.items():
        if option in options:
            raise ConfigError(
                f"{flag}: applies to the built-ins ({', '.join(sorted(ENVS))}) only, not --env {name}; pass "
                f"the env's own constructor arguments with --env_kwargs, e.g. --env_kwargs '{example}'"
            )
    return make_external(name, actions=actions, instruction=instruction, env_kwargs=env_kwargs, **options)


def _check_builtin_options(name: str, options: dict[str, Any]) -> None:
    """Each option must be a parameter of the built-in's make function or, where that passes
    `**adapter_options` on, of `TurnEnv` (`--env_size` on numberline is an error, not ignored)."""
    parameters = inspect.signature(ENVS[name].make).parameters
    accepted = set(parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted |= set(inspect.signature(TurnEnv).parameters) - {"env", "actions", "instruction"}
    for option in options:
        if option not in accepted:
            flag = BUILTIN_OPTIONS[option][0] if option in BUILTIN_OPTIONS else f"--{option}"
            raise ConfigError(f"{flag}: --env {name} has no {option!r} option")
