"""Per-family facts: the one table where VLM families differ (`FAMILY_TABLE`, one row a family).

Nothing else branches on a model family. Each row says which architecture class the family is, which
special tokens its prompts use, which chat template it speaks (TRL ships them as files), where its
vision/projector modules live, which processor quirks apply, which speed levers are exact for it
(image encoding once, shared prefill, shared prefix) and how its offline tiny model is built.

Adding a family is adding a row here and, for its tiny model, a builder in `models.tiny_builds`.
Code reads a row through `family_of(model_type)` or `model_family(model)`; a family without a row
(or with a `generic` one) is loaded, wrapped and sampled generically, without any lever.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from vlm_rl.models import tiny_builds
from vlm_rl.models.tiny_builds import IMAGE_SIZE, TEXT, VISION


@dataclass(frozen=True)
class TinyBuild:
    """How a family's offline tiny model is built (`vlm_rl.models.tiny`)."""

    name: str
    """The name that loads it: `--model_name_or_path tiny-llava` (optionally `@seedN`)."""
    builder: Callable[..., tuple[Any, Any]] = field(hash=False)
    """`builder(family, tokenizer, **sizes) -> (random model, processor)`, in `models.tiny_builds`."""
    sizes: Mapping[str, Any] | None = field(default=None, hash=False)
    """The builder's size arguments for the tiny model; `build_vlm(model_type, **sizes)` replaces
    them one by one (the benchmarks' bigger models of the same recipe). None: a fixed build that
    takes no sizes."""


@dataclass(frozen=True)
class FamilyFacts:
    model_type: str
    """`config.model_type` of the full VLM (e.g. "llava")."""
    architecture: str
    """The transformers class of the full VLM (what `AutoModelForImageTextToText` loads)."""
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
    image_only_processor: str | None = None
    """The stock processor class ("module.Class") when it needs torchvision for its video
    sub-processor: without torchvision an image-only copy of it is built instead
    (`models.processors`, `models.loading`). None: the stock processor needs no torchvision."""
    tokenizer_attributes: tuple[tuple[str, str], ...] = ()
    """(attribute, token) pairs the family's processor reads from the tokenizer (Gemma3's
    `tokenizer.boi_token`); tiny tokenizers are built with them."""
    completion_token_type: int = 0
    """Value of `token_type_ids` for completion tokens appended to a prompt: 0, text (Gemma3 marks
    image tokens 1); PaliGemma: 1, its causal suffix (0 is the bidirectional prefix)."""
    extra_vocab: tuple[str, ...] = field(default_factory=tuple)
    """Plain words the chat template writes (roles, system prompt), for tiny word-level vocabularies."""
    tiny: TinyBuild | None = None
    """How its offline tiny model is built; None: the family has no tiny model."""
    generic: bool = False
    """True for a family vlm_rl deliberately knows nothing of at run time: loading, LoRA and sampling
    treat it as any family without a row (`family_of` gives None). Its row is read only to build its
    tiny model, the generic path's test model (AyaVision)."""


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

_QWEN_VL = dict(
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
    extra_vocab=("system", "user", "assistant", "you", "are", "a", "helpful", "."),
)
"""What the Qwen-VL rows share (Qwen3-VL replaces some of it)."""

