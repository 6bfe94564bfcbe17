"""The embedded default: tiny VLMs built offline from configs.

Each tiny model is a real transformers VLM (LLaVA, Qwen2.5-VL or Idefics3 architecture) with random
weights, a word-level tokenizer whose vocabulary covers the demo tasks (`vlm_rl.tasks.vocabulary`),
and the family's real chat template. It is built once (deterministically from a seed), saved to a cache
folder, and from then on loaded by `vlm_rl.models.load_model` exactly like a hub checkpoint:
`--model_name_or_path tiny-llava`.

Sizes were chosen so the default tasks learn on 2 CPU cores in minutes: images are 32x32 (the
easy-vqa loader crops each image around its shape first), a 2-layer vision tower and a 2-layer,
128-wide language model (~0.5 M parameters).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlm_rl.models.families import FAMILIES, FamilyFacts, chat_template
from vlm_rl.models.processors import ImageOnlyQwen2_5_VLProcessor

logger = logging.getLogger(__name__)

TINY_MODELS: dict[str, str] = {
    "tiny-llava": "llava",
    "tiny-qwen2.5-vl": "qwen2_5_vl",
    "tiny-idefics3": "idefics3",
    "tiny-llava-agent": "llava",
}
"""Names accepted as `model_name_or_path` for the embedded default, mapped to their family."""


def _agent_words() -> list[str]:
    from vlm_rl import envs  # the built-in environments' protocols

    return envs.vocabulary()


TINY_EXTRA_WORDS: dict[str, Callable[[], list[str]]] = {"tiny-llava-agent": _agent_words}
"""Tiny models whose vocabulary holds more than the demo tasks' words (texts to take words from):
tiny-llava-agent also knows every built-in environment's protocol (`vlm_rl.envs`)."""

IMAGE_SIZE = 32
TINY_FORMAT_VERSION = 2  # bump when the recipe below changes, so stale caches are rebuilt

LM_HEAD_INIT_STD = 0.1
_TEXT = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
)
_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def cache_dir() -> Path:
    """Where tiny models are written: $VLM_RL_CACHE, else ~/.cache/vlm_rl."""
    return Path(os.environ.get("VLM_RL_CACHE", Path.home() / ".cache" / "vlm_rl"))


