"""Collators built on the processor: prompts (left-padded, for generation) and preference pairs.

Both render conversational prompts with the processor's chat template and let the processor expand
image placeholders, so every family (and every processor quirk: `image_grid_thw`,
`pixel_attention_mask`, `mm_token_type_ids`, ...) is handled by transformers itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from vlm_rl.data.loaders import materialize_images
from vlm_rl.data.validation import completion_text

if TYPE_CHECKING:
    from vlm_rl.models.shared_prefix import PromptGroups

_STANDARD_COLUMNS = ("prompt", "images", "image", "chosen", "rejected", "margin")


def render_prompt(processor: ProcessorMixin, prompt: str | list[dict]) -> str:
    """Prompt text ending where the assistant's answer starts (a plain string is used as is)."""
    if isinstance(prompt, str):
        return prompt
    return processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode(
    processor: ProcessorMixin,
    texts: list[str],
    images: list[list[Image.Image]],
    *,
    padding_side: str = "left",
) -> BatchFeature:
    """Tokenise texts with their images through the processor, padded on `padding_side`."""
    tokenizer = processor.tokenizer
    previous, tokenizer.padding_side = tokenizer.padding_side, padding_side
    try:
        kwargs: dict[str, Any] = {"images": images} if any(images) else {}
        return processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    finally:
        tokenizer.padding_side = previous


def _images_of(example: dict, root: Path | None) -> list[Image.Image]:
    refs = example.get("images")
    if refs is None and example.get("image") is not None:
        refs = [example["image"]]
    return materialize_images(refs or [], root=root)


@dataclass
class PromptBatch:
    """A batch of prompts ready for generation, with the raw columns the reward functions need."""

    inputs: BatchFeature
    """input_ids/attention_mask (left-padded) plus the processor's vision inputs."""
    prompts: list[Any]
    """The prompts as given in the dataset (conversational or text)."""
    images: list[list[Image.Image]]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    """Every other dataset column (e.g. `answer`), one value per prompt."""

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class PromptCollator:
    processor: ProcessorMixin
    root: Path | None = None

    def __call__(self, examples: list[dict]) -> PromptBatch:
        images = [_images_of(ex, self.root) for ex in examples]
        texts = [render_prompt(self.processor, ex["prompt"]) for ex in examples]
        extra = [k for k in examples[0] if k not in _STANDARD_COLUMNS]
        return PromptBatch(
            inputs=encode(self.processor, texts, images),
            prompts=[ex["prompt"] for ex in examples],
            images=images,
            columns={k: [ex[k] for ex in examples] for k in extra},
        )


def prompt_completion_texts(
    processor: ProcessorMixin, prompts: list[Any], completions: list[Any]
) -> list[str]:
    """The text a reward model scores: the rendered prompt followed by the completion's text."""
    return [
        render_prompt(processor, p) + completion_text(c) for p, c in zip(prompts, completions, strict=True)
    ]


@dataclass
class PreferenceBatch:
    """Chosen and rejected sequences of `num_pairs` pairs, rows [0, n) chosen, rows [n, 2n)
    rejected, so a reward model scores both in a single forward pass: either `inputs`, one
    left-padded batch of the 2n full sequences, or (a shared prefix) `groups`, the n prompts once
    with the 2n completions' tokens in `completion_ids` (right-padded, `groups.completion_mask`)."""

    inputs: BatchFeature | None
    num_pairs: int
    margin: torch.Tensor | None = None
    """Per-pair margin (float, shape (num_pairs,)) when the dataset has a `margin` column."""
    groups: PromptGroups | None = None
    completion_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.num_pairs

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PreferenceBatch:
        def move(value):
            return None if value is None else value.to(device)

        return PreferenceBatch(
            move(self.inputs), self.num_pairs, move(self.margin), move(self.groups), move(self.completion_ids)
        )


