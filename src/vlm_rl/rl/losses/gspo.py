"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025, "Group Sequence Policy Optimization",
arXiv 2507.18071), `--algorithm gspo`.

GRPO's group-normalised advantages with one importance ratio per sequence instead of one per token
(eq. 5-7):

    s_i = (pi(y_i | x) / pi_old(y_i | x)) ^ (1 / |y_i|) = exp(1/|y_i| * sum_t log r_{i,t})
    J = E[ 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) ]

so a sequence is clipped whole, and every token of a sequence gets the same weight. The paper's
objective is a mean over sequences (`--loss_aggregation sequence`) and its clip range is two orders
smaller than GRPO's, as the ratio is a per-token geometric mean (3e-4 / 4e-4: `--clip_range 3e-4
--clip_range_high 4e-4`). TRL: `importance_sampling_level="sequence"`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_rl.rl import core
from vlm_rl.rl.algorithms import CLIP_FLAGS, GroupBaseline, group_normalised, register_algorithm


@dataclass(frozen=True)
class SequenceClippedSurrogate:
    """GSPO's policy loss per token (N, T): -min(s_i A, clip(s_i, 1 - clip_low, 1 + clip_high) A)
    with s_i the sequence's ratio (its tokens' mean log-ratio, exponentiated), the same for each
    of its tokens. Advantages (N, 1) per sequence (or (N, T): then GSPO's ratio times each token's
    advantage)."""

    clip_low: float = 0.2
    clip_high: float | None = None

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        clip_high = self.clip_low if self.clip_high is None else self.clip_high
        sequence_ratio = torch.exp(core.masked_mean(logprobs - old_logprobs, mask, dim=1)).unsqueeze(1)
        unclipped = -advantages * sequence_ratio
        clipped = -advantages * torch.clamp(sequence_ratio, 1.0 - self.clip_low, 1.0 + clip_high)
        per_token = torch.maximum(unclipped, clipped).expand_as(logprobs)
        with torch.no_grad():
            clipped_tokens = (clipped > unclipped).expand_as(logprobs).float()
            stats = {
                "clip_fraction": core.masked_mean(clipped_tokens, mask),
                "sequence_ratio": sequence_ratio.mean(),
            }
        return per_token, stats


register_algorithm(
    GroupBaseline(
        "gspo",
        group_normalised,
        loss=lambda config: SequenceClippedSurrogate(config.clip_range, config.clip_range_high),
        reads=CLIP_FLAGS | {"scale_rewards"},
    )
)
