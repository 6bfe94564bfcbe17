"""RL algorithms as small objects looked up by name (`--algorithm`), as verl registers its estimators.

An algorithm declares what a step must compute for it and how its advantages are estimated; the
trainer reads those declarations, builds one `StepPlan` per step, and never branches on a name:

    algorithm   critic   KL to the reference enters   advantages (pure functions in rl/core.py)
    ppo         yes      the reward (per token, k1)   GAE over completion tokens, whitened
    grpo        no       the loss (k3)                group-normalised (Shao et al. 2024)
    rloo        no       the loss (k3)                leave-one-out (Ahmadian et al. 2024)

Every algorithm's loss is the same `core.rl_objective` (clipped policy loss, entropy bonus, value
loss when it has a critic, KL term when its KL is in the loss). A new algorithm is a class with the
`Algorithm` attributes and an `advantages` method, registered with `register_algorithm`.
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

    def advantages(
        self, rollout: Rollout, config: RLConfig, token_kl: torch.Tensor | None, kl_coef: float
    ) -> Advantages:
        """Advantages from `rollout.rewards` (N,) (+ `rollout.values` with a critic); `token_kl`
        (N, T) is KL(pi_old || pi_ref) per token when the reference pass ran."""
        ...


@dataclass(frozen=True)
class PPO:
    """PPO with a learned critic (Schulman et al. 2017; RLHF form of Ziegler et al. 2019 /
    Ouyang et al. 2022): the sequence reward at the last token, -kl_coef * KL at every token,
    GAE over the completion's tokens."""

    name: str = "ppo"
    uses_critic: bool = True
    kl_in_reward: bool = True
    default_kl_estimator: core.KLEstimator = "k1"
    min_samples_per_prompt: int = 1

    def advantages(self, rollout, config, token_kl, kl_coef) -> Advantages:
        mask = rollout.completion_mask.float()
        token_kl = token_kl if token_kl is not None else torch.zeros_like(mask)
        if not rollout.is_multi_turn:  # one turn: bi-level GAE reduces to this token-level GAE
            rewards = core.token_rewards(rollout.rewards, token_kl, mask, kl_coef)
            advantages, returns = core.gae(rewards, rollout.values, mask, config.gamma, config.lam)
        elif config.turn_credit == "bi_level":
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


GroupEstimator = Callable[[torch.Tensor, int, "RLConfig"], torch.Tensor]
"""(rewards (N,) in contiguous groups, group size, config) -> advantages (N,)."""
EpisodeEstimator = Callable[[torch.Tensor, torch.Tensor, "RLConfig"], torch.Tensor]
"""(episode returns (E,), group index (E,), config) -> advantages (E,)."""


@dataclass(frozen=True)
class GroupBaseline:
    """Critic-free methods whose baseline comes from the other samples of the same prompt (or, for
    agents, the other episodes of the same env seed); KL (when on) is a loss term. The estimators
    are the only thing GRPO and RLOO differ in.

    Agent turns: an episode's advantage (its return against its group's) is shared by all its
    turns, plus with `step_group_weight` > 0 GiGPO's step-level advantage (Feng et al. 2025): turns
    that saw the same observation in a group's episodes are compared by their discounted
    return-to-go."""

    name: str
    estimator: GroupEstimator
    episode_estimator: EpisodeEstimator
    uses_critic: bool = False
    kl_in_reward: bool = False
    default_kl_estimator: core.KLEstimator = "k3"
    min_samples_per_prompt: int = 2

    def advantages(self, rollout, config, token_kl, kl_coef) -> Advantages:
        if rollout.is_multi_turn:
            return self._episode_advantages(rollout, config)
        group_size = config.samples_per_prompt
        signal = core.groups_with_signal(rollout.rewards, group_size)
        return Advantages(
            self.estimator(rollout.rewards, group_size, config),
            # dynamic sampling (DAPO): groups with identical rewards carry no gradient; drop them
            sample_mask=signal.float() if config.dynamic_sampling else None,
            stats={"objective/groups_with_signal": signal.float().mean().item()},
        )

    def _episode_advantages(self, rollout, config) -> Advantages:
        _, returns, inverse = core.episode_totals(rollout.rewards, rollout.episode_index)
        episode_groups = torch.zeros(len(returns), dtype=torch.long).scatter_(0, inverse, rollout.group_index)
        advantages = self.episode_estimator(returns, episode_groups, config)[inverse]
        stats = {}
        if config.step_group_weight > 0:
            step_groups = core.step_group_index(rollout.observation_keys, rollout.group_index)
            to_go = core.discounted_returns(
                rollout.rewards, rollout.episode_index, rollout.turn_index, config.turn_gamma
            )
            step = core.indexed_group_advantages(to_go, step_groups, config.scale_rewards)
            advantages = advantages + config.step_group_weight * step
            sizes = torch.bincount(step_groups)[step_groups]
            stats["objective/step_grouped_fraction"] = (sizes > 1).float().mean().item()
        varies = [len(set(returns[episode_groups == g].tolist())) > 1 for g in torch.unique(episode_groups)]
        stats["objective/groups_with_signal"] = sum(varies) / max(len(varies), 1)
        return Advantages(advantages, stats=stats)


def objective_settings(config: RLConfig, algorithm: Algorithm, kl_coef: float) -> core.ObjectiveSettings:
    """The coefficients of `core.rl_objective` for a run's config; `kl_coef` is the current (possibly
    adaptive) KL coefficient, in the loss only for an algorithm whose KL is not in the reward."""
    return core.ObjectiveSettings(
        clip_low=config.clip_range,
        clip_high=config.clip_range_high,
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
register_algorithm(
    GroupBaseline(
        "grpo",
        lambda rewards, size, config: core.group_advantages(rewards, size, config.scale_rewards),
        lambda returns, groups, config: core.indexed_group_advantages(returns, groups, config.scale_rewards),
    )
)
register_algorithm(
    GroupBaseline(
        "rloo",
        lambda rewards, size, config: core.rloo_advantages(rewards, size),
        lambda returns, groups, config: core.indexed_rloo_advantages(returns, groups),
    )
)
