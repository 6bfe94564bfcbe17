"""What the trainers keep of each held-out evaluation for the report (main process only).

    eval_samples.jsonl + eval_samples/    RL runs: the first held-out prompts' images (saved once),
                                          greedy completions and rewards, per evaluation step
    eval_episodes.jsonl + eval_episodes/  agent runs: the first held-out episodes' frames, actions
                                          and rewards, per evaluation step
    eval_scores.jsonl                     reward-model runs: every held-out pair's chosen and
                                          rejected score, per evaluation step

The paths are `RunFolder`'s; a fresh run starts them empty (`RunFolder.start`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from PIL import Image

from vlm_rl.run_folder import RunFolder

GALLERY_SIZE = 8
"""Held-out prompts kept per evaluation (the first ones of the main process)."""
FILM_STRIPS = 4
"""Held-out episodes kept per evaluation."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def prompt_text(prompt: Any) -> str:
    """The text of a plain or conversational prompt (image placeholders left out)."""
    if isinstance(prompt, str):
        return prompt
    texts = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        else:
            texts += [part.get("text") or "" for part in content if part.get("type") == "text"]
    return " ".join(text for text in texts if text)


def save_eval_samples(
    run: RunFolder,
    step: int,
    indices: Sequence[int],
    prompts: Sequence[Any],
    images: Sequence[Sequence[Image.Image]],
    completions: Sequence[str],
    rewards: Sequence[float],
    components: dict[str, Sequence[float]],
    columns: dict[str, Sequence[Any]] | None = None,
) -> None:
    """Append the evaluation at `step` of held-out prompts `indices` (dataset positions): each
    prompt's images (written once per index), its completion, total reward and reward components.
    Scalar dataset columns (an answer, an image id) are kept beside them."""
    run.eval_images_dir.mkdir(parents=True, exist_ok=True)
    with run.eval_samples_file.open("a") as f:
        for row, index in enumerate(indices):
            names = []
            for number, image in enumerate(images[row]):
                name = f"item-{index:05d}-{number}.png"
                if not (run.eval_images_dir / name).exists():
                    image.convert("RGB").save(run.eval_images_dir / name)
                names.append(name)
            extra = {
                key: values[row]
                for key, values in (columns or {}).items()
                if isinstance(values[row], (str, int, float, bool))
            }
            record = {
                "step": step,
                "index": int(index),
                "images": names,
                "prompt": prompt_text(prompts[row]),
                "completion": completions[row],
                "reward": _jsonable(float(rewards[row])),
                "components": {k: _jsonable(float(v[row])) for k, v in components.items()},
                "columns": extra,
            }
            f.write(json.dumps(record) + "\n")


def save_eval_episodes(run: RunFolder, step: int, episodes: Sequence[Any]) -> None:
    """Append the held-out episodes (`vlm_rl.rl.agent.Episode`) of the evaluation at `step`, each
    frame as its own PNG so the report can caption it with the action and reward."""
    run.eval_episodes_dir.mkdir(parents=True, exist_ok=True)
    with run.eval_episodes_file.open("a") as f:
        for number, episode in enumerate(episodes):
            names = []
            for turn, frame in enumerate(episode.frames):
                name = f"step-{step:06d}-episode-{number}-frame-{turn:02d}.png"
                frame.convert("RGB").save(run.eval_episodes_dir / name)
                names.append(name)
            f.write(json.dumps({"step": step, "episode": number, **episode.record(), "frames": names}) + "\n")


def save_eval_scores(run: RunFolder, step: int, chosen: Sequence[float], rejected: Sequence[float]) -> None:
    """Append the held-out chosen and rejected scores of the reward-model evaluation at `step`."""
    record = {"step": step, "chosen": [float(v) for v in chosen], "rejected": [float(v) for v in rejected]}
    with run.eval_scores_file.open("a") as f:
        f.write(json.dumps(record) + "\n")
