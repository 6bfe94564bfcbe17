"""What to push from a run folder (an RL or a reward-model output_dir) and the card that goes
with it, read from the run's own files through `RunFolder`."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from vlm_rl.errors import ConfigError, MissingPathError
from vlm_rl.hub.client import HubError, push_folder
from vlm_rl.run_folder import (
    ADAPTER_NAME,
    REWARD_CONFIG_NAME,
    RL_RUN_INFO_NAME,
    RunFolder,
    checkpoint_step,
    read_json,
)

logger = logging.getLogger(__name__)

RL_CARD_HYPERPARAMETERS = (
    "learning_rate",
    "prompts_per_step",
    "samples_per_prompt",
    "ppo_epochs",
    "clip_range",
    "kl_coef",
    "total_steps",
    "lora_r",
    "lora_alpha",
)
REWARD_MODEL_CARD_HYPERPARAMETERS = (
    "learning_rate",
    "num_epochs",
    "max_steps",
    "per_device_batch_size",
    "gradient_accumulation_steps",
    "center_rewards_coefficient",
    "lora_r",
    "lora_alpha",
)


REPORT_NAME = "report.html"


def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    checkpoint: str | None = None,
) -> str:
    """Push a vlm_rl run folder (an RL or a reward-model `output_dir`) with a model card; returns the commit URL.

    What is pushed:
        RL run (final/vlm_rl_run.json): final/ (adapter, processor files, value head for PPO), or
            with checkpoint="step-000100" the adapter of checkpoints/step-000100 (final/ may then
            be missing: a run still training).
        Reward-model run (final/reward_config.json): final/, or best/ with checkpoint="best".

    The card comes from the run's own files: run_config.json (dataset, reward components and
    weights, key hyperparameters), final/vlm_rl_run.json or reward_config.json (algorithm, base
    model, final metrics), metrics.jsonl (the metrics of a checkpoint). The run's report.html, when
    it has one (`vlm-rl report`), goes along at the top of the repo and the card links it. The commit message names
    the run folder and the step: "vlm_rl ppo run 'ppo_caption' step 300". Token, endpoint,
    private and revision behave as in `push_folder`; the run folder is never modified.

    Raises:
        FileNotFoundError: `run_dir` is not a finished run or lacks the named checkpoint (the
            message says what exists and what to do).
        HubError: the hub refused or could not be reached.
    """
    folder, card, commit_message = _run_upload(Path(run_dir), checkpoint)
    report = RunFolder(run_dir).report_file
    extra_files = {REPORT_NAME: report} if report.is_file() else None
    card["report"] = extra_files is not None
    return push_folder(
        folder,
        repo_id,
        token=token,
        endpoint=endpoint,
        private=private,
        revision=revision,
        commit_message=commit_message,
        card=card,
        extra_files=extra_files,
    )


def push_or_explain(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    checkpoint: str | None = None,
) -> str:
    """`push_run` for the end (or a checkpoint) of a training run: returns "pushed to <commit url>",
    or, when the hub fails, the error and the `vlm-rl push` command that retries. Never raises
    `HubError`: what was trained is already on disk and stays there."""
    try:
        return f"pushed to {push_run(run_dir, repo_id, private=private, revision=revision, checkpoint=checkpoint)}"
    except HubError as error:
        retry = f"vlm-rl push {shlex.quote(str(run_dir))} --repo-id {shlex.quote(repo_id)}"
        retry += " --private" if private else ""
        retry += f" --revision {shlex.quote(revision)}" if revision else ""
        retry += f" --checkpoint {shlex.quote(checkpoint)}" if checkpoint else ""
        return f"push failed: {error}\nretry: {retry}"


def push_after_training(config: Any, checkpoint: str | None = None) -> str:
    """`push_or_explain` for a run (its final/, or `checkpoint`), from its config (an RL or
    reward-model config: output_dir, hub_model_id, hub_private, hub_revision)."""
    return push_or_explain(
        config.output_dir,
        config.hub_model_id,
        private=config.hub_private,
        revision=config.hub_revision,
        checkpoint=checkpoint,
    )


def push_checkpoint(config: Any, checkpoint: Path) -> None:
    """Push a checkpoint's adapter while training (`push_after_training`, commit "... step N") and
    log the outcome: a hub failure is a warning with the retry command, and training goes on (the
    checkpoint is on disk). Made for `CheckpointManager.upload(path, partial(push_checkpoint, config))`."""
    outcome = push_after_training(config, checkpoint=checkpoint.name)
    (logger.warning if outcome.startswith("push failed") else logger.info)(
        "checkpoint %s: %s", checkpoint.name, outcome
    )


def _run_upload(run_dir: Path, checkpoint: str | None) -> tuple[Path, dict[str, Any], str]:
    """(folder to push, `write_model_card` arguments, commit message) of a run folder."""
    if not run_dir.is_dir():
        raise MissingPathError(f"{run_dir} is not a folder: pass the output_dir of a vlm_rl run")
    if checkpoint is not None and Path(checkpoint).name != checkpoint:
        raise ConfigError(f"checkpoint must be a name such as 'step-000100', not a path: {checkpoint!r}")
    run = RunFolder(run_dir)
    if run.kind == "rl" or (checkpoint is not None and not run.final_dir.exists()):
        return _rl_run_upload(run, checkpoint)
    if run.kind == "reward_model":
        return _reward_model_run_upload(run, checkpoint)
    checkpoints = _checkpoint_names(run)
    saved = (
        f" Its saved checkpoints: {', '.join(checkpoints)}; push one with checkpoint='{checkpoints[-1]}'"
        f" (vlm-rl push --checkpoint {checkpoints[-1]})."
        if checkpoints
        else ""
    )
    if run.final_dir.is_dir():
        raise MissingPathError(
            f"{run.final_dir} has neither {RL_RUN_INFO_NAME} (an RL run) nor {REWARD_CONFIG_NAME} "
            f"(a reward-model run), so it was not written by vlm_rl or its save was interrupted.{saved}"
        )
    raise MissingPathError(
        f"{run_dir} has no final/ folder: it is not a finished vlm_rl run. Pass the output_dir of a "
        f"finished run, or let this one finish (it saves final/ at the end).{saved}"
    )


def _rl_run_upload(run: RunFolder, checkpoint: str | None) -> tuple[Path, dict[str, Any], str]:
    config = run.read_config()
    if checkpoint is None:
        folder = run.final_dir
        info = read_json(folder / RL_RUN_INFO_NAME)
        step, metrics = info["step"], info.get("metrics") or {}
        algorithm = info.get("algorithm") or config["algorithm"]
        base_model = info.get("base_model") or config["model_name_or_path"]
    else:
        checkpoint_dir = run.checkpoints_dir / checkpoint
        folder = checkpoint_dir / ADAPTER_NAME
        if not folder.is_dir():
            saved = ", ".join(_checkpoint_names(run)) or "none"
            raise MissingPathError(
                f"{run.root} has no checkpoint {checkpoint!r} (no {folder}); saved checkpoints: {saved}. "
                "Checkpoints are written every save_steps and only the last save_total_limit are kept."
            )
        step = checkpoint_step(checkpoint_dir)
        metrics = _metrics_at_step(run, step)
        algorithm, base_model = config["algorithm"], config["model_name_or_path"]

    # Runs written before reward_funcs/reward_weights named them rule_rewards/rule_reward_weights.
    names = config.get("reward_funcs", config.get("rule_rewards")) or []
    weights = config.get("reward_weights", config.get("rule_reward_weights")) or []
    components = dict(zip(names, weights, strict=True))
    if config.get("reward_model_path"):
        # The last two path parts: a hub id as is, a local folder without the user's directories.
        shown = "/".join(Path(config["reward_model_path"]).parts[-2:])
        components[f"reward_model ({shown})"] = config["reward_model_weight"]
    hyperparameters = {key: config[key] for key in RL_CARD_HYPERPARAMETERS if key in config}
    card = dict(
        kind="policy",
        base_model=base_model,
        datasets=[config["dataset"]],
        algorithm=algorithm,
        hyperparameters={**hyperparameters, "steps_trained": step},
        reward_components=components,
        metrics=metrics,
    )
    return folder, card, f"vlm_rl {algorithm} run '{run.root.resolve().name}' step {step}"


def _reward_model_run_upload(run: RunFolder, checkpoint: str | None) -> tuple[Path, dict[str, Any], str]:
    if checkpoint not in (None, "best"):
        raise MissingPathError(
            f"{run.root} is a reward-model run: it has final/ (the default) and best/ (checkpoint='best'), "
            f"no checkpoint {checkpoint!r}"
        )
    folder = run.best_dir if checkpoint == "best" else run.final_dir
    reward_config = read_json(folder / REWARD_CONFIG_NAME)
    config = run.read_config()
    records = run.read_metrics()  # metrics.jsonl, or run/metrics.jsonl of an older run
    evals = [record for record in records if "eval/accuracy" in record]

    accuracy = reward_config.get("eval_accuracy")
    if checkpoint == "best":  # the first evaluation that reached the saved accuracy
        matching = [record for record in evals if record["eval/accuracy"] == accuracy]
        step = matching[0]["step"] if matching else None
    else:
        step = records[-1]["step"] if records else None
    metrics: dict[str, Any] = {"eval/accuracy": accuracy} if accuracy is not None else {}
    if evals:
        metrics["eval/accuracy_before"] = evals[0]["eval/accuracy"]
    hyperparameters = {key: config[key] for key in REWARD_MODEL_CARD_HYPERPARAMETERS if key in config}
    if step is not None:
        hyperparameters["steps_trained"] = step
    card = dict(
        kind="reward_model",
        base_model=reward_config.get("base_model") or config["model_name_or_path"],
        datasets=[reward_config.get("dataset") or config["dataset"]],
        algorithm="bradley-terry",
        hyperparameters=hyperparameters,
        reward_components=None,
        metrics=metrics,
    )
    message = f"vlm_rl reward model run '{run.root.resolve().name}'"
    message += f" step {step}" if step is not None else ""
    message += " (best evaluation)" if checkpoint == "best" else ""
    return folder, card, message


def _checkpoint_names(run: RunFolder) -> list[str]:
    return [path.name for path in run.checkpoints()]


def _metrics_at_step(run: RunFolder, step: int) -> dict[str, Any]:
    """The latest eval/* values and reward/mean logged at or before `step` (empty without metrics)."""
    metrics: dict[str, Any] = {}
    for record in run.read_metrics():
        if record["step"] <= step:
            metrics.update({k: v for k, v in record.items() if k.startswith("eval/") or k == "reward/mean"})
    return metrics
