"""RL math as pure functions: log-probs, KL, advantages (GAE, GRPO, RLOO) and clipped losses.

Shapes: N = sequences in the batch (prompts x samples), T = completion length (right-padded).
`mask` is the completion mask (1 for real completion tokens, 0 for padding), float or bool.

Groups, not shapes: every group estimator takes the rewards and a group index (N,) saying which
group each sample belongs to (a prompt's G samples; an env seed's G episodes; GiGPO's turns that
saw the same observation), in any order. Single-turn is the case where each prompt's samples form
a group and each sample is an episode of one turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

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


ENTROPY_CHUNK = 2**22
"""Logits (positions x vocabulary) whose softmax is materialised at once in `entropy_from_logits`."""


class _Entropy(torch.autograd.Function):
    """H = -sum_v p_v log p_v per position, saving only the logits (which the log-prob gather keeps
    anyway): the backward recomputes the softmax, dH/dz_v = -p_v (log p_v + H), a chunk of
    positions at a time. Autograd through log_softmax -> exp -> product would instead keep two
    full-vocabulary tensors per position until the backward pass (the largest of the update)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        entropy = torch.cat([_entropy_rows(rows) for rows in flat.split(_chunk_rows(flat))])
        ctx.save_for_backward(logits)
        return entropy.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor) -> torch.Tensor:
        (logits,) = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grads = []
        for rows, grad in zip(
            flat.split(_chunk_rows(flat)), grad_entropy.reshape(-1).split(_chunk_rows(flat)), strict=True
        ):
            log_probs = F.log_softmax(rows, dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1, keepdim=True)
            grads.append(-log_probs.exp() * (log_probs + entropy) * grad.unsqueeze(-1))
        return torch.cat(grads).view(logits.shape)


def _chunk_rows(flat: torch.Tensor) -> int:
    return max(1, ENTROPY_CHUNK // max(flat.shape[-1], 1))


def _entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    log_probs = F.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: (N, T, V) -> (N, T).

    Differentiable, keeping nothing for backward but `logits` (`_Entropy`); call it under
    `torch.no_grad()` when the entropy is only logged."""
    return _Entropy.apply(logits.float())


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


def _groups(group_index: torch.Tensor) -> list[torch.Tensor]:
    """Boolean masks (N,) of each group's members, groups in ascending id order."""
    return [group_index == group for group in torch.unique(group_index)]


def group_advantages(
    rewards: torch.Tensor, group_index: torch.Tensor, scale_by_std: bool = True
) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, divided by the group's std + 1e-4 (Shao et al.
    2024, eq. 3); `scale_by_std=False` gives Dr. GRPO (Liu et al. 2025). A group of one gets 0 (no
    baseline: GiGPO's step groups often have one member). rewards, group_index: (N,) -> (N,)."""
    rewards = rewards.float()
    advantages = torch.zeros_like(rewards)
    for members in _groups(group_index):
        if members.sum() < 2:
            continue
        centred = rewards[members] - rewards[members].mean()
        advantages[members] = centred / (rewards[members].std() + 1e-4) if scale_by_std else centred
    return advantages


def rloo_advantages(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """RLOO: reward minus the mean reward of the other members of its group (Ahmadian et al. 2024,
    eq. 5): A_i = r_i - (sum_j r_j - r_i) / (k - 1). rewards, group_index: (N,) -> (N,)."""
    rewards = rewards.float()
    advantages = torch.zeros_like(rewards)
    for members in _groups(group_index):
        k = int(members.sum())
        if k < 2:
            raise ValueError("RLOO needs at least 2 samples per group (a leave-one-out baseline)")
        group_rewards = rewards[members]
        advantages[members] = group_rewards - (group_rewards.sum() - group_rewards) / (k - 1)
    return advantages


def groups_with_signal(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """True for each sample whose group's rewards are not all equal (dynamic sampling, DAPO).
    rewards, group_index: (N,) -> (N,) bool."""
    signal = torch.zeros(len(rewards), dtype=torch.bool)
    for members in _groups(group_index):
        signal[members] = bool(rewards[members].max() - rewards[members].min() > 1e-6)
    return signal


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), in [-1, 0]: 0 up to
    L_max - L_cache tokens, then ((L_max - L_cache) - |y|) / L_cache, falling linearly to -1 at
    L_max (and -1 beyond). lengths (N,) completion lengths, max_length = L_max, buffer = L_cache."""
    lengths = lengths.float()
    if buffer <= 0:
        return torch.zeros_like(lengths)
    start = max_length - buffer
    penalty = ((start - lengths) / buffer).clamp(max=0.0)
    return torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)


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


class PolicyLoss(Protocol):
    """The policy term of `rl_objective`, declared by each algorithm (default `ClippedSurrogate`).

    (logprobs, old_logprobs (N, T), advantages (N, T) or (N, 1), mask (N, T)) -> the loss of each
    token (N, T), to minimise, before `aggregate` reduces it; and detached statistics, logged as
    policy/<name> (the clipped share of tokens as `clip_fraction`)."""

    def __call__(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class ClippedSurrogate:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), per token, as a loss to minimise:
    -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A), ratio = exp(logp - old_logp).
    `clip_high` > `clip_low` is DAPO's clip-higher (None: clip_low)."""

    clip_low: float = 0.2
    clip_high: float | None = None

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        clip_high = self.clip_low if self.clip_high is None else self.clip_high
        ratio = torch.exp(logprobs - old_logprobs)
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - self.clip_low, 1.0 + clip_high)
        with torch.no_grad():
            stats = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask)}
        return torch.maximum(unclipped, clipped), stats


