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
    completion_token_type: int = 0
    """Value of `token_type_ids` for completion tokens appended to a prompt: 0, text (Gemma3 marks
    image tokens 1); PaliGemma: 1, its causal suffix (0 is the bidirectional prefix)."""
    extra_vocab: tuple[str, ...] = field(default_factory=tuple)
    """Plain words the chat template writes (roles, system prompt), for tiny word-level vocabularies."""


LLAVA_CHAT_TOKENS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "</s>", "<s>", "<pad>", "<unk>")
"""Tokens of the llava_next chat template (and of Llama's tokenizer) that tiny LLaVA-style builds use."""
QWEN_VL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|image_pad|>",
    "<|vision_end|>",
    "<|video_pad|>",
    "<|endoftext|>",
    "<unk>",
)

FAMILIES: dict[str, FamilyFacts] = {
    "llava": FamilyFacts(
        model_type="llava",
        chat_template="llava_next",
        image_token="<image>",
        special_tokens=("<image>", *LLAVA_CHAT_TOKENS),
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
        special_tokens=QWEN_VL_TOKENS,
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
    "llava_onevision": FamilyFacts(
        model_type="llava_onevision",
        chat_template="llava_next",
        image_token="<image>",
        special_tokens=("<image>", "<video>", *LLAVA_CHAT_TOKENS),
        eos_token="</s>",
        vision_modules=("vision_tower",),
        projector_modules=("multi_modal_projector",),
        # Anyres: every tile of every image is one row of the tower's batch (`image_sizes` is read
        # by the model, not by the tower), so identical images give identical rows.
        image_encoder="vision_tower",
        shared_prefill=True,
        shared_prefix=True,
        image_only_processor=True,
    ),
    "qwen2_vl": FamilyFacts(
        model_type="qwen2_vl",
        chat_template="qwen2_5_vl",  # Qwen2-VL's template: Qwen2.5-VL kept it
        image_token="<|image_pad|>",
        special_tokens=QWEN_VL_TOKENS,
        eos_token="<|im_end|>",
        vision_modules=("visual.blocks", "visual.patch_embed"),
        projector_modules=("visual.merger",),
        image_encoder="visual",  # flattened patches split by `grid_thw`, as Qwen2.5-VL
        shared_prefill=True,
        prefill_state=("model.rope_deltas",),
        shared_prefix=True,
        position_ids_method="model.get_rope_index",
        image_only_processor=True,
        extra_vocab=("system", "user", "assistant", "you", "are", "a", "helpful", "."),
    ),
    "qwen3_vl": FamilyFacts(
        model_type="qwen3_vl",
        chat_template="qwen3_vl",
        image_token="<|image_pad|>",
        special_tokens=QWEN_VL_TOKENS,
        eos_token="<|im_end|>",
        vision_modules=("visual.blocks", "visual.patch_embed", "visual.pos_embed"),
        projector_modules=("visual.merger", "visual.deepstack_merger_list"),
        # Its output holds the merged tokens and the DeepStack features, each split per image like
        # the patches: gathered per image as well.
        image_encoder="visual",
        shared_prefill=True,
        prefill_state=("model.rope_deltas",),
        shared_prefix=True,
        position_ids_method="model.get_rope_index",
        image_only_processor=True,
        extra_vocab=("user", "assistant"),
    ),
    "gemma3": FamilyFacts(
        model_type="gemma3",
        chat_template="gemma3",
        image_token="<image_soft_token>",  # the template writes <start_of_image>; the processor expands it
        special_tokens=(
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ),
        eos_token="<end_of_turn>",
        vision_modules=("vision_tower",),
        projector_modules=("multi_modal_projector",),
        image_encoder="vision_tower",
        # Image tokens attend to each other bidirectionally (`token_type_ids`), text causally: a
        # prompt's head (all but its last, non-image token) has the same cache either way.
        shared_prefill=True,
        shared_prefix=True,  # completions are text: causal over the prompt's cache
        extra_vocab=("user", "model"),
    ),
    "paligemma": FamilyFacts(
        model_type="paligemma",
        chat_template="paligemma",  # none upstream: vlm_rl's (see PALIGEMMA_TEMPLATE)
        image_token="<image>",
        special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<image>"),
        eos_token="<eos>",
        vision_modules=("vision_tower",),
        projector_modules=("multi_modal_projector",),
        image_encoder="vision_tower",
        # Prefix-LM: image and prompt attend to each other bidirectionally, so every prompt token's
        # cache depends on the prompt's last token; a prefill of all but that token differs.
        shared_prefill=False,
        # Scoring on the prompt's cache would be exact in attention (the answer is the causal
        # suffix) but PaliGemma's positions are 1-based, which the shared-prefix pass does not know.
        shared_prefix=False,
        completion_token_type=1,
    ),
}

PALIGEMMA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
)
"""PaliGemma has no chat template (`load_processor` gives a checkpoint without one its row's): its
prompts are plain text after the images. This one writes each image item as `<image>` and each text
item as it is, roles dropped; the processor adds BOS after the last image and a newline after the
text, the separator PaliGemma was trained with before its answer."""
_OWN_TEMPLATES = {"paligemma": PALIGEMMA_TEMPLATE}


def family_of(model_type: str) -> FamilyFacts | None:
    """Facts for a `config.model_type`, or None for a family without a row (loaded generically)."""
    return FAMILIES.get(model_type)


def completion_token_type(model) -> int:
    """`FamilyFacts.completion_token_type` of a (possibly LoRA-wrapped) model; 0 for a family without a row."""
    family = family_of(getattr(model.config, "model_type", ""))
    return family.completion_token_type if family else 0


def chat_template(name: str) -> str:
    """The text of one of TRL's shipped chat templates (or of vlm_rl's own, for PaliGemma)."""
    if name in _OWN_TEMPLATES:
        return _OWN_TEMPLATES[name]
    return resources.files("trl").joinpath("chat_templates", f"{name}.jinja").read_text()
