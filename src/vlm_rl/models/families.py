"""Per-family facts: the one place where VLM families differ.

Nothing outside `vlm_rl.models` branches on a model family. Each row says which special tokens a
family's prompts use, which chat template it speaks (TRL ships them as files), where its
vision/projector modules live, and which processor quirk applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources


@dataclass(frozen=True)
class FamilyFacts:
    model_type: str
    """`config.model_type` of the full VLM (e.g. "llava")."""
    chat_template: str
    """Name of the TRL chat template file (trl/chat_templates/<name>.jinja)."""
    image_token: str
    """Placeholder token the processor expands into the image's visual tokens."""
    special_tokens: tuple[str, ...]
    """Tokens the chat template or processor emit verbatim (built into tiny tokenizers)."""
    eos_token: str
    """Token that ends an assistant turn."""
    vision_modules: tuple[str, ...]
    """Module-name fragments of the vision tower (frozen by default)."""
    projector_modules: tuple[str, ...]
    """Module-name fragments of the vision-to-text projector (frozen unless asked)."""
    image_only_processor: bool = False
    """True when the stock processor needs torchvision for its video sub-processor: without
    torchvision an image-only processor is built instead (see `models.loading`)."""
    extra_vocab: tuple[str, ...] = field(default_factory=tuple)
    """Plain words the chat template writes (roles, system prompt), for tiny word-level vocabularies."""


FAMILIES: dict[str, FamilyFacts] = {
    "llava": FamilyFacts(
        model_type="llava",
        chat_template="llava_next",
        image_token="<image>",
        special_tokens=(
            "<image>",
            "[INST]",
            "[/INST]",
            "<<SYS>>",
            "<</SYS>>",
            "</s>",
            "<s>",
            "<pad>",
            "<unk>",
        ),
        eos_token="</s>",
        vision_modules=("vision_tower",),
        projector_modules=("multi_modal_projector",),
    ),
    "qwen2_5_vl": FamilyFacts(
        model_type="qwen2_5_vl",
        chat_template="qwen2_5_vl",
        image_token="<|image_pad|>",
        special_tokens=(
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|image_pad|>",
            "<|vision_end|>",
            "<|video_pad|>",
            "<|endoftext|>",
            "<unk>",
        ),
        eos_token="<|im_end|>",
        vision_modules=("visual.blocks", "visual.patch_embed"),
        projector_modules=("visual.merger",),
        image_only_processor=True,
        extra_vocab=("system", "user", "assistant", "you", "are", "a", "helpful", "."),
    ),
    "idefics3": FamilyFacts(
        model_type="idefics3",
        chat_template="idefics3",
        image_token="<image>",
        special_tokens=(
            "<|begin_of_text|>",
            "<end_of_utterance>",
            "<image>",
            "<fake_token_around_image>",
            "<global-img>",
            "<pad>",
            "<unk>",
        ),
        eos_token="<end_of_utterance>",
        vision_modules=("vision_model",),
        projector_modules=("connector",),
        extra_vocab=("user", "assistant", ":"),
    ),
}


def family_of(model_type: str) -> FamilyFacts | None:
    """Facts for a `config.model_type`, or None for a family without a row (loaded generically)."""
    return FAMILIES.get(model_type)


def chat_template(name: str) -> str:
    """The text of one of TRL's shipped chat templates."""
    return resources.files("trl").joinpath("chat_templates", f"{name}.jinja").read_text()
