"""Each prompt prefilled once for its G samples: same logits and tokens as a prefill per sample."""

from __future__ import annotations

import pytest
import torch

from vlm_rl.data.collators import encode, render_prompt
from vlm_rl.models import image_encoder, load_model
from vlm_rl.models.inputs import repeat_rows
from vlm_rl.models.prefill import prefilled_cache, sampling_inputs
from vlm_rl.models.tiny import tiny_names
from vlm_rl.rl.rollout import generate

NAMES = tiny_names("shared_prefill")  # one per family whose row sets it (others: tests/test_families.py)
QUESTIONS = ("Describe the shape.", "is there a red shape in the image?")
SAMPLES = 4


def prompt_batch(processor, images, padding_side: str = "left"):
    texts = [
        render_prompt(
            processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        )
        for q in QUESTIONS
    ]
    return encode(processor, texts, [[image] for image in images[:2]], padding_side=padding_side)


def record_batch_shapes(module: torch.nn.Module) -> list[tuple[int, ...]]:
    """(rows, tokens) of each call of `module` (an embedding layer)."""
    shapes: list[tuple[int, ...]] = []
    module.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.mark.parametrize("name", NAMES)
def test_sampling_matches_a_prefill_per_sample(name: str, easy_vqa_images: list) -> None:
    model, processor = load_model(name)
    prompts = prompt_batch(processor, easy_vqa_images)
    images_per_prompt = torch.tensor([1, 1])
    shapes = record_batch_shapes(model.get_input_embeddings())

    def sample(inputs: dict):
        torch.manual_seed(0)
        return model.generate(
            **inputs,
            do_sample=True,
            top_k=0,
            max_new_tokens=8,
            pad_token_id=processor.tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )

    expected = sample(dict(repeat_rows(prompts, SAMPLES, images_per_prompt)))
    shapes.clear()
    shared_inputs = sampling_inputs(model, processor, prompts, images_per_prompt, SAMPLES)
    assert "cache" in shared_inputs and "pixel_values" not in shared_inputs
    shared = sample(shared_inputs)
    assert torch.equal(shared.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(shared.logits), torch.stack(expected.logits), rtol=1e-5, atol=1e-5)
    rows, length = prompts["input_ids"].shape
    # The prompts once (all but the last token), then every copy one token at a time.
    assert shapes[0] == (rows, length - 1)
    assert all(shape == (rows * SAMPLES, 1) for shape in shapes[1:])


@pytest.mark.parametrize("name", NAMES)
def test_rollout_tokens_and_later_forward_passes_unchanged(name: str, easy_vqa_images: list) -> None:
    """`rollout.generate` (shared prefill) samples what `generate` on the repeated prompts samples,
    and leaves no state behind (Qwen2.5-VL keeps RoPE offsets on the model) for a training pass."""
    model, processor = load_model(name)
    prompts = prompt_batch(processor, easy_vqa_images)
    images_per_prompt = torch.tensor([1, 1])
    with torch.no_grad():
        logits_before = model(**prompts).logits
    torch.manual_seed(0)
    rollout = generate(
        model, processor, prompts, images_per_prompt, samples_per_prompt=SAMPLES, max_new_tokens=8
    )
    torch.manual_seed(0)
    expected = model.generate(
        **repeat_rows(prompts, SAMPLES, images_per_prompt),
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=8,
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_tokens=sorted(set(processor.tokenizer.all_special_ids) - {processor.tokenizer.eos_token_id}),
    )[:, prompts["input_ids"].shape[1] :]
    assert torch.equal(
        rollout.completion_ids[rollout.completion_mask.bool()], expected[rollout.completion_mask.bool()]
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**prompts).logits, logits_before, rtol=0, atol=0)


def test_the_image_encoder_runs_once_per_prompt(easy_vqa_images: list) -> None:
    model, processor = load_model("tiny-qwen2.5-vl")
    calls = record_batch_shapes(image_encoder(model).patch_embed)
    generate(
        model,
        processor,
        prompt_batch(processor, easy_vqa_images),
        torch.tensor([1, 1]),
        samples_per_prompt=SAMPLES,
        max_new_tokens=4,
    )
    patches_per_image = 8 * 8  # 32x32 pixels in 4x4 patches
    assert calls == [(2 * patches_per_image, calls[0][1])]


def test_no_shared_prefill_where_it_does_not_apply(easy_vqa_images: list) -> None:
    model, processor = load_model("tiny-llava")
    left = prompt_batch(processor, easy_vqa_images)
    assert prefilled_cache(model, processor, left, samples_per_prompt=SAMPLES) is not None
    assert prefilled_cache(model, processor, left, samples_per_prompt=1) is None
    right = prompt_batch(processor, easy_vqa_images, padding_side="right")
    assert not right["attention_mask"][:, -1].all()
    assert prefilled_cache(model, processor, right, samples_per_prompt=SAMPLES) is None
    image_last = encode(processor, [f"describe {processor.image_token}"], [[easy_vqa_images[0]]])
    assert prefilled_cache(model, processor, image_last, samples_per_prompt=SAMPLES) is None
    # Such a prompt is still sampled, each copy with its own prefill.
    completions = generate(
        model, processor, image_last, torch.tensor([1]), samples_per_prompt=SAMPLES, max_new_tokens=4
    )
    assert completions.completion_ids.shape[0] == SAMPLES
