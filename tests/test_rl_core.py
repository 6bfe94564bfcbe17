"""RL math in `vlm_rl.rl.core` against hand-computed numbers (torchtune style).

Every expected value below is worked out in the comments next to it; `torch` only checks it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlm_rl.rl import core
from vlm_rl.rl.core import (
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    groups_with_signal,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    rloo_advantages,
    selective_log_softmax,
    token_rewards,
)

close = torch.testing.assert_close


def groups_of(size: int, n: int) -> torch.Tensor:
    """The group index of n samples in contiguous groups of `size` (a prompt's samples): (n,)."""
    return torch.arange(n) // size


# values (2, 3) with mask keeping 1, 2 | 4: the padded entries hold values that would show if leaked.
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


# --- masked reductions ------------------------------------------------------------------------------


def test_masked_sum_and_mean_over_everything() -> None:
    # kept entries 1, 2, 4: sum 7, mean 7 / 3
    close(masked_sum(VALUES, MASK), torch.tensor(7.0))
    close(masked_mean(VALUES, MASK), torch.tensor(7.0 / 3.0))


def test_masked_sum_and_mean_along_dim() -> None:
    # rows: sums [1 + 2, 4] = [3, 4]; means [3 / 2, 4 / 1] = [1.5, 4]
    close(masked_sum(VALUES, MASK, dim=1), torch.tensor([3.0, 4.0]))
    close(masked_mean(VALUES, MASK, dim=1), torch.tensor([1.5, 4.0]))
    # columns: sums [1 + 4, 2, 0]; means [2.5, 2, 0] (the empty third column is 0, not nan)
    close(masked_sum(VALUES, MASK, dim=0), torch.tensor([5.0, 2.0, 0.0]))
    close(masked_mean(VALUES, MASK, dim=0), torch.tensor([2.5, 2.0, 0.0]))


def test_masked_mean_of_empty_mask_is_zero() -> None:
    empty = torch.zeros_like(MASK)
    close(masked_mean(VALUES, empty), torch.tensor(0.0))
    close(masked_mean(VALUES, empty, dim=1), torch.tensor([0.0, 0.0]))


def test_masked_mean_accepts_bool_mask() -> None:
    close(masked_mean(VALUES, MASK.bool()), torch.tensor(7.0 / 3.0))
    close(masked_mean(VALUES, MASK.bool(), dim=1), torch.tensor([1.5, 4.0]))


def test_masked_var_is_unbiased_over_masked_entries() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 -> unbiased 5 / 3, biased 5 / 4
    close(masked_var(values, mask), torch.tensor(5.0 / 3.0))
    close(masked_var(values, mask, unbiased=False), torch.tensor(1.25))


def test_masked_whiten_gives_zero_mean_unit_variance_over_masked_entries() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    whitened = masked_whiten(values, mask)
    # kept 1, 2, 3, 4: mean 2.5, std sqrt(5 / 3) = 1.290994 -> (x - 2.5) / 1.290994
    close(whitened[mask.bool()], torch.tensor([-1.161895, -0.387298, 0.387298, 1.161895]))
    close(masked_mean(whitened, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    close(masked_var(whitened, mask), torch.tensor(1.0))


def test_masked_whiten_without_shift_keeps_the_mean() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    whitened = masked_whiten(values, mask, shift_mean=False)
    # same scaling, mean 2.5 added back: 2.5 + [-1.161895, -0.387298, 0.387298, 1.161895]
    close(whitened[mask.bool()], torch.tensor([1.338105, 2.112702, 2.887298, 3.661895]))
    close(masked_mean(whitened, mask), torch.tensor(2.5))
    close(masked_var(whitened, mask), torch.tensor(1.0))


# --- log-probs and entropy --------------------------------------------------------------------------


def test_selective_log_softmax_hand_value() -> None:
    # softmax([0, log 3]) = [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    close(selective_log_softmax(logits, torch.tensor([[1]])), torch.tensor([[math.log(0.75)]]))
    close(selective_log_softmax(logits, torch.tensor([[0]])), torch.tensor([[math.log(0.25)]]))


def test_selective_log_softmax_equals_log_softmax_gather() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(2, 3, 7, generator=generator)
    index = torch.randint(0, 7, (2, 3), generator=generator)
    expected = F.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    result = selective_log_softmax(logits, index)
    assert result.shape == (2, 3)
    assert result.dtype == torch.float32
    close(result, expected)


def test_entropy_from_logits() -> None:
    vocab = 8
    logits = torch.zeros(2, 3, vocab)
    # uniform over V -> log V everywhere
    close(entropy_from_logits(logits), torch.full((2, 3), math.log(vocab)))
    # one logit 100 above the rest -> (almost) deterministic -> entropy ~0
    logits[..., 3] = 100.0
    close(entropy_from_logits(logits), torch.zeros(2, 3), atol=1e-6, rtol=0)
    # p = [1/4, 3/4]: -(0.25 log 0.25 + 0.75 log 0.75) = 0.346574 + 0.215762 = 0.562335
    close(entropy_from_logits(torch.tensor([[[0.0, math.log(3.0)]]])), torch.tensor([[0.562335]]))


# --- KL estimators ----------------------------------------------------------------------------------


def test_kl_penalty_estimators_on_hand_values() -> None:
    # token 0: p = 0.5, p_ref = 0.25 -> log r = log 2;  token 1: p = 0.25, p_ref = 0.5 -> log r = -log 2
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.3]]))
    ref_logprobs = torch.log(torch.tensor([[0.25, 0.5, 0.3]]))
    log2 = math.log(2.0)
    # k1 = log r
    close(kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([[log2, -log2, 0.0]]))
    # k2 = (log r)^2 / 2 = 0.240227 for both
    close(kl_penalty(logprobs, ref_logprobs, "k2"), torch.tensor([[0.240227, 0.240227, 0.0]]))
    # k3 = (p_ref / p - 1) - log(p_ref / p):
    #   token 0: (0.25 / 0.5 - 1) + log 2 = -0.5 + 0.693147 = 0.193147
    #   token 1: (0.5 / 0.25 - 1) - log 2 = 1 - 0.693147 = 0.306853
    close(kl_penalty(logprobs, ref_logprobs, "k3"), torch.tensor([[0.193147, 0.306853, 0.0]]))


