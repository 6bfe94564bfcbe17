"""SAPO: Soft Adaptive Policy Optimization (Gao et al., Qwen, "Soft Adaptive Policy Optimization",
arXiv 2511.20347), `--algorithm sapo`.

GRPO's group-normalised advantages; the hard clip is replaced by a smooth gate on each token's
ratio r (eq. 5-7):

    J = E[ 1/G sum_i 1/|y_i| sum_t f(r_{i,t}) A_i ],   f(r) = sigmoid(tau (r - 1)) * 4 / tau
    tau = tau_pos if A_i > 0 else tau_neg

The gradient weight f'(r) = 4 sigmoid(tau (r - 1)) (1 - sigmoid(tau (r - 1))) is 1 on-policy (r = 1:
the plain policy gradient) and decays smoothly as r leaves 1, faster for negative advantages
(tau_neg > tau_pos: their updates destabilise more). Its objective averages tokens per sequence,
then sequences (`--loss_aggregation sequence`). TRL: `loss_type="sapo"`, `sapo_temperature_pos`,
`sapo_temperature_neg` (defaults 1.0 and 1.05, as here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_rl.rl import core
from vlm_rl.rl.algorithms import GroupBaseline, group_normalised, register_algorithm


@dataclass(frozen=True)
class SoftGate:
    """SAPO's policy loss per token (N, T): -sigmoid(tau (r - 1)) * 4 / tau * A, r = pi / pi_old,
    tau = temperature_pos where A > 0, else temperature_neg."""

    temperature_pos: float = 1.0
    temperature_neg: float = 1.05

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        ratio = torch.exp(logprobs - old_logprobs)
        tau = torch.where(advantages > 0, self.temperature_pos, self.temperature_neg)
        gate = torch.sigmoid(tau * (ratio - 1.0))
        with torch.no_grad():  # the gradient's weight relative to the plain policy gradient
            stats = {"gate_weight": core.masked_mean((4 * gate * (1 - gate)).expand_as(mask), mask)}
        return -gate * 4.0 / tau * advantages, stats


register_algorithm(
    GroupBaseline(
        "sapo",
        group_normalised,
        loss=lambda config: SoftGate(config.sapo_temperature_pos, config.sapo_temperature_neg),
        reads=frozenset({"sapo_temperature_pos", "sapo_temperature_neg", "scale_rewards"}),
    )
)
