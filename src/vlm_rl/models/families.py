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
    image_encoder: str | None = None
    """Name of the module that takes pixel values and returns per-image features, which
    `share_image_encoding` runs once per distinct image of a call; None: never shared. Only for a
    module that encodes each image independently of the others in its batch."""
    shared_prefill: bool = False
    """True when sampling may prefill each prompt once and repeat its KV cache for the prompt's
    samples (`models.prefill`); set only where tests show the same tokens as a prefill per sample."""
    prefill_state: tuple[str, ...] = ()
    """Attributes of the base model holding per-row state that the prefill computes and decoding
    reads (Qwen2.5-VL's 3-D RoPE offsets); repeated for the samples along with the KV cache."""
    shared_prefix: bool = False
    """True when the scoring and update passes may forward each prompt once and run its samples'
    completions on its KV cache (`models.shared_prefix`); set only where tests show the same
    log-probs and gradients as a forward per sample. False: a forward per sample."""
    position_ids_method: str | None = None
    """Method of the base model that computes a full sequence's position ids from its text inputs
    and image grids (Qwen2.5-VL's 3-D RoPE index); the shared-prefix pass takes the completion's
    positions from it. None: the completion's positions continue the prompt's."""
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
        # CLIP/SigLIP towers, one row per image. Pixtral towers (given `image_sizes`, output one
        # packed sequence) are recognised by that argument and left unshared.
        image_encoder="vision_tower",
        shared_prefill=True,
        shared_prefix=True,
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
        # Patches of all images flattened, split per image by `grid_thw`; includes the merger, so a
        # trained projector's gradient is summed over the copies of an image.
        image_encoder="visual",
        shared_prefill=True,
        prefill_state=("model.rope_deltas",),
        shared_prefix=True,
        position_ids_method="model.get_rope_index",
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
        # Called with the real (sub-)images, one row each, and their `patch_attention_mask`.
        image_encoder="vision_model",
        shared_prefill=True,
        shared_prefix=True,
        extra_vocab=("user", "assistant", ":"),
    ),
}


def family_of(model_type: str) -> FamilyFacts | None:
    """Facts for a `config.model_type`, or None for a family without a row (loaded generically)."""
    return FAMILIES.get(model_type)


def chat_template(name: str) -> str:
    """The text of one of TRL's shipped chat templates."""
    return resources.files("trl").joinpath("chat_templates", f"{name}.jinja").read_text()
