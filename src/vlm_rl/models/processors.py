"""Processor workarounds: stock processors that need optional packages, rebuilt without them."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from transformers import ProcessorMixin
from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor

from vlm_rl.models.families import FAMILIES


class _ImageOnly:
    """Mixin: the stock processor without its video sub-processor (images handled identically)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        # ProcessorMixin builds, checks, saves and loads exactly these sub-processors.
        return ["image_processor", "tokenizer"]

    def to_dict(self) -> dict:
        # Saved as the stock class, so machines with torchvision load the stock processor.
        stock = type(self).__mro__[2].__name__
        return {**super().to_dict(), "processor_class": stock}


@cache
def image_only_processor_class(stock_class: str) -> type[ProcessorMixin]:
    """The stock processor class `stock_class` ("module.Class": a row's
    `FamilyFacts.image_only_processor`) minus its video sub-processor: for machines without
    torchvision, which that sub-processor needs."""
    import importlib

    module, name = stock_class.rsplit(".", 1)
    stock = getattr(importlib.import_module(module), name)
    return type(f"ImageOnly{name}", (_ImageOnly, stock), {"__doc__": _ImageOnly.__doc__})


def load_image_only_processor(stock_class: str, path: str | Path) -> ProcessorMixin:
    """The image-only copy of `stock_class` loaded from a saved checkpoint (PIL image backend: no
    torchvision)."""
    return image_only_processor_class(stock_class).from_pretrained(str(path), backend="pil")


ImageOnlyQwen2_5_VLProcessor: type[Qwen2_5_VLProcessor] = image_only_processor_class(
    FAMILIES["qwen2_5_vl"].image_only_processor
)
"""Qwen2.5-VL processor without its video sub-processor (the stock one needs torchvision)."""