def test_kl_penalty_defaults_to_k1() -> None:
    logprobs, ref_logprobs = torch.tensor([[-1.0]]), torch.tensor([[-3.0]])
    close(kl_penalty(logprobs, ref_logprobs), torch.tensor([[2.0]]))


def test_kl_penalty_rejects_unknown_estimator() -> None:
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "k4")  # type: ignore[arg-type]


# --- per-token rewards and GAE ----------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool])
def test_token_rewards_puts_score_on_last_real_token(mask_dtype: torch.dtype) -> None:
    scores = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=mask_dtype)
    rewards = token_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor(
        [
            [-0.05, -0.10, -0.15 + 1.0],  # -0.5 * kl, score 1 on token 2
            [-0.20, -0.25 + 2.0, 0.0],  # score 2 on token 1 (the last real one); padding gets 0
            [0.0, 0.0, 0.0],  # empty completion: no score, no KL
        ]
    )
    close(rewards, expected)


def test_gae_hand_computed() -> None:
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    # Row 0 (V_3 = 0):
    #   delta_2 = 1 + 0.9 * 0   - 0.7 = 0.3      A_2 = 0.3
    #   delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03     A_1 = 0.03 + 0.72 * 0.3   = 0.246
    #   delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04     A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    # Row 1: token 2 is padding, so its reward 5 and value 9 must not leak (V_2 = 0, A_2 = 0):
    #   delta_1 = 2 + 0.9 * 0   - 1.0 = 1.0      A_1 = 1.0
    #   delta_0 = 0 + 0.9 * 1.0 - 0.5 = 0.4      A_0 = 0.4 + 0.72 * 1.0 = 1.12
    close(advantages, torch.tensor([[0.21712, 0.246, 0.3], [1.12, 1.0, 0.0]]))
    # returns = A + V (V = 0 on padding)
    close(returns, torch.tensor([[0.71712, 0.846, 1.0], [1.62, 2.0, 0.0]]))


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[1.0, 1.0, 1.0]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # reward-to-go [6, 5, 3] minus V = 1
    close(advantages, torch.tensor([[5.0, 4.0, 2.0]]))
    close(returns, torch.tensor([[6.0, 5.0, 3.0]]))


# --- group baselines (GRPO, RLOO, dynamic sampling) -------------------------------------------------


