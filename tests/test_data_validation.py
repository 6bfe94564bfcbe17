"""Bad-input corpus for vlm_rl.data: every error names the dataset, the row and the field."""

from __future__ import annotations

import io
import json
import math
import re
import struct
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from PIL import Image

from vlm_rl.data import (
    DataError,
    completion_text,
    count_image_placeholders,
    load_image,
    load_jsonl,
    prompt_text,
    to_rgb,
    validate_dataset,
)

NAME = "train.jsonl"


def user_prompt(images: int = 1, text: str = "Describe the shape.") -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def answer(text: str) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def save_png(path: Path, color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def good_row(tmp_path: Path) -> dict[str, Any]:
    save_png(tmp_path / "good.png")
    return {"prompt": user_prompt(1), "images": ["good.png"], "answer": "red circle"}


def good_pair(tmp_path: Path) -> dict[str, Any]:
    return good_row(tmp_path) | {"chosen": answer("red circle"), "rejected": answer("blue square")}


# Each case builds (rows or Dataset, kind, extra validate_dataset kwargs) under tmp_path; the bad
# row is row 1 (row 0 is good) unless the problem is dataset-wide.
Case = Callable[[Path], tuple[Any, str, dict[str, Any]]]


def prompt_rows(bad: dict[str, Any]) -> Case:
    return lambda tmp: ([good_row(tmp), good_row(tmp) | bad], "prompt", {})


def pair_rows(bad: dict[str, Any]) -> Case:
    return lambda tmp: ([good_pair(tmp), good_pair(tmp) | bad], "preference", {})


def image_file_rows(write: Callable[[Path], str], **kwargs: Any) -> Case:
    def build(tmp: Path) -> tuple[Any, str, dict[str, Any]]:
        return [good_row(tmp), good_row(tmp) | {"images": [write(tmp)]}], "prompt", kwargs

    return build


def random_bytes_file(tmp: Path) -> str:
    (tmp / "random.png").write_bytes(np.random.default_rng(0).bytes(300))
    return "random.png"


def truncated_png(tmp: Path) -> str:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    data = buffer.getvalue()
    (tmp / "truncated.png").write_bytes(data[: len(data) // 2])
    return "truncated.png"


def bomb_png(width: int, height: int) -> Callable[[Path], str]:
    def write(tmp: Path) -> str:
        (tmp / "bomb.png").write_bytes(png_bytes_claiming(width, height))
        return "bomb.png"

    return write


def outside_file(tmp: Path) -> Path:
    return save_png(tmp.parent / f"{tmp.name}-outside" / "secret.png")


def symlink_out(tmp: Path) -> str:
    (tmp / "link.png").symlink_to(outside_file(tmp))
    return "link.png"


def empty_dataset(tmp: Path) -> tuple[Any, str, dict[str, Any]]:
    return datasets.Dataset.from_dict({"prompt": [], "images": []}), "prompt", {}


def no_prompt_column(tmp: Path) -> tuple[Any, str, dict[str, Any]]:
    return datasets.Dataset.from_dict({"question": ["what?"], "images": [[]]}), "prompt", {}


def no_images_column(tmp: Path) -> tuple[Any, str, dict[str, Any]]:
    return [{"prompt": user_prompt(1), "answer": "red"}], "prompt", {}


def corrupt_embedded_image(tmp: Path) -> tuple[Any, str, dict[str, Any]]:
    save_png(tmp / "a.png")
    dataset = datasets.Dataset.from_dict(
        {"prompt": [user_prompt(1)] * 2, "images": [[str(tmp / "a.png")], [str(tmp / "a.png")]]}
    ).cast_column("images", datasets.List(datasets.Image()))
    table = dataset.with_format("arrow")[:].to_pylist()
    table[1]["images"][0] = {"bytes": b"not an image at all", "path": "b.png"}
    features = dataset.features
    return datasets.Dataset.from_list(table, features=features), "prompt", {}


def row_field(row: int, field: str, name: str = NAME) -> str:
    return re.escape(f"dataset '{name}', row {row}, field '{field}'")


CORPUS: dict[str, tuple[Case, str]] = {
    "empty dataset": (empty_dataset, re.escape(f"dataset '{NAME}'") + ".*no rows"),
    "missing prompt column": (
        no_prompt_column,
        re.escape(f"dataset '{NAME}', field 'prompt'") + r".*missing.*columns \['question', 'images'\]",
    ),
    "prompt missing in one row": (
        lambda tmp: ([good_row(tmp), {"images": [], "answer": "x"}], "prompt", {}),
        row_field(1, "prompt") + ".*missing required column",
    ),
    "images column missing with placeholders": (
        no_images_column,
        row_field(0, "images") + ".*1 image placeholder.*no 'images' column",
    ),
    "prompt is an int": (prompt_rows({"prompt": 7}), row_field(1, "prompt") + ".*got int"),
    "message without role": (
        prompt_rows({"prompt": [{"content": "Describe the shape."}]}),
        row_field(1, "prompt[0]") + ".*no 'role'",
    ),
    "message without content": (
        prompt_rows({"prompt": [{"role": "user"}]}),
        row_field(1, "prompt[0]") + ".*no 'content'",
    ),
    "content item without type": (
        prompt_rows({"prompt": [{"role": "user", "content": [{"text": "hi"}]}], "images": []}),
        row_field(1, "prompt[0].content[0]") + ".*no 'type'",
    ),
    "unsupported content type": (
        prompt_rows({"prompt": [{"role": "user", "content": [{"type": "video"}]}], "images": []}),
        row_field(1, "prompt[0].content[0].type") + ".*'video'.*use 'text' or 'image'",
    ),
    "whitespace prompt text": (
        prompt_rows({"prompt": user_prompt(1, text="   ")}),
        row_field(1, "prompt") + ".*no text",
    ),
    "empty string prompt": (prompt_rows({"prompt": "", "images": []}), row_field(1, "prompt") + ".*empty"),
    "chosen identical to rejected": (
        pair_rows({"chosen": answer("red circle"), "rejected": answer(" red circle ")}),
        row_field(1, "rejected") + ".*identical to 'chosen'",
    ),
    "empty rejected": (pair_rows({"rejected": answer("")}), row_field(1, "rejected") + ".*no text"),
    "empty string chosen": (pair_rows({"chosen": "  "}), row_field(1, "chosen") + ".*empty"),
    "chosen wrong type": (pair_rows({"chosen": {"text": "red"}}), row_field(1, "chosen") + ".*got dict"),
    "chosen from the user": (
        pair_rows({"chosen": [{"role": "user", "content": "red"}]}),
        row_field(1, "chosen[0].role") + ".*must be 'assistant'",
    ),
    "margin NaN": (pair_rows({"margin": math.nan}), row_field(1, "margin") + ".*nan.*finite"),
    "margin not a number": (pair_rows({"margin": "high"}), row_field(1, "margin") + ".*must be a number"),
    "images not a list": (prompt_rows({"images": "good.png"}), row_field(1, "images") + ".*expected a list"),
    "placeholder count mismatch": (
        prompt_rows({"prompt": user_prompt(2)}),
        row_field(1, "images") + r".*1 image\(s\) but the prompt has 2",
    ),
    "image dict without path or bytes": (
        prompt_rows({"images": [{"path": None, "bytes": None}]}),
        row_field(1, "images[0]") + ".*neither 'bytes' nor 'path'",
    ),
    "missing image file": (
        image_file_rows(lambda tmp: "missing.png"),
        row_field(1, "images[0]") + ".*file not found: .*missing.png; check the path is relative to",
    ),
    "corrupt image file": (
        image_file_rows(random_bytes_file),
        row_field(1, "images[0]") + ".*not a readable image",
    ),
    "truncated png": (image_file_rows(truncated_png), row_field(1, "images[0]") + ".*corrupt or truncated"),
    "bomb header beyond PIL's limit": (
        image_file_rows(bomb_png(100_000, 100_000)),
        row_field(1, "images[0]") + ".*decompression-bomb limit",
    ),
    "bomb header between PIL's warning and error": (
        image_file_rows(bomb_png(10_000, 10_000)),
        row_field(1, "images[0]") + ".*decompression-bomb limit",
    ),
    "image above max_pixels": (
        image_file_rows(lambda tmp: str(save_png(tmp / "big.png", size=(20, 20))), max_pixels=399),
        row_field(1, "images[0]") + ".*20x20 = 400 pixels, more than max_pixels=399",
    ),
    "path escaping root": (
        image_file_rows(lambda tmp: f"../{outside_file(tmp).parent.name}/secret.png"),
        row_field(1, "images[0]") + ".*outside the dataset folder",
    ),
    "absolute path outside root": (
        image_file_rows(lambda tmp: str(outside_file(tmp))),
        row_field(1, "images[0]") + ".*outside the dataset folder",
    ),
    "symlink pointing outside root": (
        image_file_rows(symlink_out),
        row_field(1, "images[0]") + r".*through a symlink.*outside the dataset folder",
    ),
    "remote url refused": (
        image_file_rows(lambda tmp: "https://example.com/cat.png"),
        row_field(1, "images[0]") + ".*remote image.*allow_remote",
    ),
    "unsupported url scheme": (
        image_file_rows(lambda tmp: "s3://bucket/cat.png"),
        row_field(1, "images[0]") + ".*unsupported URL scheme",
    ),
    "corrupt embedded bytes in an Image feature": (
        corrupt_embedded_image,
        row_field(1, "images[0]") + r".*embedded image bytes \(b.png\) is not a readable image",
    ),
}


@pytest.mark.parametrize("case", CORPUS, ids=list(CORPUS))
def test_bad_input_names_dataset_row_and_field(case: str, tmp_path: Path) -> None:
    build, pattern = CORPUS[case]
    dataset, kind, kwargs = build(tmp_path)
    with pytest.raises(DataError, match=pattern):
        validate_dataset(dataset, kind=kind, name=NAME, root=tmp_path, **kwargs)


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 18


def test_valid_rows_pass_and_first_bad_row_wins(tmp_path: Path) -> None:
    rows = [good_pair(tmp_path), good_pair(tmp_path) | {"margin": 0.5}]
    validate_dataset(rows, kind="preference", name=NAME, root=tmp_path)
    rows += [good_pair(tmp_path) | {"margin": math.inf}, good_pair(tmp_path) | {"chosen": ""}]
    with pytest.raises(DataError, match=row_field(2, "margin")):
        validate_dataset(rows, kind="preference", name=NAME, root=tmp_path)


def test_check_images_false_skips_decoding_but_not_types(tmp_path: Path) -> None:
    rows = [{"prompt": user_prompt(1), "images": ["missing.png"]}]
    validate_dataset(rows, kind="prompt", name=NAME, root=tmp_path, check_images=False)
    rows = [{"prompt": user_prompt(1), "images": [42]}]
    with pytest.raises(DataError, match=row_field(0, "images[0]") + ".*type int"):
        validate_dataset(rows, kind="prompt", name=NAME, root=tmp_path, check_images=False)


def test_single_image_column_is_accepted(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png")
    rows = [{"prompt": user_prompt(1), "image": "a.png"}, {"prompt": "Say hi.", "image": None}]
    validate_dataset(rows, kind="prompt", name=NAME, root=tmp_path)
    with pytest.raises(DataError, match=row_field(0, "image") + ".*rename the column to 'images'"):
        validate_dataset([{"prompt": user_prompt(1), "image": ["a.png"]}], kind="prompt", name=NAME)


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "Say hi.", "images": []})
    path.write_text(f"{good}\n\n{{'prompt': 'single quotes'}}\n")
    with pytest.raises(DataError, match=re.escape(f"dataset '{path}', line 3: invalid JSON")):
        load_jsonl(path, kind="prompt")


def test_remote_image_fetched_only_when_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 0, 255)).save(buffer, "PNG")
    requested: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        requested.append(url)
        return io.BytesIO(buffer.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    url = "https://example.com/blue.png"
    with pytest.raises(DataError, match="allow_remote"):
        load_image(url)
    assert requested == []
    image = load_image(url, allow_remote=True)
    assert requested == [url]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (0, 0, 255)


def test_load_image_accepts_pil_path_and_dict(tmp_path: Path) -> None:
    path = save_png(tmp_path / "sub" / "green.png", color=(0, 255, 0))
    refs = [Image.open(path), "sub/green.png", path, {"path": "sub/green.png", "bytes": None}]
    refs.append({"path": "ignored.png", "bytes": path.read_bytes()})
    for ref in refs:
        image = load_image(ref, root=tmp_path)
        assert image.mode == "RGB" and image.size == (8, 8) and image.getpixel((3, 3)) == (0, 255, 0)


def test_error_message_starts_with_where(tmp_path: Path) -> None:
    with pytest.raises(DataError) as raised:
        load_image("nope.png", root=tmp_path, where="dataset 'x', row 7, field 'images[0]'")
    message = str(raised.value)
    assert message.startswith("dataset 'x', row 7, field 'images[0]': file not found: ")
    assert f"check the path is relative to the dataset folder {tmp_path.resolve()}" in message


def single_pixel(mode: str, value: Any) -> Image.Image:
    image = Image.new(mode, (2, 1))
    image.putpixel((0, 0), value)
    return image


def palette_image(transparent_index: int | None) -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def i16_image() -> Image.Image:
    image = Image.new("I;16", (2, 1))
    image.putpixel((0, 0), 65535)
    image.putpixel((1, 0), 32896)
    return image


def float_image(values: tuple[float, float]) -> Image.Image:
    image = Image.new("F", (2, 1))
    image.putpixel((0, 0), values[0])
    image.putpixel((1, 0), values[1])
    return image


# mode -> (image, expected RGB of pixel (0, 0), expected RGB of pixel (1, 0))
RGB_CASES: dict[str, tuple[Callable[[], Image.Image], tuple[int, ...], tuple[int, ...]]] = {
    "L": (lambda: single_pixel("L", 200), (200, 200, 200), (0, 0, 0)),
    "LA transparent": (lambda: single_pixel("LA", (0, 0)), (255, 255, 255), (255, 255, 255)),
    "LA opaque": (lambda: single_pixel("LA", (50, 255)), (50, 50, 50), (255, 255, 255)),
    "P": (lambda: palette_image(None), (255, 0, 0), (0, 0, 255)),
    "P with transparency": (lambda: palette_image(0), (255, 255, 255), (0, 0, 255)),
    "RGBA transparent": (lambda: single_pixel("RGBA", (10, 20, 30, 0)), (255, 255, 255), (255, 255, 255)),
    "RGBA half": (lambda: single_pixel("RGBA", (0, 0, 0, 128)), (127, 127, 127), (255, 255, 255)),
    "RGBA opaque": (lambda: single_pixel("RGBA", (10, 20, 30, 255)), (10, 20, 30), (255, 255, 255)),
    "CMYK": (lambda: single_pixel("CMYK", (0, 255, 255, 0)), (255, 0, 0), (255, 255, 255)),
    "I;16": (i16_image, (255, 255, 255), (128, 128, 128)),
    "I 16-bit range": (lambda: single_pixel("I", 65535), (255, 255, 255), (0, 0, 0)),
    "I 8-bit range": (lambda: single_pixel("I", 100), (100, 100, 100), (0, 0, 0)),
    "F unit range": (lambda: float_image((1.0, 0.5)), (255, 255, 255), (127, 127, 127)),
    "1": (lambda: single_pixel("1", 1), (255, 255, 255), (0, 0, 0)),
}


@pytest.mark.parametrize("case", RGB_CASES, ids=list(RGB_CASES))
def test_to_rgb(case: str) -> None:
    make, first, second = RGB_CASES[case]
    source = make()
    converted = to_rgb(source)
    assert converted.mode == "RGB" and converted.size == source.size
    for actual, expected in ((converted.getpixel((0, 0)), first), (converted.getpixel((1, 0)), second)):
        assert all(abs(a - e) <= 1 for a, e in zip(actual, expected, strict=True)), (actual, expected)


def test_to_rgb_returns_a_copy() -> None:
    source = Image.new("RGB", (2, 2), (1, 2, 3))
    converted = to_rgb(source)
    converted.putpixel((0, 0), (9, 9, 9))
    assert source.getpixel((0, 0)) == (1, 2, 3)


def test_text_helpers() -> None:
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Shape?"}]},
    ]
    assert prompt_text(prompt) == "Be brief.\nShape?"
    assert prompt_text("plain") == "plain"
    assert count_image_placeholders(prompt) == 1
    assert count_image_placeholders(user_prompt(3)) == 3
    assert count_image_placeholders("<image> plain") == 0
    assert completion_text(answer("red circle")) == "red circle"
    assert completion_text("blue") == "blue"
