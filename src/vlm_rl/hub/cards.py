"""Model cards for pushed policies and reward models: YAML front matter, summary, training,
hyperparameters (secrets redacted), final metrics, and a how-to-load snippet that runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml

from vlm_rl.hub_ids import is_hub_id

SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key)$", re.I)


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
    report: bool = False,
) -> Path:
    """Write `folder/README.md`: YAML front matter, summary, training, final metrics, the run
    report's link (`report`: report.html is pushed beside it), how to load.

    Hyperparameters whose name looks like a secret (`hub_token`, `api_key`, ...) are redacted.
    `base_model` goes into the front matter only when it is a hub id: a local path or a tiny
    default name ("tiny-llava") would not validate on the hub, so the text mentions it instead.
    """
    if kind not in ("policy", "reward_model"):
        raise ValueError(f"kind must be 'policy' or 'reward_model', got {kind!r}")
    tags = ["vlm-rl", "reinforcement-learning", "vision-language-model", "lora"]
    tags += ["reward-model"] if kind == "reward_model" else []
    tags += [algorithm.lower()] if algorithm else []
    on_hub = is_hub_id(base_model)
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
    if report:
        lines += [
            "## Run report",
            "",
            "[report.html](report.html): the run's curves, held-out evaluations and samples "
            "on one self-contained page (download it and open it in a browser).",
            "",
        ]
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
