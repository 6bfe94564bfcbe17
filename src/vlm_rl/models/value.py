"""The policy and its critic as one module: per-token log-probs, entropies and values in one pass."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import BatchFeature

from vlm_rl.models.shared_prefix import PromptGroups, completion_states
from vlm_rl.rl.core import entropy_from_logits, selective_log_softmax


class PolicyWithValue(nn.Module):
    """The policy (a LoRA-wrapped VLM) and, for PPO, a value head on the same trunk.

    One forward pass over prompt + completion returns per-token log-probs of the completion
    (logits computed only at completion positions), optionally entropies, and values; given
    `PromptGroups`, each distinct prompt is forwarded once for all its completions
    (`models.shared_prefix`). The critic
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
        return self.policy.is_activation_checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.policy.gradient_checkpointing_disable()

    def forward(
        self,
        inputs: BatchFeature | PromptGroups,
        completion_ids: torch.Tensor,
        temperature: float = 1.0,
        with_entropy: bool = False,
        with_values: bool = False,
        entropy_grad: bool = True,
        excluded_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """inputs: the N full sequences' model inputs (prompt + completion) or `PromptGroups`;
        completion_ids: (N, T). Returns (N, T) `logprobs`, and `entropy` / `values` when asked;
        `entropy_grad=False`: the entropy is computed without a graph (logged, not trained on);
        `excluded_tokens`: ids outside the distribution (probability 0, the others renormalised), as
        the engine that sampled them never draws them (`Rollout.excluded_tokens`)."""
        hidden = completion_states(self.policy, inputs, completion_ids)  # (N, T, H), predict each token
        logits = output_logits(self.policy, hidden) / temperature  # (N, T, V)
        if excluded_tokens is not None and len(excluded_tokens):
            # a large finite value, not -inf: 0 * log 0 stays 0 in the entropy
            logits = logits.index_fill(-1, excluded_tokens.to(logits.device), -1e30)
        out = {"logprobs": selective_log_softmax(logits, completion_ids)}
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                out["entropy"] = entropy_from_logits(logits)
        if with_values and self.value_head is not None:
            out["values"] = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return out


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The float32 logits the model's own forward computes from its trunk's last hidden states, so
    the scored distribution is the sampled one: the output embedding, then what the forward applies
    after it, read from the text config: `logit_scale` (Cohere-family language models such as Aya
    Vision's: logits * 0.0625 in the released checkpoints) and `final_logit_softcapping` (Gemma2-based
    models such as PaliGemma2: cap * tanh(logits / cap), cap 30). tests/test_models.py checks this
    against the forward of every tiny family, the generic path's included."""
    text_config = model.config.get_text_config()
    logits = model.get_output_embeddings()(hidden).float()
    scale = getattr(text_config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


VALUE_HEAD_NAME = "value_head.safetensors"


def save_value_head(
    value_head: nn.Linear, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """`value_head`'s weights, or `state_dict` (its weights gathered from FSDP or ZeRO-3 shards)."""
    from safetensors.torch import save_file

    state_dict = value_head.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(state, str(Path(folder) / VALUE_HEAD_NAME))


def load_value_head(folder: str | Path) -> nn.Linear | None:
    """The value head saved beside an adapter (a PPO run's final/ or checkpoint adapter/), or None."""
    from safetensors.torch import load_file

    path = Path(folder) / VALUE_HEAD_NAME
    if not path.is_file():
        return None
    state = load_file(str(path))
    head = nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return head
