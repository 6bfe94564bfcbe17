"""Shared test set-up: offline, one CPU thread, tiny models built once per test session.

The hub variables are set at import, before any test module imports huggingface_hub (which reads
them once). `VLM_RL_CACHE` points at a per-session temporary folder, so `load_model("tiny-llava")`
builds each tiny model at most once per session and never touches the user's cache.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# One thread: on the shared 2-core machines a second thread contends with other processes (these
# tests took 60 s with 2 threads against 26 s with 1 under load); on an idle machine it costs little.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def vlm_rl_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's `VLM_RL_CACHE` folder (where `ensure_tiny` writes tiny models)."""
    previous = os.environ.get("VLM_RL_CACHE")
    path = tmp_path_factory.mktemp("vlm_rl_cache")
    os.environ["VLM_RL_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("VLM_RL_CACHE", None)
    else:
        os.environ["VLM_RL_CACHE"] = previous


@pytest.fixture(scope="session")
def learning_seed() -> int:
    """The seed of the learning tests (`-m learning`): 0, or VLM_RL_LEARNING_SEED. CI runs seed 0;
    `VLM_RL_LEARNING_SEED=1 make test` (and 2) checks that what they assert is not one lucky seed."""
    return int(os.environ.get("VLM_RL_LEARNING_SEED", "0"))


@pytest.fixture(scope="session")
def _tiny_builds() -> dict[tuple[str, int], tuple]:
    return {}


@pytest.fixture
def tiny_model(_tiny_builds: dict[tuple[str, int], tuple]) -> Callable[..., tuple]:
    """`tiny_model(name, seed=0) -> (model, processor)`: a tiny VLM built in memory (`build_tiny`).

    Each name is built once per session; every call returns fresh deep copies, so a test may train,
    wrap or otherwise change what it gets without affecting other tests.
    """
    from vlm_rl.models import build_tiny

    def make(name: str, seed: int = 0) -> tuple:
        if (name, seed) not in _tiny_builds:
            _tiny_builds[name, seed] = build_tiny(name, seed)
        return copy.deepcopy(_tiny_builds[name, seed])

    return make


@pytest.fixture(scope="session")
def _easy_vqa_images() -> tuple[Image.Image, ...]:
    from vlm_rl.tasks.easy_vqa import crop_to_shape, image_labels

    images, captions = [], set()
    for label in image_labels("train"):
        if label.color and label.shape and label.caption not in captions:
            captions.add(label.caption)
            with Image.open(label.path) as image:
                images.append(crop_to_shape(image))
        if len(images) == 4:
            return tuple(images)
    raise AssertionError("easy-vqa's train split has fewer than 4 distinct captions")


@pytest.fixture
def easy_vqa_images(_easy_vqa_images: tuple[Image.Image, ...]) -> list[Image.Image]:
    """Four real easy-vqa train images with four different captions, cropped to 32x32 RGB as the
    default tasks load them (copies: a test may change them)."""
    return [image.copy() for image in _easy_vqa_images]
