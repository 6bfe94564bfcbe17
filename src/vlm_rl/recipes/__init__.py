"""The recipes as modules: each has `main(argv)`, which `vlm-rl <command>` and the launch files in a
checkout's recipes/ (`accelerate launch recipes/<name>.py`) both call, so an installed wheel runs
the same recipes as a source checkout.

configs/ holds the shipped YAML configs as package data (recipes/configs and
reward_models/caption_preference.yaml of a checkout link here).
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"


def project_dir() -> Path:
    """The folder that relative default paths of the shipped configs (reward_models/caption_preference/final)
    are read from: the source checkout this package runs from (an editable install), wherever the recipe
    is launched; else, for an installed wheel, the current folder."""
    package = Path(__file__).resolve().parents[1]  # src/vlm_rl in a checkout
    checkout = package.parents[1]
    if package.parent.name == "src" and (checkout / "pyproject.toml").is_file():
        return checkout
    return Path.cwd()


def recipe_args(argv: list[str] | None, default_config: Path) -> list[str]:
    """A recipe's arguments for TrlParser: `argv` (default: the process's), after
    `--config default_config` unless they name a config of their own."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return argv if "--config" in argv else ["--config", str(default_config), *argv]
