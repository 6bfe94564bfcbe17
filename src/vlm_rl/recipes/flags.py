"""Which flags a run acts on: a flag the user gives that the chosen recipe, engine or algorithm
does not read is an error, never a silent no-op.

`FLAG_RULES` holds one rule per config field of every recipe: `rule(run) -> None` when a run of
that kind acts on the field, else the reason it does not ("PPO only", "needs --push_to_hub").
`check_flags` applies the rules to the fields the user set: on the command line an ignored flag is
an error; in their own `--config` file, a warning (the recipe's shipped defaults are not the user's
doing). tests/test_flag_rules.py
keeps the table honest: every field has a rule, and in a real run of every recipe x engine x
algorithm, a field the run never reads has a rule that names why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from vlm_rl.errors import ConfigError

logger = logging.getLogger(__name__)

RECIPES = ("ppo_caption", "grpo_vqa", "ppo_agent", "train_reward_model", "agent_preferences")


@dataclass(frozen=True)
class Run:
    """What decides which flags a run reads: the recipe and every parsed field's value."""

    recipe: str
    values: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def agent(self) -> bool:
        return self.recipe == "ppo_agent"

    @property
    def native(self) -> bool:
        return self.values.get("trainer", "native") == "native"

    @property
    def critic(self) -> bool:
        from vlm_rl.rl.algorithms import get_algorithm

        return get_algorithm(self.algorithm).uses_critic

    @property
    def algorithm_reads(self) -> frozenset[str]:
        """The algorithm-specific fields its estimator and policy loss read (`Algorithm.reads`)."""
        from vlm_rl.rl.algorithms import get_algorithm

        return get_algorithm(self.algorithm).reads

    @property
    def kl_on(self) -> bool:
        return self.kl_coef > 0 or self.adaptive_kl


Rule = Callable[[Run], "str | None"]


def always(run: Run) -> None:
    return None


def _critic_only(run: Run) -> str | None:
    return None if run.critic else f"PPO's critic only; --algorithm {run.algorithm} has no value head"


def _native_only(why: str) -> Rule:
    return lambda run: None if run.native else f"--trainer trl: {why}"


def _not_agents(why: str) -> Rule:
    return lambda run: f"agents {why}" if run.agent else None


def _agents_only(run: Run) -> str | None:
    return None if run.agent else "agents only (vlm-rl agent / recipes/ppo_agent.py)"


def _hub(run: Run) -> str | None:
    return None if run.push_to_hub else "needs --push_to_hub"


def _gamma_lam(run: Run) -> str | None:
    if not run.critic:
        return f"GAE over tokens (PPO) only; --algorithm {run.algorithm} has no critic"
    if run.agent and run.turn_credit == "turn":
        return "--turn_credit turn gives a turn's tokens one advantage (its --turn_gamma/--turn_lam)"
    return None


def _turn_gamma(run: Run) -> str | None:
    if not run.agent:
        return "agents only (the discount across an episode's turns)"
    if run.critic or run.step_group_weight > 0:
        return None
    return f"--algorithm {run.algorithm} compares whole episodes' returns (discounted only with --step_group_weight > 0)"


def _scale_rewards(run: Run) -> str | None:
    if "scale_rewards" in run.algorithm_reads or (run.agent and run.step_group_weight > 0 and not run.critic):
        return None
    return f"GRPO's group std; --algorithm {run.algorithm} does not divide by it"


def _read_by_algorithm(name: str) -> Rule:
    """A field that only some algorithms' estimator or policy loss reads (`Algorithm.reads`)."""
    return lambda run: (
        None if name in run.algorithm_reads else f"--algorithm {run.algorithm}'s policy loss does not use it"
    )


def _clip_range(run: Run) -> str | None:
    """The lower clip, and the upper one too unless --clip_range_high is set."""
    reads = run.algorithm_reads
    if "clip_range" in reads or ("clip_range_high" in reads and run.clip_range_high is None):
        return None
    if "clip_range_high" in reads:
        return f"--algorithm {run.algorithm} clips only from above, at --clip_range_high"
    return f"--algorithm {run.algorithm}'s policy loss has no clip"


