"""Models: load a VLM + processor, wrap it with LoRA, the offline tiny defaults, and sampling
without repeated work (each distinct image encoded once per call, each prompt prefilled once)."""

from vlm_rl.models.families import FAMILIES, FAMILY_TABLE, FamilyFacts, family_of, model_family
from vlm_rl.models.image_encoding import ImageEncodingStats, image_encoder, share_image_encoding
from vlm_rl.models.loading import (
    hidden_size,
    language_model_linear_names,
    load_model,
    load_policy,
    load_processor,
    resolve_model_path,
    vlm_trunk,
    wrap_with_lora,
)
from vlm_rl.models.processors import ImageOnlyQwen2_5_VLProcessor
from vlm_rl.models.tiny import TINY_MODELS, build_tiny, build_vlm, ensure_tiny

__all__ = [
    "FAMILIES",
    "FAMILY_TABLE",
    "FamilyFacts",
    "ImageEncodingStats",
    "ImageOnlyQwen2_5_VLProcessor",
    "TINY_MODELS",
    "build_tiny",
    "build_vlm",
    "ensure_tiny",
    "family_of",
    "hidden_size",
    "image_encoder",
    "language_model_linear_names",
    "load_model",
    "load_policy",
    "load_processor",
    "model_family",
    "resolve_model_path",
    "share_image_encoding",
    "vlm_trunk",
    "wrap_with_lora",
]
