"""Score G completions of a prompt with the prompt forwarded once (a shared prefix).

In the scoring and update passes of an RL step each prompt (its image features and prompt tokens)
is followed by G sampled completions. Forwarding prompt + completion per sample runs the prompt
through the language model G times. Here the U distinct prompts of a batch are forwarded once,
with gradients, through the family's own forward (`use_cache=True`); the KV cache is gathered to
the N = sum of G rows (an index-select per layer, so the backward pass sums the G rows' gradients
into the one prefix), and the completion tokens run on top of it with the full attention mask
(prompt padding + completion mask) and the positions a single forward over prompt + completion
gives them. The same idea as Prefix Grouper (Liu et al. 2025, "Efficient GRPO Training through
Shared-Prefix Forward"), which splits attention into prefix self-attention and suffix
concat-attention inside a modified model; here the stock HF attention with a cache does that split.

Exact up to float summation order: per-token log-probs and values equal those of the per-sample
forward within 3e-6 in float32, LoRA/projector gradients within 2.4e-6 of each tensor's largest
entry (tests/test_shared_prefix.py asserts 1e-5 and 1e-5 of it for every family row with
`shared_prefix`). Reward models use the same split for a preference pair's two answers
(`sequence_end_states`: the state at each answer's last token). Falls back to the per-sample
forward (same results, no saving) when a family has no `shared_prefix`, the prompts repeat too
little (`MIN_ROWS_PER_PROMPT`), the prompts are right-padded, or gradient checkpointing is on in a
pass with gradients (HF then turns the cache off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import BatchFeature

from vlm_rl.models.families import completion_token_type, model_family
from vlm_rl.models.inputs import TEXT_KEYS, append_completion, select_rows
from vlm_rl.models.loading import vlm_trunk


@dataclass
class PromptGroups:
    """N sequences prompt + completion whose prompts are U distinct ones (U <= N).

    The inputs of `completion_states`: instead of the N full sequences, the U prompts once and which
    prompt each row continues.
    """

    prompt_inputs: BatchFeature
    """Processor output for the U distinct prompts (left-padded to a common length L)."""
    images_per_prompt: torch.Tensor
    """(U,) number of images of each prompt."""
    prompt_index: torch.Tensor
    """(N,) long: the prompt (0..U-1) each row continues."""
    completion_mask: torch.Tensor
    """(N, T) 1 for completion tokens to attend to (up to and including EOS)."""

    @classmethod
    def of_rows(
        cls,
        prompt_inputs: BatchFeature,
        images_per_prompt: torch.Tensor,
        prompt_of_row: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> PromptGroups:
        """The groups of N rows answering prompts `prompt_of_row` (N,) of a P-prompt batch
        `prompt_inputs` (images_per_prompt (P,)): only the prompts the rows use are kept."""
        distinct, prompt_index = torch.unique(prompt_of_row.cpu(), return_inverse=True)
        return cls(
            select_rows(prompt_inputs, distinct, images_per_prompt),
            images_per_prompt.cpu()[distinct],
            prompt_index,
            completion_mask,
        )

    def __len__(self) -> int:
        return len(self.prompt_index)

    def to(self, device: torch.device | str) -> PromptGroups:
        return PromptGroups(
            BatchFeature(dict(self.prompt_inputs)).to(device),
            self.images_per_prompt,
            self.prompt_index.to(device),
            self.completion_mask.to(device),
        )

    def full_inputs(self, completion_ids: torch.Tensor, completion_token_type: int = 0) -> BatchFeature:
        """Model inputs of the N full sequences (each prompt repeated for its rows, vision included);
        `completion_token_type`: the family's (`FamilyFacts.completion_token_type`)."""
        prompts = select_rows(self.prompt_inputs, self.prompt_index, self.images_per_prompt)
        return append_completion(prompts, completion_ids, self.completion_mask, completion_token_type)


MIN_ROWS_PER_PROMPT = 1.5
"""Share only when the N rows are at least 1.5x the U distinct prompts (a third of the rows repeat
a prompt). The shared path runs two forwards and gathers the cache to N rows; with few repeats that
can cost more than the N - U prompt forwards it saves. Measured (tiny-llava-agent, 48-token prompts,
2-token completions, forward + backward of N = 64 rows, median of 7, 2 threads; two runs): shared /
per-row 0.65x at N/U = 2, 0.79-0.91x at 1.4-1.6, 0.99-1.09x at 1.1-1.3 (with 1 thread sharing still
won at 1.1: 0.88x). In the PPO agent recipe (32 maps x 2 episodes) most update minibatches have
N/U of 1.15-1.3: two 40-step runs took 3.93 ms per turn to update with sharing and 3.50 without;
`benchmarks/agent_rollout.py --train-algorithm ppo` (a random adapter, longer episodes) reads within
noise either way. GRPO groups (N/U = G >= 2) always share."""


