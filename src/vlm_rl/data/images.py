"""Image references -> RGB PIL images, refusing anything unsafe or broken with a `DataError`.

An image reference is what a dataset row holds for one image: a PIL image, a path (str or
Path), an ``http(s)://`` URL, or the ``{"path": ..., "bytes": ...}`` dict that HF datasets stores
for an ``Image`` feature. Every failure (missing, corrupt, truncated, too large, outside the
dataset folder, remote when remote is off) raises `DataError` whose message starts with the
caller's ``where`` prefix, says what is wrong, and says what to do.
"""

from __future__ import annotations

import io
import os
import re
import struct
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from PIL import Image, UnidentifiedImageError

from vlm_rl.errors import DataError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DataError",
    "ImageRef",
    "is_url",
    "load_image",
    "resolve_image_path",
    "to_rgb",
]

DEFAULT_MAX_PIXELS = 64_000_000
"""Images with more pixels (width * height) than this are refused as decompression bombs."""

_MAX_REMOTE_BYTES = 256 * 1024 * 1024
_REMOTE_TIMEOUT_S = 30.0
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

ImageRef = Image.Image | str | os.PathLike | Mapping[str, Any]
"""What a dataset row may hold for one image."""


def _fail(where: str, problem: str) -> DataError:
    return DataError(f"{where}: {problem}" if where else problem)


def is_url(ref: str) -> bool:
    """True if ``ref`` looks like a URL (``scheme://...``) rather than a local path.

    >>> is_url("https://example.com/cat.png"), is_url("images/cat.png")
    (True, False)
    """
    return bool(_URL_SCHEME.match(ref))


def to_rgb(image: Image.Image) -> Image.Image:
    """Return a new RGB copy of ``image``, whatever its mode.

    Transparency (alpha bands, or a palette/RGB ``transparency`` entry) is composited over white,
    so a fully transparent pixel becomes (255, 255, 255). High-bit-depth grey modes are scaled to
    8 bits rather than clipped: ``I;16*`` maps 0..65535 to 0..255; ``I`` and ``F`` are scaled by the
    range their values fit (0..1 for ``F``, 0..255, 0..65535, else their own min..max).
    """
    if image.mode.startswith("I") or image.mode == "F":
        return _grey_to_8bit(image).convert("RGB")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float grey image to mode L."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")
        low, high = 0.0, 65535.0
    else:
        if image.mode not in ("I", "F"):
            image = image.convert("I")
        low, high = image.getextrema()
        if image.mode == "F" and low >= 0 and high <= 1:
            low, high = 0.0, 1.0
        elif low >= 0 and high <= 255:
            low, high = 0.0, 255.0
        elif low >= 0 and high <= 65535:
            low, high = 0.0, 65535.0
    scale = 255.0 / (high - low) if high > low else 0.0
    return image.point(lambda value: (value - low) * scale).convert("L")


def resolve_image_path(ref: str | os.PathLike, *, root: Path | None = None, where: str = "") -> Path:
    """Resolve a local image path to an absolute path (symlinks followed).

    Relative paths resolve against ``root`` (the dataset folder), or the current directory when
    ``root`` is None. With a ``root``, the resolved path must lie inside it: ``../`` escapes,
    absolute paths elsewhere and symlinks pointing out are refused with `DataError`. The file is
    not required to exist.
    """
    candidate = Path(ref).expanduser()
    if root is None:
        return candidate.resolve()
    root_resolved = Path(root).resolve()
    if not candidate.is_absolute():
        candidate = root_resolved / candidate
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root_resolved):
        via_symlink = " (through a symlink)" if _lexically_inside(candidate, root_resolved) else ""
        raise _fail(
            where,
            f"image path {os.fspath(ref)!r} resolves to {resolved}{via_symlink}, outside the dataset "
            f"folder {root_resolved}; copy the image into the dataset folder and refer to it by a "
            "path relative to that folder",
        )
    return resolved


def _lexically_inside(path: Path, root: Path) -> bool:
    return Path(os.path.normpath(path)).is_relative_to(root)


