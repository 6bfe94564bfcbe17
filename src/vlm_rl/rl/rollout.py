"""Rollouts: sample completions for a batch of prompts and score them token by token.

A `Rollout` is the typed container that carries one RL step's samples between the stages
(generate -> reward -> old/ref log-probs and values -> advantages -> update).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

from vlm_rl.models.inputs import append_completion, select_rows
from vlm_rl.models.loading import vlm_trunk
from vlm_rl.models.prefill import sampling_inputs
from vlm_rl.rl.core import entropy_from_logits, selective_log_softmax


@dataclass
class Rollout:
    """N = num_prompts x samples_per_prompt sequences; T = completion length (right-padded)."""

    prompt_inputs: BatchFeature
    """Processor output for the distinct prompts (num_prompts rows, left-padded)."""
    images_per_prompt: torch.Tensor
    """(num_prompts,) number of images of each prompt."""
    prompt_index: torch.Tensor
    """(N,) which prompt each sample answers (samples of a prompt are contiguous)."""
    completion_ids: torch.Tensor
    """(N, T) sampled tokens, padded with the pad token after the end."""
    completion_mask: torch.Tensor
    """(N, T) 1 for tokens up to and including the first EOS."""
    ended: torch.Tensor
    """(N,) bool: the sample emitted EOS within max_new_tokens."""
    completions: list[str]
    """Decoded completion texts (special tokens skipped)."""
    scores: torch.Tensor | None = None
    """(N,) sequence reward used for the update (after penalties)."""
    old_logprobs: torch.Tensor | None = None
    """(N, T) log-probs under the policy that sampled (no grad)."""
    ref_logprobs: torch.Tensor | None = None
    """(N, T) log-probs under the reference (adapter disabled); None when the KL term is off."""
    values: torch.Tensor | None = None
    """(N, T) critic values V(s_t) before each completion token (PPO)."""
    advantages: torch.Tensor | None = None
    """(N, T) or (N,) advantages."""
    returns: torch.Tensor | None = None
    """(N, T) value targets (PPO)."""
    sample_mask: torch.Tensor | None = None
    """(N,) 1 for samples that take part in the update (dynamic sampling drops the others)."""
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_index)

    def model_inputs(self, rows: torch.Tensor) -> BatchFeature:
        """Model inputs (prompt + completion, with the prompt's images) for the given sample rows."""
        prompts = select_rows(self.prompt_inputs, self.prompt_index[rows], self.images_per_prompt)
        return append_completion(prompts, self.completion_ids[rows], self.completion_mask[rows])


def completion_mask_from_ids(
    completion_ids: torch.Tensor, eos_token_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens up to and including the first EOS; and whether an EOS occurred.

    completion_ids: (N, T) -> mask (N, T) long, ended (N,) bool.
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    ended = is_eos.any(dim=1)
    first_eos = torch.where(
        ended, is_eos.float().argmax(dim=1), torch.full_like(ended, completion_ids.shape[1], dtype=torch.long)
    )
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device).unsqueeze(0)
    return (positions <= first_eos.unsqueeze(1)).long(), ended


def eos_token_ids(model: PreTrainedModel, processor: ProcessorMixin) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if processor.tokenizer.eos_token_id is not None:
        ids.append(processor.tokenizer.eos_token_id)
    return sorted(set(ids))


def suppressed_tokens(processor: ProcessorMixin, keep: list[int]) -> list[int]:
    """Special tokens a completion must never contain (image placeholders, chat markers): sampling
    one would break the next forward pass (image tokens must match image features)."""
    return sorted(set(processor.tokenizer.all_special_ids) - set(keep))


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    prompt_inputs: BatchFeature,
    images_per_prompt: torch.Tensor,
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> Rollout:
    """Sample `samples_per_prompt` completions for each prompt (one `generate` call on the
    expanded batch, each prompt prefilled once where its family allows: `models.prefill`)."""
    eos = eos_token_ids(model, processor)
    inputs = sampling_inputs(model, processor, prompt_inputs, images_per_prompt, samples_per_prompt)
    sampling = (
        dict(do_sample=False)
        if greedy
        else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    )
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_tokens=suppressed_tokens(processor, keep=eos),
        **sampling,
    )
    completion_ids = output[:, inputs["input_ids"].shape[1] :]
    completion_mask, ended = completion_mask_from_ids(completion_ids, eos)
    completion_ids = torch.where(completion_mask.bool(), completion_ids, processor.tokenizer.pad_token_id)
    texts = processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    num_prompts = len(images_per_prompt)
    return Rollout(
        prompt_inputs=prompt_inputs,
        images_per_prompt=images_per_prompt,
        prompt_index=torch.arange(num_prompts).repeat_interleave(samples_per_prompt),
        completion_ids=completion_ids.cpu(),
        completion_mask=completion_mask.cpu(),
        ended=ended.cpu(),
        completions=[t.strip() for t in texts],
    )


class PolicyWithValue(nn.Module):
    """The policy (a LoRA-wrapped VLM) and, for PPO, a value head on the same trunk.

    One forward pass over prompt + completion returns per-token log-probs of the completion
    (logits computed only at completion positions), optionally entropies, and values. The critic
    shares the policy's trunk: no second model in memory, and its value is read from the same
    hidden state that predicts the token (V(s_t) before token t is generated).
    """

    def __init__(self, policy: nn.Module, value_head: nn.Linear | None = None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head

    # Gradient checkpointing belongs to the policy (TRL's generation context toggles it).
    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.policy.is_gradient_checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.policy.gradient_checkpointing_disable()

    def forward(
        self,
        inputs: BatchFeature,
        completion_ids: torch.Tensor,
        temperature: float = 1.0,
        with_entropy: bool = False,
        with_values: bool = False,
    ) -> dict[str, torch.Tensor]:
        hidden = vlm_trunk(self.policy)(**inputs).last_hidden_state  # (N, L, H)
        T = completion_ids.shape[1]
        hidden = hidden[:, -T - 1 : -1]  # states that predict each completion token
        lm_head = self.policy.get_output_embeddings()
        logits = lm_head(hidden).float() / temperature  # (N, T, V)
        out = {"logprobs": selective_log_softmax(logits, completion_ids)}
        if with_entropy:
            out["entropy"] = entropy_from_logits(logits)
        if with_values and self.value_head is not None:
            out["values"] = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return out