def build_tokenizer(family: FamilyFacts, extra_texts: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer: the family's special tokens, then every word of the demo
    tasks' texts (`vlm_rl.tasks.vocabulary`), of `extra_texts` and of the family's chat template, sorted.

    One token per word keeps the default tasks short ("red circle" is two tokens) so a tiny model
    learns them in minutes; special tokens are matched before splitting, so chat templates render
    exactly as they do for the real family.
    """
    from vlm_rl import tasks

    split = pre_tokenizers.Whitespace()
    words: set[str] = set(family.extra_vocab)
    for text in [*tasks.vocabulary(), *extra_texts]:
        words.update(piece for piece, _ in split.pre_tokenize_str(text.lower()))
    vocab = {token: i for i, token in enumerate(family.special_tokens)}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    unk = "<unk>"
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = split
    pad = "<pad>" if "<pad>" in vocab else "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        pad_token=pad,
        eos_token=family.eos_token,
        additional_special_tokens=[t for t in family.special_tokens if t not in (unk, pad, family.eos_token)],
        padding_side="left",
    )
    tokenizer.chat_template = chat_template(family.chat_template)
    return tokenizer


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
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava import LlavaImageProcessorPil, LlavaProcessor

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, image_size=image_size, patch_size=patch),
        text_config=LlamaConfig(**text, vocab_size=len(tokenizer), max_position_embeddings=max_positions),
        image_token_index=tokenizer.convert_tokens_to_ids(family.image_token),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=tokenizer.chat_template,
    )
    return model, processor


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
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    head_dim = text["hidden_size"] // text["num_attention_heads"]
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            **vision,
            patch_size=patch,
            spatial_merge_size=merge,
            temporal_patch_size=2,
            window_size=window,
            out_hidden_size=text["hidden_size"],
        ),
        text_config=dict(
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
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(family.image_token),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )
    processor = ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    return model, processor


def _build_idefics3(family: FamilyFacts, tokenizer):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig
    from transformers.models.idefics3 import Idefics3ImageProcessorPil, Idefics3Processor

    patch, scale = 8, 1
    config = Idefics3Config(
        vision_config=dict(**_VISION, image_size=IMAGE_SIZE, patch_size=patch),
        text_config=LlamaConfig(
            **_TEXT,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        ),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids(family.image_token),
    )
    model = Idefics3ForConditionalGeneration(config)
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


_BUILDERS = {"llava": build_llava, "qwen2_5_vl": build_qwen2_5_vl, "idefics3": _build_idefics3}
_TINY_SIZES: dict[str, dict[str, Any]] = {
    "llava": dict(image_size=IMAGE_SIZE, patch=8, vision=_VISION, text=_TEXT, max_positions=512),
    "qwen2_5_vl": dict(
        image_size=IMAGE_SIZE,
        patch=4,
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1]),
        text=_TEXT,
        window=IMAGE_SIZE,
        max_positions=512,
    ),
    "idefics3": {},
}


def build_tiny(name: str, seed: int = 0):
    """Build the tiny model `name` (a key of TINY_MODELS) in memory: (model, processor)."""
    extra = TINY_EXTRA_WORDS[name]() if name in TINY_EXTRA_WORDS else ()
    return build_vlm(TINY_MODELS[name], seed=seed, extra_texts=extra)


def build_vlm(model_type: str, *, seed: int = 0, extra_texts: Sequence[str] = (), **sizes: Any):
    """A random VLM of family `model_type` ("llava", "qwen2_5_vl", "idefics3") with the tiny
    word-level tokenizer, built deterministically from `seed`: (model in eval mode, processor).

    `sizes` replace, one by one, the tiny default's arguments to the family's builder
    (`build_llava`, `build_qwen2_5_vl`; Idefics3 takes none): with none this is the tiny default,
    with others a bigger model of the same recipe (the benchmarks' mid-size models).
    """
    family = FAMILIES[model_type]
    tokenizer = build_tokenizer(family, extra_texts)
    with torch.random.fork_rng():  # leave the caller's random state untouched
        torch.manual_seed(seed)
        model, processor = _BUILDERS[model_type](family, tokenizer, **(_TINY_SIZES[model_type] | sizes))
        # A LoRA-tuned policy cannot rescale the frozen final norm or LM head, so with the stock
        # init (std 0.02) its logits stay within about +-2.5 and its distribution near uniform
        # whatever it learns. A wider LM head (std 0.1: logits reach about +-13) lets it sharpen.
        torch.nn.init.normal_(model.get_output_embeddings().weight, std=LM_HEAD_INIT_STD)
    for config in (model.generation_config, model.config.get_text_config()):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = None
    return model.eval(), processor


def ensure_tiny(name: str, seed: int = 0) -> Path:
    """Path of the cached tiny model `name`, building and saving it first if needed.

    The folder is written to a temporary name and renamed, so an interrupted build never leaves a
    half-written model behind.
    """
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_MODELS)}")
    path = cache_dir() / f"{name}-seed{seed}-v{TINY_FORMAT_VERSION}"
    if (path / "config.json").exists():
        return path
    logger.info("building tiny model %s (seed %d) into %s", name, seed, path)
    model, processor = build_tiny(name, seed)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    # Written file by file, not with save_pretrained: inside a launched process group that writes
    # the weights on rank 0 only, and another rank could rename an incomplete folder into place.
    tmp.mkdir(parents=True)
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    processor.save_pretrained(tmp)
    (tmp / "vlm_rl_tiny.json").write_text(
        json.dumps({"name": name, "seed": seed, "version": TINY_FORMAT_VERSION})
    )
    try:
        tmp.rename(path)
    except OSError:  # another process finished the same build first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_tiny_name(model_name_or_path: str) -> tuple[str, int] | None:
    """("tiny-llava", seed) for "tiny-llava" or "tiny-llava@seed3"; None for any other name."""
    match = re.fullmatch(r"(tiny-[\w.\-]+?)(?:@seed(\d+))?", model_name_or_path)
    if match and match.group(1) in TINY_MODELS:
        return match.group(1), int(match.group(2) or 0)
    return None


__all__ = [
    "TINY_MODELS",
    "IMAGE_SIZE",
    "build_llava",
    "build_qwen2_5_vl",
    "build_tiny",
    "build_vlm",
    "ensure_tiny",
    "cache_dir",
    "resolve_tiny_name",
]


# -- the vocabulary guard -------------------------------------------------------------------------
MAX_UNKNOWN_WORDS = 0.5
"""Share of a dataset's words a tiny default may not know before `check_vocabulary` refuses it."""


def tiny_vocabulary(name: str) -> frozenset[str]:
    """Every word (token) the tiny model `name`'s word-level tokenizer knows, lowercased."""
    return _tiny_vocabulary(name)


@functools.cache
def _tiny_vocabulary(name: str) -> frozenset[str]:
    extra = TINY_EXTRA_WORDS[name]() if name in TINY_EXTRA_WORDS else ()
    return frozenset(build_tokenizer(FAMILIES[TINY_MODELS[name]], extra).get_vocab())


def unknown_words(name: str, texts: Sequence[str]) -> tuple[int, list[str]]:
    """(number of words in `texts`, the words among them the tiny model `name` does not know)."""
    vocabulary = tiny_vocabulary(name)
    split = pre_tokenizers.Whitespace()
    words = [piece for text in texts for piece, _ in split.pre_tokenize_str(text.lower())]
    return len(words), [word for word in words if word not in vocabulary]


def check_vocabulary(
    model_name_or_path: str, texts: Sequence[str], source: str, flag: str = "--dataset"
) -> None:
    """Refuse text the tiny default would read as mostly <unk> (it has a word-level vocabulary of the
    demo tasks' words): a `ConfigError` naming the model, the share of unknown words and what to use.

    Does nothing for any other model."""
    tiny = resolve_tiny_name(model_name_or_path)
    if tiny is None:
        return
    total, unknown = unknown_words(tiny[0], texts)
    if not total or len(unknown) / total <= MAX_UNKNOWN_WORDS:
        return
    from vlm_rl.errors import ConfigError

    examples = ", ".join(repr(word) for word in list(dict.fromkeys(unknown))[:5])
    raise ConfigError(
        f"{flag} {source}: {len(unknown)} of its {total} words ({len(unknown) / total:.0%}; e.g. {examples}) "
        f"are unknown to --model_name_or_path {model_name_or_path}, the offline tiny default, whose word-level "
        f"vocabulary ({len(tiny_vocabulary(tiny[0]))} tokens) holds only the demo tasks' words: they would all "
        "become <unk> and nothing would be learned; use a model with a real tokenizer: --model_name_or_path "
        "smol-llava (offline, SmolLM2's vocabulary), a hub VLM such as HuggingFaceTB/SmolVLM-256M-Instruct, "
        "or a local model folder"
    )
