"""The recipes as modules: each has `main(argv)`, which `vlm-rl <command>` and the launch files in a
checkout's recipes/ (`accelerate launch recipes/<name>.py`) both call, so an installed wheel runs
the same recipes as a source checkout.

configs/ holds the shipped YAML configs as package data (recipes/configs and
reward_models/caption_preference.yaml of a checkout link here).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

from vlm_rl.errors import ConfigError, MissingPathError, ModelNotFoundError, VlmRlError, closest, one_line

CONFIGS = Path(__file__).resolve().parent / "configs"
EMBEDDED_MODELS = ("smol-llava",)
"""Model names built offline besides the tiny defaults (vlm_rl.models.smol_llava)."""


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


# -- parsing and checks before anything is loaded ----------------------------------------------
PEER_FLAG_NAMES = {
    "max_steps": "total_steps",
    "num_generations": "samples_per_prompt",
    "max_completion_length": "max_new_tokens",
    "num_iterations": "ppo_epochs",
    "num_ppo_epochs": "ppo_epochs",
    "beta": "kl_coef",
    "epsilon": "clip_range",
    "epsilon_high": "clip_range_high",
    "cliprange": "clip_range",
    "cliprange_value": "value_clip_range",
    "vf_coef": "value_coef",
    "loss_type": "loss_aggregation",
}
"""TRL's GRPOConfig / PPOConfig names with a vlm_rl flag of the same meaning: an unknown flag (or
YAML key) spelled the TRL way is answered with the vlm_rl name."""


RENAMED_FLAGS = {
    "rule_rewards": "reward_funcs",
    "rule_reward_weights": "reward_weights",
    "report_to_tensorboard": "report_to",
}
"""vlm_rl's own earlier flag names -> today's: a config or command line written for an earlier
release is answered with the new name, not with the nearest spelling."""


def _suggestion(name: str, flags: list[str]) -> str:
    """' (renamed: --y)' for a flag of an earlier release, ' (TRL's --x is --y here)' for a TRL name
    this parser has under another name, else the nearest flag (' (did you mean ...?)') or ''."""
    bare = name.lstrip("-")
    if bare in RENAMED_FLAGS and f"--{RENAMED_FLAGS[bare]}" in flags:
        new = RENAMED_FLAGS[bare]
        example = " (e.g. --report_to none)" if new == "report_to" else ""
        return f" (renamed: use --{new}{example})"
    ours = PEER_FLAG_NAMES.get(bare)
    if ours is not None and f"--{ours}" in flags:
        return f" (TRL's --{bare} is --{ours} here)"
    return closest(name, flags)


def command_line_flags(args: list[str]) -> set[str]:
    """The field names set on a command line (`--name value` or `--name=value`), `--config` aside.

    >>> sorted(command_line_flags(["--config", "a.yaml", "--total_steps=3", "--reward_funcs", "f", "g"]))
    ['reward_funcs', 'total_steps']
    """
    names = {arg[2:].split("=", 1)[0] for arg in args if arg.startswith("--") and len(arg) > 2}
    return names - {"config"}


def parse_config(
    types: tuple[type, ...], argv: list[str] | None, default_config: Path, *, recipe: str | None = None
) -> tuple:
    """The recipe's config dataclasses from `argv` (after `--config default_config` unless given):
    TrlParser's parse, with every flag or YAML mistake (unknown flag or key, bad value, missing or
    invalid config file, out-of-range field) raised as one `ConfigError` naming the flag.

    `--reward_funcs` on the command line replaces the config's functions *and* their weights: the
    weights then default to 1.0 each (TRL's default) unless `--reward_weights` is given too.
    With `recipe` (a name of `vlm_rl.recipes.flags.RECIPES`), a command-line flag that this run
    would not act on is a ConfigError (a key of the user's own config file: a warning).
    """
    import yaml
    from trl import TrlParser

    args = recipe_args(argv, default_config)
    config_file = Path(args[args.index("--config") + 1]) if "--config" in args[:-1] else None
    if "--config" in args and config_file is None:
        raise ConfigError("--config needs a YAML file path")
    if config_file is not None and not config_file.is_file():
        raise MissingPathError(
            f"--config {config_file}: file not found; give a YAML config such as {default_config}"
        )
    on_command_line = command_line_flags(args)
    from_file: set[str] = set()

    class Parser(TrlParser):
        def error(self, message: str):  # argparse would print the usage and exit
            raise ConfigError(f"{message}; `{self.prog} --help` lists the flags")

        def set_defaults_with_config(self, **values):
            if config_file is not None and config_file.resolve() != Path(default_config).resolve():
                from_file.update(values)  # the user's own config file: its keys are the user's choices
            if "reward_funcs" in on_command_line and "reward_weights" not in on_command_line:
                values.pop("reward_weights", None)  # they weighed the config's functions, not these
            return super().set_defaults_with_config(**values)

    parser = Parser(types)
    flags = sorted(option for option in parser._option_string_actions if option.startswith("--"))
    try:
        configs = parser.parse_args_and_config(args=args)
        if recipe is not None:
            from vlm_rl.recipes.flags import check_flags

            check_flags(recipe, configs, on_command_line, from_file)
        return configs
    except VlmRlError:
        raise
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {config_file}: not valid YAML ({one_line(str(err))})") from err
    except ValueError as err:
        message = str(err)
        unused = re.search(r"not used by the HfArgumentParser: (\[.*\])", message)
        from_file = re.search(r"Unknown arguments from config file: (\[.*?\])", message)
        if unused or from_file:
            remaining = [str(item) for item in ast.literal_eval((unused or from_file).group(1))]
            name = next(
                (item for item in remaining if item.startswith("-")), remaining[0] if remaining else "?"
            )
            if from_file:
                where = f"--config {config_file}: unknown key {name.lstrip('-')!r}"
            else:
                where = f"unknown flag {name}" if name.startswith("-") else f"unexpected argument {name!r}"
            raise ConfigError(
                f"{where}{_suggestion(name, flags)}; `{parser.prog} --help` lists the flags"
            ) from err
        raise ConfigError(message) from err


def check_output_dir(output_dir: str | Path, flag: str = "--output_dir") -> None:
    """The run folder must be a folder (or not exist yet), with no file on its path."""
    path = Path(output_dir)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            what = "is a file" if part == path else f"is inside {part}, which is a file"
            raise ConfigError(f"{flag} {output_dir}: {what}; give a folder path (it is created if missing)")


def check_model_source(model_name_or_path: str, flag: str = "--model_name_or_path") -> None:
    """A tiny default name, a local model folder, or a hub id (which offline must be in the cache)."""
    from vlm_rl.models.tiny import TINY_MODELS, resolve_tiny_name

    if resolve_tiny_name(model_name_or_path) or model_name_or_path in EMBEDDED_MODELS:
        return
    path = Path(model_name_or_path).expanduser()
    fix = (
        f"give a local model folder (with config.json and model.safetensors), a tiny default "
        f"({', '.join(TINY_MODELS)}) or a hub id"
    )
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{flag} {model_name_or_path}: no config.json there; {fix}")
        return
    from vlm_rl.hub_ids import is_hub_id

    if not is_hub_id(model_name_or_path):
        raise ModelNotFoundError(
            f"{flag} {model_name_or_path!r}: no such folder, and not a hub id (owner/name){closest(model_name_or_path, TINY_MODELS)}; {fix}"
        )
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(
        try_to_load_from_cache(model_name_or_path, "config.json"), str
    ):
        raise ModelNotFoundError(
            f"{flag} {model_name_or_path}: not in the local hub cache, and the hub is offline (HF_HUB_OFFLINE); "
            f"download it where the hub is reachable (`hf download {model_name_or_path} --local-dir DIR`) and "
            "pass that folder, or unset HF_HUB_OFFLINE"
        )


def check_resume(config: Any, compared: tuple[str, ...]) -> None:
    """With `--resume_from_checkpoint`, the checkpoint must exist in the run folder and the run must
    have been started with the same values of the `compared` fields (the shapes of what it saved)."""
    from vlm_rl.run_folder import RunFolder

    resume = getattr(config, "resume_from_checkpoint", None)
    if not resume:
        return
    run = RunFolder(config.output_dir)
    try:
        checkpoint = run.resolve_checkpoint(resume)
    except FileNotFoundError as err:
        raise MissingPathError(
            f"--resume_from_checkpoint {resume}: {err}; start without it, or point --output_dir at the run "
            "that saved the checkpoint"
        ) from err
    if not run.config_file.is_file():
        return
    try:
        saved = run.read_config()
    except (OSError, ValueError):
        return
    for name in compared:
        if name in saved and saved[name] != getattr(config, name):
            raise ConfigError(
                f"--resume_from_checkpoint {checkpoint.name}: the run in {run.root} was started with "
                f"--{name} {saved[name]!r}, this config says {getattr(config, name)!r}; resume with the same "
                "value, or start a fresh run in another --output_dir"
            )


def _check_trl_resume(config: Any) -> None:
    resume = config.resume_from_checkpoint
    checkpoints = Path(config.output_dir) / "checkpoints"
    if resume == "latest" and not any(checkpoints.glob("checkpoint-*")):
        raise MissingPathError(
            f"--resume_from_checkpoint latest: no TRL checkpoint (checkpoint-N) in {checkpoints}; start without "
            "it, or point --output_dir at the run that saved one"
        )
    if resume and resume != "latest" and not Path(resume).is_dir():
        raise MissingPathError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")


def check_rl_inputs(config: Any, *, check_reward_model: bool = True) -> None:
    """What an RL recipe checks before it loads a model: the model source, the run folder, the
    checkpoint to resume, the adapter to start from, the reward functions and the process count."""
    check_model_source(config.model_name_or_path)
    check_output_dir(config.output_dir)
    if config.trainer == "trl":  # TRL's own checkpoints/checkpoint-N folders
        _check_trl_resume(config)
    else:
        check_resume(config, ("model_name_or_path", "algorithm", "lora_r", "lora_alpha", "train_projector"))
    from vlm_rl.distributed import check_prompts_per_step, launched_processes
    from vlm_rl.models.loading import check_adapter_folder
    from vlm_rl.rewards.build import check_reward_model_path, resolve_reward_function

    if config.init_adapter:
        check_adapter_folder(config.init_adapter, f"--init_adapter {config.init_adapter}")

    if config.reward_model_path and check_reward_model:
        check_reward_model_path(config.reward_model_path)
    if not config.reward_funcs and not config.reward_model_path:
        raise ConfigError("no reward: give --reward_model_path and/or --reward_funcs")
    for spec in config.reward_funcs:
        try:
            resolve_reward_function(spec)
        except ValueError as err:
            raise ConfigError(f"--reward_funcs: {err}") from err
    check_prompts_per_step(config.prompts_per_step, launched_processes())
