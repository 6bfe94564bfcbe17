"""easy-vqa derived tasks: splits, determinism, labels checked against pixels, preference pairs, crops."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlm_rl.tasks.easy_vqa import (
    CAPTION_PROMPT,
    COLORS,
    SHAPES,
    caption_dataset,
    caption_preference_dataset,
    crop_to_shape,
    half_right_caption,
    image_labels,
    load_dataset,
    vqa_dataset,
    wrong_caption,
)

# easy-vqa draws each shape in one flat colour; measured on its images (the centre of every crop).
REFERENCE_RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "yellow": (255, 255, 0),
    "brown": (165, 42, 42),
}
# Fraction of a shape's bounding box it fills, measured on the 32x32 crops: a rectangle fills it,
# a circle ~pi/4 (0.76-0.86 after resizing), a triangle about half (0.53-0.65).
REFERENCE_FILL = {"rectangle": 1.0, "circle": 0.81, "triangle": 0.57}


def nearest(value: float | np.ndarray, references: dict) -> str:
    names = list(references)
    distances = [np.sum((np.asarray(references[n], dtype=float) - value) ** 2) for n in names]
    return names[int(np.argmin(distances))]


def background_mask(pixels: np.ndarray, threshold: int = 60) -> np.ndarray:
    """True where a pixel differs from the median border colour (the background)."""
    pixels = pixels.astype(np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.abs(pixels - np.median(border, axis=0)).max(axis=-1) > threshold


def centre_colour(image: Image.Image) -> str:
    pixels = np.asarray(image.convert("RGB"), dtype=float)
    h, w, _ = pixels.shape
    centre = pixels[h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4].reshape(-1, 3)
    return nearest(np.median(centre, axis=0), REFERENCE_RGB)


def shape_by_fill(image: Image.Image) -> str:
    mask = background_mask(np.asarray(image.convert("RGB")))
    rows, cols = np.nonzero(mask)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    return nearest(mask.sum() / box_area, REFERENCE_FILL)


def pixel_hash(image: Image.Image) -> str:
    return hashlib.md5(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def file_pixel_hash(path: str) -> str:
    with Image.open(path) as image:
        return pixel_hash(image)


def cropped(path: str) -> Image.Image:
    with Image.open(path) as image:
        return crop_to_shape(image)


def test_train_and_test_are_different_images() -> None:
    train, test = image_labels("train"), image_labels("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert not {lab.path for lab in train} & {lab.path for lab in test}
    # Different files could still hold the same picture: compare the pixels of every image.
    assert not {file_pixel_hash(lab.path) for lab in train} & {file_pixel_hash(lab.path) for lab in test}

    # Image ids restart at 0 in each split, so a test row must carry the test file's pixels.
    test_paths = {lab.image_id: lab.path for lab in test}
    train_paths = {lab.image_id: lab.path for lab in train}
    rows = caption_dataset("test", num_samples=8, seed=0)
    for row in rows:
        image = row["images"][0]
        assert pixel_hash(image) == pixel_hash(cropped(test_paths[row["image_id"]]))
        assert pixel_hash(image) != pixel_hash(cropped(train_paths[row["image_id"]]))


def test_most_images_get_both_labels() -> None:
    for split in ("train", "test"):
        labels = image_labels(split)
        both = [lab for lab in labels if lab.color and lab.shape]
        assert len(both) >= 0.8 * len(labels)
        assert {lab.color for lab in both} == set(COLORS)
        assert {lab.shape for lab in both} == set(SHAPES)


def _rows(dataset) -> list[tuple]:
    """Everything but the prompt (identical in every caption row), images by pixel hash."""
    return [
        tuple(pixel_hash(v[0]) if k == "images" else v for k, v in row.items() if k != "prompt")
        for row in dataset
    ]


@pytest.mark.parametrize("task", ["caption", "caption_preference", "vqa"])
def test_deterministic_given_seed_and_sized(task: str) -> None:
    first = load_dataset(task, "train", num_samples=12, seed=0)
    again = load_dataset(task, "train", num_samples=12, seed=0)
    other = load_dataset(task, "train", num_samples=12, seed=1)
    assert len(first) == len(again) == len(other) == 12
    assert _rows(first) == _rows(again)
    assert first["prompt"] == again["prompt"]
    assert first["image_id"] != other["image_id"]
    assert len(load_dataset(task, "test", num_samples=5, seed=0)) == 5


def test_caption_rows_are_distinct_images_with_the_default_prompt() -> None:
    rows = caption_dataset("train", num_samples=30, seed=3)
    assert len(set(rows["image_id"])) == 30
    for row in rows:
        assert row["prompt"] == [
            {
                "role": "user",
                "content": [{"type": "image", "text": None}, {"type": "text", "text": CAPTION_PROMPT}],
            }
        ]
        assert row["answer"] == f"{row['color']} {row['shape']}"
        assert len(row["images"]) == 1
        assert row["images"][0].size == (32, 32)


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_match_the_pixels(split: str) -> None:
    rows = caption_dataset(split, num_samples=50, seed=7)
    images = [row["images"][0] for row in rows]
    colour_hits = [centre_colour(img) == c for img, c in zip(images, rows["color"], strict=True)]
    shape_hits = [shape_by_fill(img) == s for img, s in zip(images, rows["shape"], strict=True)]
    # Tiny shapes blur when upscaled, so a few centres may sit nearer a neighbouring colour.
    assert sum(colour_hits) >= 45, [c for c, hit in zip(rows["answer"], colour_hits, strict=True) if not hit]
    assert sum(shape_hits) >= 45, [c for c, hit in zip(rows["answer"], shape_hits, strict=True) if not hit]
    assert len(set(rows["color"])) >= 5 and len(set(rows["shape"])) == 3


def _corruption(chosen: str, rejected: str) -> str:
    (color, shape), (bad_color, bad_shape) = chosen.split(), rejected.split()
    return {(True, False): "color", (False, True): "shape", (True, True): "both"}[
        (color != bad_color, shape != bad_shape)
    ]


def test_preference_pairs_differ_in_every_way() -> None:
    rows = caption_preference_dataset("train", num_samples=150, seed=0)
    truth = {lab.image_id: lab.caption for lab in image_labels("train")}
    kinds = Counter()
    for row in rows:
        assert row["chosen"] == truth[row["image_id"]]
        assert row["rejected"] != row["chosen"]
        color, shape = row["rejected"].split()
        assert color in COLORS and shape in SHAPES
        kinds[_corruption(row["chosen"], row["rejected"])] += 1
    # The kind is drawn uniformly: about 50 of each.
    assert set(kinds) == {"color", "shape", "both"}
    assert min(kinds.values()) >= 25, kinds


def test_preference_pairs_per_image() -> None:
    rows = caption_preference_dataset("train", num_samples=10, seed=0, pairs_per_image=3)
    assert len(rows) == 30
    assert len(set(rows["image_id"])) == 10
    for start in range(0, 30, 3):
        group = rows[start : start + 3]
        assert len(set(group["image_id"])) == 1 and len(set(group["chosen"])) == 1
        assert len({pixel_hash(images[0]) for images in group["images"]}) == 1
        assert all(r != group["chosen"][0] for r in group["rejected"])


def test_graded_pairs_prefer_one_right_word_to_none() -> None:
    rows = caption_preference_dataset("train", num_samples=200, seed=0, graded_fraction=0.5)
    truth = {lab.image_id: lab for lab in image_labels("train")}
    graded = 0
    for row in rows:
        label = truth[row["image_id"]]
        if row["chosen"] == label.caption:
            continue
        graded += 1
        color, shape = row["chosen"].split()
        assert (color == label.color) != (shape == label.shape), row["chosen"]
        rejected = row["rejected"].split()
        assert label.color not in rejected and label.shape not in rejected, row["rejected"]
    assert 60 <= graded <= 140, graded  # about half of 200
    assert half_right_caption("red", "circle", random.Random(0)) != "red circle"


def test_wrong_caption_is_wrong_and_seeded() -> None:
    draws = [wrong_caption("red", "circle", random.Random(seed)) for seed in range(300)]
    assert "red circle" not in draws
    assert {_corruption("red circle", d) for d in draws} == {"color", "shape", "both"}
    assert [wrong_caption("red", "circle", random.Random(seed)) for seed in range(300)] == draws


@pytest.mark.parametrize(
    ("question_types", "answers"),
    [
        (("color", "shape"), set(COLORS) | set(SHAPES)),
        (("color",), set(COLORS)),
        (("yes_no",), {"yes", "no"}),
        (("color", "shape", "yes_no"), set(COLORS) | set(SHAPES) | {"yes", "no"}),
    ],
)
def test_vqa_question_types(question_types: tuple[str, ...], answers: set[str]) -> None:
    rows = vqa_dataset("train", num_samples=200, seed=0, question_types=question_types)
    assert len(rows) == 200
    assert set(rows["answer"]) <= answers
    assert set(rows["question_type"]) == set(question_types)  # every asked kind occurs
    for row in rows:
        assert len(row["answer"].split()) == 1
        kind = "color" if row["answer"] in COLORS else "shape" if row["answer"] in SHAPES else "yes_no"
        assert row["question_type"] == kind
        content = row["prompt"][0]["content"]
        assert content[0]["type"] == "image" and content[1]["text"].endswith("?")


def test_vqa_rows_pair_question_and_image() -> None:
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    asked = set(zip(questions, answers, image_ids, strict=True))
    paths = {lab.image_id: lab.path for lab in image_labels("test")}
    rows = vqa_dataset("test", num_samples=20, seed=0, crop=False)
    for row in rows:
        assert (row["prompt"][0]["content"][1]["text"], row["answer"], row["image_id"]) in asked
        assert pixel_hash(row["images"][0]) == file_pixel_hash(paths[row["image_id"]])
        assert row["images"][0].size == (64, 64)


def test_unknown_task_or_split_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'ocr'.*caption.*caption_preference.*vqa"):
        load_dataset("ocr")
    with pytest.raises(ValueError, match="'val'"):
        caption_dataset("val")


def test_crop_fills_the_frame_with_the_shape() -> None:
    labels = [lab for lab in image_labels("train") if lab.shape][:40]
    full_fractions, crop_fractions = [], []
    for lab in labels:
        with Image.open(lab.path) as image:
            original = image.convert("RGB")
        crop = crop_to_shape(original)
        assert crop.size == (32, 32) and crop.mode == "RGB"
        full_fraction = background_mask(np.asarray(original), threshold=40).mean()
        crop_fraction = background_mask(np.asarray(crop), threshold=40).mean()
        assert crop_fraction >= 2 * full_fraction, lab
        full_fractions.append(full_fraction)
        crop_fractions.append(crop_fraction)
    assert np.median(full_fractions) < 0.15
    assert np.median(crop_fractions) > 0.4


def test_crop_of_a_drawn_square() -> None:
    image = Image.new("RGB", (64, 64), (250, 240, 230))
    image.paste((255, 0, 0), (20, 20, 30, 30))  # a 10x10 square at columns/rows 20..29
    crop = np.asarray(crop_to_shape(image, size=32, margin=3))
    # Box 17..32 (16 px, 3 px margin each side) scaled by 2: the square covers pixels 6..25.
    assert crop.shape == (32, 32, 3)
    assert (crop[8:24, 8:24] == (255, 0, 0)).all()
    assert (crop[:4] == (250, 240, 230)).all() and (crop[:, -4:] == (250, 240, 230)).all()


def test_crop_of_a_blank_or_non_rgb_image() -> None:
    blank = crop_to_shape(Image.new("L", (64, 64), 200))
    assert blank.size == (32, 32) and blank.mode == "RGB"
    assert (np.asarray(blank) == 200).all()
    rgba = Image.new("RGBA", (40, 40), (255, 255, 255, 255))
    rgba.paste((0, 0, 255, 255), (10, 10, 20, 20))
    crop = crop_to_shape(rgba, size=16)
    assert crop.size == (16, 16) and crop.mode == "RGB"
    assert tuple(np.asarray(crop)[8, 8]) == (0, 0, 255)
