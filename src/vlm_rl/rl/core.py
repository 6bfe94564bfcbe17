"""RL math as pure functions: log-probs, KL, advantages (GAE, GRPO, RLOO) and clipped losses.

Shapes: N = sequences in the batch (prompts x samples), T = completion length (right-padded).
`mask` is the completion mask (1 for real completion tokens, 0 for padding), float or bool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k2", "k3"]
LossAggregation = Literal["token", "sequence", "fixed"]


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over everything, or along `dim`). Empty -> 0."""
    mask = mask.to(values.dtype)
    if dim is None:
        return masked_sum(values, mask) / mask.sum().clamp(min=1.0)
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked entries; `shift_mean=False` keeps the mean (PPO rewards)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[index] without materialising the full log-softmax.

    logits: (N, T, V), index: (N, T) long -> (N, T).
    """
    logits = logits.float()
    return torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: (N, T, V) -> (N, T)."""
    logits = logits.float()
    log_probs = F.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL", 2020).

    k1 = log r, k2 = (log r)^2 / 2, k3 = (r_inv - 1) - log r_inv with log r = logp - ref_logp
    (k3 is unbiased and always >= 0; k1 is unbiased but can be negative). (N, T) -> (N, T).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO per-token rewards: -kl_coef * kl at every token, plus the sequence score at its last token.

    (Ziegler et al. 2019, eq. 2.) scores: (N,), kl/mask: (N, T) -> (N, T).
    """
    rewards = -kl_coef * kl * mask
    last = (mask.long().sum(1) - 1).clamp(min=0)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores * (mask.sum(1) > 0)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), over completion tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    Positions past a sequence's end (mask 0) have V = 0 and A = 0.
    rewards, values, mask: (N, T) -> advantages, returns: (N, T).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    T = values.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, advantages + values


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, divided by the group's std (Shao et al. 2024,
    eq. 3); `scale_by_std=False` gives Dr. GRPO (Liu et al. 2025). rewards: (N,) grouped contiguously
    (N = prompts x group_size) -> (N,)."""
    if group_size < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt")
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: reward minus the mean reward of the other samples of its group (Ahmadian et al. 2024,
    eq. 5): A_i = r_i - (sum_j r_j - r_i) / (k - 1). (N,) -> (N,)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """True for each sample whose group's rewards are not all equal (dynamic sampling, DAPO). (N,) -> (N,)."""
    grouped = rewards.view(-1, group_size)
    varies = (grouped.max(dim=1).values - grouped.min(dim=1).values) > 1e-6
    return varies.repeat_interleave(group_size)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAggregation = "token",
    max_length: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    token: mean over all tokens of the minibatch (DAPO, Yu et al. 2025; with gradient accumulation
        or several processes each minibatch is averaged separately, as TRL's "bnpo");
    sequence: mean over tokens of each sequence, then over sequences (GRPO, Shao et al. 2024);
    fixed: sum over tokens / (N * max_length) (Dr. GRPO, Liu et al. 2025).
    """
    mask = mask.to(per_token.dtype)
    if mode == "token":
        return masked_mean(per_token, mask)
    if mode == "sequence":
        return (masked_sum(per_token, mask, dim=1) / mask.sum(1).clamp(min=1.0)).mean()
    if mode == "fixed":
        length = max_length or per_token.shape[1]
        return masked_sum(per_token, mask) / (per_token.shape[0] * length)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose token, sequence or fixed")


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    aggregation: LossAggregation = "token",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    L = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A), ratio = exp(logp - old_logp).
    `clip_high` > `clip_low` is DAPO's clip-higher. advantages: (N, T) or (N,) (broadcast over tokens).
    Returns the loss and stats: clip fraction and approx KL ((ratio - 1) - log ratio, k3).
    """
    clip_high = clip_low if clip_high is None else clip_high
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    loss = aggregate(per_token, mask, aggregation, max_length)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO value loss with the value clipped around its rollout-time estimate (as in OpenAI baselines):
    0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), masked mean. Returns (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    return loss, masked_mean((clipped_loss > unclipped_loss).float(), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over masked entries (1 = perfect critic)."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


@dataclass(frozen=True)
class ObjectiveSettings:
    """The coefficients of `rl_objective` (flat, from the RL config)."""

    clip_low: float = 0.2
    clip_high: float | None = None
    aggregation: LossAggregation = "token"
    max_length: int | None = None
    """Completion length limit (the "fixed" aggregation divides by it)."""
    entropy_coef: float = 0.0
    value_coef: float = 0.0
    value_clip_range: float = 0.2
    kl_coef: float = 0.0
    """Weight of the KL-to-reference term in the loss (0 or no reference log-probs: no term)."""
    kl_estimator: KLEstimator = "k3"
    kl_importance_weighted: bool = False
    """Multiply the per-token KL by the ratio pi/pi_old (DeepSeek-V3.2's unbiased KL; TRL's
    `use_bias_correction_kl`). Off: the plain estimator (Shao et al. 2024, eq. 4)."""


def rl_objective(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: ObjectiveSettings,
    *,
    entropy: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole loss of one minibatch, to minimise, for every algorithm (PPO, GRPO, RLOO, ...):

        loss = clipped policy loss                          (Schulman et al. 2017, eq. 7)
               - entropy_coef * mean token entropy          (when `entropy` is given)
               + value_coef * clipped value loss            (when `values` is given: a critic)
               + kl_coef * aggregated KL(pi || pi_ref)      (when `ref_logprobs` is given: KL in the loss)

    logprobs, old_logprobs, mask, entropy, values, old_values, returns, ref_logprobs: (N, T);
    advantages: (N, T) or (N,). An algorithm whose KL enters the reward (PPO) passes no
    `ref_logprobs`. Returns the loss and detached statistics named as the trainer logs them
    (loss/policy, loss/value, loss/kl, policy/entropy, policy/clip_fraction, policy/approx_kl, ...).
    """
    s = settings
    policy_loss, policy_stats = clipped_policy_loss(
        logprobs, old_logprobs, advantages, mask, s.clip_low, s.clip_high, s.aggregation, s.max_length
    )
    loss = policy_loss
    stats = {
        "loss/policy": policy_loss.detach(),
        "policy/clip_fraction": policy_stats["clip_fraction"],
        "policy/approx_kl": policy_stats["approx_kl"],
    }
    if entropy is not None:
        mean_entropy = masked_mean(entropy, mask)
        loss = loss - s.entropy_coef * mean_entropy
        stats["policy/entropy"] = mean_entropy.detach()
    if values is not None:
        value_loss, value_clip = clipped_value_loss(values, old_values, returns, mask, s.value_clip_range)
        loss = loss + s.value_coef * value_loss
        stats["loss/value"] = value_loss.detach()
        stats["loss/value_clip_fraction"] = value_clip.detach()
    if ref_logprobs is not None and s.kl_coef > 0:
        kl = kl_penalty(logprobs, ref_logprobs, s.kl_estimator)
        if s.kl_importance_weighted:
            kl = kl * torch.exp(logprobs - old_logprobs)
        kl_loss = aggregate(kl, mask, s.aggregation, s.max_length)
        loss = loss + s.kl_coef * kl_loss
        stats["loss/kl"] = kl_loss.detach()
    stats["loss/total"] = loss.detach()
    return loss, stats


# -- multi-turn episodes ---------------------------------------------------------------------------
# A batch of agent turns: N rows, one per turn, each its own (prompt, completion) sample.
# episode_index (N,) says which episode a turn belongs to and turn_index (N,) its position in it
# (0, 1, ...); rows may come in any order. An episode's last turn is its last step: the value
# after it is 0 (terminated, or truncated at the turn limit as VAGEN treats it).


def _episode_rows(episode_index: torch.Tensor, turn_index: torch.Tensor) -> list[torch.Tensor]:
    """Row indices of each episode, in turn order."""
    rows = []
    for episode in torch.unique(episode_index):
        members = torch.nonzero(episode_index == episode).flatten()
        rows.append(members[torch.argsort(turn_index[members])])
    return rows


def discounted_returns(
    turn_rewards: torch.Tensor, episode_index: torch.Tensor, turn_index: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Return-to-go of each turn, G_k = r_k + gamma * G_{k+1} within its episode. (N,) -> (N,)."""
    returns = torch.zeros_like(turn_rewards, dtype=torch.float)
    for rows in _episode_rows(episode_index, turn_index):
        running = 0.0
        for row in reversed(rows.tolist()):
            running = float(turn_rewards[row]) + gamma * running
            returns[row] = running
    return returns


def turn_level_gae(
    turn_rewards: torch.Tensor,
    turn_values: torch.Tensor,
    episode_index: torch.Tensor,
    turn_index: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with one step per turn (Schulman et al. 2016, eq. 16, over an episode's turns):
    delta_k = r_k + gamma * V_{k+1} - V_k, A_k = delta_k + gamma * lam * A_{k+1}, V after the last
    turn = 0. turn_rewards, turn_values, episode_index, turn_index: (N,) -> advantages, returns (N,)
    (a turn's advantage is then shared by all its tokens, VAGEN's "turn-wise GAE")."""
    advantages = torch.zeros_like(turn_values, dtype=torch.float)
    for rows in _episode_rows(episode_index, turn_index):
        next_value, next_advantage = 0.0, 0.0
        for row in reversed(rows.tolist()):
            delta = float(turn_rewards[row]) + gamma * next_value - float(turn_values[row])
            next_advantage = delta + gamma * lam * next_advantage
            advantages[row] = next_advantage
            next_value = float(turn_values[row])
    return advantages, advantages + turn_values.float()


def bi_level_gae(
    turn_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    episode_index: torch.Tensor,
    turn_index: torch.Tensor,
    turn_gamma: float = 0.95,
    turn_lam: float = 1.0,
    gamma: float = 1.0,
    lam: float = 1.0,
    token_kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bi-level GAE (VAGEN, Wang et al. 2025): GAE across turns with the turn discount, the value of
    a turn read at its last token; then token-level GAE inside each turn whose last token is
    rewarded with the turn's return G_k = A_k + V_k (so each turn's tokens are credited toward
    what the turn led to, and no value leaks across turns). `token_kl` (N, T), when given, adds
    -kl_coef * KL at every token as in single-turn PPO (`token_rewards`).
    turn_rewards (N,), values/mask (N, T), episode_index/turn_index (N,) -> advantages, returns (N, T)."""
    mask = mask.to(values.dtype)
    last = (mask.long().sum(1) - 1).clamp(min=0)
    turn_values = values[torch.arange(len(values)), last] * (mask.sum(1) > 0)
    turn_advantages, _ = turn_level_gae(
        turn_rewards, turn_values, episode_index, turn_index, turn_gamma, turn_lam
    )
    turn_returns = turn_advantages + turn_values
    kl = token_kl if token_kl is not None else torch.zeros_like(values)
    rewards = token_rewards(turn_returns, kl, mask, kl_coef)
    return gae(rewards, values, mask, gamma, lam)


def indexed_group_advantages(
    rewards: torch.Tensor, group_index: torch.Tensor, scale_by_std: bool = True
) -> torch.Tensor:
    """GRPO's group normalisation for groups given by an index rather than contiguous blocks:
    (r - mean of its group) / (std of its group + 1e-4); a group of one gets 0 (no baseline).
    Used for episodes (a group = G episodes from the same env seed) and for GiGPO's step groups.
    rewards, group_index: (N,) -> (N,)."""
    rewards = rewards.float()
    advantages = torch.zeros_like(rewards)
    for group in torch.unique(group_index):
        members = group_index == group
        if members.sum() < 2:
            continue
        centred = rewards[members] - rewards[members].mean()
        advantages[members] = centred / (rewards[members].std() + 1e-4) if scale_by_std else centred
    return advantages


def indexed_rloo_advantages(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """RLOO's leave-one-out baseline for groups given by an index: r_i minus the mean of the other
    members of its group; a group of one gets 0. rewards, group_index: (N,) -> (N,)."""
    rewards = rewards.float()
    advantages = torch.zeros_like(rewards)
    for group in torch.unique(group_index):
        members = group_index == group
        k = int(members.sum())
        if k < 2:
            continue
        group_rewards = rewards[members]
        advantages[members] = group_rewards - (group_rewards.sum() - group_rewards) / (k - 1)
    return advantages


def episode_totals(
    turn_rewards: torch.Tensor, episode_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each episode's summed reward: (episode ids (E,), totals (E,), inverse (N,): each turn's
    position in ids, so `totals[inverse]` gives every turn its episode's total)."""
    ids, inverse = torch.unique(episode_index, return_inverse=True)
    totals = torch.zeros(len(ids)).index_add_(0, inverse, turn_rewards.float())
    return ids, totals, inverse


def step_group_index(observation_keys: list, episode_groups: torch.Tensor) -> torch.Tensor:
    """GiGPO's anchor-state groups (Feng et al. 2025): turns of the same episode group whose
    observations are identical (equal `observation_keys`, e.g. a hash of the frame) form a step
    group. observation_keys: N hashables, episode_groups (N,) -> step group ids (N,)."""
    ids: dict = {}
    return torch.tensor(
        [
            ids.setdefault((int(g), key), len(ids))
            for key, g in zip(observation_keys, episode_groups.tolist(), strict=True)
        ]
    )
