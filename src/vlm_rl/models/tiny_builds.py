"""How each family's tiny model is built: one function per family, named by its row's `TinyBuild`.

A builder takes the family's row, a tokenizer (`vlm_rl.models.tiny.build_tokenizer`) and, where its
row lists sizes, keyword sizes; it returns a randomly initialised model of the row's architecture
class and a processor for that tokenizer. `vlm_rl.models.tiny.build_vlm` calls it under a fixed seed.
A builder draws its random weights in a fixed order: changing that order changes every cached tiny
model (bump `tiny.TINY_FORMAT_VERSION` then).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlm_rl.models.families import FamilyFacts

IMAGE_SIZE = 32
"""Side of every tiny model's (square) images, in pixels."""
TEXT = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
)
"""The tiny language models' sizes."""
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
"""The tiny vision towers' sizes (CLIP/SigLIP-style configs)."""


def new_model(family: FamilyFacts, config):
    """A randomly initialised model of the family's architecture class (`FamilyFacts.architecture`)."""
    import transformers

    return getattr(transformers, family.architecture)(config)


def _ids(tokenizer, **tokens: str) -> dict[str, int]:
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in tokens.items()}


def llava_processor(tokenizer, *, image_size: int, patch: int, chat_template: str):
    """A LLaVA processor for a CLIP tower (its CLS token dropped by the "default" feature strategy):
    every image resized to image_size x image_size, (image_size / patch)^2 visual tokens."""
    from transformers.models.llava import LlavaImageProcessorPil, LlavaProcessor

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=chat_template,
    )


def build_llava(
    family: FamilyFacts,
    tokenizer,
    *,
    image_size: int,
    patch: int,
    vision: dict,
    text: dict,
    max_positions: int,
):
    """A random LLaVA-style model (CLIP vision tower, Llama language model) + processor for
    `tokenizer`, every image resized to image_size x image_size, (image_size / patch)^2 visual
    tokens. `vision` and `text` are the sub-configs' sizes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, image_size=image_size, patch_size=patch),
        text_config=LlamaConfig(**text, vocab_size=len(tokenizer), max_position_embeddings=max_positions),
        image_token_index=tokenizer.convert_tokens_to_ids(family.image_token),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    processor = llava_processor(
        tokenizer, image_size=image_size, patch=patch, chat_template=tokenizer.chat_template
    )
    return new_model(family, config), processor


def _mrope_text(tokenizer, text: dict, max_positions: int) -> dict[str, Any]:
    """Qwen2-VL/2.5-VL text config: 3-D RoPE over (time, height, width) sections of each head."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return dict(
        **text,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 8, head_dim // 8 * 3 // 2, head_dim // 8 * 3 // 2],
        },
    )


def _build_qwen_vl(
    family: FamilyFacts,
    tokenizer,
    config_class,
    *,
    vision_config: dict,
    text_config: dict,
    image_size: int,
    patch: int,
    merge: int,
):
    """A random Qwen-VL model (`config_class` of these sub-configs and the tokenizer's special token
    ids) + the family's image-only processor (its row's `image_only_processor`), every image resized
    to image_size x image_size in patch x patch patches, merged merge x merge."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from vlm_rl.models.processors import image_only_processor_class

    token_ids = _ids(
        tokenizer,
        image_token_id=family.image_token,
        video_token_id="<|video_pad|>",
        vision_start_token_id="<|vision_start|>",
        vision_end_token_id="<|vision_end|>",
    )
    config = config_class(vision_config=vision_config, text_config=text_config, **token_ids)
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )
    processor = image_only_processor_class(family.image_only_processor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    return new_model(family, config), processor


def build_qwen2_5_vl(
    family: FamilyFacts,
    tokenizer,
    *,
    image_size: int,
    patch: int,
    vision: dict,
    text: dict,
    window: int,
    max_positions: int,
    merge: int = 2,
):
    """A random Qwen2.5-VL-style model + image-only processor for `tokenizer`, every image resized to
    image_size x image_size, (image_size / patch / merge)^2 visual tokens. `vision` and `text` are
    the sub-configs' sizes."""
    from transformers import Qwen2_5_VLConfig

    vision_config = dict(
        **vision,
        patch_size=patch,
        spatial_merge_size=merge,
        temporal_patch_size=2,
        window_size=window,
        out_hidden_size=text["hidden_size"],
    )
    return _build_qwen_vl(
        family,
        tokenizer,
        Qwen2_5_VLConfig,
        vision_config=vision_config,
        text_config=_mrope_text(tokenizer, text, max_positions),
        image_size=image_size,
        patch=patch,
        merge=merge,
    )


