"""The embedded default: tiny VLMs built offline from configs.

Each tiny model is a real transformers VLM of one family (its row's `FamilyFacts.tiny` names the
builder, in `models.tiny_builds`, and its sizes) with random weights, a word-level tokenizer whose vocabulary covers the demo tasks (`vlm_rl.tasks.vocabulary`),
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlm_rl.models.families import FAMILIES, TINY_FAMILIES, UNLISTED_FAMILIES, FamilyFacts, chat_template
from vlm_rl.models.tiny_builds import IMAGE_SIZE, build_llava, build_qwen2_5_vl

logger = logging.getLogger(__name__)


def _env_words(tiny_model: str | None) -> Callable[[], list[str]]:
    """The texts of the built-in environments whose `EnvSpec.tiny_model` is `tiny_model` (None: all)."""

    def words() -> list[str]:
        from vlm_rl import envs  # the built-in environments' protocols

        return envs.vocabulary(tiny_model)

    return words


@dataclass(frozen=True)
class TinyVariant:
    """A tiny model built as another one with a larger vocabulary and, optionally, other sizes."""

    built_as: str
    """The tiny model it is built as ("tiny-llava")."""
    words: Callable[[], list[str]]
    """Texts whose words it knows besides the demo tasks'."""
    sizes: dict[str, Any] = field(default_factory=dict)
    """Sizes that replace the built-as row's (`TinyBuild.sizes`), e.g. image_size."""


TINY_VARIANTS: dict[str, TinyVariant] = {
    "tiny-llava-agent": TinyVariant("tiny-llava", _env_words("tiny-llava-agent")),
    "tiny-llava-babyai": TinyVariant("tiny-llava", _env_words(None), {"image_size": 56}),
}
"""Tiny models built as another one but with a larger vocabulary. tiny-llava-agent knows the
protocols of the built-in environments that name it (`EnvSpec.tiny_model`; its vocabulary never
changes when an env naming another model is added); tiny-llava-babyai knows every built-in's, BabyAI's
missions included, and reads 56x56 images (BabyAI's 7x7-cell view at 8 px a cell: one cell per
8x8 patch, 49 visual tokens)."""

TINY_MODELS: dict[str, str] = {
    **{name: row.model_type for name, row in TINY_FAMILIES.items()},
    **{name: TINY_FAMILIES[variant.built_as].model_type for name, variant in TINY_VARIANTS.items()},
}
"""Names accepted as `model_name_or_path` for the embedded default, mapped to their family
(`config.model_type`): each row's tiny model (`FamilyFacts.tiny`), then the variants. tiny-aya-vision's
row is generic, on purpose: it is the tiny model of the generic path (any VLM that transformers loads,
without per-family facts)."""

TINY_FORMAT_VERSION = 2  # bump when a builder (models.tiny_builds) changes, so stale caches are rebuilt

LM_HEAD_INIT_STD = 0.1


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
    # Gemma's chat template and PaliGemma's processor write the BOS token into the text.
    bos = {"bos_token": "<bos>"} if "<bos>" in vocab else {}
    named = dict(family.tokenizer_attributes)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        pad_token=pad,
        eos_token=family.eos_token,
        additional_special_tokens=[
            t for t in family.special_tokens if t not in (unk, pad, family.eos_token, *bos.values())
        ],
        padding_side="left",
        **bos,
        **({"model_specific_special_tokens": named} if named else {}),
    )
    tokenizer.chat_template = chat_template(family.chat_template)
    return tokenizer


def build_tiny(name: str, seed: int = 0):
    """Build the tiny model `name` (a key of TINY_MODELS) in memory: (model, processor)."""
    variant = TINY_VARIANTS.get(name)
    if variant is None:
        return build_vlm(TINY_FAMILIES[name].model_type, seed=seed)
    model_type = TINY_FAMILIES[variant.built_as].model_type
    return build_vlm(model_type, seed=seed, extra_texts=variant.words(), **variant.sizes)


