"""Share trained policies and reward models on the Hugging Face Hub, or on a self-hosted hub.

    commit_url = push_folder("runs/grpo", "me/tiny-llava-grpo", card=dict(kind="policy", ...))
    path = download("me/tiny-llava-grpo")

`push_folder` uploads a run folder with a generated model card (`write_model_card`) through
`huggingface_hub`; the card is written into a temporary copy, never into the run folder. Every
hub failure (HTTP 401/403/404/5xx, connection refused, timeout) becomes a `HubError` that says
what failed, for which repo and endpoint, and what to do. The token is handed to
`huggingface_hub` only: never logged, never written into the card or any pushed file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub import HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import httpx  # httpx2 on huggingface_hub 2.x, httpx on 1.x

from vlm_rl.runlog import read_metrics

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key)$", re.I)


class HubError(RuntimeError):
    """A hub operation failed; the message names the repo, the endpoint and what to do next."""


# -- model card -------------------------------------------------------------------------------
def write_model_card(
    folder: str | Path,
    *,
    kind: Literal["policy", "reward_model"],
    base_model: str,
    datasets: list[str],
    algorithm: str | None,
    hyperparameters: dict[str, Any],
    reward_components: dict[str, float] | None,
    metrics: dict[str, float],
    repo_id: str,
) -> Path:
    """Write `folder/README.md`: YAML front matter, summary, training, final metrics, how to load.

    Hyperparameters whose name looks like a secret (`hub_token`, `api_key`, ...) are redacted.
    `base_model` goes into the front matter only when it is a hub id: a local path or a tiny
    default name ("tiny-llava") would not validate on the hub, so the text mentions it instead.
    """
    if kind not in ("policy", "reward_model"):
        raise ValueError(f"kind must be 'policy' or 'reward_model', got {kind!r}")
    tags = ["vlm-rl", "reinforcement-learning", "vision-language-model", "lora"]
    tags += ["reward-model"] if kind == "reward_model" else []
    tags += [algorithm.lower()] if algorithm else []
    on_hub = bool(HUB_ID.match(base_model)) and not Path(base_model).exists()
    front_matter: dict[str, Any] = {"library_name": "peft" if kind == "policy" else "vlm_rl"}
    if on_hub:
        front_matter["base_model"] = base_model
    if kind == "policy":
        front_matter["pipeline_tag"] = "image-text-to-text"
    front_matter["tags"] = list(dict.fromkeys(tags))
    front_matter["datasets"] = list(datasets)

    trained_with = f" with {algorithm.upper()}" if algorithm else ""
    if kind == "policy":
        summary = f"A LoRA adapter for the vision-language model `{base_model}`, fine-tuned by vlm_rl{trained_with}."
        # A tiny default ("tiny-llava") or a local folder only loads through vlm_rl's loader.
        how_to_load = (
            [
                "from peft import PeftModel",
                "from transformers import AutoModelForImageTextToText, AutoProcessor",
                "",
                f'processor = AutoProcessor.from_pretrained("{base_model}")',
                f'model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("{base_model}"), "{repo_id}")',
            ]
            if on_hub
            else [
                "from peft import PeftModel",
                "from vlm_rl.models import load_model",
                "",
                f'base, processor = load_model("{base_model}")',
                f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            ]
        )
    else:
        summary = (
            f"A multimodal reward model trained by vlm_rl{trained_with}: a LoRA adapter on `{base_model}` plus a "
            "scalar head on the last token. It scores (image, prompt, completion) triples and plugs into "
            "TRL-style trainers as a reward function."
        )
        how_to_load = [
            "from vlm_rl.rewards import RewardModel",
            "",
            f'rm = RewardModel.from_pretrained("{repo_id}")',
            "# one reward per (images, prompt, completion):",
            'rewards = rm.score(images=[[image]], prompts=[prompt], completions=["red circle"])',
        ]

    lines = ["---", yaml.safe_dump(front_matter, sort_keys=False).rstrip(), "---", "", f"# {repo_id}", ""]
    lines += ["## Summary", "", summary, ""]
    lines += ["## Training", "", f"- Algorithm: **{algorithm.upper() if algorithm else 'not recorded'}**"]
    lines += [f"- Base model: `{base_model}`"]
    lines += [f"- Datasets: {', '.join(f'`{d}`' for d in datasets) or 'none recorded'}", ""]
    lines += ["### Hyperparameters", ""]
    lines += _table(("Hyperparameter", "Value"), {k: _redacted(k, v) for k, v in hyperparameters.items()})
    if reward_components:
        lines += ["### Reward components", ""]
        lines += _table(("Component", "Weight"), reward_components)
    lines += ["## Final metrics", ""]
    lines += _table(("Metric", "Value"), metrics)
    lines += ["## How to load", "", "```python", *how_to_load, "```", ""]

    path = Path(folder) / "README.md"
    path.unlink(missing_ok=True)  # a hard-linked README (see push_folder) must not be written through
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _redacted(key: str, value: Any) -> Any:
    return "<redacted>" if SECRET_KEY.search(key) else value


def _table(header: tuple[str, str], rows: dict[str, Any]) -> list[str]:
    if not rows:
        return ["(none recorded)", ""]
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{_cell(key)}` | {_cell(value)} |" for key, value in rows.items()]
    return lines + [""]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


# -- push / download --------------------------------------------------------------------------
def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    card: dict[str, Any] | None = None,
) -> str:
    """Upload `folder` to the model repo `repo_id`; returns the commit URL (it ends with the commit oid).

    Creates the repo if needed (`private` applies only then) and the branch `revision` if given
    and missing. `card` holds `write_model_card`'s keyword arguments (all but folder and
    repo_id); the card is written into a temporary copy of the folder, so the run folder is
    never modified.

    Args:
        token: defaults to $HF_TOKEN, then the login of `hf auth login`.
        endpoint: a self-hosted hub; defaults to $HF_ENDPOINT, then https://huggingface.co.

    Raises:
        HubError: the hub refused or could not be reached; the original error is chained.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: nothing to push to {repo_id}")
    token = _resolve_token(token)
    endpoint = _resolve_endpoint(endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    logger.info("pushing %s to %s at %s (revision %s)", folder, repo_id, endpoint, revision or "main")
    with tempfile.TemporaryDirectory(prefix="vlm_rl-push-") as staging_root:
        upload_folder = folder
        if card is not None:
            upload_folder = Path(staging_root) / folder.name
            shutil.copytree(
                folder, upload_folder, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(".git")
            )
            write_model_card(upload_folder, repo_id=repo_id, **card)
        if token:
            _refuse_if_token_inside(upload_folder, token, repo_id, folder)
        step = "creating the repo"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and revision != constants.DEFAULT_REVISION:
                step = f"creating the branch {revision!r} in"
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            step = "uploading to"
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=upload_folder,
                revision=revision,
                commit_message=commit_message or f"Upload {folder.name} with vlm_rl",
            )
        except Exception as err:
            hub_error = _as_hub_error(err, step, repo_id, endpoint, token, folder=folder, revision=revision)
            if hub_error is None:
                raise
            raise hub_error from err
    logger.info("pushed %s to %s", folder, commit.commit_url)
    return commit.commit_url