def build_idefics3(family: FamilyFacts, tokenizer):
    """Idefics3 (SmolVLM): 32x32 images, never split, in 8x8 patches (16 visual tokens)."""
    from transformers import Idefics3Config, LlamaConfig
    from transformers.models.idefics3 import Idefics3ImageProcessorPil, Idefics3Processor

    patch, scale = 8, 1
    config = Idefics3Config(
        vision_config=dict(**VISION, image_size=IMAGE_SIZE, patch_size=patch),
        text_config=LlamaConfig(
            **TEXT,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        ),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids(family.image_token),
    )
    model = new_model(family, config)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(IMAGE_SIZE // patch) ** 2 // scale**2,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def build_llava_onevision(family: FamilyFacts, tokenizer):
    """LLaVA-OneVision: anyres tiling (a 32x32 image is its base view plus one 32x32 tile, with an
    image-newline token per row of tile features), Qwen2 language model."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    from vlm_rl.models.processors import image_only_processor_class

    patch = 8
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            **VISION, image_size=IMAGE_SIZE, patch_size=patch, vision_use_head=False
        ),
        text_config=Qwen2Config(**TEXT, vocab_size=len(tokenizer), max_position_embeddings=512),
        image_token_index=tokenizer.convert_tokens_to_ids(family.image_token),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
    )
    model = new_model(family, config)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
    )
    processor = image_only_processor_class(family.image_only_processor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(IMAGE_SIZE // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def build_qwen2_vl(family: FamilyFacts, tokenizer):
    """Qwen2-VL: 32x32 images in 4x4 patches merged 2x2 (16 visual tokens), 3-D RoPE."""
    from transformers import Qwen2VLConfig

    patch = 4
    vision_config = dict(
        depth=2, embed_dim=64, mlp_ratio=2, num_heads=4, patch_size=patch, hidden_size=TEXT["hidden_size"]
    )
    text_config = _mrope_text(tokenizer, TEXT, 512)
    return _build_qwen_vl(
        family,
        tokenizer,
        Qwen2VLConfig,
        vision_config=vision_config,
        text_config=text_config,
        image_size=IMAGE_SIZE,
        patch=patch,
        merge=2,
    )


def build_qwen3_vl(family: FamilyFacts, tokenizer):
    """Qwen3-VL: 32x32 images in 4x4 patches merged 2x2 (16 visual tokens), learned vision position
    embeddings, DeepStack features of vision layer 0 added to text layer 0, interleaved 3-D RoPE."""
    from transformers import Qwen3VLConfig

    patch, head_dim = 4, TEXT["hidden_size"] // TEXT["num_attention_heads"]
    half = head_dim // 2  # Qwen3-VL's split of the rotary frequencies, [24, 20, 20] of 64, scaled
    vision_config = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        patch_size=patch,
        out_hidden_size=TEXT["hidden_size"],
        num_position_embeddings=(IMAGE_SIZE // patch) ** 2,
        deepstack_visual_indexes=[0],
    )
    text_config = dict(
        **TEXT,
        head_dim=head_dim,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [half * 24 // 64, half * 20 // 64, half * 20 // 64],
            "mrope_interleaved": True,
        },
    )
    return _build_qwen_vl(
        family,
        tokenizer,
        Qwen3VLConfig,
        vision_config=vision_config,
        text_config=text_config,
        image_size=IMAGE_SIZE,
        patch=patch,
        merge=2,
    )


# Gemma3, PaliGemma and AyaVision tie the LM head to the input embeddings upstream. In a random tiny
# model a tied head makes the input token's own logit dominate (its embedding against itself), so
# sampling repeats one token with probability ~1 and RL sees no variety: their tiny builds untie it.


def _gemma_text(tokenizer) -> dict[str, Any]:
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    return dict(
        **TEXT,
        head_dim=head_dim,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _siglip(patch: int):
    """A tiny SigLIP tower on IMAGE_SIZE images in patch x patch patches, without its pooling head."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**VISION, image_size=IMAGE_SIZE, patch_size=patch, vision_use_head=False)


def build_gemma3(family: FamilyFacts, tokenizer):
    """Gemma3: SigLIP tower on 32x32 images in 4x4 patches, pooled 2x2 into 16 soft tokens that
    attend to each other bidirectionally (`token_type_ids`); sliding-window text layers."""
    import torch
    from transformers import Gemma3Config
    from transformers.models.gemma3 import Gemma3ImageProcessorPil, Gemma3Processor

    patch, tokens = 4, 16
    config = Gemma3Config(
        vision_config=_siglip(patch),
        text_config=dict(
            **_gemma_text(tokenizer),
            query_pre_attn_scalar=TEXT["hidden_size"] // TEXT["num_attention_heads"],
            sliding_window=512,
        ),
        mm_tokens_per_image=tokens,
        tie_word_embeddings=False,  # see above _gemma_text
        **_ids(
            tokenizer,
            boi_token_index="<start_of_image>",
            eoi_token_index="<end_of_image>",
            image_token_index=family.image_token,
        ),
    )
    model = new_model(family, config)
    # The projector's weight initialises to zeros (transformers' `_init_weights`): a random Gemma3
    # would give every image the same (zero) features and ignore it. Unit-scale features instead.
    projector = model.model.multi_modal_projector.mm_input_projection_weight
    torch.nn.init.normal_(projector, std=projector.shape[0] ** -0.5)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=tokens,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def build_paligemma(family: FamilyFacts, tokenizer):
    """PaliGemma: SigLIP tower on 32x32 images in 8x8 patches (16 image tokens), Gemma language
    model attending bidirectionally over image + prompt (the prefix) and causally over the answer."""
    from transformers import GemmaConfig, PaliGemmaConfig
    from transformers.models.paligemma import PaliGemmaProcessor
    from transformers.models.siglip import SiglipImageProcessorPil

    patch = 8
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = (IMAGE_SIZE // patch) ** 2
    # The processor adds PaliGemma's 1,152 location/segmentation tokens to the tokenizer: the model's
    # vocabulary is sized after it (the mismatch OFFLINE.md saw).
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    config = PaliGemmaConfig(
        vision_config=_siglip(patch),
        text_config=GemmaConfig(**_gemma_text(processor.tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids(family.image_token),
        projection_dim=TEXT["hidden_size"],
        hidden_size=TEXT["hidden_size"],
        vocab_size=len(processor.tokenizer),
        tie_word_embeddings=False,  # see above _gemma_text
    )
    return new_model(family, config), processor


def build_aya_vision(family: FamilyFacts, tokenizer):
    """AyaVision (a generic row: the generic path's test model): SigLIP tower on 32x32 images in 4x4
    patches, pixel-shuffled 2x2 into 16 patch tokens between start/global/end markers; Cohere2
    language model."""
    from transformers import AyaVisionConfig, Cohere2Config
    from transformers.models.aya_vision import AyaVisionProcessor
    from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil

    patch, downsample = 4, 2
    config = AyaVisionConfig(
        vision_config=_siglip(patch),
        text_config=Cohere2Config(
            **TEXT,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            sliding_window=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
        ),
        downsample_factor=downsample,
        tie_word_embeddings=False,  # see above _gemma_text
        image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"),
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=False
    )
    processor = AyaVisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        img_size=IMAGE_SIZE,
        downsample_factor=downsample,
        image_token=family.image_token,
        chat_template=tokenizer.chat_template,
    )
    return new_model(family, config), processor
