"""Every family end to end: generate -> score round trip, adapter save/load, one GRPO step; the
family quirks (Gemma3's zero projector, PaliGemma's prefix-LM) and the generic path (a family
without a row in the family table: AyaVision)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_rl.data.collators import encode, render_prompt
from vlm_rl.models import (
    FAMILIES,
    TINY_MODELS,
    family_of,
    image_encoder,
    load_model,
    load_policy,
    share_image_encoding,
    wrap_with_lora,
)
from vlm_rl.models.families import completion_token_type
from vlm_rl.models.inputs import repeat_rows
from vlm_rl.models.prefill import prefilled_cache, sampling_inputs
from vlm_rl.models.shared_prefix import PromptGroups, shares_prefix
from vlm_rl.models.tiny import UNLISTED_FAMILIES, build_vlm, ensure_tiny, resolve_tiny_name, tiny_names
from vlm_rl.models.value import PolicyWithValue
from vlm_rl.rl.rollout import eos_token_ids, generate, suppressed_tokens

NAMES = tiny_names()  # one per family
NEW_NAMES = [
    "tiny-llava-onevision",
    "tiny-qwen2-vl",
    "tiny-qwen3-vl",
    "tiny-gemma3",
    "tiny-paligemma",
    "tiny-aya-vision",
]
QUESTIONS = ("Describe the shape.", "is there a red shape in the image?")
SAMPLES = 3


def user_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def prompt_batch(processor, images):
    texts = [render_prompt(processor, user_prompt(q)) for q in QUESTIONS]
    return encode(processor, texts, [[image] for image in images[: len(texts)]])


def test_every_family_of_the_issue_has_a_row_and_a_tiny_build() -> None:
    families = set(TINY_MODELS.values())
    wanted = {
        "llava",
        "llava_onevision",
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "idefics3",
        "gemma3",
        "paligemma",
    }
    assert wanted <= families and wanted <= set(FAMILIES)
    assert "aya_vision" in families and family_of("aya_vision") is None  # the generic path's build
    assert set(UNLISTED_FAMILIES).isdisjoint(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_each_tiny_build_is_its_rows_architecture(name: str, tiny_model) -> None:
    """A row's tiny build gives a model of the row's `model_type` and `architecture` class, and the
    row is found by that model (`model_family`) unless it is the generic one."""
    from vlm_rl.models.families import FAMILY_TABLE, model_family

    row = next(row for row in FAMILY_TABLE if row.tiny and row.tiny.name == name)
    model, _ = tiny_model(name)
    assert (model.config.model_type, type(model).__name__) == (row.model_type, row.architecture)
    assert model_family(model) is (None if row.generic else row)


@pytest.mark.parametrize("name", NAMES)
def test_scoring_the_sampled_completions_gives_the_sampling_log_probs(
    name: str, easy_vqa_images: list
) -> None:
    """The engine's rollout (shared prefill where the row allows) and its scoring pass (one forward
    over prompt + completion: `Rollout.model_inputs`, `PolicyWithValue`) see the same distribution:
    catches position ids (Qwen's 3-D RoPE), token types (PaliGemma's causal suffix, Gemma3's image
    blocks) and vision inputs that scoring would rebuild differently from generation."""
    model, processor = load_model(name)
    assert_scoring_gives_the_sampling_log_probs(model, processor, easy_vqa_images)


def test_scoring_caps_the_logits_as_a_softcapped_model_samples(easy_vqa_images: list) -> None:
    """PaliGemma2's Gemma2 text model caps its logits (cap * tanh(logits / cap), cap 30): scoring
    caps them too. A cap of 1 squeezes the tiny model's logits hard, so an uncapped score differs."""
    model, processor = load_model("tiny-paligemma")
    model.config.get_text_config().final_logit_softcapping = 1.0
    assert_scoring_gives_the_sampling_log_probs(model, processor, easy_vqa_images)