def ratio_stats(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Detached statistics of the token ratio pi / pi_old: its mean and the approximate KL
    (ratio - 1) - log ratio (k3) over the masked tokens."""
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        return {
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(torch.exp(log_ratio), mask),
        }


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
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise: `ClippedSurrogate`
    aggregated. advantages: (N, T) or (N,) (broadcast over tokens). Returns the loss and stats: clip
    fraction, approx KL ((ratio - 1) - log ratio, k3) and mean ratio."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    per_token, stats = ClippedSurrogate(clip_low, clip_high)(logprobs, old_logprobs, advantages, mask)
    loss = aggregate(per_token, mask, aggregation, max_length)
    return loss, {**stats, **ratio_stats(logprobs, old_logprobs, mask)}


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
    """The coefficients of `rl_objective` (flat, from the RL config) and the algorithm's policy loss."""

    policy_loss: PolicyLoss = field(default_factory=ClippedSurrogate)
    """The policy term (`PolicyLoss`): PPO's clipped surrogate unless the algorithm brings its own."""
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

        loss = aggregated policy loss (settings.policy_loss: PPO's clipped surrogate, Schulman et al.
               2017, eq. 7, unless the algorithm declares another: GSPO, CISPO, SAPO, ...)
               - entropy_coef * mean token entropy          (when `entropy` is given)
               + value_coef * clipped value loss            (when `values` is given: a critic)
               + kl_coef * aggregated KL(pi || pi_ref)      (when `ref_logprobs` is given: KL in the loss)

    logprobs, old_logprobs, mask, entropy, values, old_values, returns, ref_logprobs: (N, T);
    advantages: (N, T) or (N,). An algorithm whose KL enters the reward (PPO) passes no
    `ref_logprobs`. Returns the loss and detached statistics named as the trainer logs them
    (loss/policy, loss/value, loss/kl, policy/entropy, policy/clip_fraction, policy/approx_kl, ...).
    """
    s = settings
    per_token, policy_stats = s.policy_loss(
        logprobs, old_logprobs, advantages.unsqueeze(1) if advantages.dim() == 1 else advantages, mask
    )
    policy_loss = aggregate(per_token, mask, s.aggregation, s.max_length)
    loss = policy_loss
    stats = {
        "loss/policy": policy_loss.detach(),
        **{f"policy/{name}": value for name, value in policy_stats.items()},
        "policy/approx_kl": ratio_stats(logprobs, old_logprobs, mask)["approx_kl"],
    }
    if entropy is not None:
        mean_entropy = masked_mean(entropy, mask)
        if s.entropy_coef:  # else the entropy is only logged (computed without a graph)
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


# -- episodes ---------------------------------------------------------------------------------------
# A batch of turns: N rows, one per turn, each its own (prompt, completion) sample.
# episode_index (N,) says which episode a turn belongs to and turn_index (N,) its position in it
# (0, 1, ...); rows may come in any order. An episode's last turn is its last step: the value
# after it is 0 (terminated, or truncated at the turn limit as VAGEN treats it). A single-turn
# batch is N episodes of one turn (episode_index = arange(N), turn_index = 0).


def _episode_rows(episode_index: torch.Tensor, turn_index: torch.Tensor) -> list[list[int]]:
    """Row indices of each episode, in turn order (episodes in ascending id order)."""
    by_turn = torch.argsort(turn_index, stable=True)
    order = by_turn[torch.argsort(episode_index[by_turn], stable=True)]
    counts = torch.unique_consecutive(episode_index[order], return_counts=True)[1]
    return [rows.tolist() for rows in order.split(counts.tolist())]


def discounted_returns(
    turn_rewards: torch.Tensor, episode_index: torch.Tensor, turn_index: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Return-to-go of each turn, G_k = r_k + gamma * G_{k+1} within its episode. (N,) -> (N,)."""
    returns = torch.zeros_like(turn_rewards, dtype=torch.float)
    for rows in _episode_rows(episode_index, turn_index):
        running = 0.0
        for row in reversed(rows):
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
    (a turn's advantage is then shared by all its tokens, VAGEN's "turn-wise GAE"). Computed in
    double precision: an episode of one turn returns exactly its reward (A + V = r - V + V)."""
    advantages = torch.zeros_like(turn_values, dtype=torch.float)
    returns = torch.zeros_like(advantages)
    for rows in _episode_rows(episode_index, turn_index):
        next_value, next_advantage = 0.0, 0.0
        for row in reversed(rows):
            value = float(turn_values[row])
            delta = float(turn_rewards[row]) + gamma * next_value - value
            next_advantage = delta + gamma * lam * next_advantage
            advantages[row] = next_advantage
            returns[row] = next_advantage + value
            next_value = value
    return advantages, returns


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
    _, turn_returns = turn_level_gae(
        turn_rewards, turn_values, episode_index, turn_index, turn_gamma, turn_lam
    )
    kl = token_kl if token_kl is not None else torch.zeros_like(values)
    rewards = token_rewards(turn_returns, kl, mask, kl_coef)
    return gae(rewards, values, mask, gamma, lam)


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
