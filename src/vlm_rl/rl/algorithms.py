"""RL algorithms as small objects looked up by name (`--algorithm`), as verl registers its estimators.

An algorithm declares what a step must compute for it, how its advantages are estimated and its
policy loss; the trainer reads those declarations, builds one `StepPlan` per step, and never
branches on a name:

    algorithm   critic   KL to the reference enters   advantages (rl/core.py)    policy loss
    ppo         yes      the reward (per token, k1)   bi-level GAE, whitened     clipped surrogate
    grpo        no       the loss (k3)                group-normalised           clipped surrogate
    rloo        no       the loss (k3)                leave-one-out              clipped surrogate
    gspo        no       the loss (k3)                group-normalised           sequence ratio, clipped
    cispo       no       the loss (k3)                group-normalised           truncated IS REINFORCE
    sapo        no       the loss (k3)                group-normalised           soft gate

Every estimator works on groups given by an index and on episodes of turns; a single-turn rollout
is N episodes of one turn grouped by prompt (`Rollout.group_index`), so no algorithm has a
single-turn and a multi-turn path. The loss is `core.rl_objective` for all: the algorithm's policy
loss (a `core.PolicyLoss`), the entropy bonus, the value loss when it has a critic, the KL term
when its KL is in the loss. A new algorithm is one module registering an `Algorithm` (see
`vlm_rl.rl.losses` for GSPO, CISPO and SAPO) and its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from vlm_rl.rl import core

if TYPE_CHECKING:
    from vlm_rl.rl.config import RLConfig
    from vlm_rl.rl.rollout import Rollout


@dataclass
class Advantages:
    """What an estimator returns for a rollout of N samples (T = completion length)."""

    advantages: torch.Tensor
    """(N, T) per token, or (N,) per sequence (broadcast over its tokens)."""
    returns: torch.Tensor | None = None
    """(N, T) value targets, for an algorithm with a critic."""
    sample_mask: torch.Tensor | None = None
    """(N,) 1 for samples that take part in the update (None: all of them)."""
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepPlan:
    """What one step computes between its rewards and its update (decided once, before scoring)."""

    values: bool
    """Critic values V(s_t) at rollout time (GAE and the clipped value loss need them)."""
    ref_logprobs: bool
    """A reference pass (adapter disabled): the KL term is on."""
    old_logprobs: bool
    """A scoring pass under the sampling policy. False when the update is a single on-policy
    optimizer step and nothing else needs them: old = the update's own log-probs, detached."""
    kl_in_loss: bool
    """The KL term is part of the loss (else, when on, it is subtracted from the per-token reward)."""

    @property
    def scoring_pass(self) -> bool:
        return self.values or self.ref_logprobs or self.old_logprobs


class Algorithm(Protocol):
    name: str
    uses_critic: bool
    """A value head on the policy trunk, trained with the clipped value loss."""
    kl_in_reward: bool
    """KL to the reference is a per-token reward penalty (Ziegler et al. 2019) rather than a loss term."""
    default_kl_estimator: core.KLEstimator
    min_samples_per_prompt: int
    """Group methods need a group: at least 2 samples of each prompt."""
    reads: frozenset[str]
    """The config fields its estimator and policy loss read among those only some algorithms read
    (clip_range, clip_range_high, scale_rewards, sapo_temperature_*): the flag rules refuse the
    others (`vlm_rl.recipes.flags`)."""

    def policy_loss(self, config: RLConfig) -> core.PolicyLoss:
        """The policy term of `core.rl_objective` for this run's config."""
        ...

    def advantages(
        self, rollout: Rollout, config: RLConfig, token_kl: torch.Tensor | None, kl_coef: float
    ) -> Advantages:
        """Advantages from `rollout.rewards` (N,) (+ `rollout.values` with a critic); `token_kl`
        (N, T) is KL(pi_old || pi_ref) per token when the reference pass ran."""
        ...


CLIP_FLAGS = frozenset({"clip_range", "clip_range_high"})


def clipped_surrogate(config: RLConfig) -> core.PolicyLoss:
    """PPO's clipped surrogate with the run's clip range (DAPO's clip-higher with clip_range_high)."""
    return core.ClippedSurrogate(config.clip_range, config.clip_range_high)


@dataclass(frozen=True)
class PPO:
    """PPO with a learned critic (Schulman et al. 2017; RLHF form of Ziegler et al. 2019 /
    Ouyang et al. 2022): the sequence reward at the last token, -kl_coef * KL at every token,
    GAE over the completion's tokens. Over an episode's turns: bi-level GAE (VAGEN), or one GAE
    step per turn (`turn_credit` "turn"); an episode of one turn is plain token-level GAE."""

    name: str = "ppo"
    uses_critic: bool = True
    kl_in_reward: bool = True
    default_kl_estimator: core.KLEstimator = "k1"
    min_samples_per_prompt: int = 1
    reads: frozenset[str] = CLIP_FLAGS

    def policy_loss(self, config) -> core.PolicyLoss:
        return clipped_surrogate(config)

    def advantages(self, rollout, config, token_kl, kl_coef) -> Advantages:
        mask = rollout.completion_mask.float()
        if config.turn_credit == "bi_level":
            advantages, returns = core.bi_level_gae(
                rollout.rewards,
                rollout.values,
                mask,
                rollout.episode_index,
                rollout.turn_index,
                config.turn_gamma,
                config.turn_lam,
                config.gamma,
                config.lam,
                token_kl,
                kl_coef,
            )
        else:  # "turn": one GAE step per turn, V(s_k) read before the turn's first token
            token_kl = token_kl if token_kl is not None else torch.zeros_like(mask)
            turn_rewards = rollout.rewards - kl_coef * core.masked_sum(token_kl, mask, dim=1)
            turn_advantages, turn_returns = core.turn_level_gae(
                turn_rewards,
                rollout.values[:, 0],
                rollout.episode_index,
                rollout.turn_index,
                config.turn_gamma,
                config.turn_lam,
            )
            advantages = turn_advantages.unsqueeze(1) * mask
            returns = turn_returns.unsqueeze(1) * mask
        if config.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask)
        stats = {
            "objective/explained_variance": core.explained_variance(rollout.values, returns, mask).item(),
            "objective/value_mean": core.masked_mean(rollout.values, mask).item(),
        }
        return Advantages(advantages, returns, stats=stats)