def build_vlm(model_type: str, *, seed: int = 0, extra_texts: Sequence[str] = (), **sizes: Any):
    """A random VLM of family `model_type` ("llava", "qwen2_5_vl", ...) built by its row's
    `TinyBuild`, with the tiny word-level tokenizer, deterministically from `seed`: (model in eval
    mode, processor).

    `sizes` replace, one by one, the row's tiny sizes (`TinyBuild.sizes`; a row without sizes takes
    none): with none this is the tiny default, with others a bigger model of the same recipe (the
    benchmarks' mid-size models).
    """
    family = FAMILIES.get(model_type) or UNLISTED_FAMILIES[model_type]
    build = family.tiny
    if build is None:
        raise ValueError(f"the {model_type} family has no tiny build (no `tiny` in its row)")
    if sizes and build.sizes is None:
        raise ValueError(f"the tiny {model_type} build takes no sizes (given {sorted(sizes)})")
    tokenizer = build_tokenizer(family, extra_texts)
    with torch.random.fork_rng():  # leave the caller's random state untouched
        torch.manual_seed(seed)
        model, processor = build.builder(family, tokenizer, **({**(build.sizes or {}), **sizes}))
        # A LoRA-tuned policy cannot rescale the frozen final norm or LM head, so with the stock
        # init (std 0.02) its logits stay within about +-2.5 and its distribution near uniform
        # whatever it learns. A wider LM head (std 0.1: logits reach about +-13) lets it sharpen.
        torch.nn.init.normal_(model.get_output_embeddings().weight, std=LM_HEAD_INIT_STD)
    for config in (model.generation_config, model.config.get_text_config()):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = None
    return model.eval(), processor


def tiny_names(capability: str | None = None) -> list[str]:
    """One tiny model per family (each row's; variants such as tiny-llava-agent left out); with
    `capability` (a `FamilyFacts` field, e.g. "shared_prefill") only families whose row sets it."""
    return [
        name
        for name, row in TINY_FAMILIES.items()
        if capability is None or getattr(FAMILIES.get(row.model_type), capability, False)
    ]


def ensure_tiny(name: str, seed: int = 0) -> Path:
    """Path of the cached tiny model `name`, building and saving it first if needed."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_MODELS)}")
    path = cache_dir() / f"{name}-seed{seed}-v{TINY_FORMAT_VERSION}"
    return cache_built_model(
        path,
        lambda: build_tiny(name, seed),
        "vlm_rl_tiny.json",
        {"name": name, "seed": seed, "version": TINY_FORMAT_VERSION},
        f"tiny model {name} (seed {seed})",
    )


def cache_built_model(
    path: Path, build: Callable[[], tuple[Any, Any]], info_name: str, info: dict[str, Any], what: str
) -> Path:
    """`path`, holding the model and processor `build()` returns (saved with the JSON `info` as
    `info_name`), built first if `path` holds no model yet; `what` names it in the log.

    The folder is written to a temporary name and renamed, so an interrupted build never leaves a
    half-written model behind.
    """
    if (path / "config.json").is_file():
        return path
    logger.info("building %s into %s", what, path)
    model, processor = build()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    # Written file by file, not with save_pretrained: inside a launched process group that writes
    # the weights on rank 0 only, and another rank could rename an incomplete folder into place.
    tmp.mkdir(parents=True)
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))  # a tied LM head is stored once
    processor.save_pretrained(tmp)
    (tmp / info_name).write_text(json.dumps(info))
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
    "tiny_names",
]


# -- the vocabulary guard -------------------------------------------------------------------------
MAX_UNKNOWN_WORDS = 0.5
"""Share of a dataset's words a tiny default may not know before `check_vocabulary` refuses it."""


def tiny_vocabulary(name: str, seed: int = 0) -> frozenset[str]:
    """Every word (token) of the tokenizer the tiny model `name` will run with: the one saved in its
    cached folder (built first if missing), not a freshly built one that a stale cache could differ from."""
    tokenizer_file = ensure_tiny(name, seed) / "tokenizer.json"
    return _vocabulary_of(tokenizer_file, tokenizer_file.stat().st_mtime_ns)


@functools.cache
def _vocabulary_of(tokenizer_file: Path, mtime_ns: int) -> frozenset[str]:
    return frozenset(Tokenizer.from_file(str(tokenizer_file)).get_vocab())


def unknown_words(name: str, texts: Sequence[str], seed: int = 0) -> tuple[int, list[str]]:
    """(number of words in `texts`, the words among them the tiny model `name` does not know)."""
    vocabulary = tiny_vocabulary(name, seed)
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
    total, unknown = unknown_words(tiny[0], texts, seed=tiny[1])
    if not total or len(unknown) / total <= MAX_UNKNOWN_WORDS:
        return
    from vlm_rl.errors import ConfigError

    examples = ", ".join(repr(word) for word in list(dict.fromkeys(unknown))[:5])
    raise ConfigError(
        f"{flag} {source}: {len(unknown)} of its {total} words ({len(unknown) / total:.0%}; e.g. {examples}) "
        f"are unknown to --model_name_or_path {model_name_or_path}, the offline tiny default, whose word-level "
        f"vocabulary ({len(tiny_vocabulary(*tiny))} tokens) holds only the demo tasks' words: they would all "
        "become <unk> and nothing would be learned; use a model with a real tokenizer: --model_name_or_path "
        "smol-llava (offline, SmolLM2's vocabulary), a hub VLM such as HuggingFaceTB/SmolVLM-256M-Instruct, "
        "or a local model folder"
    )