def test_group_advantages_normalise_each_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0])
    advantages = group_advantages(rewards, groups_of(4, 8))
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / (0.57735 + 1e-4) = +-0.865875
    # group 1: mean 5, deviations [-3, -1, 1, 3], std sqrt(20 / 3) = 2.581989 -> dev / 2.582089
    expected = torch.tensor(
        [0.865875, -0.865875, -0.865875, 0.865875, -1.161850, -0.387283, 0.387283, 1.161850]
    )
    close(advantages, expected)


def test_group_advantages_groups_are_independent() -> None:
    first = torch.tensor([1.0, 0.0, 0.0, 1.0])
    alone = group_advantages(first, groups_of(4, 4))
    together = group_advantages(torch.cat([first, torch.tensor([100.0, -7.0, 3.0, 50.0])]), groups_of(4, 8))
    close(together[:4], alone)


def test_group_advantages_without_std_are_just_centred() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0])
    # Dr. GRPO: reward minus group mean (0.5 and 5)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, -3.0, -1.0, 1.0, 3.0])
    close(group_advantages(rewards, groups_of(4, 8), scale_by_std=False), expected)


def test_group_advantages_of_equal_rewards_are_zero() -> None:
    close(group_advantages(torch.tensor([0.7, 0.7, 0.7]), groups_of(3, 3)), torch.zeros(3))


def test_rloo_advantages_leave_one_out() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    # group 0: baselines [(2 + 3) / 2, (1 + 3) / 2, (1 + 2) / 2] = [2.5, 2, 1.5] -> [-1.5, 0, 1.5]
    # group 1: baselines [(0 + 4) / 2, (0 + 4) / 2, 0] = [2, 2, 0] -> [-2, -2, 4]
    close(rloo_advantages(rewards, groups_of(3, 6)), torch.tensor([-1.5, 0.0, 1.5, -2.0, -2.0, 4.0]))


def test_rloo_needs_two_samples_per_prompt() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.tensor([1.0, 2.0]), groups_of(1, 2))


def test_groups_with_signal_marks_groups_whose_rewards_differ() -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0])
    expected = torch.tensor([False, False, False, True, True, True, False, False, False])
    assert torch.equal(groups_with_signal(rewards, groups_of(3, 9)), expected)


# --- loss aggregation -------------------------------------------------------------------------------

# Sequence 0 has 4 tokens [1, 2, 3, 4], sequence 1 one token [10]; the padding holds 100s.
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 100.0, 100.0, 100.0]])
AGG_MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])


def test_aggregate_modes_differ_on_unequal_lengths() -> None:
    # token: (1 + 2 + 3 + 4 + 10) / 5 tokens = 4
    token = aggregate(PER_TOKEN, AGG_MASK, "token")
    # sequence: mean of per-sequence means (2.5, 10) = 6.25
    sequence = aggregate(PER_TOKEN, AGG_MASK, "sequence")
    # fixed: 20 / (2 sequences * T = 4) = 2.5; with max_length 10: 20 / (2 * 10) = 1
    fixed = aggregate(PER_TOKEN, AGG_MASK, "fixed")
    close(token, torch.tensor(4.0))
    close(sequence, torch.tensor(6.25))
    close(fixed, torch.tensor(2.5))
    close(aggregate(PER_TOKEN, AGG_MASK, "fixed", max_length=10), torch.tensor(1.0))
    assert len({token.item(), sequence.item(), fixed.item()}) == 3


def test_aggregate_modes_agree_on_equal_lengths_without_padding() -> None:
    per_token = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    mask = torch.ones(2, 2)
    for mode in ("token", "sequence", "fixed"):
        close(aggregate(per_token, mask, mode), torch.tensor(3.0))


def test_aggregate_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="median"):
        aggregate(PER_TOKEN, AGG_MASK, "median")  # type: ignore[arg-type]


# --- PPO clipped policy loss ------------------------------------------------------------------------

# log ratios, eps = 0.2 (ratio clipped to [0.8, 1.2]):
#   e^0.1 = 1.105171, e^-0.1 = 0.904837, e^0.2 = 1.221403, e^0.3 = 1.349859, e^-0.3 = 0.740818
OLD_LOGPROBS = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
LOG_RATIO = torch.tensor([[0.1, 0.3, -0.3], [-0.1, 0.3, -0.3]])
LOGPROBS = OLD_LOGPROBS + LOG_RATIO