FAMILY_TABLE: tuple[FamilyFacts, ...] = (
    FamilyFacts(
        model_type="llava",
        architecture="LlavaForConditionalGeneration",
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
        tiny=TinyBuild(
            "tiny-llava",
            tiny_builds.build_llava,
            sizes=dict(image_size=IMAGE_SIZE, patch=8, vision=VISION, text=TEXT, max_positions=512),
        ),
    ),
    FamilyFacts(
        model_type="qwen2_5_vl",
        architecture="Qwen2_5_VLForConditionalGeneration",
        chat_template="qwen2_5_vl",
        **_QWEN_VL,
        image_only_processor="transformers.models.qwen2_5_vl.Qwen2_5_VLProcessor",
        tiny=TinyBuild(
            "tiny-qwen2.5-vl",
            tiny_builds.build_qwen2_5_vl,
            sizes=dict(
                image_size=IMAGE_SIZE,
                patch=4,
                vision=dict(
                    depth=2, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1]
                ),
                text=TEXT,
                window=IMAGE_SIZE,
                max_positions=512,
            ),
        ),
    ),
    FamilyFacts(
        model_type="idefics3",
        architecture="Idefics3ForConditionalGeneration",
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
        tiny=TinyBuild("tiny-idefics3", tiny_builds.build_idefics3),
    ),
    FamilyFacts(
        model_type="llava_onevision",
        architecture="LlavaOnevisionForConditionalGeneration",
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
        image_only_processor="transformers.models.llava_onevision.LlavaOnevisionProcessor",
        tiny=TinyBuild("tiny-llava-onevision", tiny_builds.build_llava_onevision),
    ),
    FamilyFacts(
        model_type="qwen2_vl",
        architecture="Qwen2VLForConditionalGeneration",
        chat_template="qwen2_5_vl",  # Qwen2-VL's template: Qwen2.5-VL kept it
        **_QWEN_VL,
        image_only_processor="transformers.models.qwen2_vl.Qwen2VLProcessor",
        tiny=TinyBuild("tiny-qwen2-vl", tiny_builds.build_qwen2_vl),
    ),
    FamilyFacts(
        model_type="qwen3_vl",
        architecture="Qwen3VLForConditionalGeneration",
        chat_template="qwen3_vl",
        **(
            _QWEN_VL
            | dict(
                vision_modules=("visual.blocks", "visual.patch_embed", "visual.pos_embed"),
                # Its output holds the merged tokens and the DeepStack features, each split per
                # image like the patches: gathered per image as well.
                projector_modules=("visual.merger", "visual.deepstack_merger_list"),
                extra_vocab=("user", "assistant"),
            )
        ),
        image_only_processor="transformers.models.qwen3_vl.Qwen3VLProcessor",
        tiny=TinyBuild("tiny-qwen3-vl", tiny_builds.build_qwen3_vl),
    ),
    FamilyFacts(
        model_type="gemma3",
        architecture="Gemma3ForConditionalGeneration",
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
        tokenizer_attributes=(
            ("boi_token", "<start_of_image>"),
            ("eoi_token", "<end_of_image>"),
            ("image_token", "<image_soft_token>"),
        ),
        extra_vocab=("user", "model"),
        tiny=TinyBuild("tiny-gemma3", tiny_builds.build_gemma3),
    ),
    FamilyFacts(
        model_type="paligemma",
        architecture="PaliGemmaForConditionalGeneration",
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
        tiny=TinyBuild("tiny-paligemma", tiny_builds.build_paligemma),
    ),
    FamilyFacts(
        model_type="aya_vision",
        architecture="AyaVisionForConditionalGeneration",
        chat_template="llava_next",  # Cohere's own template is text-only; the tiny build writes <image>
        image_token="<image>",
        special_tokens=(
            "<image>",
            "<|START_OF_IMG|>",
            "<|END_OF_IMG|>",
            "<|IMG_PATCH|>",
            "<|IMG_LINE_BREAK|>",
            "TILE",
            "TILE_GLOBAL",
            *LLAVA_CHAT_TOKENS,
        ),
        eos_token="</s>",
        vision_modules=("vision_tower",),
        projector_modules=("multi_modal_projector",),
        tiny=TinyBuild("tiny-aya-vision", tiny_builds.build_aya_vision),
        generic=True,  # the generic path's tiny model: no lever, no per-family fact at run time
    ),
)
"""Every family vlm_rl knows, one row each."""

FAMILIES: dict[str, FamilyFacts] = {row.model_type: row for row in FAMILY_TABLE if not row.generic}
"""The rows that apply at run time, by `config.model_type` (`family_of` reads it)."""
UNLISTED_FAMILIES: dict[str, FamilyFacts] = {row.model_type: row for row in FAMILY_TABLE if row.generic}
"""The generic rows (their families are treated as any family without a row; only their tiny builds
read them)."""
TINY_FAMILIES: dict[str, FamilyFacts] = {row.tiny.name: row for row in FAMILY_TABLE if row.tiny}
"""The rows by their tiny model's name ("tiny-llava")."""


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


def model_family(model) -> FamilyFacts | None:
    """Facts of a (possibly LoRA-wrapped) model's family, or None for a family without a row."""
    return family_of(getattr(model.config, "model_type", ""))


def completion_token_type(model) -> int:
    """`FamilyFacts.completion_token_type` of a (possibly LoRA-wrapped) model; 0 for a family without a row."""
    family = model_family(model)
    return family.completion_token_type if family else 0


def chat_template(name: str) -> str:
    """The text of one of TRL's shipped chat templates (or of vlm_rl's own, for PaliGemma)."""
    if name in _OWN_TEMPLATES:
        return _OWN_TEMPLATES[name]
    return resources.files("trl").joinpath("chat_templates", f"{name}.jinja").read_text()