def download(
    repo_id: str, *, revision: str | None = None, token: str | None = None, endpoint: str | None = None
) -> Path:
    """Download the model repo `repo_id` (at `revision`) into the hub cache; returns the snapshot folder.

    Token and endpoint resolve as in `push_folder`. Raises HubError (original error chained).
    """
    token = _resolve_token(token)
    endpoint = _resolve_endpoint(endpoint)
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint))
    except Exception as err:
        hub_error = _as_hub_error(
            err, "downloading", repo_id, endpoint, token, folder=None, revision=revision
        )
        if hub_error is None:
            raise
        raise hub_error from err


def _resolve_token(token: str | None) -> str | None:
    """Explicit token, else $HF_TOKEN, else the saved login (None: anonymous)."""
    return token or os.environ.get("HF_TOKEN") or get_token()


def _resolve_endpoint(endpoint: str | None) -> str:
    # Read $HF_ENDPOINT now: huggingface_hub reads it once, at import.
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link (instant, no extra disk) when on the same filesystem, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _refuse_if_token_inside(upload_folder: Path, token: str, repo_id: str, folder: Path) -> None:
    """Raise before uploading if any file contains the token (e.g. saved training args with hub_token)."""
    needle = token.encode()
    leaking = [
        path.relative_to(upload_folder).as_posix()
        for path in sorted(upload_folder.rglob("*"))
        if path.is_file() and ".git" not in path.relative_to(upload_folder).parts and _contains(path, needle)
    ]
    if leaking:
        raise HubError(
            f"refusing to push {folder} to {repo_id}: {', '.join(leaking)} contain(s) your Hugging Face token. "
            "Remove the token from those files (or exclude them) and push again; nothing was uploaded."
        )


