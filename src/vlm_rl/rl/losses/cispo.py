"""CISPO: Clipped IS-weight Policy Optimization (MiniMax, "MiniMax-M1", arXiv 2506.13585, sec. 3.1),
`--algorithm cispo`.

GRPO's group-normalised advantages; instead of clipping the token updates (which drops the gradient
of clipped tokens, often the rare "reflective" ones), every token keeps a REINFORCE gradient,
weighted by its importance-sampling ratio truncated from above and detached (eq. 4-5):

    J = E[ 1 / sum_i |o_i| * sum_i sum_t sg(r^_{i,t}) A_{i,t} log pi(o_{i,t}) ]
    r^_{i,t} = clip(r_{i,t}, 1 - eps_low, 1 + eps_high)

MiniMax-M1 sets no lower bound (eps_low large), as here: the weight is min(r, 1 + clip_range_high)
(`--clip_range_high`, else `--clip_range`). Its normalisation is over all tokens of the batch
(`--loss_aggregation token`). TRL: `loss_type="cispo"`, whose `epsilon_high` is the bound itself,
1 + clip_range_high (ScaleRL's eps_max; TRL recommends 5.0, i.e. `--clip_range_high 4`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_rl.rl import core
from vlm_rl.rl.algorithms import GroupBaseline, group_normalised, register_algorithm


@dataclass(frozen=True)
class TruncatedISReinforce:
    """CISPO's policy loss per token (N, T): -sg(min(r, 1 + clip_high)) * A * log pi, r = pi / pi_old.
    Its gradient is -sg(min(r, 1 + clip_high)) * A * grad log pi on every token (none is zeroed)."""

    clip_high: float = 0.2

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        ratio = torch.exp(logprobs - old_logprobs)
        weight = torch.clamp(ratio, max=1.0 + self.clip_high).detach()
        with torch.no_grad():
            stats = {"clip_fraction": core.masked_mean((ratio > 1.0 + self.clip_high).float(), mask)}
        return -weight * advantages * logprobs, stats


def _upper_bound(config) -> float:
    return config.clip_range if config.clip_range_high is None else config.clip_range_high


register_algorithm(
    GroupBaseline(
        "cispo",
        group_normalised,
        loss=lambda config: TruncatedISReinforce(_upper_bound(config)),
        reads=frozenset({"clip_range_high", "scale_rewards"}),
    )
)
