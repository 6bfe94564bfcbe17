"""easy-vqa (a PyPI package of 64x64 shape images with questions) as the demo task, in one place:
its datasets, rule rewards, held-out metrics and the words the tiny default models must know.

Three derived datasets, each deterministic given a seed, with train and test built from easy-vqa's
own train and test images (so no image is in both), named "easy-vqa:<task>" in dataset flags:
- `vqa`: the question -> a one-word answer (optionally only colour/shape questions);
- `caption`: "Describe the shape." -> "<color> <shape>";
- `caption_preference`: chosen = the true caption, rejected = a plausible wrong one
  (wrong colour, wrong shape, or both).

easy-vqa has no caption field: an image's colour and shape come from its question/answer pairs
(about 86% of images get both; the others are left out of the caption tasks).
By default each image is cropped around its shape and resized to 32x32 (`crop=True`): the shape
then fills the frame, which makes the tasks learnable by the tiny default models in minutes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import datasets
import numpy as np
from PIL import Image

from vlm_rl.data.validation import completion_text
from vlm_rl.errors import ConfigError, check_ranges, closest
from vlm_rl.rewards.rules import normalize_text

COLORS = ("red", "green", "blue", "black", "gray", "teal", "yellow", "brown")
SHAPES = ("circle", "rectangle", "triangle")
CAPTION_PROMPT = "Describe the shape."
CROP_SIZE = 32
# Words of the task's prompts beyond easy-vqa's own questions and answers, for `vocabulary`.
PROMPT_WORDS = (
    "describe the shape . what color and shape is it ? answer with one word . "
    "this is a red green blue black gray teal yellow brown circle rectangle triangle yes no"
)

Split = Literal["train", "test"]


@dataclass(frozen=True)
class ImageLabel:
    image_id: int
    path: str
    color: str | None
    shape: str | None

    @property
    def caption(self) -> str:
        return f"{self.color} {self.shape}"


def _questions(split: Split):
    import easy_vqa

    if split == "train":
        return easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    if split == "test":
        return easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    raise ValueError(f"easy-vqa split must be 'train' or 'test', got {split!r}")


@cache
def image_labels(split: Split) -> tuple[ImageLabel, ...]:
    """Colour and shape of every image of a split, read off its question/answer pairs.

    Both the answer and the question carry labels: "what color is the circle?" -> "red" says the
    image holds a red circle; "is there not a blue shape?" -> "no" says it is blue.
    """
    (questions, answers, image_ids), paths = _questions(split)
    color: dict[int, str] = {}
    shape: dict[int, str] = {}

    def mentioned(question: str, words: tuple[str, ...]) -> str | None:
        found = [w for w in words if w in question.replace("?", "").split()]
        return found[0] if len(found) == 1 else None

    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        if answer in COLORS:
            color[image_id] = answer
            shape.setdefault(image_id, mentioned(question, SHAPES))
        elif answer in SHAPES:
            shape[image_id] = answer
            color.setdefault(image_id, mentioned(question, COLORS))
        else:
            negated = " not " in f" {question} " or question.startswith("is no ")
            if (answer == "yes") != negated:  # the mentioned colour/shape is present
                if word := mentioned(question, COLORS):
                    color[image_id] = word
                if word := mentioned(question, SHAPES):
                    shape[image_id] = word
    return tuple(
        ImageLabel(image_id, paths[image_id], color.get(image_id), shape.get(image_id))
        for image_id in sorted(paths)
    )


def crop_to_shape(image: Image.Image, size: int = CROP_SIZE, margin: int = 3) -> Image.Image:
    """Crop around the non-background pixels (background = median border colour), then resize."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.abs(pixels - background).max(axis=-1) > 40
    if not mask.any():
        return image.convert("RGB").resize((size, size), Image.BILINEAR)
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    box = (
        max(cols.min() - margin, 0),
        max(rows.min() - margin, 0),
        min(cols.max() + margin + 1, w),
        min(rows.max() + margin + 1, h),
    )
    return image.convert("RGB").crop(box).resize((size, size), Image.BILINEAR)