def test_clipped_policy_loss_hand_computed() -> None:
    # A = +2 on row 0, -1 on row 1; per token loss = max(-A r, -A clip(r, 0.8, 1.2)):
    #   row 0: r = 1.105 -> -2.210342 (inside); r = 1.350 -> max(-2.699718, -2.4) = -2.4 (clipped);
    #          r = 0.741 -> max(-1.481636, -1.6) = -1.481636 (low side does not clip A > 0)
    #   row 1: r = 0.905 -> 0.904837 (inside); r = 1.350 -> max(1.349859, 1.2) = 1.349859 (no clip);
    #          r = 0.741 -> max(0.740818, 0.8) = 0.8 (clipped)
    # token mean: (-2.210342 - 2.4 - 1.481636 + 0.904837 + 1.349859 + 0.8) / 6 = -0.506214
    advantages = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]])
    loss, stats = clipped_policy_loss(LOGPROBS, OLD_LOGPROBS, advantages, torch.ones(2, 3))
    close(loss, torch.tensor(-0.506214))
    close(stats["clip_fraction"], torch.tensor(2.0 / 6.0))
    # ratio mean: (1.105171 + 1.349859 + 0.740818 + 0.904837 + 1.349859 + 0.740818) / 6 = 1.031894
    close(stats["ratio"], torch.tensor(1.031894))


def test_clipped_policy_loss_approx_kl() -> None:
    # (r - 1) - log r per token: 0.1 -> 0.005171, 0.3 -> 0.049859, -0.3 -> 0.040818, -0.1 -> 0.004837
    # mean: (0.005171 + 0.049859 + 0.040818 + 0.004837 + 0.049859 + 0.040818) / 6 = 0.031894
    _, stats = clipped_policy_loss(LOGPROBS, OLD_LOGPROBS, torch.ones(2, 3), torch.ones(2, 3))
    close(stats["approx_kl"], torch.tensor(0.031894))


def test_clipped_policy_loss_broadcasts_sequence_advantages() -> None:
    per_token = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss_seq, stats_seq = clipped_policy_loss(LOGPROBS, OLD_LOGPROBS, torch.tensor([2.0, -1.0]), mask)
    loss_tok, stats_tok = clipped_policy_loss(LOGPROBS, OLD_LOGPROBS, per_token, mask)
    close(loss_seq, loss_tok)
    close(stats_seq["clip_fraction"], stats_tok["clip_fraction"])
    # masked token (0, 2) dropped: (-2.210342 - 2.4 + 0.904837 + 1.349859 + 0.8) / 5 = -0.311129
    close(loss_seq, torch.tensor(-0.311129))
    close(stats_seq["clip_fraction"], torch.tensor(2.0 / 5.0))


def test_clip_higher_changes_only_the_positive_advantage_side() -> None:
    log_ratio = torch.tensor([[0.2, 0.3, -0.3], [0.2, 0.3, -0.3]])
    old_logprobs = torch.zeros(2, 3)
    logprobs = old_logprobs + log_ratio
    advantages = torch.tensor([1.0, -1.0])
    positive_row = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    negative_row = 1.0 - positive_row

    def loss_and_clip(mask: torch.Tensor, clip_high: float | None) -> tuple[float, float]:
        loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2, clip_high)
        return loss.item(), stats["clip_fraction"].item()

    # A = +1, ratios 1.221403, 1.349859, 0.740818:
    #   symmetric [0.8, 1.2]:   (-1.2 - 1.2 - 0.740818) / 3 = -1.046939, 2 of 3 clipped
    #   clip-higher [0.8, 1.28]: (-1.221403 - 1.28 - 0.740818) / 3 = -1.080740, 1 of 3 clipped
    assert loss_and_clip(positive_row, None) == pytest.approx((-1.046939, 2 / 3), abs=1e-5)
    assert loss_and_clip(positive_row, 0.28) == pytest.approx((-1.080740, 1 / 3), abs=1e-5)
    # A = -1 only clips below 0.8, so the upper bound does not matter:
    #   (1.221403 + 1.349859 + 0.8) / 3 = 1.123754, 1 of 3 clipped, with either bound
    assert loss_and_clip(negative_row, None) == pytest.approx((1.123754, 1 / 3), abs=1e-5)
    assert loss_and_clip(negative_row, 0.28) == pytest.approx((1.123754, 1 / 3), abs=1e-5)


