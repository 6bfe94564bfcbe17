"""Old import path of the easy-vqa datasets, now in `vlm_rl.tasks.easy_vqa`.

Kept only for modules not yet moved to the new path; import from `vlm_rl.tasks.easy_vqa` instead.
"""

from vlm_rl.tasks.easy_vqa import (
    CAPTION_PROMPT,
    COLORS,
    SHAPES,
    caption_dataset,
    caption_preference_dataset,
    crop_to_shape,
    image_labels,
    vqa_dataset,
)

__all__ = [
    "CAPTION_PROMPT",
    "COLORS",
    "SHAPES",
    "caption_dataset",
    "caption_preference_dataset",
    "crop_to_shape",
    "image_labels",
    "vqa_dataset",
]