def _contains(path: Path, needle: bytes, chunk_size: int = 1 << 20) -> bool:
    tail = b""
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            if needle in tail + chunk:
                return True
            tail = chunk[-(len(needle) - 1) :] if len(needle) > 1 else b""
    return False


def _network_cause(err: BaseException) -> BaseException | None:
    """The HTTP / transport error behind `err` (huggingface_hub wraps some, e.g. in LocalEntryNotFoundError)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (HfHubHTTPError, httpx.TransportError, OfflineModeIsEnabled)):
            return err
        err = err.__cause__ or err.__context__
    return None


def _as_hub_error(
    err: Exception,
    step: str,
    repo_id: str,
    endpoint: str,
    token: str | None,
    *,
    folder: Path | None,
    revision: str | None,
) -> HubError | None:
    """A HubError explaining `err`; None when `err` is not a hub failure (a bug, to be seen as is)."""
    cause = _network_cause(err)
    if cause is None:
        return None
    namespace = repo_id.split("/")[0]
    if isinstance(cause, OfflineModeIsEnabled):
        reason, advice = "offline mode is on (HF_HUB_OFFLINE=1)", "unset HF_HUB_OFFLINE to reach the hub"
    elif isinstance(cause, httpx.TimeoutException):
        reason, advice = (
            f"the hub did not answer in time ({type(cause).__name__})",
            "check the network and retry",
        )
    elif isinstance(cause, httpx.TransportError):
        reason = f"could not connect ({type(cause).__name__}: {cause})"
        advice = "check the network, a proxy, and that the endpoint (HF_ENDPOINT or endpoint=) is right"
    else:
        status = cause.response.status_code if cause.response is not None else None
        detail = f": {cause.server_message.strip()}" if cause.server_message else ""
        if status == 401:
            reason = f"authentication failed (401{detail})" if token else "no token was sent (401)"
            advice = "check HF_TOKEN / `hf auth login`, or pass token= (pushing needs write access;"
            advice += " a private or missing repo also answers 401 to an unauthorised token)"
        elif status == 403:
            reason = f"permission denied (403{detail})"
            access = "write access" if folder is not None else "access (a gated repo: request it on its page)"
            advice = f"use a token with {access} to {namespace!r} ({endpoint}/settings/tokens)"
        elif status == 404:
            reason = f"not found (404{detail})"
            advice = "check the repo id" + (f", the revision {revision!r}" if revision else "")
            advice += ", and that your token can see the repo"
        elif status is not None and status >= 500:
            reason, advice = f"the hub had a server error ({status}{detail})", "retry later"
        else:
            reason, advice = f"the hub refused the request ({status}{detail})", "see the chained error"
    message = f"{step} {repo_id!r} at {endpoint} failed: {reason}. What to do: {advice}."
    if folder is not None:
        message += f" The local folder {folder} was left intact."
    if token and len(token) >= 8:  # never echo a token, even if a server message quoted it
        message = message.replace(token, "<token>")
    return HubError(message)


# -- run folders ------------------------------------------------------------------------------
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
    model, final metrics), metrics.jsonl (the metrics of a checkpoint). The commit message names
    the run folder and the step: "vlm_rl ppo run 'ppo_caption' step 300". Token, endpoint,
    private and revision behave as in `push_folder`; the run folder is never modified.

    Raises:
        FileNotFoundError: `run_dir` is not a finished run or lacks the named checkpoint (the
            message says what exists and what to do).
        HubError: the hub refused or could not be reached.
    """
    folder, card, commit_message = _run_upload(Path(run_dir), checkpoint)
    return push_folder(
        folder,
        repo_id,
        token=token,
        endpoint=endpoint,
        private=private,
        revision=revision,
        commit_message=commit_message,
        card=card,
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


def _run_upload(run_dir: Path, checkpoint: str | None) -> tuple[Path, dict[str, Any], str]:
    """(folder to push, `write_model_card` arguments, commit message) of a run folder."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder: pass the output_dir of a vlm_rl run")
    if checkpoint is not None and Path(checkpoint).name != checkpoint:
        raise ValueError(f"checkpoint must be a name such as 'step-000100', not a path: {checkpoint!r}")
    final = run_dir / "final"
    if (final / "vlm_rl_run.json").is_file() or (checkpoint is not None and not final.exists()):
        return _rl_run_upload(run_dir, checkpoint)
    if (final / "reward_config.json").is_file():
        return _reward_model_run_upload(run_dir, checkpoint)
    checkpoints = _checkpoint_names(run_dir)
    saved = (
        f" Its saved checkpoints: {', '.join(checkpoints)}; push one with checkpoint='{checkpoints[-1]}'"
        f" (vlm-rl push --checkpoint {checkpoints[-1]})."
        if checkpoints
        else ""
    )
    if final.is_dir():
        raise FileNotFoundError(
            f"{final} has neither vlm_rl_run.json (an RL run) nor reward_config.json (a reward-model run), "
            f"so it was not written by vlm_rl or its save was interrupted.{saved}"
        )
    raise FileNotFoundError(
        f"{run_dir} has no final/ folder: it is not a finished vlm_rl run. Pass the output_dir of a "
        f"finished run, or let this one finish (it saves final/ at the end).{saved}"
    )


def _rl_run_upload(run_dir: Path, checkpoint: str | None) -> tuple[Path, dict[str, Any], str]:
    config = _read_json(run_dir / "run_config.json")
    if checkpoint is None:
        folder = run_dir / "final"
        info = _read_json(folder / "vlm_rl_run.json")
        step, metrics = info["step"], info.get("metrics") or {}
        algorithm = info.get("algorithm") or config["algorithm"]
        base_model = info.get("base_model") or config["model_name_or_path"]
    else:
        checkpoint_dir = run_dir / "checkpoints" / checkpoint
        folder = checkpoint_dir / "adapter"
        if not folder.is_dir():
            saved = ", ".join(_checkpoint_names(run_dir)) or "none"
            raise FileNotFoundError(
                f"{run_dir} has no checkpoint {checkpoint!r} (no {folder}); saved checkpoints: {saved}. "
                "Checkpoints are written every save_steps and only the last save_total_limit are kept."
            )
        state_file = checkpoint_dir / "trainer_state.json"
        step = _read_json(state_file)["step"] if state_file.is_file() else int(checkpoint.split("-")[-1])
        metrics = _metrics_at_step(run_dir / "metrics.jsonl", step)
        algorithm, base_model = config["algorithm"], config["model_name_or_path"]

    components = dict(
        zip(config.get("rule_rewards") or [], config.get("rule_reward_weights") or [], strict=True)
    )
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
    return folder, card, f"vlm_rl {algorithm} run '{run_dir.resolve().name}' step {step}"


def _reward_model_run_upload(run_dir: Path, checkpoint: str | None) -> tuple[Path, dict[str, Any], str]:
    if checkpoint not in (None, "best"):
        raise FileNotFoundError(
            f"{run_dir} is a reward-model run: it has final/ (the default) and best/ (checkpoint='best'), "
            f"no checkpoint {checkpoint!r}"
        )
    folder = run_dir / (checkpoint or "final")
    reward_config = _read_json(folder / "reward_config.json")
    config = _read_json(run_dir / "run_config.json")
    metrics_file = run_dir / "run" / "metrics.jsonl"
    records = read_metrics(metrics_file.parent) if metrics_file.is_file() else []
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
    message = f"vlm_rl reward model run '{run_dir.resolve().name}'"
    message += f" step {step}" if step is not None else ""
    message += " (best evaluation)" if checkpoint == "best" else ""
    return folder, card, message


def _checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(path.name for path in (run_dir / "checkpoints").glob("step-*") if path.is_dir())


def _metrics_at_step(metrics_file: Path, step: int) -> dict[str, Any]:
    """The latest eval/* values and reward/mean logged at or before `step` (empty without metrics.jsonl)."""
    if not metrics_file.is_file():
        return {}
    metrics: dict[str, Any] = {}
    for record in read_metrics(metrics_file.parent):
        if record["step"] <= step:
            metrics.update({k: v for k, v in record.items() if k.startswith("eval/") or k == "reward/mean"})
    return metrics


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the run folder is incomplete or was not written by vlm_rl"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the run folder is damaged") from err