def completion_token_ids(
    tokenizer, prompts: list[str], prompt_index: torch.Tensor, completions: list[str]
) -> list[list[int]] | None:
    """Each completion's token ids (completion n answers `prompts[prompt_index[n]]`) when every
    prompt + completion text tokenizes as the prompt's tokens followed by the completion's (no token
    merges across the boundary, no empty completion), so scoring them after the prompt's tokens is
    scoring the full text; else None. Each distinct prompt is tokenized once."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    index = prompt_index.tolist()
    full = tokenizer(
        [prompts[i] + c for i, c in zip(index, completions, strict=True)], add_special_tokens=False
    )
    for i, completion, whole in zip(index, ids, full["input_ids"], strict=True):
        if not completion or prompt_ids[i] + completion != whole:
            return None
    return ids


def shared_prompt_batch(
    processor: ProcessorMixin,
    prompts: list[str],
    images: list[list[Image.Image]],
    prompt_index: torch.Tensor,
    completions: list[str],
) -> tuple[PromptGroups, torch.Tensor] | None:
    """The U rendered `prompts` (with their `images`) once and the N `completions` apart, row n
    answering prompt `prompt_index[n]`: (PromptGroups, (N, T) completion ids right-padded), the
    inputs of `shared_prefix.sequence_end_states`; None where the texts do not tokenize apart as
    they do together (`completion_token_ids`)."""
    from vlm_rl.models.shared_prefix import PromptGroups

    ids = completion_token_ids(processor.tokenizer, prompts, prompt_index, completions)
    if ids is None:
        return None
    T = max(len(row) for row in ids)
    pad = processor.tokenizer.pad_token_id or 0  # masked out
    completion_ids = torch.tensor([row + [pad] * (T - len(row)) for row in ids])
    completion_mask = torch.tensor([[1] * len(row) + [0] * (T - len(row)) for row in ids])
    groups = PromptGroups(
        encode(processor, prompts, images),
        torch.tensor([len(picks) for picks in images]),
        prompt_index,
        completion_mask,
    )
    return groups, completion_ids


def distinct_prompts(
    prompts: list[str], images: list[list[Image.Image]]
) -> tuple[list[str], list[list[Image.Image]], torch.Tensor]:
    """Rows that repeat a prompt (its text and the same pixels) -> the U distinct ones, their
    images, and (N,) the one each row has (the G samples of a prompt share it)."""
    keys: dict[tuple, int] = {}
    rows: list[int] = []  # the first row of each distinct prompt
    index = []
    for row, (text, picks) in enumerate(zip(prompts, images, strict=True)):
        digest = tuple(
            (im.mode, im.size, hashlib.blake2b(im.tobytes(), digest_size=16).digest()) for im in picks
        )
        if (text, digest) not in keys:
            keys[text, digest] = len(rows)
            rows.append(row)
        index.append(keys[text, digest])
    return [prompts[r] for r in rows], [images[r] for r in rows], torch.tensor(index)


@dataclass
class PreferenceCollator:
    """(prompt, chosen, rejected, images) -> one left-padded batch, so the last position of every
    row is its final token (where a reward model reads its score). `shared_prefix`: the prompts
    once and the completions' tokens apart (`PreferenceBatch.groups`), where the texts tokenize
    apart as they do together (`completion_token_ids`; else the full sequences, as without it)."""

    processor: ProcessorMixin
    root: Path | None = None
    shared_prefix: bool = False

    def __call__(self, examples: list[dict]) -> PreferenceBatch:
        images = [_images_of(ex, self.root) for ex in examples]
        prompts = [ex["prompt"] for ex in examples]
        margin = None
        if "margin" in examples[0]:
            margin = torch.tensor([float(ex["margin"]) for ex in examples], dtype=torch.float32)
        if self.shared_prefix:
            texts = [render_prompt(self.processor, p) for p in prompts]
            answers = [completion_text(ex[key]) for key in ("chosen", "rejected") for ex in examples]
            shared = shared_prompt_batch(
                self.processor, texts, images, torch.arange(len(examples)).repeat(2), answers
            )
            if shared is not None:
                return PreferenceBatch(None, len(examples), margin, *shared)
        chosen = prompt_completion_texts(self.processor, prompts, [ex["chosen"] for ex in examples])
        rejected = prompt_completion_texts(self.processor, prompts, [ex["rejected"] for ex in examples])
        inputs = encode(self.processor, chosen + rejected, images + images)
        return PreferenceBatch(inputs=inputs, num_pairs=len(examples), margin=margin)