def _overlong_penalty(run: Run) -> str | None:
    return None if run.overlong_buffer > 0 else "only with --overlong_buffer > 0"


def _dynamic_sampling(run: Run) -> str | None:
    if run.critic:
        return f"group methods only; --algorithm {run.algorithm} has no groups"
    if run.agent:
        return "agents keep every episode group (their groups are env seeds, never dropped)"
    return None if run.native else "--trainer trl: TRL's GRPOTrainer trains on every group"


def _kl_estimator(run: Run) -> str | None:
    if not run.kl_on:
        return "no KL term: --kl_coef is 0"
    if not run.native and run.kl_estimator != "k3":
        return "--trainer trl: TRL's KL is the k3 estimator"
    return None


def _kl_importance_weighted(run: Run) -> str | None:
    if not run.kl_on:
        return "no KL term: --kl_coef is 0"
    if run.critic:
        return "PPO puts the KL in the reward, not the loss"
    return None


def _adaptive(run: Run) -> str | None:
    return None if run.adaptive_kl else "only with --adaptive_kl"


def _vllm_engine(run: Run) -> str | None:
    return None if run.values.get("rollout_engine") == "vllm" else "needs --rollout_engine vllm"


def _managed_vllm(run: Run) -> str | None:
    if run.values.get("rollout_engine") != "vllm":
        return "needs --rollout_engine vllm"
    if run.values.get("vllm_url"):
        return "the server at --vllm_url is yours: the run starts none"
    return None


def _lr_decay_steps(run: Run) -> str | None:
    return None if run.native else "--trainer trl: TRL's schedule decays over --total_steps"


def _trainer(run: Run) -> str | None:
    if run.recipe != "grpo_vqa":
        return "only `vlm-rl grpo` (recipes/grpo_vqa.py) has a choice of engine (TRL's GRPOTrainer)"
    return None


def _warm(run: Run) -> str | None:
    return None if run.warm_start_steps > 0 else "only with --warm_start_steps > 0"


def _reward_model_weight(run: Run) -> str | None:
    if run.recipe == "ppo_caption" or run.reward_model_path:
        return None
    return "needs --reward_model_path"


def _easy_vqa_pairs(run: Run) -> str | None:
    if run.dataset == "easy-vqa:caption_preference":
        return None
    return f"options of the easy-vqa:caption_preference pairs, not of --dataset {run.dataset}"


def _save_total_limit(run: Run) -> str | None:
    return None if run.save_steps > 0 else "no checkpoints: --save_steps is 0"


_DATA = _not_agents("play --env episodes; they read no --dataset")