def load_image(
    ref: ImageRef,
    *,
    root: Path | None = None,
    allow_remote: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    where: str = "",
) -> Image.Image:
    """Load one image reference as a fully decoded RGB PIL image.

    Args:
        ref: a PIL image, a local path (str/Path), an ``http(s)://`` URL, or a dict with ``bytes``
            and/or ``path`` (HF datasets' ``Image`` storage; ``bytes`` wins when present).
        root: the dataset folder; relative paths resolve against it and no path may leave it
            (see `resolve_image_path`). None: relative to the current directory, unrestricted.
        allow_remote: fetch ``http(s)://`` URLs with urllib; refused when False.
        max_pixels: refuse images whose width * height exceeds this (decompression bombs).
            PIL's own ``Image.MAX_IMAGE_PIXELS`` guard is enforced too.
        where: message prefix naming the place, e.g. "dataset 'train.jsonl', row 7, field 'images[0]'".

    Raises:
        DataError: the reference is of the wrong type, missing, remote while ``allow_remote`` is
            False, outside ``root``, not an image, corrupt, truncated or too large.
    """
    if isinstance(ref, Image.Image):
        _check_pixels(ref.size, max_pixels, "the in-memory image", where)
        return to_rgb(ref)
    if isinstance(ref, Mapping):
        data, path = ref.get("bytes"), ref.get("path")
        if data is not None and not isinstance(data, bytes | bytearray | memoryview):
            raise _fail(
                where,
                f"image dict 'bytes' must be raw bytes, got {type(data).__name__}; store the image "
                "as a file and give its path instead",
            )
        if data:
            label = f"the embedded image bytes ({path})" if path else "the embedded image bytes"
            return _decode(io.BytesIO(data), label, max_pixels, where)
        if not path:
            raise _fail(
                where,
                f"image dict has neither 'bytes' nor 'path' (keys: {sorted(ref)}); give the image as a "
                "path string or a {'path': ..., 'bytes': ...} dict",
            )
        ref = path
    if not isinstance(ref, str | os.PathLike):
        raise _fail(
            where,
            f"unsupported image value of type {type(ref).__name__}; use a PIL image, a path string, "
            "or a {'path': ..., 'bytes': ...} dict",
        )
    text = os.fspath(ref)
    if isinstance(ref, str) and is_url(text):
        return _decode(io.BytesIO(_fetch(text, allow_remote, where)), text, max_pixels, where)
    path = resolve_image_path(text, root=root, where=where)
    if not path.is_file():
        anchor = (
            f"the dataset folder {Path(root).resolve()}"
            if root is not None
            else f"the current directory {Path.cwd()}"
        )
        problem = "is a directory, not an image file" if path.is_dir() else "file not found"
        raise _fail(where, f"{problem}: {path}; check the path is relative to {anchor}")
    return _decode(path, str(path), max_pixels, where)


def _fetch(url: str, allow_remote: bool, where: str) -> bytes:
    if not url.lower().startswith(("http://", "https://")):
        raise _fail(
            where,
            f"unsupported URL scheme in {url!r}; use a local path or an http(s):// URL",
        )
    if not allow_remote:
        raise _fail(
            where,
            f"remote image {url!r} refused because allow_remote is off; download the images and "
            "refer to local paths, or pass allow_remote=True",
        )
    try:
        with urllib.request.urlopen(url, timeout=_REMOTE_TIMEOUT_S) as response:
            data = response.read(_MAX_REMOTE_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise _fail(
            where,
            f"could not download {url!r} ({err}); check the URL and the network, or download the "
            "images and refer to local paths",
        ) from err
    if len(data) > _MAX_REMOTE_BYTES:
        raise _fail(
            where,
            f"remote image {url!r} is larger than {_MAX_REMOTE_BYTES} bytes; download and shrink it",
        )
    return data


def _check_pixels(size: tuple[int, int], max_pixels: int, label: str, where: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise _fail(
            where,
            f"{label} is {width}x{height} = {width * height} pixels, more than max_pixels="
            f"{max_pixels} (a possible decompression bomb); resize the image, or raise max_pixels "
            "if you trust it",
        )


def _decode(source: Path | IO[bytes], label: str, max_pixels: int, where: str) -> Image.Image:
    """Open, size-check and fully decode an image (``.load()`` surfaces truncation)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                _check_pixels(image.size, max_pixels, label, where)
                image.load()
                return to_rgb(image)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _fail(
            where,
            f"{label} exceeds PIL's decompression-bomb limit ({err}); resize the image, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS and max_pixels if you trust it",
        ) from err
    except PermissionError as err:
        raise _fail(where, f"cannot read {label} ({err}); check the file's permissions") from err
    except UnidentifiedImageError as err:
        raise _fail(
            where,
            f"{label} is not a readable image (unknown or corrupt format); re-export it as PNG or "
            "JPEG, or remove this row",
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        raise _fail(
            where,
            f"{label} could not be decoded ({err}); the file is corrupt or truncated: re-export it, "
            "or remove this row",
        ) from err