GroupEstimator = Callable[[torch.Tensor, torch.Tensor, "RLConfig"], torch.Tensor]
"""(rewards (N,), group index (N,), config) -> advantages (N,)."""


def group_normalised(rewards: torch.Tensor, group_index: torch.Tensor, config: RLConfig) -> torch.Tensor:
    """GRPO's estimator (Dr. GRPO's without `scale_rewards`): `core.group_advantages`."""
    return core.group_advantages(rewards, group_index, config.scale_rewards)


def leave_one_out(rewards: torch.Tensor, group_index: torch.Tensor, config: RLConfig) -> torch.Tensor:
    """RLOO's estimator: `core.rloo_advantages`."""
    return core.rloo_advantages(rewards, group_index)


@dataclass(frozen=True)
class GroupBaseline:
    """Critic-free methods whose baseline comes from the other episodes of the same group (a
    prompt's G samples, each an episode of one turn; or an env seed's G episodes); KL (when on) is
    a loss term. GRPO and RLOO differ only in their estimator; GSPO, CISPO and SAPO are GRPO's
    estimator with another policy loss.

    An episode's advantage (its summed reward against its group's) is shared by all its turns,
    plus with `step_group_weight` > 0 GiGPO's step-level advantage (Feng et al. 2025): turns
    that saw the same observation in a group's episodes are compared by their discounted
    return-to-go."""

    name: str
    estimator: GroupEstimator
    loss: Callable[[RLConfig], core.PolicyLoss] = clipped_surrogate
    reads: frozenset[str] = CLIP_FLAGS
    uses_critic: bool = False
    kl_in_reward: bool = False
    default_kl_estimator: core.KLEstimator = "k3"
    min_samples_per_prompt: int = 2

    def policy_loss(self, config) -> core.PolicyLoss:
        return self.loss(config)

    def advantages(self, rollout, config, token_kl, kl_coef) -> Advantages:
        _, returns, inverse = core.episode_totals(rollout.rewards, rollout.episode_index)
        episode_groups = torch.zeros(len(returns), dtype=torch.long).scatter_(0, inverse, rollout.group_index)
        advantages = self.estimator(returns, episode_groups, config)[inverse]
        signal = core.groups_with_signal(returns, episode_groups)
        stats = {"objective/groups_with_signal": _share_of_groups(signal, episode_groups)}
        if config.step_group_weight > 0:
            step_groups = core.step_group_index(rollout.observation_keys, rollout.group_index)
            to_go = core.discounted_returns(
                rollout.rewards, rollout.episode_index, rollout.turn_index, config.turn_gamma
            )
            step = core.group_advantages(to_go, step_groups, config.scale_rewards)
            advantages = advantages + config.step_group_weight * step
            sizes = torch.bincount(step_groups)[step_groups]
            stats["objective/step_grouped_fraction"] = (sizes > 1).float().mean().item()
        return Advantages(
            advantages,
            # dynamic sampling (DAPO): groups whose returns are all equal carry no gradient; drop them
            sample_mask=signal[inverse].float() if config.dynamic_sampling else None,
            stats=stats,
        )


def _share_of_groups(signal: torch.Tensor, group_index: torch.Tensor) -> float:
    """The fraction of groups whose members' `signal` is set (it is the same within a group)."""
    groups = torch.unique(group_index)
    with_signal = torch.unique(group_index[signal])
    return len(with_signal) / max(len(groups), 1)


def objective_settings(config: RLConfig, algorithm: Algorithm, kl_coef: float) -> core.ObjectiveSettings:
    """The coefficients of `core.rl_objective` for a run's config; `kl_coef` is the current (possibly
    adaptive) KL coefficient, in the loss only for an algorithm whose KL is not in the reward."""
    return core.ObjectiveSettings(
        policy_loss=algorithm.policy_loss(config),
        aggregation=config.loss_aggregation,
        max_length=config.max_new_tokens,
        entropy_coef=config.entropy_coef,
        value_coef=config.value_coef,
        value_clip_range=config.value_clip_range,
        kl_coef=0.0 if algorithm.kl_in_reward else kl_coef,
        kl_estimator=config.kl_estimator,
        kl_importance_weighted=config.kl_importance_weighted,
    )


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Make `algorithm` available as `--algorithm <algorithm.name>`."""
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown --algorithm {name!r}; choose among {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


register_algorithm(PPO())
register_algorithm(GroupBaseline("grpo", group_normalised, reads=CLIP_FLAGS | {"scale_rewards"}))
register_algorithm(GroupBaseline("rloo", leave_one_out))

import vlm_rl.rl.losses  # noqa: E402, F401  (GSPO, CISPO, SAPO: each module registers its algorithm)