RL_RULES: dict[str, Rule] = {
    "algorithm": always,
    "trainer": _trainer,
    "use_vllm": lambda run: None if not run.native else "needs --trainer trl",
    "vllm_mode": lambda run: None if run.use_vllm else "needs --use_vllm",
    "model_name_or_path": always,
    "lora_r": always,
    "lora_alpha": always,
    "train_projector": always,
    "init_adapter": always,
    "dtype": always,
    "gradient_checkpointing": always,
    "attn_implementation": always,
    "load_in_4bit": always,
    "load_in_8bit": always,
    "lora_target_modules": always,
    "trust_remote_code": always,
    "dataset": _DATA,
    "max_train_prompts": _DATA,
    "max_eval_prompts": _DATA,
    "eval_dataset": _DATA,
    "reward_model_path": always,
    "reward_model_weight": _reward_model_weight,
    "reward_funcs": always,
    "reward_weights": always,
    "normalize_rewards": always,
    "missing_eos_penalty": always,
    "overlong_buffer": always,
    "overlong_penalty": _overlong_penalty,
    "prompts_per_step": always,
    "samples_per_prompt": always,
    "max_new_tokens": always,
    "temperature": always,
    "top_p": always,
    "rollout_engine": _native_only("TRL's GRPOTrainer generates itself (--use_vllm for its vLLM)"),
    "vllm_url": _vllm_engine,
    "vllm_python": _managed_vllm,
    "vllm_cpus": _managed_vllm,
    "async_rollouts": _vllm_engine,
    "vllm_importance_sampling_cap": _vllm_engine,
    "learning_rate": always,
    "lr_scheduler_type": always,
    "warmup_steps": always,
    "weight_decay": always,
    "total_steps": always,
    "lr_decay_steps": _lr_decay_steps,
    "ppo_epochs": always,
    "minibatch_size": always,
    "gradient_accumulation_steps": always,
    "max_grad_norm": always,
    "clip_range": _clip_range,
    "clip_range_high": _read_by_algorithm("clip_range_high"),
    "loss_aggregation": always,
    "entropy_coef": always,
    "sapo_temperature_pos": _read_by_algorithm("sapo_temperature_pos"),
    "sapo_temperature_neg": _read_by_algorithm("sapo_temperature_neg"),
    "value_coef": _critic_only,
    "value_learning_rate": _critic_only,
    "value_clip_range": _critic_only,
    "gamma": _gamma_lam,
    "lam": _gamma_lam,
    "whiten_advantages": _critic_only,
    "turn_credit": lambda run: _agents_only(run) or _critic_only(run),
    "turn_gamma": _turn_gamma,
    "turn_lam": lambda run: _agents_only(run) or _critic_only(run),
    "step_group_weight": lambda run: (
        _agents_only(run)
        or (None if not run.critic else "GiGPO step groups need a group method (grpo, rloo)")
    ),
    "shared_prefix": _native_only("TRL's GRPOTrainer forwards each sample whole"),
    "scale_rewards": _scale_rewards,
    "dynamic_sampling": _dynamic_sampling,
    "kl_coef": always,
    "kl_estimator": _kl_estimator,
    "kl_importance_weighted": _kl_importance_weighted,
    "adaptive_kl": lambda run: None if run.native else "--trainer trl: TRL's beta is fixed",
    "target_kl": _adaptive,
    "kl_horizon": _adaptive,
    "output_dir": always,
    "seed": always,
    "logging_steps": always,
    "eval_steps": always,
    "save_steps": always,
    "save_total_limit": _save_total_limit,
    "resume_from_checkpoint": always,
    "num_threads": always,
    "sample_log_steps": _native_only("TRL logs completions its own way"),
    "push_to_hub": always,
    "hub_model_id": _hub,
    "hub_private": _hub,
    "hub_revision": _hub,
    "hub_push_checkpoints": lambda run: (
        _hub(run) or (None if run.native else "--trainer trl: TRL's checkpoints are not pushed; final/ is")
    ),
    "report_to": always,
    "report_steps": _native_only("the report is written at the end"),
}
"""RLConfig's fields (recipes ppo_caption, grpo_vqa, ppo_agent)."""

WARM_START_RULES: dict[str, Rule] = {
    "warm_start_steps": always,
    "warm_start_learning_rate": _warm,
    "warm_start_batch_size": _warm,
}

AGENT_RULES: dict[str, Rule] = {
    # Which env options apply to which kind of env (built-in, gymnasium id, a class) is checked
    # where the env is made (vlm_rl.envs.make_env), with the env in hand.
    "env": always,
    "env_size": always,
    "slippery": always,
    "render": always,
    "max_turns": always,
    "invalid_penalty": always,
    "context_frames": always,
    "context_actions": always,
    "actions": always,
    "instruction": always,
    "env_kwargs": always,
    "eval_episodes": always,
    "expert_warm_start_seeds": _warm,
}

REWARD_MODEL_RULES: dict[str, Rule] = {
    "num_epochs": lambda run: None if run.max_steps is None else "--max_steps is given and wins",
    "pairs_per_image": _easy_vqa_pairs,
    "graded_fraction": _easy_vqa_pairs,
    "malformed_fraction": _easy_vqa_pairs,
    "hub_model_id": _hub,
    "hub_private": _hub,
    "hub_revision": _hub,
    "save_total_limit": _save_total_limit,
}
"""The reward-model recipe's fields that are not always read (every other field is)."""


