"""The demo tasks, one module each, and the three things generic code looks up in them.

A dataset flag "<prefix>:<task>" ("easy-vqa:caption") names a task of the module `TASKS[prefix]`.
Such a module provides:

- ``load_dataset(task, split, **options) -> datasets.Dataset``: its datasets, read by
  `vlm_rl.data.load_task_dataset`;
- ``RULE_REWARDS: dict[str, reward function]``: its rule rewards by name, found through
  `vlm_rl.rewards.rules.RULE_REWARDS` alongside the generic ones;
- ``vocabulary() -> list[str]``: texts whose words the tiny default models' word-level tokenizers
  must hold (`vlm_rl.models.tiny`).

Task modules are imported on first use, so the generic layers that consult this registry
(loaders, rule rewards, the tiny models) import no task until one is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import datasets

__all__ = ["TASKS", "is_task_dataset", "load_task", "rule_rewards", "vocabulary"]

TASKS: dict[str, str] = {"easy-vqa": "vlm_rl.tasks.easy_vqa"}
"""Dataset-name prefix -> the module of that task."""


def _module(prefix: str) -> ModuleType:
    return importlib.import_module(TASKS[prefix])


def is_task_dataset(name: str) -> bool:
    """True for a dataset name "<prefix>:<task>" whose prefix is a registered task.

    >>> is_task_dataset("easy-vqa:caption"), is_task_dataset("data/train.jsonl"), is_task_dataset("easy-vqa")
    (True, False, False)
    """
    prefix, colon, _ = name.partition(":")
    return bool(colon) and prefix in TASKS


def load_task(name: str, split: str, **options: Any) -> datasets.Dataset:
    """The dataset "<prefix>:<task>" from its task module's ``load_dataset(task, split, **options)``."""
    if not is_task_dataset(name):
        raise ValueError(
            f"{name!r} is not a task dataset; give '<task>:<name>' with a task among {sorted(TASKS)}"
        )
    prefix, _, task = name.partition(":")
    return _module(prefix).load_dataset(task, split, **options)


def rule_rewards() -> dict[str, Callable[..., list[float | None]]]:
    """Every task's rule rewards by name (imports every task module)."""
    return {name: fn for prefix in TASKS for name, fn in _module(prefix).RULE_REWARDS.items()}


def vocabulary() -> list[str]:
    """Texts of every task (prompts, questions, answers) for the tiny models' word-level vocabulary."""
    return [text for prefix in TASKS for text in _module(prefix).vocabulary()]
