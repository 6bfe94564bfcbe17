"""The `vlm-rl` command: run a recipe, summarise a run folder, push a run to the hub.

    vlm-rl ppo [--config my_ppo.yaml] [--total_steps 1000 ...]
    vlm-rl grpo [--algorithm rloo ...]
    vlm-rl train-reward-model [--output_dir reward_models/mine ...]
    vlm-rl agent [--env numberline ...]
    vlm-rl agent-preferences [--env frozenlake --env_size 6 ...]   # a learned turn reward for agents
    vlm-rl ppo --help                      # every config field of the recipe
    vlm-rl evaluate runs/ppo_caption
    vlm-rl report runs/ppo_caption          # -> runs/ppo_caption/report.html
    HF_TOKEN=hf_... vlm-rl push runs/ppo_caption --repo-id me/tiny-llava-ppo [--private] [--checkpoint step-000100]
    accelerate launch -m vlm_rl.cli grpo ...   # several processes

A recipe command imports its module from vlm_rl.recipes (part of the installed package, with its
default configs) and calls its `main` with every argument after the command, untouched, so
`vlm-rl ppo ...` and a checkout's `accelerate launch recipes/ppo_caption.py ...` are the same run.
The token of `push` comes from $HF_TOKEN or `hf auth login`, never from the command line (shell
history). This module is the command line: it is the one place in src/ that writes to stdout and
stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import vlm_rl
from vlm_rl.errors import ConfigError, MissingPathError, run_entry_point
from vlm_rl.run_folder import RL_RUN_INFO_NAME, RunFolder, read_json

RECIPES = {
    # command: (module in vlm_rl.recipes, one-line help)
    "ppo": ("ppo_caption", "PPO: caption easy-vqa shapes, rewarded by the learned reward model"),
    "grpo": ("grpo_vqa", "GRPO or RLOO (--algorithm rloo): answer easy-vqa questions, rewarded by rule"),
    "train-reward-model": ("train_reward_model", "train a multimodal reward model from preference pairs"),
    "agent": ("ppo_agent", "PPO/GRPO agents in visual environments (FrozenLake, NumberLine, ...)"),
    "agent-preferences": (
        "agent_preferences",
        "turn preference pairs from an env's episodes + a reward model on them (agent --reward_model_path)",
    ),
}
TRAINING_KEYS = ("reward/mean", "train/accuracy", "train/loss")


def main(argv: list[str] | None = None) -> int:
    """Run `vlm-rl` with `argv` (default: the process's arguments); returns the exit code: 0, or 2
    after an expected error (one line on stderr; `--debug` or VLM_RL_DEBUG=1 adds the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    prog = f"vlm-rl {command}" if command in (*RECIPES, "evaluate", "report", "push") else "vlm-rl"
    return run_entry_point(dispatch, argv, prog)


def dispatch(argv: list[str]) -> None:
    """Run the command of `argv`; expected errors are raised (`vlm_rl.errors.VlmRlError`)."""
    parser = build_parser()
    # argparse cannot hand "--help" or "--config x" through untouched, so recipe commands are
    # dispatched before parsing; the subparsers still document them in `vlm-rl --help`.
    if argv and argv[0] in RECIPES:
        run_recipe(argv[0], argv[1:])
        return
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        evaluate(args.run_dir)
    elif args.command == "report":
        report(args.run_dir)
    else:
        push(args)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors raised as one-line `ConfigError`s instead of usage + exit."""

    def error(self, message: str):
        raise ConfigError(f"{message}; `{self.prog} --help` lists the commands and flags")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="vlm-rl",
        description="RLHF for vision-language models: train (recipes), summarise and share runs.",
        epilog="A recipe command hands every argument after it to the recipe: `vlm-rl ppo --help` "
        "lists the config fields, `vlm-rl ppo --config my.yaml --total_steps 50` runs it.",
    )
    parser.add_argument("--version", action="version", version=f"vlm-rl {vlm_rl.__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_ArgumentParser
    )
    for command, (module, help) in RECIPES.items():
        commands.add_parser(command, help=f"{help} (vlm_rl.recipes.{module})", add_help=False)

    evaluate_parser = commands.add_parser(
        "evaluate", help="summarise a run folder's metrics (no model is loaded)"
    )
    evaluate_parser.add_argument("run_dir", type=Path, help="an RL or reward-model output_dir")

    report_parser = commands.add_parser(
        "report", help="write RUN_DIR/report.html: curves, held-out gallery, film strips (self-contained)"
    )
    report_parser.add_argument("run_dir", type=Path, help="an RL, agent or reward-model output_dir")

    push_parser = commands.add_parser(
        "push",
        help="push a run's final adapter (or a checkpoint) with a model card to the hub",
        description="Push a run folder to a hub model repo; the token comes from $HF_TOKEN or `hf auth login`.",
    )
    push_parser.add_argument("run_dir", type=Path, help="an RL or reward-model output_dir")
    push_parser.add_argument("--repo-id", required=True, help="the model repo, e.g. me/tiny-llava-ppo")
    push_parser.add_argument("--private", action="store_true", help="create the repo as private")
    push_parser.add_argument("--revision", help="push to this branch (created if missing)")
    push_parser.add_argument(
        "--endpoint", help="a self-hosted hub (default: $HF_ENDPOINT, then huggingface.co)"
    )
    push_parser.add_argument(
        "--checkpoint",
        help="push checkpoints/<name>/adapter of an RL run (e.g. step-000100), or best/ of a reward-model "
        "run (best); default: final/",
    )
    return parser


# -- recipes ----------------------------------------------------------------------------------
def run_recipe(command: str, recipe_argv: list[str]) -> None:
    module_name, _ = RECIPES[command]
    # Imported here: a recipe pulls in torch, transformers and trl, which evaluate and push do not need.
    recipe = importlib.import_module(f"vlm_rl.recipes.{module_name}")
    program = sys.argv
    sys.argv = [f"vlm-rl {command}", *recipe_argv]  # argparse's usage line then reads "vlm-rl ppo ..."
    try:
        recipe.main(recipe_argv)
    finally:
        sys.argv = program


# -- evaluate ---------------------------------------------------------------------------------
def evaluate(run_dir: Path) -> None:
    """Print a run's evaluation metrics (first and last evaluation; called held-out unless the run
    recorded that they ran on training data), its last training reward and final metrics."""
    run = RunFolder(run_dir)
    metrics_file = run.find_metrics_file()  # metrics.jsonl, or run/metrics.jsonl of an older run
    if metrics_file is None:
        raise MissingPathError(
            f"no metrics.jsonl in {run.root} or {run.legacy_metrics_file.parent}: pass the "
            "output_dir of a vlm_rl run (it writes metrics.jsonl from its first evaluation on)"
        )
    records = run.read_metrics()
    print(f"{metrics_file}: {len(records)} records, last step {records[-1]['step'] if records else '-'}")

    evals = [record for record in records if any(key.startswith("eval/") for key in record)]
    evaluation = run.read_evaluation()  # None for runs before evaluation.json
    label = "held-out evaluation" if run.evaluation_label() == "Held-out" else "evaluation on training data"
    if evaluation is not None:
        label += f" ({evaluation['description']})"
    if evals:
        first, last = evals[0], evals[-1]
        keys = sorted({key for record in (first, last) for key in record if key.startswith("eval/")})
        width = max(len(key) for key in keys)
        print(f"{label}, step {first['step']} -> step {last['step']}:")
        for key in keys:
            print(f"  {key:{width}}  {_number(first.get(key))} -> {_number(last.get(key))}")
    else:
        print(f"{label}: none logged yet")
    training = [record for record in records if any(key in record for key in TRAINING_KEYS)]
    if training:
        values = ", ".join(
            f"{key} {_number(training[-1][key])}" for key in TRAINING_KEYS if key in training[-1]
        )
        print(f"training at step {training[-1]['step']}: {values}")

    for folder in (run.final_dir, run.best_dir):
        saved = run.saved_model_info(folder)
        if saved is not None:
            print(_saved_summary(saved, read_json(saved)))


def _saved_summary(path: Path, saved: dict[str, Any]) -> str:
    if path.name == RL_RUN_INFO_NAME:
        metrics = ", ".join(
            f"{key} {_number(value)}" for key, value in sorted(saved.get("metrics", {}).items())
        )
        return (
            f"{path} ({saved.get('algorithm')} on {saved.get('base_model')}, step {saved.get('step')}): "
            f"{metrics or 'no metrics'}"
        )
    return (
        f"{path} (reward model on {saved.get('base_model')}, dataset {saved.get('dataset')}): "
        f"eval_accuracy {_number(saved.get('eval_accuracy'))}"
    )


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- report -----------------------------------------------------------------------------------
def report(run_dir: Path) -> None:
    """Write the run's report.html and print its path (one line, exit 2, when it is no run folder)."""
    from vlm_rl.report import write_report

    try:
        path = write_report(run_dir)
    except (FileNotFoundError, ValueError) as err:
        raise MissingPathError(f"vlm-rl report: {err}") from err
    print(path)


# -- push -------------------------------------------------------------------------------------
def push(args: argparse.Namespace) -> None:
    from vlm_rl.hub import push_run  # huggingface_hub is imported only when pushing

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vlm_rl").setLevel(logging.INFO)
    commit_url = push_run(  # a HubError or a missing run folder ends in one line (run_entry_point)
        args.run_dir,
        args.repo_id,
        endpoint=args.endpoint,
        private=args.private,
        revision=args.revision,
        checkpoint=args.checkpoint,
    )
    print(commit_url)


if __name__ == "__main__":
    sys.exit(main())