def _load(path: str, crop: bool) -> Image.Image:
    with Image.open(path) as image:
        return crop_to_shape(image) if crop else image.convert("RGB")


def _user_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _features(extra: dict[str, datasets.Value]) -> datasets.Features:
    return datasets.Features(
        {
            "prompt": [
                {
                    "role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
                }
            ],
            "images": datasets.List(datasets.Image()),
            "image_id": datasets.Value("int64"),
            **extra,
        }
    )


def _sample(items: list, num_samples: int | None, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items if num_samples is None else items[:num_samples]


def caption_dataset(
    split: Split = "train", *, num_samples: int | None = None, seed: int = 0, crop: bool = True
) -> datasets.Dataset:
    """Prompt-only captioning task: "Describe the shape." -> answer "<color> <shape>"."""
    labels = _sample([lab for lab in image_labels(split) if lab.color and lab.shape], num_samples, seed)
    rows = {
        "prompt": [_user_prompt(CAPTION_PROMPT) for _ in labels],
        "images": [[_load(lab.path, crop)] for lab in labels],
        "image_id": [lab.image_id for lab in labels],
        "answer": [lab.caption for lab in labels],
        "color": [lab.color for lab in labels],
        "shape": [lab.shape for lab in labels],
    }
    string = datasets.Value("string")
    return datasets.Dataset.from_dict(
        rows, features=_features({"answer": string, "color": string, "shape": string})
    )


def wrong_caption(color: str, shape: str, rng: random.Random) -> str:
    """A plausible wrong caption: wrong colour, wrong shape, or both (chosen uniformly)."""
    kind = rng.choice(("color", "shape", "both"))
    new_color = rng.choice([c for c in COLORS if c != color]) if kind in ("color", "both") else color
    new_shape = rng.choice([s for s in SHAPES if s != shape]) if kind in ("shape", "both") else shape
    return f"{new_color} {new_shape}"


def malformed_caption(color: str, shape: str, rng: random.Random) -> str:
    """A caption that is not "<color> <shape>": one word missing, a word repeated or added, the
    words swapped, or 1-4 random task words. A reward model trained only on well-formed captions
    scores such strings arbitrarily, and an RL policy finds and exploits them."""
    vocabulary = COLORS + SHAPES + ("the", "shape", "is", "a", "color", "image", "yes", "no", "what")
    kind = rng.choice(("color_only", "shape_only", "repeat", "extra", "swapped", "noise"))
    if kind == "color_only":
        return color
    if kind == "shape_only":
        return shape
    if kind == "repeat":
        return rng.choice(
            (f"{color} {color} {shape}", f"{color} {shape} {shape}", f"{color} {shape} {color} {shape}")
        )
    if kind == "extra":
        return f"{color} {shape} {rng.choice(vocabulary)}"
    if kind == "swapped":
        return f"{shape} {color}"
    words = [rng.choice(vocabulary) for _ in range(rng.randint(1, 4))]
    text = " ".join(words)
    return text if text != f"{color} {shape}" else "the shape"


def half_right_caption(color: str, shape: str, rng: random.Random) -> str:
    """The right colour with a wrong shape, or the right shape with a wrong colour."""
    if rng.random() < 0.5:
        return f"{color} {rng.choice([s for s in SHAPES if s != shape])}"
    return f"{rng.choice([c for c in COLORS if c != color])} {shape}"


def worse_than_half_right(color: str, shape: str, rng: random.Random) -> str:
    """Both words wrong, or 1-3 repeats of a word that is neither the right colour nor shape."""
    if rng.random() < 0.5:
        return (
            f"{rng.choice([c for c in COLORS if c != color])} {rng.choice([s for s in SHAPES if s != shape])}"
        )
    word = rng.choice([w for w in (*COLORS, *SHAPES, "the", "shape", "is", "a") if w not in (color, shape)])
    return " ".join([word] * rng.randint(1, 3))


def caption_preference_dataset(
    split: Split = "train",
    *,
    num_samples: int | None = None,
    seed: int = 0,
    crop: bool = True,
    pairs_per_image: int = 1,
    malformed_fraction: float = 0.0,
    graded_fraction: float = 0.0,
) -> datasets.Dataset:
    """Preference pairs for captions: chosen = the true caption, rejected = a plausible wrong one.

    `malformed_fraction` of the rejected captions are malformed instead (see `malformed_caption`):
    the default reward model trains with 0.5 so that it also ranks the odd strings an RL policy
    samples below the true caption. `graded_fraction` of the pairs instead prefer a half-right
    caption (one word right) to a wrong or malformed one, which teaches the model partial credit:
    a denser reward for RL than "exactly right or not".
    """
    rng = random.Random(seed + 1)
    labels = _sample([lab for lab in image_labels(split) if lab.color and lab.shape], num_samples, seed)
    rows: dict[str, list] = {k: [] for k in ("prompt", "images", "image_id", "chosen", "rejected")}
    for lab in labels:
        image = _load(lab.path, crop)
        for _ in range(pairs_per_image):
            rows["prompt"].append(_user_prompt(CAPTION_PROMPT))
            rows["images"].append([image])
            rows["image_id"].append(lab.image_id)
            if graded_fraction > 0 and rng.random() < graded_fraction:  # datasets without it unchanged
                rows["chosen"].append(half_right_caption(lab.color, lab.shape, rng))
                rows["rejected"].append(worse_than_half_right(lab.color, lab.shape, rng))
                continue
            rows["chosen"].append(lab.caption)
            if rng.random() < malformed_fraction:
                rows["rejected"].append(malformed_caption(lab.color, lab.shape, rng))
            else:
                rows["rejected"].append(wrong_caption(lab.color, lab.shape, rng))
    string = datasets.Value("string")
    return datasets.Dataset.from_dict(rows, features=_features({"chosen": string, "rejected": string}))


def vqa_dataset(
    split: Split = "train",
    *,
    num_samples: int | None = None,
    seed: int = 0,
    crop: bool = True,
    question_types: tuple[str, ...] = ("color", "shape"),
) -> datasets.Dataset:
    """Question -> one-word answer. `question_types` picks among "color", "shape" and "yes_no"."""
    unknown = set(question_types) - {"color", "shape", "yes_no"}
    if unknown:
        raise ConfigError(
            f"unknown question_types {sorted(unknown)}; choose from ['color', 'shape', 'yes_no']"
        )
    (questions, answers, image_ids), paths = _questions(split)

    def kind(answer: str) -> str:
        return "color" if answer in COLORS else "shape" if answer in SHAPES else "yes_no"

    picked = [i for i, a in enumerate(answers) if kind(a) in question_types]
    picked = _sample(picked, num_samples, seed)
    images: dict[int, Image.Image] = {}
    for i in picked:
        if image_ids[i] not in images:
            images[image_ids[i]] = _load(paths[image_ids[i]], crop)
    rows = {
        "prompt": [_user_prompt(questions[i]) for i in picked],
        "images": [[images[image_ids[i]]] for i in picked],
        "image_id": [image_ids[i] for i in picked],
        "answer": [answers[i] for i in picked],
        "question_type": [kind(answers[i]) for i in picked],
    }
    string = datasets.Value("string")
    return datasets.Dataset.from_dict(rows, features=_features({"answer": string, "question_type": string}))


@dataclass
class PreferenceOptions:
    """Options of the "easy-vqa:caption_preference" pairs (flags of the reward-model recipe)."""

    pairs_per_image: int = field(default=1, metadata={"help": "easy-vqa preference pairs drawn per image."})
    graded_fraction: float = field(
        default=0.0,
        metadata={"help": "easy-vqa: share of pairs preferring a half-right caption to a wrong one."},
    )
    malformed_fraction: float = field(
        default=0.0, metadata={"help": "easy-vqa: share of rejected captions that are malformed strings."}
    )

    def __post_init__(self) -> None:
        check_ranges(
            self, {"pairs_per_image": ">= 1", "graded_fraction": "[0, 1]", "malformed_fraction": "[0, 1]"}
        )


def load_dataset(task: str, split: Split = "train", **kwargs) -> datasets.Dataset:
    """One of the derived datasets by name: "vqa", "caption" or "caption_preference"."""
    builders = {
        "vqa": vqa_dataset,
        "caption": caption_dataset,
        "caption_preference": caption_preference_dataset,
    }
    if task not in builders:
        raise ConfigError(
            f"--dataset easy-vqa:{task}: unknown easy-vqa task {task!r}; choose one of "
            f"{', '.join('easy-vqa:' + name for name in sorted(builders))}{closest(task, builders)}"
        )
    return builders[task](split, **kwargs)


def vocabulary() -> list[str]:
    """The task's prompt words and every question and answer of both splits (tiny tokenizers' words)."""
    texts = [PROMPT_WORDS]
    for split in ("train", "test"):
        (questions, answers, _), _ = _questions(split)
        texts.extend(questions)
        texts.extend(answers)
    return texts


# -- rewards and held-out metrics -------------------------------------------------------------------
def caption_match(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    color: Sequence[str | None],
    shape: Sequence[str | None],
    **kwargs: Any,
) -> list[float | None]:
    """easy-vqa caption reward: 0.5 for the right colour word plus 0.5 for the right shape word.

    A half counts only if its word is the only colour (or shape) word in the completion, so
    listing every colour earns nothing. None where the sample has no colour or shape label.

    >>> caption_match(
    ...     ["Q"] * 5,
    ...     ["Red circle.", "red blue circle", "circle", "", "blue square"],
    ...     color=["red"] * 5,
    ...     shape=["circle"] * 5,
    ... )
    [1.0, 0.5, 0.5, 0.0, 0.0]
    """
    rewards: list[float | None] = []
    for c, true_color, true_shape in zip(completions, color, shape, strict=True):
        if true_color is None or true_shape is None:
            rewards.append(None)
            continue
        words = set(normalize_text(completion_text(c)).split())
        rewards.append(
            0.5 * (words & set(COLORS) == {true_color}) + 0.5 * (words & set(SHAPES) == {true_shape})
        )
    return rewards


RULE_REWARDS = {"caption_match": caption_match}
"""The task's rule rewards by name (see `vlm_rl.tasks`)."""


def caption_accuracy(completion: str | Sequence[Any], color: str, shape: str) -> bool:
    """True iff the normalised completion is exactly ``"<color> <shape>"``.

    >>> caption_accuracy("Red circle.", "red", "circle"), caption_accuracy("a red circle", "red", "circle")
    (True, False)
    """
    return normalize_text(completion_text(completion)) == f"{color} {shape}"


def caption_metrics(completions: list[str], columns: dict[str, list]) -> dict[str, float]:
    """Held-out task metric: the caption is exactly "<color> <shape>" of the image (easy-vqa labels)."""
    if not {"color", "shape"} <= columns.keys():
        return {}
    correct = [
        caption_accuracy(c, color, shape)
        for c, color, shape in zip(completions, columns["color"], columns["shape"], strict=True)
    ]
    return {"caption_accuracy": sum(correct) / max(len(correct), 1)}


def vqa_metrics(completions: list[str], columns: dict[str, list]) -> dict[str, float]:
    """Held-out task metric: the normalised answer equals the reference answer."""
    if "answer" not in columns:
        return {}
    correct = [
        normalize_text(c) == normalize_text(a) for c, a in zip(completions, columns["answer"], strict=True)
    ]
    return {"accuracy": sum(correct) / max(len(correct), 1)}
