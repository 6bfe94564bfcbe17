"""Processor workarounds: stock processors that need optional packages, rebuilt without them."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from transformers import ProcessorMixin
from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor

# The stock processors whose video sub-processor needs torchvision, by `config.model_type`.
_STOCK_PROCESSORS = {
    "qwen2_vl": ("transformers.models.qwen2_vl", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("transformers.models.qwen3_vl", "Qwen3VLProcessor"),
    "llava_onevision": ("transformers.models.llava_onevision", "LlavaOnevisionProcessor"),
}


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
def image_only_processor_class(model_type: str) -> type[ProcessorMixin]:
    """The stock processor of `model_type` (a key of `_STOCK_PROCESSORS`) minus its video
    sub-processor: for machines without torchvision, which that sub-processor needs."""
    import importlib

    module, name = _STOCK_PROCESSORS[model_type]
    stock = getattr(importlib.import_module(module), name)
    return type(f"ImageOnly{name}", (_ImageOnly, stock), {"__doc__": _ImageOnly.__doc__})


def load_image_only_processor(model_type: str, path: str | Path) -> ProcessorMixin:
    """The image-only processor of a saved checkpoint (PIL image backend: no torchvision)."""
    return image_only_processor_class(model_type).from_pretrained(str(path), backend="pil")


ImageOnlyQwen2_5_VLProcessor: type[Qwen2_5_VLProcessor] = image_only_processor_class("qwen2_5_vl")
"""Qwen2.5-VL processor without its video sub-processor (the stock one needs torchvision)."""
