"""Rollouts: sample completions for a batch of prompts (one batched `generate` call).

A `Rollout` is the typed container that carries one RL step's samples between the stages
(generate -> rewards -> old/ref log-probs and values -> advantages -> update).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import BatchFeature, GenerationConfig, PreTrainedModel, ProcessorMixin

from vlm_rl.models.families import completion_token_type
from vlm_rl.models.inputs import append_completion, select_rows
from vlm_rl.models.prefill import generate_exactly, sampling_inputs


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
    rewards: torch.Tensor | None = None
    """(N,) sequence reward used for the update (the reward components' total, after penalties)."""
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
    # Every row is a turn of an episode; a single-turn sample is an episode of one turn, in the
    # group of its prompt's samples (the defaults). Agents (vlm_rl.rl.agent) give all three.
    group_index: torch.Tensor | None = None
    """(N,) the group of the row's episode, for group baselines: the samples of a prompt
    (default: `prompt_index`), or the episodes of the same env seed."""
    episode_index: torch.Tensor | None = None
    """(N,) the episode each turn belongs to (default: one episode per row)."""
    turn_index: torch.Tensor | None = None
    """(N,) the turn's position in its episode (0, 1, ...; default: 0)."""
    observation_keys: list[str] | None = None
    """A hash of what the policy saw on each turn (GiGPO's step groups)."""
    completion_token_type: int = 0
    """`token_type_ids` of completion tokens (the family's; PaliGemma: 1, its causal suffix)."""
    engine_logprobs: torch.Tensor | None = None
    """(N, T) log-probs of the sampled tokens under the engine that sampled them, 0 off the mask
    (a vLLM server's, `vlm_rl.rl.engines`); None when the trainer's own generate sampled."""
    excluded_tokens: torch.Tensor | None = None
    """Token ids the engine never samples and normalises its log-probs without (a vLLM server's
    banned special tokens); the trainer scores the rollout over the same support. None: the whole
    vocabulary (the trainer's own generate: old and new log-probs both over it)."""
    episodes: list | None = None
    """The episodes an agent's rows are the turns of (`vlm_rl.rl.agent.Episode`); None for prompts."""

    def __post_init__(self):
        n = len(self.prompt_index)
        if self.group_index is None:
            self.group_index = self.prompt_index.clone()
        if self.episode_index is None:
            self.episode_index = torch.arange(n)
        if self.turn_index is None:
            self.turn_index = torch.zeros(n, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.prompt_index)

    def model_inputs(self, rows: torch.Tensor) -> BatchFeature:
        """Model inputs (prompt + completion, with the prompt's images) for the given sample rows."""
        prompts = select_rows(self.prompt_inputs, self.prompt_index[rows], self.images_per_prompt)
        return append_completion(
            prompts, self.completion_ids[rows], self.completion_mask[rows], self.completion_token_type
        )


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
    """Every id that ends a completion: the generation config's (Qwen-VL checkpoints list several)
    and the tokenizer's. A new list: the model's generation_config is never changed."""
    eos = model.generation_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
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
    # Every setting given (top_k=0: transformers' default is 50), none taken from the checkpoint
    # (`generate_exactly`): the samples come from the distribution the trainer scores.
    sampling = (
        dict(do_sample=False)
        if greedy
        else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    )
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_tokens=suppressed_tokens(processor, keep=eos),
        **sampling,
    )
    output = generate_exactly(model, generation_config, **inputs)
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
        completion_token_type=completion_token_type(model),
    )
