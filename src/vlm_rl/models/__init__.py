"""Models: load a VLM + processor, wrap it with LoRA, and the offline tiny defaults."""

from vlm_rl.models.families import FAMILIES, FamilyFacts, family_of
from vlm_rl.models.loading import (
    ImageOnlyQwen2_5_VLProcessor,
    hidden_size,
    language_model_linear_names,
    load_model,
    load_processor,
    resolve_model_path,
    vlm_trunk,
    wrap_with_lora,
)
from vlm_rl.models.tiny import TINY_MODELS, build_tiny, ensure_tiny

__all__ = [
    "FAMILIES",
    "FamilyFacts",
    "ImageOnlyQwen2_5_VLProcessor",
    "TINY_MODELS",
    "build_tiny",
    "ensure_tiny",
    "family_of",
    "hidden_size",
    "language_model_linear_names",
    "load_model",
    "load_processor",
    "resolve_model_path",
    "vlm_trunk",
    "wrap_with_lora",
]
