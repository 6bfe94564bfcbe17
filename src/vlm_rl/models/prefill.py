"""Sample G completions per prompt with each prompt prefilled once.

Sampling G completions of a prompt by `generate` on the prompt repeated G times runs the prompt's
prefill (its image encoding and every prompt token through the language model) G times. Here each
distinct prompt is prefilled once, all tokens but the last, through `generate` itself (so position
ids and per-family set-up are those of a normal prefill); the KV cache is repeated G times in place
(`Cache.batch_repeat_interleave`) and `generate` continues on the repeated batch's text inputs:
it runs the last prompt token for each copy, then samples as usual. The copies' logits equal those
of a prefill per copy up to float summation order, and the sampler draws the same random numbers,
so a fixed seed gives the same tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import BatchFeature, Cache, GenerationConfig, ProcessorMixin

from vlm_rl.models.families import model_family
from vlm_rl.models.inputs import TEXT_KEYS, repeat_rows


def sampling_inputs(
    model: nn.Module,
    processor: ProcessorMixin,
    prompt_inputs: BatchFeature,
    images_per_prompt: torch.Tensor,
    samples_per_prompt: int,
) -> dict[str, Any]:
    """Keyword arguments for `model.generate` that sample `samples_per_prompt` completions per prompt.

    prompt_inputs: processor output for P prompts (left-padded, length L); images_per_prompt: (P,).
    Returns the inputs of the P x samples_per_prompt rows (prompt 0's copies first): `input_ids`
    (N, L) and the other text inputs plus a prefilled `cache` where the family allows it (see
    `prefilled_cache`), else every processor output repeated (vision inputs included).
    """
    on_device = BatchFeature(dict(prompt_inputs)).to(model.device)  # a copy: the caller's stay put
    cache = prefilled_cache(model, processor, on_device, samples_per_prompt)
    if cache is None:
        return dict(repeat_rows(prompt_inputs, samples_per_prompt, images_per_prompt).to(model.device))
    # The images are in the cache: repeat the text inputs only (prompt 0's copies first).
    return {
        **{k: v.repeat_interleave(samples_per_prompt, dim=0) for k, v in on_device.items() if k in TEXT_KEYS},
        "cache": cache,
    }


def prefilled_cache(
    model: nn.Module, processor: ProcessorMixin, prompt_inputs: BatchFeature, samples_per_prompt: int
) -> Cache | None:
    """The KV cache of every prompt but its last token, computed once per prompt and repeated
    `samples_per_prompt` times per row (rows 0, 0, ..., 1, 1, ...).

    None, and nothing computed, when sharing does not apply: one sample per prompt, a family
    without `shared_prefill`, right padding, or a prompt ending in an image token (its image must
    lie inside the prefilled part).
    """
    family = model_family(model)
    if samples_per_prompt < 2 or family is None or not family.shared_prefill:
        return None
    input_ids, attention_mask = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]
    image_token_id = processor.tokenizer.convert_tokens_to_ids(family.image_token)
    if (
        input_ids.shape[1] < 2
        or not attention_mask[:, -1].all()
        or (input_ids[:, -1] == image_token_id).any()
    ):
        return None
    head = {k: v[:, :-1] if k in TEXT_KEYS else v for k, v in prompt_inputs.items()}
    # One greedy step: `generate` prefills the head and returns its cache (the token it picks is
    # never fed back, so the cache holds the head only); no random number is drawn.
    prefill = generate_exactly(
        model,
        GenerationConfig(
            max_new_tokens=1,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=processor.tokenizer.pad_token_id,
        ),
        **head,
    )
    cache = prefill.cache
    cache.batch_repeat_interleave(samples_per_prompt)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    for path in family.prefill_state:
        owner_path, _, name = path.rpartition(".")
        owner = base.get_submodule(owner_path)
        value = getattr(owner, name)
        if isinstance(value, torch.Tensor):
            setattr(owner, name, value.repeat_interleave(samples_per_prompt, dim=0))
    return cache


def generate_exactly(model: nn.Module, generation_config: GenerationConfig, **inputs: Any) -> Any:
    """`model.generate(**inputs)` under `generation_config` and nothing else.

    transformers fills every field a passed config leaves unset from the model's own
    `generation_config`, the checkpoint's generation_config.json (Qwen2.5-VL-3B-Instruct's:
    repetition_penalty 1.05, top_k 1, top_p 0.001, temperature 0.1), so a fresh config alone still
    samples with the checkpoint's logits processors: a distribution other than the one the trainer
    scores. The model's config is hidden for the call (an empty one in its place, the same object
    back afterwards), leaving transformers' global defaults as the only fill-in.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    checkpoint_config = base.generation_config
    base.generation_config = GenerationConfig()
    try:
        return model.generate(**inputs, generation_config=generation_config)
    finally:
        base.generation_config = checkpoint_config