def test_clipped_policy_loss_gradient_vanishes_only_on_clipped_tokens() -> None:
    logprobs = LOGPROBS.clone().requires_grad_(True)
    advantages = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # 5 tokens
    loss, _ = clipped_policy_loss(logprobs, OLD_LOGPROBS, advantages, mask, aggregation="token")
    loss.backward()
    # d/dlogp of -A r / 5 is -A r / 5 where the unclipped term wins; 0 where the clip is active or masked:
    #   row 0: r = e^0.1 inside -> -2 e^0.1 / 5; r = e^0.3 clipped (A > 0) -> 0;
    #          r = e^-0.3 below the range but A > 0, so unclipped -> -2 e^-0.3 / 5
    #   row 1: r = e^-0.1 inside -> e^-0.1 / 5; r = e^0.3 above the range but A < 0 -> e^0.3 / 5;
    #          token 2 masked -> 0
    expected = torch.tensor(
        [
            [-2 * math.exp(0.1) / 5, 0.0, -2 * math.exp(-0.3) / 5],
            [math.exp(-0.1) / 5, math.exp(0.3) / 5, 0.0],
        ]
    )
    close(logprobs.grad, expected)


# --- value loss and critic quality ------------------------------------------------------------------


def test_clipped_value_loss_hand_computed() -> None:
    values = torch.tensor([[1.0, 2.0, 0.0, 1.0, 50.0]])
    old_values = torch.tensor([[0.5, 1.9, 0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, clip_fraction = clipped_value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: moved +0.5 -> clipped V = 0.7; (1 - 2)^2 = 1 vs (0.7 - 2)^2 = 1.69 -> 1.69 (clipped used)
    # token 1: moved +0.1 (inside) -> (2 - 0)^2 = 4 both -> 4
    # token 2: not moved -> (0 - 1)^2 = 1
    # token 3: moved +1 -> clipped V = 0.2; (1 - 0)^2 = 1 vs 0.04 -> 1 (unclipped is larger)
    # token 4: padding
    # loss = 0.5 * (1.69 + 4 + 1 + 1) / 4 = 0.96125; clipped term chosen on 1 of 4 tokens
    close(loss, torch.tensor(0.96125))
    close(clip_fraction, torch.tensor(0.25))


def test_explained_variance() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    close(explained_variance(returns.clone(), returns, mask), torch.tensor(1.0))
    # predicting the mean 2.5: Var[returns - 2.5] = Var[returns] -> 0
    close(
        explained_variance(torch.full_like(returns, 2.5), returns, mask), torch.tensor(0.0), atol=1e-6, rtol=0
    )
    # residuals [0, 0, 0, 2]: var 3 / 3 = 1; Var[returns] = 5 / 3 -> 1 - 3 / 5 = 0.4
    values = torch.tensor([[1.0, 2.0, 3.0, 2.0, -7.0]])
    close(explained_variance(values, returns, mask), torch.tensor(0.4))


def test_rl_objective_sums_its_terms_by_hand():
    """ratio 1 (old = current), advantages [2, 1] per sequence, 2 tokens each:
    policy = -(2 + 2 + 1 + 1) / 4 = -1.5; entropy bonus -0.1 * 0.5; value 0.5 * (1 - 3)^2 = 2 (times
    0.5); KL k1 = logp - ref = 1 at every token (times 0.2): total -1.5 - 0.05 + 1.0 + 0.2 = -0.35."""
    logprobs = torch.zeros(2, 2, requires_grad=True)
    settings = core.ObjectiveSettings(entropy_coef=0.1, value_coef=0.5, kl_coef=0.2, kl_estimator="k1")
    loss, stats = core.rl_objective(
        logprobs,
        logprobs.detach(),
        torch.tensor([2.0, 1.0]),
        torch.ones(2, 2),
        settings,
        entropy=torch.full((2, 2), 0.5),
        values=torch.ones(2, 2),
        old_values=torch.ones(2, 2),
        returns=torch.full((2, 2), 3.0),
        ref_logprobs=torch.full((2, 2), -1.0),
    )
    assert loss.item() == pytest.approx(-0.35)
    assert stats["loss/policy"].item() == pytest.approx(-1.5)
    assert stats["loss/value"].item() == pytest.approx(2.0)
    assert stats["loss/kl"].item() == pytest.approx(1.0)
    assert stats["policy/entropy"].item() == pytest.approx(0.5)
    assert stats["loss/total"].item() == pytest.approx(-0.35)
    # Each term is present only when its inputs are: PPO (KL in the reward) passes no reference.
    loss, stats = core.rl_objective(
        logprobs, logprobs.detach(), torch.tensor([2.0, 1.0]), torch.ones(2, 2), settings
    )
    assert loss.item() == pytest.approx(-1.5)
    assert {"loss/value", "loss/kl", "policy/entropy"}.isdisjoint(stats)


# -- multi-turn credit assignment -------------------------------------------------------------------
# Rows in a scrambled order: episode 0's second turn, episode 1's only turn, episode 0's first turn.
EPISODE = torch.tensor([0, 1, 0])
TURN = torch.tensor([1, 0, 0])


def test_discounted_returns_per_episode():
    # episode 0: rewards (turn 0, turn 1) = (0, 1) -> G = (0 + 0.9 * 1, 1) = (0.9, 1); episode 1: 2
    returns = core.discounted_returns(torch.tensor([1.0, 2.0, 0.0]), EPISODE, TURN, gamma=0.9)
    assert returns.tolist() == pytest.approx([1.0, 2.0, 0.9])


def test_turn_level_gae_by_hand():
    # episode 0: r = (0, 1), V = (0.5, 0.8), gamma 0.9, lam 0.5:
    #   turn 1: delta = 1 - 0.8 = 0.2 -> A = 0.2; turn 0: delta = 0 + 0.9 * 0.8 - 0.5 = 0.22,
    #   A = 0.22 + 0.9 * 0.5 * 0.2 = 0.31. Returns A + V = (0.81, 1.0).
    # episode 1: r = 2, V = 1: A = 1, return 2.
    rewards, values = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.8, 1.0, 0.5])
    advantages, returns = core.turn_level_gae(rewards, values, EPISODE, TURN, gamma=0.9, lam=0.5)
    assert advantages.tolist() == pytest.approx([0.2, 1.0, 0.31])
    assert returns.tolist() == pytest.approx([1.0, 2.0, 0.81])


def test_bi_level_gae_by_hand():
    # One episode, two turns of two tokens. Turn values at the last token: V0 = 0.5, V1 = 0.8.
    # Across turns (turn_gamma 0.9, turn_lam 1): A1 = 1 - 0.8 = 0.2, G1 = 1.0;
    #   A0 = (0 + 0.9 * 0.8 - 0.5) + 0.9 * 0.2 = 0.40, G0 = 0.9.
    # Inside turn 0 (gamma = lam = 1), last token rewarded G0 = 0.9, values (0.1, 0.5):
    #   t1: 0.9 - 0.5 = 0.4; t0: (0 + 0.5 - 0.1) + 0.4 = 0.8; returns (0.9, 0.9).
    # Inside turn 1, last token rewarded G1 = 1.0, values (0.2, 0.8): t1: 0.2; t0: 0.6 + 0.2 = 0.8.
    values = torch.tensor([[0.1, 0.5], [0.2, 0.8]])
    advantages, returns = core.bi_level_gae(
        torch.tensor([0.0, 1.0]),
        values,
        torch.ones(2, 2),
        torch.tensor([0, 0]),
        torch.tensor([0, 1]),
        turn_gamma=0.9,
        turn_lam=1.0,
        gamma=1.0,
        lam=1.0,
    )
    torch.testing.assert_close(advantages, torch.tensor([[0.8, 0.4], [0.8, 0.2]]))
    torch.testing.assert_close(returns, torch.tensor([[0.9, 0.9], [1.0, 1.0]]))


def test_indexed_group_advantages_and_step_groups():
    # group 0 = rewards (1, 0): mean 0.5, std (unbiased) 0.7071 -> +-0.5 / 0.7072; groups of one -> 0
    advantages = core.group_advantages(torch.tensor([1.0, 0.0, 3.0, 5.0]), torch.tensor([0, 0, 1, 2]))
    assert advantages.tolist() == pytest.approx(
        [0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4), 0, 0]
    )
    unscaled = core.group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([7, 7]), scale_by_std=False)
    assert unscaled.tolist() == [0.5, -0.5]
    # GiGPO anchor states: same observation within the same episode group -> same step group
    groups = core.step_group_index(["a", "b", "a", "a"], torch.tensor([0, 0, 0, 1]))
    assert groups.tolist() == [0, 1, 0, 2]
