"""Row operations on processor outputs, whatever the family's vision-input layout.

Processors lay out vision inputs in three ways, told apart by shape, not by family name:
- per row: `input_ids`, `attention_mask`, `mm_token_type_ids`, `token_type_ids`, LLaVA-OneVision's
  `batch_num_images`, Idefics3's 5-D `pixel_values` (rows, images, 3, H, W) and its `pixel_attention_mask`;
- per image: LLaVA's 4-D `pixel_values` (images, 3, H, W), `image_sizes`, `image_grid_thw`, and
  LLaVA-Next/OneVision's 5-D `pixel_values` (images, tiles, 3, H, W), which come with `image_sizes`;
- per patch: Qwen-VL's 2-D `pixel_values` (patches, dim), `image_grid_thw` giving each image's patches.
PaliGemma's processor also returns `labels` for the prompt alone; they are dropped (a completion's
labels are the caller's to build).
"""

from __future__ import annotations

import torch
from transformers import BatchFeature

TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
IMAGE_LEVEL_KEYS = ("image_sizes", "image_grid_thw")
DROPPED_KEYS = ("labels",)


def _image_rows(images_per_row: torch.Tensor) -> torch.Tensor:
    """For each image (in batch order), the index of the row it belongs to."""
    return torch.repeat_interleave(torch.arange(len(images_per_row)), images_per_row)


def select_rows(
    inputs: BatchFeature | dict, rows: torch.Tensor, images_per_row: torch.Tensor
) -> BatchFeature:
    """Processor outputs for `rows` (any order, repeats allowed) of a batch.

    inputs: processor output for B rows; rows: (R,) long; images_per_row: (B,) long.
    Returns a BatchFeature for R rows, vision inputs selected consistently.
    """
    rows = rows.cpu()
    images_per_row = images_per_row.cpu()
    image_rows = _image_rows(images_per_row)
    # Images of the selected rows, in the order of `rows`.
    image_index = torch.cat(
        [torch.nonzero(image_rows == r).flatten() for r in rows.tolist()]
        or [torch.zeros(0, dtype=torch.long)]
    )
    out = {}
    grid = inputs.get("image_grid_thw")
    tiled = "image_sizes" in inputs  # 5-D pixel values are per image (tiles), not per row
    for key, value in inputs.items():
        if key in DROPPED_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            out[key] = value
        elif (
            key in TEXT_KEYS
            or key == "pixel_attention_mask"
            or (key == "pixel_values" and value.dim() == 5 and not tiled)
        ):
            out[key] = value[rows.to(value.device)]
        elif key in IMAGE_LEVEL_KEYS or (key == "pixel_values" and value.dim() in (4, 5)):
            out[key] = value[image_index.to(value.device)]
        elif key == "pixel_values" and grid is not None:  # flattened patches
            patches = grid.prod(dim=-1).cpu()
            starts = torch.cumsum(patches, 0) - patches
            spans = [torch.arange(starts[i], starts[i] + patches[i]) for i in image_index.tolist()]
            out[key] = value[torch.cat(spans).to(value.device)] if spans else value[:0]
        elif value.shape[0] == len(images_per_row):
            out[key] = value[rows.to(value.device)]
        else:
            raise ValueError(
                f"don't know how to select rows of processor output {key!r} with shape {tuple(value.shape)}"
            )
    return BatchFeature(out)


def repeat_rows(inputs: BatchFeature | dict, times: int, images_per_row: torch.Tensor) -> BatchFeature:
    """Each row repeated `times` times in place (row 0, 0, ..., 1, 1, ...)."""
    rows = torch.arange(len(images_per_row)).repeat_interleave(times)
    return select_rows(inputs, rows, images_per_row)


def append_completion(
    prompt_inputs: BatchFeature | dict,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    completion_token_type: int = 0,
) -> BatchFeature:
    """Model inputs for prompt + completion: token-aligned tensors are extended by the completion
    (ids, mask; `mm_token_type_ids` with zeros, text; `token_type_ids` with `completion_token_type`,
    the family's `FamilyFacts.completion_token_type`), vision kept."""
    out = {k: v for k, v in prompt_inputs.items() if k not in DROPPED_KEYS}
    prompt_len = prompt_inputs["input_ids"].shape[1]
    out["input_ids"] = torch.cat([prompt_inputs["input_ids"], completion_ids], dim=1)
    out["attention_mask"] = torch.cat(
        [prompt_inputs["attention_mask"], completion_mask.to(prompt_inputs["attention_mask"].dtype)], dim=1
    )
    for key, token_type in (("mm_token_type_ids", 0), ("token_type_ids", completion_token_type)):
        value = prompt_inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == prompt_len:
            completion = torch.full_like(completion_ids, token_type, dtype=value.dtype)
            out[key] = torch.cat([value, completion.to(value.device)], dim=1)
    return BatchFeature(out)