def supports_shared_prefix(model: nn.Module) -> bool:
    """Whether `model`'s family row allows the shared-prefix forward (`FamilyFacts.shared_prefix`)."""
    family = model_family(model)
    return family is not None and family.shared_prefix


def shares_prefix(model: nn.Module, groups: PromptGroups) -> bool:
    """Whether `completion_states` forwards each prompt once for these groups (else per row)."""
    if not supports_shared_prefix(model) or len(groups) < MIN_ROWS_PER_PROMPT * len(groups.images_per_prompt):
        return False
    if not groups.prompt_inputs["attention_mask"][:, -1].all():  # right padding: completions not adjacent
        return False
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    # HF disables the cache under gradient checkpointing in training.
    return not (torch.is_grad_enabled() and base.training and base.is_activation_checkpointing)


def completion_states(
    model: nn.Module, inputs: BatchFeature | PromptGroups, completion_ids: torch.Tensor
) -> torch.Tensor:
    """Last hidden states that predict each completion token: (N, T, H), row n's state t being the
    one at the position before completion token t (the prompt's last token for t = 0).

    model: a VLM, LoRA-wrapped or not; inputs: the full sequences' model inputs (prompt +
    completion, N rows), or `PromptGroups` (each prompt forwarded once where `shares_prefix`);
    completion_ids: (N, T).
    """
    if isinstance(inputs, PromptGroups):
        return _prompt_end_and_completion_states(model, inputs, completion_ids)[:, :-1]
    T = completion_ids.shape[1]
    hidden = vlm_trunk(model)(**inputs).last_hidden_state  # (N, L + T, H)
    return hidden[:, -T - 1 : -1]


def sequence_end_states(model: nn.Module, groups: PromptGroups, completion_ids: torch.Tensor) -> torch.Tensor:
    """(N, H): each row's last hidden state at its final token (its last completion token under
    `groups.completion_mask`, right-padded; the prompt's last token for an empty completion), where a
    reward model reads its score. Each prompt is forwarded once where `shares_prefix`."""
    states = _prompt_end_and_completion_states(model, groups, completion_ids)  # (N, T + 1, H)
    lengths = groups.completion_mask.sum(dim=1).long()
    return states[torch.arange(len(states), device=states.device), lengths]


def _prompt_end_and_completion_states(
    model: nn.Module, groups: PromptGroups, completion_ids: torch.Tensor
) -> torch.Tensor:
    """(N, T + 1, H): the states at the prompt's last token and at each completion token."""
    T = completion_ids.shape[1]
    if shares_prefix(model, groups):
        trunk = vlm_trunk(model)
        prompts = groups.prompt_inputs
        index = groups.prompt_index
        prefix = trunk(**prompts, use_cache=True)  # (U, L, H), the cache of the U prompts
        cache = prefix.cache
        if cache is not None:  # a family that ignores use_cache cannot share: the full forward below
            cache.batch_select_indices(
                index
            )  # (U, heads, L, d) -> (N, heads, L, d) per layer, differentiable
            mask = groups.completion_mask.to(prompts["attention_mask"].dtype)
            suffix = trunk(
                input_ids=completion_ids,
                attention_mask=torch.cat([prompts["attention_mask"][index], mask], dim=1),
                position_ids=_completion_positions(model, groups, completion_ids),
                cache=cache,
                use_cache=True,
            ).last_hidden_state  # (N, T, H)
            return torch.cat([prefix.last_hidden_state[:, -1:][index], suffix], dim=1)
    inputs = groups.full_inputs(completion_ids, completion_token_type(model))
    hidden = vlm_trunk(model)(**inputs).last_hidden_state  # (N, L + T, H)
    return hidden[:, -T - 1 :]


def _completion_positions(
    model: nn.Module, groups: PromptGroups, completion_ids: torch.Tensor
) -> torch.Tensor:
    """The completion tokens' position ids as one forward over prompt + completion computes them:
    by the family's `position_ids_method` (Qwen-VL's 3-D RoPE index) over the N full sequences'
    text inputs and image grids, sliced to the completion; for a family without one, the positions
    continue the prompt's (L, L + 1, ...: a forward's default, padding included)."""
    family = model_family(model)
    if family is None or family.position_ids_method is None:
        length, (rows, T) = groups.prompt_inputs["input_ids"].shape[1], completion_ids.shape
        return torch.arange(length, length + T, device=completion_ids.device).expand(rows, T)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    owner_path, _, name = family.position_ids_method.rpartition(".")
    method = getattr(base.get_submodule(owner_path), name)
    text = {k: v for k, v in groups.prompt_inputs.items() if k in (*TEXT_KEYS, "image_grid_thw")}
    rows = select_rows(text, groups.prompt_index, groups.images_per_prompt)
    full = append_completion(rows, completion_ids, groups.completion_mask)
    position_ids = method(**full)[0]  # (..., N, L + T)
    return position_ids[..., -completion_ids.shape[1] :]
