"""Datasets in TRL's formats: image loading, validation and loaders.

Formats: a prompt dataset has a ``prompt`` column (a string or a list of chat messages with
``{"type": "image"}`` placeholders) and an ``images`` column (or a single-image ``image``);
a preference dataset adds ``chosen`` and ``rejected`` (strings or assistant messages) and an
optional ``margin``. Every problem in the data is reported as a `DataError`.
"""

from vlm_rl.data.images import DEFAULT_MAX_PIXELS, DataError, load_image, resolve_image_path, to_rgb
from vlm_rl.data.loaders import load_jsonl, load_prompt_dataset, load_task_dataset, materialize_images
from vlm_rl.data.validation import (
    completion_text,
    count_image_placeholders,
    prompt_text,
    validate_dataset,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DataError",
    "completion_text",
    "count_image_placeholders",
    "load_image",
    "load_jsonl",
    "load_prompt_dataset",
    "load_task_dataset",
    "materialize_images",
    "prompt_text",
    "resolve_image_path",
    "to_rgb",
    "validate_dataset",
]
