"""The built-in environments by name, and `make_env` for them, gymnasium ids and import paths."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import gymnasium

from vlm_rl.envs import cliffwalking, frozenlake, numberline
from vlm_rl.envs.adapter import TurnEnv, words_of
from vlm_rl.errors import ConfigError, VlmRlError, closest


@dataclass(frozen=True)
class EnvSpec:
    """A built-in environment: how to make it and what its protocol needs.

    `make(**options)` returns a `TurnEnv`; `train_seeds` and `eval_seeds` (held out) never overlap;
    `max_turns` is the episode cap with the default options; `words` are every word of the
    protocol (instruction and actions), for the tiny models' vocabulary; `expert(env)` is the
    optimal (shortest-path) action word in the env's current state, for warm starts and baselines.
    """

    name: str
    make: Callable[..., TurnEnv]
    train_seeds: range
    eval_seeds: range
    max_turns: int
    words: list[str]
    expert: Callable[[TurnEnv], str] | None = None


def _builtin(name: str, module: ModuleType, make: Callable[..., TurnEnv], max_turns: int) -> EnvSpec:
    words = words_of(module.INSTRUCTION, *module.ACTIONS)
    return EnvSpec(name, make, module.TRAIN_SEEDS, module.EVAL_SEEDS, max_turns, words, module.expert)


ENVS: dict[str, EnvSpec] = {
    "frozenlake": _builtin("frozenlake", frozenlake, frozenlake.make_frozenlake, max_turns=8),
    "numberline": _builtin("numberline", numberline, numberline.make_numberline, max_turns=10),
    "cliffwalking": _builtin("cliffwalking", cliffwalking, cliffwalking.make_cliffwalking, max_turns=20),
}
"""Built-in name -> its spec (protocols in the modules' docstrings)."""


def vocabulary() -> list[str]:
    """Texts whose words the built-in protocols use (the `vocabulary()` contract of `vlm_rl.tasks`)."""
    return [" ".join(spec.words) for spec in ENVS.values()]


def make_env(
    name: str,
    *,
    actions: Sequence[str] | None = None,
    instruction: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> TurnEnv:
    """A `TurnEnv` from a built-in name ("frozenlake"), a gymnasium id ("CliffWalking-v1") or an
    import path "pkg.module:attr".

    For a built-in, `options` are its make function's (e.g. `size=`, `render=`, `invalid_penalty=`).
    Otherwise the env is gymnasium's (or attr's, a `gymnasium.Env` class), built with `env_kwargs`
    and render_mode="rgb_array" where it takes one, and wrapped in a `TurnEnv` with `actions`,
    `instruction` and `options`. An attr that is not an env class is called with `options` and must
    return a `TurnEnv`.
    """
    if name in ENVS:
        if actions is not None or instruction is not None or env_kwargs is not None:
            raise ConfigError(f"{name!r} is a built-in with its own protocol; give it options only")
        return ENVS[name].make(**options)
    env_kwargs = dict(env_kwargs or {})
    try:
        return _make_other(name, actions, instruction, env_kwargs, options)
    except VlmRlError:
        raise
    except (ValueError, TypeError, gymnasium.error.Error, ImportError) as error:
        raise ConfigError(f"--env {name}: cannot be played as a turn environment ({error})") from error


def _make_other(
    name: str, actions, instruction, env_kwargs: dict[str, Any], options: dict[str, Any]
) -> TurnEnv:
    if ":" in name:
        target = _import(name)
        if not (inspect.isclass(target) and issubclass(target, gymnasium.Env)):
            env = target(**options)
            if not isinstance(env, TurnEnv):
                raise ValueError(f"{name} returned {type(env).__name__}, not a TurnEnv")
            return env
        if "render_mode" in inspect.signature(target).parameters:
            env_kwargs.setdefault("render_mode", "rgb_array")
        env = target(**env_kwargs)
    elif name in gymnasium.registry:
        env = gymnasium.make(name, **{"render_mode": "rgb_array", **env_kwargs})
    else:
        raise ConfigError(
            f"--env {name!r}: unknown environment{closest(name, [*ENVS, *gymnasium.registry])}; choose a built-in "
            f"{sorted(ENVS)}, a gymnasium id (e.g. 'CliffWalking-v1') or an import path 'pkg.module:Class'"
        )
    return TurnEnv(env, actions=actions, instruction=instruction, **options)


def _import(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"--env {path}: cannot load the environment ({error}); check the module is importable and has {attr!r}"
        ) from error