def _pairs_mode(mode: str) -> Rule:
    return lambda run: None if run.pairs == mode else f"--pairs {mode} only"


def _random_action_prob(run: Run) -> str | None:
    if run.pairs == "expert" or run.behaviour_policy == "expert":
        return None
    return f"mixes random moves into the expert's (--pairs expert); --behaviour_policy {run.behaviour_policy} plays alone"


_OWN_PAIRS = lambda run: "agent-preferences trains on the pairs it writes (<output_dir>/pairs/)"  # noqa: E731

AGENT_PREFERENCE_RULES: dict[str, Rule] = {
    # TurnPairsConfig's fields
    "pairs": always,
    "num_seeds": always,
    "random_action_prob": _random_action_prob,
    "episodes_per_seed": _pairs_mode("return"),
    "behaviour_policy": _pairs_mode("return"),
    "pairs_only": always,
    # the reward-model trainer's and the agent recipe's fields that do not apply
    "dataset": _OWN_PAIRS,
    "eval_dataset": _OWN_PAIRS,
    "expert_warm_start_seeds": lambda run: "vlm-rl agent's warm start; agent-preferences has none",
}
"""`vlm-rl agent-preferences` (recipes/agent_preferences.py): its own fields, and the reward-model and
agent fields it does not read; every other reward-model field is the trainer's (`REWARD_MODEL_RULES`),
unused under --pairs_only, and every other agent field (the env's) is read."""

PAIRS_ONLY_READS = ("output_dir", "seed")
"""The reward-model fields that `--pairs_only` still reads (the folder, the behaviour policy's seed)."""


def _agent_preference_rule(name: str) -> Rule:
    if name in AGENT_PREFERENCE_RULES:
        return AGENT_PREFERENCE_RULES[name]
    if name in AGENT_RULES:
        return always
    trainer = REWARD_MODEL_RULES.get(name, always)
    if name in PAIRS_ONLY_READS:
        return trainer
    return lambda run: (
        "--pairs_only writes the pairs and trains no reward model" if run.pairs_only else trainer(run)
    )


def rules_for(recipe: str, names: Iterable[str]) -> dict[str, Rule]:
    """The rule of each of `names` in `recipe` (KeyError for a field with no rule)."""
    if recipe == "train_reward_model":
        return {name: REWARD_MODEL_RULES.get(name, always) for name in names}
    if recipe == "agent_preferences":
        return {name: _agent_preference_rule(name) for name in names}
    table = {**RL_RULES, **WARM_START_RULES, **AGENT_RULES}
    return {name: table[name] for name in names}


def unused_flags(recipe: str, configs: Iterable[Any], given: Iterable[str]) -> list[tuple[str, str]]:
    """(flag, why) for every field in `given` that a run of `recipe` with `configs` does not act on."""
    values = {f.name: getattr(config, f.name) for config in configs for f in fields(config)}
    run = Run(recipe, values)
    rules = rules_for(recipe, values)
    return [(name, why) for name in values if name in given and (why := rules[name](run))]


def check_flags(
    recipe: str, configs: Iterable[Any], given: Iterable[str], from_file: Iterable[str] = ()
) -> None:
    """Raise one ConfigError naming every flag set on the command line (`given`) that this run
    would ignore. Keys of the user's own config file (`from_file`) that it would ignore are logged
    as one warning instead: a config is a template that may hold settings of a variant the command
    line turned off (`--config grpo_agent.yaml --warm_start_steps 0` leaves its warm-start rate unused)."""
    configs = list(configs)
    problems = unused_flags(recipe, configs, set(given))
    if problems:
        listed = "; ".join(f"--{name}: {why}" for name, why in problems)
        raise ConfigError(
            f"flag(s) this run would ignore: {listed}. Drop them (or change what they depend on)"
        )
    unused_keys = unused_flags(recipe, configs, set(from_file) - set(given))
    if unused_keys:
        listed = "; ".join(f"{name} ({why})" for name, why in unused_keys)
        logger.warning("config keys this run ignores: %s", listed)
