"""Build the combined reward of an RL run from names and weights (the config's reward fields).

A reward function is named as TRL's CLI names them: a built-in rule reward (`RULE_REWARDS`, e.g.
``exact_match``) or an import path, ``my_pkg.rewards:fn`` or ``my_pkg.rewards.fn``, of any function
with the signature ``fn(prompts, completions, **columns) -> list[float | None]``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlm_rl.errors import ConfigError, MissingPathError
from vlm_rl.hub_ids import is_hub_id
from vlm_rl.rewards.compose import CombinedReward, RewardComponent
from vlm_rl.rewards.model import CONFIG_NAME, RewardModel
from vlm_rl.rewards.rules import RULE_REWARDS

logger = logging.getLogger(__name__)


def check_reward_model_path(path: str) -> None:
    """A local reward-model path must hold a trained reward model; else fail with the command that trains it."""
    local = Path(path)
    if not is_hub_id(path) and not (local / CONFIG_NAME).exists():
        raise MissingPathError(
            f"reward model not found at {path!r}. Train it first:\n"
            f"    accelerate launch recipes/train_reward_model.py --output_dir {local.parent if local.name in ('final', 'best') else local}\n"
            "(or point --reward_model_path at a trained reward model folder or hub repo)"
        )


def load_reward_model(path: str, device: torch.device | str = "cpu", **loading: Any) -> RewardModel:
    """Load a reward model, or fail with the command that trains it (`loading`: `load_model`'s options)."""
    check_reward_model_path(path)
    model = RewardModel.from_pretrained(path, **loading)
    model.scorer.to(device)
    return model


def resolve_reward_function(spec: str) -> tuple[str, Callable]:
    """(log name, function) for a built-in rule reward name or an import path ("pkg.mod:fn" or
    "pkg.mod.fn"; the current folder is searched too, so a local my_rewards.py works)."""
    if spec in RULE_REWARDS:
        return spec, RULE_REWARDS[spec]
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
    elif "." in spec:
        module_name, _, attribute = spec.rpartition(".")
    else:
        raise ConfigError(
            f"unknown reward function {spec!r}: not a built-in rule reward ({', '.join(sorted(RULE_REWARDS))}) "
            "nor an import path such as my_pkg.rewards:my_reward"
        )
    try:
        module = import_user_module(module_name)
    except ImportError as error:
        raise ConfigError(f"reward function {spec!r}: cannot import {module_name!r} ({error})") from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"reward function {spec!r}: {module_name!r} has no function {attribute!r}")
    return attribute, function


def import_user_module(module_name: str):
    """Import a module of the user's (a reward function's, an env class's): the import path as
    usual, then the current folder, so a local my_rewards.py or my_env.py works without PYTHONPATH."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        if os.getcwd() in sys.path:
            raise
        sys.path.append(os.getcwd())
        return importlib.import_module(module_name)


def build_reward(
    *,
    reward_model_path: str | None = None,
    reward_model_weight: float = 1.0,
    reward_funcs: list[str] | tuple[str, ...] = (),
    reward_weights: list[float] | tuple[float, ...] | None = None,
    normalize: bool = False,
    device: torch.device | str = "cpu",
    loading: dict[str, Any] | None = None,
) -> CombinedReward:
    """A CombinedReward from a reward-model path and reward functions (names or import paths) with
    their weights; the reward model's base is loaded with `loading` (`load_model`'s options)."""
    weights = list(reward_weights) if reward_weights else [1.0] * len(reward_funcs)
    components = []
    for spec, weight in zip(reward_funcs, weights, strict=True):
        name, function = resolve_reward_function(spec)
        components.append(RewardComponent(name, function, weight=weight, normalize=normalize))
    if reward_model_path:
        reward_model = load_reward_model(reward_model_path, device, **(loading or {}))
        components.append(
            RewardComponent("reward_model", reward_model, weight=reward_model_weight, normalize=normalize)
        )
    if not components:
        raise ConfigError("no reward: give --reward_model_path and/or --reward_funcs")
    return CombinedReward(components)
