"""Validate prompt and preference datasets (TRL's formats) before any training starts.

Formats (TRL's conventions):

- prompt dataset: ``prompt`` is a string or a list of messages
  ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]``;
  ``images`` is a list of image references (one per ``{"type": "image"}`` placeholder), or a
  single-image column ``image``.
- preference dataset: adds ``chosen`` and ``rejected``, each a string or a list of assistant
  messages, and an optional numeric ``margin``.

Any other column is left alone. `validate_dataset` raises a `DataError` on the first problem,
row by row, naming the dataset, the row index and the field, and saying what to do.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
from PIL import Image

from vlm_rl.data.images import DEFAULT_MAX_PIXELS, DataError, load_image

__all__ = [
    "completion_text",
    "count_image_placeholders",
    "prompt_text",
    "validate_dataset",
]

logger = logging.getLogger(__name__)

DatasetKind = Literal["prompt", "preference"]
_Where = Callable[[str], str]
_REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "preference": ("prompt", "chosen", "rejected"),
}
_CONTENT_TYPES = ("text", "image")
_BOTH_IMAGE_COLUMNS = "both 'image' and 'images' columns; keep one ('images' holds a list per row)"
_EXAMPLE_PROMPT = '[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]'
_EXAMPLE_COMPLETION = '[{"role": "assistant", "content": [{"type": "text", "text": "..."}]}]'


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(item.get("text") or "" for item in content or () if item.get("type") == "text")


def prompt_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a prompt: the string itself, or the messages' text parts.

    A message's text parts are concatenated as chat templates do; messages are joined by a
    newline. Image placeholders contribute nothing.

    >>> prompt_text([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    'Hi'
    """
    if isinstance(prompt, str):
        return prompt
    return "\n".join(_message_text(message) for message in prompt)


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a ``chosen``/``rejected`` value: a string, or a list of assistant messages.

    >>> completion_text([{"role": "assistant", "content": [{"type": "text", "text": "red circle"}]}])
    'red circle'
    """
    return prompt_text(completion)


def count_image_placeholders(prompt: str | Sequence[Mapping[str, Any]]) -> int:
    """Number of ``{"type": "image"}`` content items in a conversational prompt (0 for a string).

    >>> count_image_placeholders([{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}])
    2
    """
    if isinstance(prompt, str):
        return 0
    return sum(
        1
        for message in prompt
        if not isinstance(message.get("content"), str)
        for item in message.get("content") or ()
        if item.get("type") == "image"
    )


def validate_dataset(
    dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
    *,
    kind: DatasetKind,
    name: str,
    root: Path | None = None,
    allow_remote: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_images: bool = True,
) -> None:
    """Check a prompt or preference dataset row by row; raise `DataError` on the first problem.

    Args:
        dataset: a ``datasets.Dataset`` or a list of row dicts.
        kind: "prompt" (needs ``prompt``) or "preference" (also ``chosen`` and ``rejected``).
        name: how errors name the dataset (a file path, a hub id).
        root: the dataset folder image paths are relative to and must stay inside (None: no limit).
        allow_remote: accept ``http(s)://`` image URLs (they are fetched when ``check_images``).
        max_pixels: refuse larger images (decompression bombs).
        check_images: open and fully decode every image; False checks only the value types.

    Raises:
        DataError: naming ``name``, the row index and the field, with what to do.
    """
    if kind not in _REQUIRED_COLUMNS:
        raise ValueError(f"kind must be 'prompt' or 'preference', got {kind!r}")
    required = _REQUIRED_COLUMNS[kind]
    if len(dataset) == 0:
        raise DataError(
            f"dataset '{name}': it has no rows; check that the file or split is the one you meant "
            "and that it is not empty"
        )
    if isinstance(dataset, datasets.Dataset):
        columns = list(dataset.column_names)
        missing = [column for column in required if column not in columns]
        if missing:
            raise DataError(
                f"dataset '{name}', field '{missing[0]}': missing required column(s) {missing}; the "
                f"dataset has columns {columns}, and a {kind} dataset needs {list(required)}"
            )
        if "image" in columns and "images" in columns:
            raise DataError(f"dataset '{name}', field 'image': {_BOTH_IMAGE_COLUMNS}")
    image_count = 0
    for index, row in enumerate(_iter_rows(dataset)):
        image_count += _check_row(
            row,
            index=index,
            kind=kind,
            name=name,
            root=root,
            allow_remote=allow_remote,
            max_pixels=max_pixels,
            check_images=check_images,
        )
    logger.info(
        "dataset '%s': %d %s rows valid, %d images %s",
        name,
        len(dataset),
        kind,
        image_count,
        "decoded" if check_images else "type-checked",
    )


def _iter_rows(dataset: datasets.Dataset | Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    if isinstance(dataset, datasets.Dataset):
        # Arrow rows keep Image features undecoded ({"bytes", "path"} dicts), so a corrupt image
        # reaches load_image (which names the row) instead of failing inside datasets' decoder.
        for batch in dataset.with_format("arrow").iter(batch_size=256):
            yield from batch.to_pylist()
    else:
        yield from dataset


def _check_row(
    row: Mapping[str, Any],
    *,
    index: int,
    kind: DatasetKind,
    name: str,
    root: Path | None,
    allow_remote: bool,
    max_pixels: int,
    check_images: bool,
) -> int:
    """Validate one row; return its number of images."""

    def where(field: str) -> str:
        return f"dataset '{name}', row {index}, field '{field}'"

    if not isinstance(row, Mapping):
        raise DataError(
            f"dataset '{name}', row {index}: expected a dict of columns, got {type(row).__name__}"
        )
    for column in _REQUIRED_COLUMNS[kind]:
        if column not in row:
            raise DataError(
                f"{where(column)}: missing required column; the row has {sorted(row)}, and a {kind} "
                f"dataset needs {list(_REQUIRED_COLUMNS[kind])} in every row"
            )
    if "image" in row and "images" in row:
        raise DataError(f"{where('image')}: {_BOTH_IMAGE_COLUMNS}")

    prompt = row["prompt"]
    _check_prompt(prompt, where)
    if kind == "preference":
        _check_completion(row["chosen"], "chosen", where)
        _check_completion(row["rejected"], "rejected", where)
        chosen = completion_text(row["chosen"]).strip()
        if chosen == completion_text(row["rejected"]).strip():
            raise DataError(
                f"{where('rejected')}: identical to 'chosen' ({_shorten(chosen)!r}); a preference "
                "pair needs two different completions: fix the pair or drop the row"
            )
    if "margin" in row:
        _check_margin(row["margin"], where)

    image_field, refs = _image_refs(row, where)
    placeholders = count_image_placeholders(prompt)
    if image_field is None and placeholders:
        raise DataError(
            f"{where('images')}: the prompt has {placeholders} image placeholder(s) but there is no "
            f"'images' column (row has {sorted(row)}); add an 'images' column with one image per "
            'placeholder, or remove the {"type": "image"} items'
        )
    # A string prompt carries the model's own image tokens, which only its processor can count.
    if image_field is not None and not isinstance(prompt, str) and len(refs) != placeholders:
        raise DataError(
            f"{where(image_field)}: {len(refs)} image(s) but the prompt has {placeholders} "
            '{"type": "image"} placeholder(s); give exactly one image per placeholder, in order'
        )
    for position, ref in enumerate(refs):
        field = image_field if image_field == "image" else f"images[{position}]"
        if check_images:
            load_image(ref, root=root, allow_remote=allow_remote, max_pixels=max_pixels, where=where(field))
        else:
            _check_image_type(ref, where(field))
    return len(refs)


def _check_prompt(prompt: Any, where: _Where) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where('prompt')}: the prompt is empty; write the question or instruction")
        return
    if not isinstance(prompt, list):
        raise DataError(
            f"{where('prompt')}: expected a string or a list of messages like {_EXAMPLE_PROMPT}, "
            f"got {type(prompt).__name__}"
        )
    _check_messages(prompt, "prompt", where, role=None)
    if not prompt_text(prompt).strip():
        raise DataError(
            f"{where('prompt')}: the prompt has no text (only images or whitespace); add a text item "
            'with the question or instruction, {"type": "text", "text": "..."}'
        )


def _check_completion(value: Any, field: str, where: _Where) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where(field)}: the completion is empty; give the response text")
        return
    if not isinstance(value, list):
        raise DataError(
            f"{where(field)}: expected a string or a list of assistant messages like "
            f"{_EXAMPLE_COMPLETION}, got {type(value).__name__}"
        )
    _check_messages(value, field, where, role="assistant")
    if count_image_placeholders(value):
        raise DataError(
            f"{where(field)}: completions cannot contain images; put images in the prompt and the "
            "'images' column"
        )
    if not completion_text(value).strip():
        raise DataError(f"{where(field)}: the completion has no text; give the response text")


def _check_messages(messages: list[Any], field: str, where: _Where, *, role: str | None) -> None:
    """Check a list of chat messages; ``role`` (when given) is the only role allowed."""
    if not messages:
        raise DataError(f"{where(field)}: the message list is empty; expected e.g. {_EXAMPLE_PROMPT}")
    for position, message in enumerate(messages):
        path = f"{field}[{position}]"
        if not isinstance(message, Mapping):
            raise DataError(
                f"{where(path)}: a message must be a dict with 'role' and 'content', got "
                f"{type(message).__name__}"
            )
        for key in ("role", "content"):
            if message.get(key) is None:
                raise DataError(
                    f"{where(path)}: message has no '{key}' (keys: {sorted(message)}); every message "
                    "needs 'role' and 'content'"
                )
        if not isinstance(message["role"], str) or not message["role"]:
            raise DataError(f"{where(path + '.role')}: role must be a non-empty string like 'user'")
        if role is not None and message["role"] != role:
            raise DataError(
                f"{where(path + '.role')}: role is {message['role']!r} but {field} messages must be "
                f"{role!r}; put the conversation before the answer in the 'prompt' column"
            )
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise DataError(
                f"{where(path + '.content')}: content must be a string or a list of items like "
                f'{{"type": "text", "text": "..."}}, got {type(content).__name__}'
            )
        for item_position, item in enumerate(content):
            _check_content_item(item, f"{path}.content[{item_position}]", where)


def _check_content_item(item: Any, path: str, where: _Where) -> None:
    if not isinstance(item, Mapping) or item.get("type") is None:
        raise DataError(
            f'{where(path)}: content item has no \'type\'; use {{"type": "text", "text": "..."}} '
            'or {"type": "image"}'
        )
    if item["type"] not in _CONTENT_TYPES:
        raise DataError(
            f"{where(path + '.type')}: unsupported content type {item['type']!r}; use 'text' or "
            "'image' (images themselves go in the 'images' column)"
        )
    if item["type"] == "text" and not isinstance(item.get("text"), str):
        raise DataError(
            f"{where(path + '.text')}: a text item needs a string 'text', got "
            f"{type(item.get('text')).__name__}"
        )


def _check_margin(margin: Any, where: _Where) -> None:
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise DataError(
            f"{where('margin')}: margin must be a number, got {type(margin).__name__} ({margin!r}); "
            "give every row a finite float margin, or drop the column"
        )
    if not math.isfinite(margin):
        raise DataError(f"{where('margin')}: margin is {margin!r}; use a finite number")


def _image_refs(row: Mapping[str, Any], where: _Where) -> tuple[str | None, list[Any]]:
    """The row's image column name ('images', 'image' or None) and its list of references."""
    if "images" in row:
        refs = row["images"]
        if not isinstance(refs, list | tuple):
            raise DataError(
                f"{where('images')}: expected a list of images, got {type(refs).__name__}; wrap a "
                "single image as [image] and use [] for a row without images"
            )
        return "images", list(refs)
    if "image" in row:
        ref = row["image"]
        if isinstance(ref, list | tuple):
            raise DataError(
                f"{where('image')}: the 'image' column holds one image per row but this row has a "
                "list; rename the column to 'images'"
            )
        return "image", [] if ref is None else [ref]
    return None, []


def _check_image_type(ref: Any, where: str) -> None:
    if isinstance(ref, Image.Image | str | os.PathLike):
        return
    if isinstance(ref, Mapping) and (ref.get("bytes") or ref.get("path")):
        return
    raise DataError(
        f"{where}: unsupported image value of type {type(ref).__name__}; use a PIL image, a path "
        "string, or a {'path': ..., 'bytes': ...} dict"
    )


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
