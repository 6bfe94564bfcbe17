"""Parity with TRL: on one fixed batch, vlm_rl's GRPO loss and gradients equal TRL GRPOTrainer's.

One tiny LLaVA with a perturbed LoRA adapter, two prompts (different lengths, so left padding is
exercised) x 4 fixed completions (some ending in EOS, some truncated at `max_completion_length`)
and fixed rewards. TRL builds its own batch with its real pipeline (`_generate_and_score_completions`,
with generation replaced by the fixed completions, the rewards from a reward function) and scores it
with `compute_loss`; vlm_rl builds the same batch with `PromptCollator` + `Rollout`, takes its
advantages from the registered "grpo" algorithm and its loss from `core.rl_objective` with the
settings an `RLConfig` gives (`algorithms.objective_settings`): the very functions `RLTrainer.update`
calls, so a regression in the trainer's objective fails here.
Old log-probs differ from the current ones, so both clip bounds (epsilon, epsilon_high) are hit.

Loss types and their vlm_rl counterparts (one micro-batch, no gradient accumulation):
  TRL "grpo"    <-> aggregation "sequence"
  TRL "bnpo"    <-> aggregation "token"
  TRL "dapo"    <-> aggregation "token" (TRL divides by `num_items_in_batch`: the same count here)
  TRL "dr_grpo" <-> aggregation "fixed" with scale_rewards "none" / `scale_by_std=False`
Policy losses (`--algorithm`, each with GRPO's advantages) and TRL's:
  gspo  <-> importance_sampling_level "sequence" with the loss types above
  cispo <-> loss_type "cispo" (aggregation "token"; TRL's epsilon_high is the bound, 1 + clip_range_high)
  sapo  <-> loss_type "sapo" (aggregation "sequence"; sapo_temperature_pos/neg one to one)
TRL's vespo and luspo have no vlm_rl counterpart and are not tested.
TRL's `beta` KL term is vlm_rl's `kl_coef` with `kl_estimator="k3"` (GRPO's default) and the
reference = the adapter disabled; TRL's `use_bias_correction_kl` is vlm_rl's `kl_importance_weighted`; TRL's `temperature` and `entropy_coef` map one to one.
Measured agreement (fp32, CPU): losses within 3e-8, gradients within 7e-7 of their norm.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_rl.data.collators import PromptCollator
from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.models.value import PolicyWithValue
from vlm_rl.rl import core
from vlm_rl.rl.algorithms import get_algorithm, objective_settings
from vlm_rl.rl.config import RLConfig
from vlm_rl.rl.rollout import Rollout, completion_mask_from_ids, eos_token_ids

GROUP_SIZE = 4
MAX_COMPLETION_LENGTH = 4
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
# Completions as a sampler returns them: each ends at its EOS or is cut at MAX_COMPLETION_LENGTH.
COMPLETIONS = (
    "red circle </s>",
    "blue circle red triangle",
    "green triangle yes no",
    "</s>",
    "teal </s>",
    "yes no yes </s>",
    "circle red blue green",
    "gray </s>",
)
REWARDS = (1.0, 0.0, 0.5, 0.25, 0.3, 0.9, 0.9, 0.1)
LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-5  # per parameter, relative to the norm of TRL's gradient


def user_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def fixed_rewards(completions, **columns) -> list[float]:
    return list(REWARDS[: len(completions)])


@pytest.fixture
def policy_and_processor():
    torch.manual_seed(0)
    model, processor = load_model("tiny-llava")  # from disk: TRL may reload the reference from its path
    policy = wrap_with_lora(model, r=4, alpha=8)
    with torch.no_grad():  # LoRA B starts at zero: perturb it so the adapter changes the policy
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return policy, processor


@pytest.fixture
def examples() -> list[dict]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    texts = ("Describe the shape.", "What color and shape is it? Answer with one word.")
    return [
        {"prompt": user_prompt(text), "images": [image]} for text, image in zip(texts, images, strict=True)
    ]


def trl_batch(trainer, examples: list[dict], completion_ids: list[list[int]]) -> dict:
    """TRL's own training batch for the examples, with generation replaced by `completion_ids`."""
    trainer._generate_single_turn = lambda prompt_ids, images, fields, num_generations: (completion_ids, None)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, read by compute_loss
    trainer.model.train()
    rows = [examples[i // GROUP_SIZE] for i in range(len(examples) * GROUP_SIZE)]
    return trainer._generate_and_score_completions(rows)


def vlm_rl_rollout(policy, processor, examples: list[dict], completion_ids: list[list[int]]) -> Rollout:
    """The same batch as `vlm_rl.rl.rollout.generate` lays it out (right-padded with the pad token)."""
    pad_id = processor.tokenizer.pad_token_id
    ids = torch.tensor([c + [pad_id] * (MAX_COMPLETION_LENGTH - len(c)) for c in completion_ids])
    mask, ended = completion_mask_from_ids(ids, eos_token_ids(policy, processor))
    batch = PromptCollator(processor)(examples)
    return Rollout(
        prompt_inputs=batch.inputs,
        images_per_prompt=torch.ones(len(examples), dtype=torch.long),
        prompt_index=torch.arange(len(examples)).repeat_interleave(GROUP_SIZE),
        completion_ids=torch.where(mask.bool(), ids, pad_id),
        completion_mask=mask,
        ended=ended,
        completions=list(COMPLETIONS),
        rewards=torch.tensor(REWARDS),
    )


def grads_of(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    grads = {name: param.grad.detach().clone() for name, param in params.items()}
    for param in params.values():
        param.grad = None
    return grads


SAPO_TEMPERATURES = {"sapo_temperature_pos": 0.8, "sapo_temperature_neg": 1.3}
GRPO = ("grpo", {}, {})
GSPO = ("gspo", {"importance_sampling_level": "sequence"}, {})
CISPO = ("cispo", {"epsilon_high": 1.0 + CLIP_HIGH}, {})
SAPO = ("sapo", SAPO_TEMPERATURES, SAPO_TEMPERATURES)


@pytest.mark.parametrize(
    (
        "loss_type",
        "aggregation",
        "scale_rewards",
        "beta",
        "bias_corrected_kl",
        "temperature",
        "entropy_coef",
        "policy_loss",
    ),
    [
        ("grpo", "sequence", "group", 0.0, False, 1.0, 0.0, GRPO),
        ("grpo", "sequence", "group", 0.1, False, 0.7, 0.0, GRPO),
        ("grpo", "sequence", "group", 0.1, True, 1.0, 0.0, GRPO),
        ("bnpo", "token", "group", 0.0, False, 1.0, 0.0, GRPO),
        ("dapo", "token", "group", 0.1, False, 1.0, 0.05, GRPO),
        ("dr_grpo", "fixed", "none", 0.0, False, 1.0, 0.0, GRPO),
        ("dr_grpo", "fixed", "none", 0.1, False, 1.0, 0.0, GRPO),
        ("grpo", "sequence", "group", 0.0, False, 1.0, 0.0, GSPO),
        ("grpo", "sequence", "group", 0.1, False, 0.7, 0.0, GSPO),
        ("dapo", "token", "group", 0.0, False, 1.0, 0.05, GSPO),
        ("cispo", "token", "group", 0.0, False, 1.0, 0.0, CISPO),
        ("cispo", "token", "group", 0.1, True, 0.7, 0.05, CISPO),
        ("sapo", "sequence", "group", 0.0, False, 1.0, 0.0, SAPO),
        ("sapo", "sequence", "none", 0.1, False, 1.0, 0.05, SAPO),
    ],
)
def test_loss_and_gradients_match_trl(
    tmp_path,
    policy_and_processor,
    examples,
    loss_type,
    aggregation,
    scale_rewards,
    beta,
    bias_corrected_kl,
    temperature,
    entropy_coef,
    policy_loss,
):
    """`bias_corrected_kl` is TRL's `use_bias_correction_kl` (default True since TRL 1.x): the k3 term is
    multiplied by the importance ratio (DeepSeek-V3.2); vlm_rl's `kl_importance_weighted` (default off:
    the plain k3 of Shao et al. 2024, eq. 4). `policy_loss`: (vlm_rl's --algorithm, TRL's GRPOConfig
    fields for that loss, vlm_rl's RLConfig fields for it)."""
    algorithm_name, trl_loss_fields, config_fields = policy_loss
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    policy, processor = policy_and_processor
    completion_ids = [
        processor.tokenizer(text, add_special_tokens=False)["input_ids"] for text in COMPLETIONS
    ]
    assert all(len(c) <= MAX_COMPLETION_LENGTH for c in completion_ids)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=len(examples) * GROUP_SIZE,
        num_generations=GROUP_SIZE,
        max_completion_length=MAX_COMPLETION_LENGTH,
        loss_type=loss_type,
        scale_rewards=scale_rewards,
        beta=beta,
        use_bias_correction_kl=bias_corrected_kl,
        temperature=temperature,
        entropy_coef=entropy_coef,
        **{"epsilon": CLIP_LOW, "epsilon_high": CLIP_HIGH, **trl_loss_fields},
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=fixed_rewards,
        args=args,
        train_dataset=datasets.Dataset.from_list(examples),
        processing_class=processor,
    )
    assert trainer.model is policy
    trl_inputs = trl_batch(trainer, examples, completion_ids)
    rollout = vlm_rl_rollout(policy, processor, examples, completion_ids)
    module = PolicyWithValue(policy)
    rows = torch.arange(len(rollout))
    mask = rollout.completion_mask.float()

    # Same batch: token ids, masks (EOS included, nothing after it) and advantages.
    model_inputs = rollout.model_inputs(rows)
    trl_input_ids = torch.cat([trl_inputs["prompt_ids"], trl_inputs["completion_ids"]], dim=1)
    trl_attention = torch.cat([trl_inputs["prompt_mask"], trl_inputs["completion_mask"]], dim=1)
    torch.testing.assert_close(model_inputs["input_ids"], trl_input_ids, rtol=0, atol=0)
    torch.testing.assert_close(model_inputs["attention_mask"], trl_attention, rtol=0, atol=0)
    torch.testing.assert_close(model_inputs["pixel_values"], trl_inputs["pixel_values"])
    torch.testing.assert_close(rollout.completion_mask, trl_inputs["completion_mask"], rtol=0, atol=0)
    config = RLConfig(
        algorithm=algorithm_name,
        **config_fields,
        samples_per_prompt=GROUP_SIZE,
        max_new_tokens=MAX_COMPLETION_LENGTH,
        scale_rewards=scale_rewards != "none",
        loss_aggregation=aggregation,
        clip_range=CLIP_LOW,
        clip_range_high=CLIP_HIGH,
        entropy_coef=entropy_coef,
        temperature=temperature,
        kl_coef=beta,
        kl_importance_weighted=bias_corrected_kl,
    )
    algorithm = get_algorithm(config.algorithm)
    advantages = algorithm.advantages(rollout, config, None, config.kl_coef).advantages
    torch.testing.assert_close(advantages, trl_inputs["advantages"], rtol=1e-6, atol=1e-6)

    # Old log-probs off the current policy (as after an earlier PPO epoch); a reference that differs
    # from the policy (vlm_rl's: the adapter disabled). Both sides get the very same tensors.
    with torch.no_grad():
        current = module(model_inputs, rollout.completion_ids, temperature=temperature)["logprobs"]
        with policy.disable_adapter():
            ref_logprobs = module(model_inputs, rollout.completion_ids, temperature=temperature)["logprobs"]
    old_logprobs = current + 0.3 * torch.randn(current.shape, generator=torch.Generator().manual_seed(0))
    ratio = torch.exp(current - old_logprobs)[mask.bool()]
    assert (ratio < 1 - CLIP_LOW).any() and (ratio > 1 + CLIP_HIGH).any(), "clipping is not exercised"
    trl_inputs["old_per_token_logps"] = old_logprobs
    if beta:
        trl_inputs["ref_per_token_logps"] = ref_logprobs
        assert (ref_logprobs - current).abs()[mask.bool()].max() > 1e-2

    params = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    assert params and all("lora" in name for name in params)
    for param in params.values():
        param.grad = None

    trl_loss = trainer.compute_loss(trainer.model, trl_inputs)
    trl_loss.backward()
    trl_grads = grads_of(params)

    # vlm_rl: the objective `RLTrainer.update` calls, with the settings its config gives.
    out = module(model_inputs, rollout.completion_ids, temperature=config.temperature, with_entropy=True)
    torch.testing.assert_close(out["logprobs"][mask.bool()], current[mask.bool()])
    loss, _ = core.rl_objective(
        out["logprobs"],
        old_logprobs,
        advantages,
        mask,
        objective_settings(config, algorithm, config.kl_coef),
        entropy=out["entropy"],
        ref_logprobs=ref_logprobs if beta else None,
    )
    loss.backward()
    vlm_rl_grads = grads_of(params)

    assert abs(loss.item() - trl_loss.item()) <= LOSS_ATOL, (loss.item(), trl_loss.item())
    assert abs(trl_loss.item()) > 1e-3
    for name, trl_grad in trl_grads.items():
        scale = trl_grad.norm().item()
        difference = (vlm_rl_grads[name] - trl_grad).norm().item()
        assert difference <= GRAD_RTOL * max(scale, 1e-6), (name, difference, scale)
    assert sum(g.norm() for g in trl_grads.values()) > 0