def assert_scoring_gives_the_sampling_log_probs(model, processor, easy_vqa_images: list) -> None:
    prompts = prompt_batch(processor, easy_vqa_images)
    images_per_prompt = torch.tensor([1, 1])
    torch.manual_seed(0)
    rollout = generate(
        model, processor, prompts, images_per_prompt, samples_per_prompt=SAMPLES, max_new_tokens=6
    )

    # The same sampling by hand, keeping the logits of every step (raw, before the suppression).
    eos = eos_token_ids(model, processor)
    torch.manual_seed(0)
    sampled = model.generate(
        **sampling_inputs(model, processor, prompts, images_per_prompt, SAMPLES),
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=6,
        eos_token_id=eos,
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_tokens=suppressed_tokens(processor, keep=eos),
        output_logits=True,
        return_dict_in_generate=True,
    )
    mask = rollout.completion_mask.bool()
    completion = sampled.sequences[:, prompts["input_ids"].shape[1] :]
    assert torch.equal(completion[mask], rollout.completion_ids[mask])
    steps = torch.stack(sampled.logits, dim=1).log_softmax(-1)  # (N, T, V)
    expected = steps.gather(-1, rollout.completion_ids[:, : steps.shape[1], None]).squeeze(-1)

    rows = torch.arange(len(rollout))
    # Both scoring inputs of the trainer: the full sequences, and the prompt groups (each prompt
    # forwarded once where the row has `shared_prefix`, else the same full sequences).
    groups = PromptGroups.of_rows(
        rollout.prompt_inputs, images_per_prompt, rollout.prompt_index, rollout.completion_mask
    )
    family = family_of(model.config.model_type)
    assert shares_prefix(model, groups) == bool(family and family.shared_prefix)
    assert mask.sum() >= len(rollout)  # every sample has at least one token
    for inputs in (rollout.model_inputs(rows), groups):
        with torch.no_grad():
            scored = PolicyWithValue(model)(inputs, rollout.completion_ids)["logprobs"]
        torch.testing.assert_close(scored[mask], expected[mask], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_a_saved_adapter_loads_back_with_identical_outputs(
    name: str, easy_vqa_images: list, tmp_path: Path
) -> None:
    model, processor = load_model(name)
    policy = wrap_with_lora(model, r=4, alpha=8, train_projector=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move every trainable weight, so the adapter is not the identity
        for parameter in policy.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    policy.save_pretrained(tmp_path / "adapter")
    inputs = {k: v for k, v in prompt_batch(processor, easy_vqa_images).items() if k != "labels"}
    loaded, _ = load_policy(tmp_path / "adapter")
    with torch.no_grad():
        expected = policy(**inputs).logits
        with policy.disable_adapter():
            base = policy(**inputs).logits
        actual = loaded(**inputs).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter (and the projector) changed something
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", NEW_NAMES)
def test_one_grpo_step_trains_the_adapter(name: str, tmp_path: Path) -> None:
    from vlm_rl.rewards.compose import CombinedReward
    from vlm_rl.rl.config import RLConfig
    from vlm_rl.rl.trainer import RLTrainer
    from vlm_rl.tasks.easy_vqa import caption_dataset

    def rewards_by_length(prompts, completions, **columns):  # a reward every family's samples vary in
        return [float(len(str(c).split())) for c in completions]

    torch.manual_seed(0)
    config = RLConfig(
        algorithm="grpo",
        prompts_per_step=2,
        samples_per_prompt=4,
        minibatch_size=8,
        kl_coef=0.0,
        max_new_tokens=4,
        total_steps=1,
        output_dir=str(tmp_path / "run"),
        report_to="none",
        sample_log_steps=0,
    )
    model, processor = load_model(name)
    policy = wrap_with_lora(model, r=4, alpha=8)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    trainer = RLTrainer(
        config,
        policy,
        processor,
        CombinedReward([rewards_by_length]),
        caption_dataset("train", num_samples=8, seed=0),
    )
    metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss/policy"]))
    changed = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".lora_B." in n for n in changed)


# -- Gemma3: the projector initialises to zeros -------------------------------------------------


def test_gemma3_tiny_build_sees_its_images_and_a_zero_projector_would_not(easy_vqa_images: list) -> None:
    model, processor = load_model("tiny-gemma3")
    projector = model.model.multi_modal_projector.mm_input_projection_weight
    inputs = encode(
        processor,
        [render_prompt(processor, user_prompt(QUESTIONS[0]))] * 2,
        [[i] for i in easy_vqa_images[:2]],
    )
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        assert (logits[0] - logits[1]).abs().max() > 1e-2
        projector.zero_()  # as transformers initialises it
        blind = model(**inputs).logits[:, -1]
    torch.testing.assert_close(blind[0], blind[1], rtol=0, atol=0)


def test_gemma3_image_tokens_are_marked_for_their_bidirectional_block(easy_vqa_images: list) -> None:
    model, processor = load_model("tiny-gemma3")
    text = render_prompt(processor, user_prompt(QUESTIONS[0]))
    assert text.count("<start_of_image>") == 1  # the template's placeholder, expanded by the processor
    inputs = encode(processor, [text], [[easy_vqa_images[0]]])
    image = inputs["input_ids"] == model.config.image_token_id
    assert image.sum() == 16 and torch.equal(inputs["token_type_ids"].bool(), image)
    assert completion_token_type(model) == 0


# -- PaliGemma: prefix-LM attention, no chat template -----------------------------------------------


def test_paligemma_prompt_is_images_bos_text_newline(easy_vqa_images: list) -> None:
    model, processor = load_model("tiny-paligemma")
    text = render_prompt(processor, user_prompt("Describe the shape."))
    assert text == "<image>Describe the shape."  # vlm_rl's template: PaliGemma ships none
    inputs = encode(processor, [text], [[easy_vqa_images[0]]])
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert tokens == ["<image>"] * 16 + ["<bos>", "describe", "the", "shape", "."]
    assert not inputs["token_type_ids"].any()  # the whole prompt is the bidirectional prefix
    assert model.config.get_text_config().vocab_size == len(processor.tokenizer)  # loc/seg tokens included
    assert completion_token_type(model) == 1


def test_paligemma_prefix_attends_both_ways_so_a_shared_prefill_is_refused(
    monkeypatch, easy_vqa_images: list
) -> None:
    model, processor = load_model("tiny-paligemma")
    prompts = prompt_batch(processor, easy_vqa_images)
    prompts.pop("labels")
    assert prefilled_cache(model, processor, prompts, samples_per_prompt=SAMPLES) is None
    # Forced on, the prefill of all but the last prompt token misses that token's influence on the
    # others (they attend to it): the next-token distribution changes.
    monkeypatch.setitem(
        FAMILIES, "paligemma", dataclasses.replace(FAMILIES["paligemma"], shared_prefill=True)
    )

    def first_logits(inputs: dict) -> torch.Tensor:
        out = model.generate(
            **inputs,
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        return out.logits[0]

    forced = sampling_inputs(model, processor, prompts, torch.tensor([1, 1]), SAMPLES)
    assert "cache" in forced
    per_sample = dict(repeat_rows(prompts, SAMPLES, torch.tensor([1, 1])))
    assert (first_logits(forced) - first_logits(per_sample)).abs().max() > 1e-4


def test_paligemma_answer_tokens_attend_causally(easy_vqa_images: list) -> None:
    """Token type 1 makes the completion PaliGemma's causal suffix: a prompt position's logits do
    not depend on the completion, and a completion token does not see the tokens after it."""
    model, processor = load_model("tiny-paligemma")
    prompts = prompt_batch(processor, easy_vqa_images)
    rollout = generate(
        model, processor, prompts, torch.tensor([1, 1]), samples_per_prompt=1, max_new_tokens=4
    )
    inputs = rollout.model_inputs(torch.arange(2))
    length = prompts["input_ids"].shape[1]
    assert (inputs["token_type_ids"][:, length:] == 1).all()
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][:, -1] = processor.tokenizer.convert_tokens_to_ids("red")
    with torch.no_grad():
        logits, other = model(**inputs).logits, model(**changed).logits
    torch.testing.assert_close(other[:, :-1], logits[:, :-1], rtol=0, atol=1e-6)


# -- The generic path: a family without a row ---------------------------------------------------


def test_a_family_without_a_row_samples_and_scores_through_the_generic_path(easy_vqa_images: list) -> None:
    model, processor = load_model("tiny-aya-vision")
    assert family_of(model.config.model_type) is None
    assert image_encoder(model) is None  # encoding not shared: nothing known about its tower
    prompts = prompt_batch(processor, easy_vqa_images)
    assert prefilled_cache(model, processor, prompts, samples_per_prompt=SAMPLES) is None
    inputs = sampling_inputs(model, processor, prompts, torch.tensor([1, 1]), SAMPLES)
    assert "cache" not in inputs and inputs["pixel_values"].shape[0] == 2 * SAMPLES  # every copy's image
    with share_image_encoding(model) as stats:
        rollout = generate(
            model, processor, prompts, torch.tensor([1, 1]), samples_per_prompt=SAMPLES, max_new_tokens=4
        )
    assert stats.images == 0 and len(rollout) == 2 * SAMPLES
    assert completion_token_type(model) == 0


def test_the_cli_trains_a_new_family_by_its_tiny_name(tmp_path: Path, vlm_rl_cache: Path) -> None:
    """`vlm-rl grpo --model_name_or_path tiny-paligemma`: the prefix-LM family (token types, no
    shared prefill, no chat template) through the whole recipe, in a subprocess."""
    out = tmp_path / "run"
    env = {**os.environ, "VLM_RL_CACHE": str(vlm_rl_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            *(sys.executable, "-m", "vlm_rl.cli", "grpo", "--model_name_or_path", "tiny-paligemma"),
            *("--total_steps", "2", "--max_eval_prompts", "4", "--prompts_per_step", "2"),
            *("--samples_per_prompt", "4", "--warm_start_steps", "0", "--eval_steps", "0"),
            *("--save_steps", "0", "--report_to", "none", "--num_threads", "1"),
            *("--output_dir", str(out)),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out (4 questions on unseen images; no image shared with training): accuracy" in result.stdout
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert (out / "metrics.jsonl").read_text().count('"reward/mean"') == 2


@pytest.mark.parametrize("name", NEW_NAMES)
def test_each_tiny_name_resolves_with_a_seed(name: str) -> None:
    assert resolve_tiny_name(f"{name}@seed2") == (name, 2)
    assert resolve_tiny_name(name) == (name, 0)


def test_an_unknown_tiny_name_lists_the_families() -> None:
    with pytest.raises(
        ValueError, match=r"'tiny-gemma'.*tiny-aya-vision.*tiny-gemma3.*tiny-paligemma.*tiny-qwen3-vl"
    ):
        ensure_tiny("tiny-gemma")
    with pytest.raises(ValueError, match="the tiny gemma3 build takes no sizes"):
        build_vlm("gemma3", image_size=64)


def test_a_paligemma_checkpoint_without_a_chat_template_gets_the_rows(tmp_path: Path) -> None:
    import shutil

    from vlm_rl.models import load_processor, resolve_model_path

    folder = tmp_path / "paligemma"
    shutil.copytree(resolve_model_path("tiny-paligemma"), folder)
    (folder / "chat_template.jinja").unlink()  # as PaliGemma checkpoints on the hub
    processor = load_processor(str(folder))
    assert render_prompt(processor, user_prompt("Describe the shape.")) == "<image>Describe the shape."
