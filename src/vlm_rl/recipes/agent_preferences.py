"""Turn preference pairs from an agent's environment, and a reward model trained on them: a
learned, dense turn reward for `vlm-rl agent --reward_model_path`.

    vlm-rl agent-preferences --env frozenlake --env_size 6 --output_dir reward_models/frozenlake6
    vlm-rl agent --env frozenlake --env_size 6 --reward_model_path reward_models/frozenlake6/final \
        --reward_model_weight 0.1
    vlm-rl agent-preferences --pairs return --env CliffWalking-v1 --actions up,right,down,left --pairs_only

`--pairs expert` (built-ins, which have an expert): a behaviour policy plays the env's training
seeds, taking the expert's move or, with probability --random_action_prob, a random one (so
states off the expert's path are covered); at every state it visits, the expert's action is
chosen over each action after which the expert does strictly worse. `--pairs return` (any env):
--episodes_per_seed episodes of each seed by --behaviour_policy; at an observation seen in
several of them, the action with the higher mean return from there on is chosen (ties dropped).
A pair's prompt is the turn's prompt exactly as `vlm-rl agent` builds it (same --context_frames
and --context_actions), so the reward model scores turns as it was trained. The pairs go to
<output_dir>/pairs/{train,held_out}.jsonl (the trainer's format, docs/data.md), the reward model
(the trainer of `vlm-rl train-reward-model`) to <output_dir>/final; its pairwise accuracy is
measured on pairs built the same way from the env's held-out seeds. docs/turn_reward.md.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vlm_rl import envs
from vlm_rl.distributed import make_accelerator
from vlm_rl.errors import ConfigError, DataError, check_ranges
from vlm_rl.recipes import CONFIGS, check_model_source, check_output_dir, check_resume, parse_config
from vlm_rl.recipes.ppo_agent import model_for_env
from vlm_rl.rewards.trainer import RewardTrainingConfig, train_reward_model
from vlm_rl.rl.agent import AgentContext, TurnPolicy, expert_mix, expert_pairs, return_pairs, write_pairs
from vlm_rl.rl.config import AgentConfig

if TYPE_CHECKING:
    import torch

DEFAULT_CONFIG = CONFIGS / "agent_preferences.yaml"
OTHER_ENV_SEEDS = 10_000
"""Training seeds of an env with no built-in split (0, 1, ...), as `vlm-rl agent` plays them."""


@dataclass
class TurnPairsConfig:
    """How the preference pairs are built (the env flags are `vlm-rl agent`'s)."""

    pairs: Literal["expert", "return"] = field(
        default="expert",
        metadata={
            "help": "expert: the expert's action over each worse one (built-ins); return: the action with the higher "
            "return from the turn on, over episodes of one seed (any env)."
        },
    )
    num_seeds: int = field(default=300, metadata={"help": "Training seeds played (the env's first ones)."})
    random_action_prob: float = field(
        default=0.3,
        metadata={
            "help": "How often the expert's behaviour policy (--pairs expert, --behaviour_policy expert) moves at random."
        },
    )
    episodes_per_seed: int = field(default=8, metadata={"help": "--pairs return: episodes played per seed."})
    behaviour_policy: str = field(
        default="random",
        metadata={
            "help": "--pairs return: random (uniform moves), expert (built-ins; mixed per --random_action_prob) "
            "or pkg.module:fn, fn(env, turn) -> an action word."
        },
    )
    pairs_only: bool = field(default=False, metadata={"help": "Write the pairs; train no reward model."})

    def __post_init__(self):
        check_ranges(
            self,
            {"num_seeds": ">= 1", "random_action_prob": "[0, 1]", "episodes_per_seed": ">= 1"},
        )


def behaviour(pairs: TurnPairsConfig, env_name: str, rng: random.Random) -> TurnPolicy:
    """The policy that plays `--pairs return` episodes (`--behaviour_policy`)."""
    spec = envs.ENVS.get(env_name)
    if pairs.behaviour_policy == "random":
        return lambda env, turn: rng.choice(env.actions)
    if pairs.behaviour_policy == "expert":
        if spec is None or spec.expert is None:
            raise ConfigError(
                f"--behaviour_policy expert: --env {env_name} has no expert; use random or pkg.module:fn"
            )
        return expert_mix(spec.expert, pairs.random_action_prob, rng)
    from vlm_rl.rewards.build import import_user_module

    module_name, _, name = pairs.behaviour_policy.partition(":")
    try:
        policy = getattr(import_user_module(module_name), name, None) if name else None
    except ImportError as error:
        raise ConfigError(
            f"--behaviour_policy {pairs.behaviour_policy}: cannot import {module_name!r} ({error})"
        ) from error
    if not callable(policy):
        raise ConfigError(
            f"--behaviour_policy {pairs.behaviour_policy!r}: not random, expert, nor pkg.module:fn naming a function"
        )
    return policy


def build_pairs(pairs: TurnPairsConfig, agent: AgentConfig, seeds: Sequence[int], seed: int) -> list[dict]:
    """The preference rows of `seeds` (`vlm_rl.rl.agent.expert_pairs` or `return_pairs`)."""
    options = agent.env_options()
    context = AgentContext(frames=agent.context_frames, actions=agent.context_actions)
    rng = random.Random(seed)
    if pairs.pairs == "expert":
        spec = envs.ENVS.get(agent.env)
        if spec is None or spec.expert is None:
            raise ConfigError(
                f"--pairs expert: --env {agent.env} has no expert (the built-ins {', '.join(sorted(envs.ENVS))} "
                "have one); use --pairs return"
            )
        make = lambda: envs.make_env(agent.env, **options)  # noqa: E731
        return expert_pairs(
            make, spec.expert, seeds, random_action_prob=pairs.random_action_prob, rng=rng, context=context
        )
    env = envs.make_env(agent.env, **options)
    policy = behaviour(pairs, agent.env, rng)
    return return_pairs(env, policy, seeds, episodes_per_seed=pairs.episodes_per_seed, context=context)


def blind_scores(train: Sequence[dict], held_out: Sequence[dict]) -> list[float]:
    """Per pair of `held_out`, the score of the best ranking that never looks at the turn: an action
    beats another where it did so more often in `train` (1 right, 0 wrong, 0.5 a tie). A reward
    model has read the image only where it beats this ranking."""
    wins = Counter((row["chosen"], row["rejected"]) for row in train)
    scores = []
    for row in held_out:
        ahead, behind = wins[row["chosen"], row["rejected"]], wins[row["rejected"], row["chosen"]]
        scores.append(1.0 if ahead > behind else 0.5 if ahead == behind else 0.0)
    return scores


def image_dependent_accuracy(
    model_path: Path, rows: Sequence[dict], device: torch.device | str = "cpu"
) -> float:
    """The reward model's pairwise accuracy on `rows` (pairs that the image-blind ranking gets
    wrong or ties: only the image tells their actions apart)."""
    from vlm_rl.rewards.build import load_reward_model

    model = load_reward_model(str(model_path), device)
    images, prompts = [row["images"] for row in rows], [row["prompt"] for row in rows]
    chosen = model.score(images, prompts, [row["chosen"] for row in rows])
    rejected = model.score(images, prompts, [row["rejected"] for row in rows])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / max(len(rows), 1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    config, agent, pairs = parse_config(
        (RewardTrainingConfig, AgentConfig, TurnPairsConfig), argv, DEFAULT_CONFIG, recipe="agent_preferences"
    )
    spec = envs.ENVS.get(agent.env)
    config.model_name_or_path = model_for_env(config.model_name_or_path, spec)  # e.g. tiny-llava-babyai
    if not pairs.pairs_only:
        check_model_source(config.model_name_or_path)
        check_resume(config, ("model_name_or_path", "lora_r", "lora_alpha", "train_projector"))
    check_output_dir(config.output_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Seeds: the env's training seeds for the pairs, its held-out seeds (as `vlm-rl agent` evaluates) to check
    envs.make_env(agent.env, **agent.env_options())  # an unknown --env or option is the first thing to fix
    available = list(spec.train_seeds) if spec else list(range(OTHER_ENV_SEEDS))
    if pairs.num_seeds > len(available):
        raise ConfigError(
            f"--num_seeds {pairs.num_seeds}: --env {agent.env} has {len(available)} training seeds"
        )
    train_seeds = available[: pairs.num_seeds]
    eval_seeds = list(spec.eval_seeds if spec else range(100_000, 100_000 + agent.eval_episodes))
    eval_seeds = eval_seeds[: agent.eval_episodes]
    shared_seeds = set(train_seeds) & set(eval_seeds)

    # Pairs
    folder = Path(config.output_dir) / "pairs"
    train_rows = build_pairs(pairs, agent, train_seeds, config.seed)
    held_out_rows = build_pairs(pairs, agent, eval_seeds, config.seed + 1)
    if not train_rows or not held_out_rows:
        raise DataError(
            f"--env {agent.env}, --pairs {pairs.pairs}: {len(train_rows)} training and {len(held_out_rows)} held-out "
            "pairs; the episodes showed no action better than another (a sparse reward that random play never "
            "reaches?): play more (--num_seeds, --episodes_per_seed) or use --pairs expert"
        )
    # several processes build the same rows (seeded); one writes them
    state = make_accelerator(config.gradient_accumulation_steps)  # the launch's state, as the trainer's
    if state.is_main_process:
        write_pairs(train_rows, folder / "train.jsonl")
        write_pairs(held_out_rows, folder / "held_out.jsonl")
    state.wait_for_everyone()
    blind_per_pair = blind_scores(train_rows, held_out_rows)
    blind = sum(blind_per_pair) / len(blind_per_pair)
    image_rows = [row for row, score in zip(held_out_rows, blind_per_pair, strict=True) if score < 1.0]
    where = (
        f"{len(eval_seeds)} held-out seeds of {agent.env}, none of the {len(train_seeds)} training seeds"
        if not shared_seeds
        else f"{len(eval_seeds)} evaluation seeds of {agent.env}, NOT held out: {len(shared_seeds)} of them are training seeds"
    )
    summary = (
        f"{len(train_rows)} training pairs ({len(train_seeds)} seeds) and {len(held_out_rows)} pairs of {where} "
        f"in {folder}"
    )
    if pairs.pairs_only:
        if state.is_main_process:
            print(f"{summary}; an image-blind ranking scores {blind:.3f} on the second")
        return {
            "pairs/train": len(train_rows),
            "pairs/held_out": len(held_out_rows),
            "eval/blind_accuracy": blind,
        }

    # Reward model: the trainer of `vlm-rl train-reward-model`, on these pairs
    config.dataset, config.eval_dataset = str(folder / "train.jsonl"), str(folder / "held_out.jsonl")
    metrics = train_reward_model(config)
    state.wait_for_everyone()  # final/ is written by the main process
    if image_rows:  # on every process, so that each returns the same metrics
        metrics["eval/image_pairs_accuracy"] = image_dependent_accuracy(
            Path(config.output_dir) / "final", image_rows, state.device
        )
    if state.is_main_process:
        label = "held-out pairwise accuracy" if not shared_seeds else "pairwise accuracy (NOT held out)"
        shared = int(metrics["eval/images_shared_with_training"])
        print(
            f"{summary}; {label}: {metrics['eval/accuracy_before']:.3f} before -> {metrics['eval/accuracy']:.3f} "
            f"after ({int(metrics['eval/pairs'])} pairs, {shared} frame(s) shared with training); an image-blind "
            f"ranking scores {blind:.3f}; on the {len(image_rows)} pairs it gets wrong or ties, the reward model "
            f"scores {metrics.get('eval/image_pairs_accuracy', float('nan')):.3f}; saved to {Path(config.output_dir) / 'final'} "
            "(vlm-rl agent with the same env flags and --reward_model_path to it)"
        )
        if config.push_to_hub:
            from vlm_rl.hub import push_after_training

            print(push_after_training(config))
    return {**metrics, "eval/blind_accuracy": blind}
