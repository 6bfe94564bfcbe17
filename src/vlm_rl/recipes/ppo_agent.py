"""PPO (or GRPO/RLOO) for a VLM agent in a visual environment, over multi-turn episodes.

    accelerate launch recipes/ppo_agent.py                      # FrozenLake random 4x4 maps, PPO
    accelerate launch recipes/ppo_agent.py --config recipes/configs/grpo_agent.yaml   # GRPO + GiGPO
    accelerate launch recipes/ppo_agent.py --env numberline
    vlm-rl agent --env babyai-gotoobj                            # BabyAI: the mission in the prompt (tiny-llava-babyai)
    vlm-rl agent --env minigrid:BabyAI-GoToRedBallNoDists-v0 --model_name_or_path smol-llava --warm_start_steps 0
    vlm-rl agent --env CliffWalking-v1 --actions up,right,down,left --max_turns 20 --warm_start_steps 0
    vlm-rl agent --env userpkg.colorpick:ColorPick --max_turns 1 ...  # a gymnasium.Env class of your own

Each turn the policy sees the current frame (flat colours, one map cell per image patch) and the
protocol's instruction, answers with an action word, and the environment steps; the episode's
turns are the RL samples. PPO: value head on the policy trunk, bi-level GAE (across turns, then
tokens inside a turn); GRPO/RLOO: the episode's return against the other episodes of its map.
Rewards: the environment's (goal 1.0, invalid reply -0.1) plus, optionally, a learned reward model
scoring each turn (--reward_model_path). With no arguments it runs offline on CPU (tiny LLaVA
whose vocabulary holds the protocols, a short supervised warm start on expert turns) and prints
held-out success before and after RL beside the random and image-blind baselines on the same maps.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vlm_rl import envs
from vlm_rl.envs.baselines import frozenlake_baselines, sokoban_baselines, success_rate
from vlm_rl.errors import ConfigError
from vlm_rl.models.tiny import check_vocabulary, resolve_tiny_name, tiny_vocabulary
from vlm_rl.recipes import CONFIGS, check_rl_inputs, parse_config
from vlm_rl.rl.agent import AgentContext, AgentTrainer, expert_dataset
from vlm_rl.rl.config import AgentConfig, RLConfig, WarmStartConfig
from vlm_rl.rl.pipeline import build_policy, load_base, reward_from_config, start, warm_start
from vlm_rl.run_folder import RunFolder

DEFAULT_CONFIG = CONFIGS / "ppo_agent.yaml"
DEFAULT_MODEL = "tiny-llava-agent"
logger = logging.getLogger(__name__)


def model_for_env(model_name_or_path: str, spec: envs.EnvSpec | None) -> str:
    """The model to run: the env's own tiny model (`EnvSpec.tiny_model`, e.g. tiny-llava-babyai, which
    knows BabyAI's missions) where the user kept the default tiny-llava-agent (any @seedN kept), else
    `model_name_or_path` unchanged.

    >>> model_for_env("tiny-llava-agent@seed2", envs.ENVS["babyai-gotoobj"]), model_for_env("tiny-llava", None)
    ('tiny-llava-babyai@seed2', 'tiny-llava')
    """
    tiny = resolve_tiny_name(model_name_or_path)
    if spec is None or tiny is None or tiny[0] != DEFAULT_MODEL or spec.tiny_model == DEFAULT_MODEL:
        return model_name_or_path
    return spec.tiny_model + model_name_or_path[len(DEFAULT_MODEL) :]


def baselines(agent: AgentConfig, env, eval_seeds: list[int]) -> dict[str, float]:
    """Success rates on the held-out seeds without reading the image: uniform random moves for any
    environment; for FrozenLake and Sokoban also the best image-blind move distribution and fixed
    sequence."""
    options = {"size": agent.env_size} if agent.env_size else {}
    if agent.env == "frozenlake":
        found = frozenlake_baselines(eval_seeds, slippery=agent.slippery, max_turns=env.max_turns, **options)
        return {k: found[k] for k in ("random", "best_blind", "best_sequence")}
    if agent.env == "sokoban":
        found = sokoban_baselines(eval_seeds, max_turns=env.max_turns, **options)
        return {k: found[k] for k in ("random", "best_blind", "best_sequence")}
    import random

    rng = random.Random(0)
    return {"random": success_rate(env, lambda env, turn: rng.choice(env.actions), eval_seeds)}


def check_action_words(model_name_or_path: str, env_name: str, env) -> None:
    """A tiny default can only answer with words of its vocabulary: every action word of the
    environment must be one (minigrid's "forward", "pickup", ... are not)."""
    tiny = resolve_tiny_name(model_name_or_path)
    if tiny is None:
        return
    vocabulary = tiny_vocabulary(*tiny)
    missing = [word for word in env.actions if word.lower() not in vocabulary]
    if missing:
        spec = envs.ENVS.get(env_name)
        fix = (
            f"use its tiny model (--model_name_or_path {spec.tiny_model}, or leave the flag out) or a model "
            "with a real tokenizer (--model_name_or_path smol-llava works offline)"
            if spec
            else "use a model with a real tokenizer (--model_name_or_path smol-llava works offline), name the "
            f"actions with words it knows (--actions), or use a built-in environment ({', '.join(sorted(envs.ENVS))})"
        )
        raise ConfigError(
            f"--env {env_name}: its action words {list(env.actions)} do not fit --model_name_or_path "
            f"{model_name_or_path}, whose word-level vocabulary lacks {missing}; {fix}"
        )
    check_vocabulary(model_name_or_path, [env.instruction], env_name, flag="--env")


def evaluate_run(
    run: Path, flags: Sequence[str], *, episodes: int, num_threads: int, env_options: dict | None = None
) -> dict:
    """Held-out evaluation of a finished agent run's final adapter (`<run>/final`, on the base model
    its `vlm_rl_run.json` names) on the env and protocol `flags` give (`--env ...`), through this
    recipe's own evaluation: `{"eval": {...}, "baselines": {...}}`. For benchmarks/babyai_mission.py
    (`env_options`: BabyAI's `blank_mission`) and benchmarks/generalisation.py (larger maps)."""
    base_model = json.loads((run / "final" / "vlm_rl_run.json").read_text())["base_model"]
    with tempfile.TemporaryDirectory() as output_dir, contextlib.redirect_stdout(io.StringIO()):
        fixed = {
            "--model_name_or_path": base_model,
            "--init_adapter": str(run / "final"),
            "--eval_episodes": str(episodes),
            "--num_threads": str(num_threads),
            "--output_dir": output_dir,
            "--report_to": "none",
        }
        argv = [*(item for pair in fixed.items() for item in pair), *flags]  # the caller's flags win
        return main(argv, env_options=env_options, evaluate_only=True)


def main(
    argv: list[str] | None = None, *, env_options: dict | None = None, evaluate_only: bool = False
) -> dict:
    """The recipe. For benchmarks/babyai_mission.py: `env_options` are `make_env` options the flags do
    not give (BabyAI's `blank_mission=True`); `evaluate_only` returns the held-out evaluation of the
    policy (e.g. a saved one: --init_adapter) and the baselines, with no warm start and no RL."""
    config, agent, warm = parse_config(
        (RLConfig, AgentConfig, WarmStartConfig), argv, DEFAULT_CONFIG, recipe="ppo_agent"
    )
    check_rl_inputs(config)  # before anything is loaded
    spec = envs.ENVS.get(agent.env)
    accelerator = start(config)
    if (model := model_for_env(config.model_name_or_path, spec)) != config.model_name_or_path:
        logger.info("--env %s: the model is %s, the tiny model that knows its words", agent.env, model)
        config.model_name_or_path = model

    # Environment: built-in specs give train/held-out seeds and an expert; others use seed ranges.
    # Every flag set reaches make_env, which refuses the ones that do not apply to the env's kind.
    options = {**agent.env_options(), **(env_options or {})}

    def make():
        return envs.make_env(agent.env, **options)

    env = make()  # first: an unknown --env is the first thing to fix
    if warm.warm_start_steps and (spec is None or spec.expert is None):
        raise ConfigError(
            f"--warm_start_steps {warm.warm_start_steps}: needs an expert; {agent.env!r} has none (use 0)"
        )
    check_action_words(config.model_name_or_path, agent.env, env)
    train_seeds = list(spec.train_seeds) if spec else list(range(10_000))
    eval_seeds = list(spec.eval_seeds if spec else range(100_000, 100_000 + agent.eval_episodes))[
        : agent.eval_episodes
    ]
    context = AgentContext(frames=agent.context_frames, actions=agent.context_actions)
    if accelerator.is_main_process:
        overlap = len(set(train_seeds) & set(eval_seeds))
        RunFolder(config.output_dir).write_evaluation(
            f"{len(eval_seeds)} evaluation seeds of {agent.env}, {overlap} of them training seeds",
            overlap == 0,
        )

    # Policy and reward (environment reward + any reward functions / reward model on turns)
    model, processor = load_base(config, accelerator)
    policy, value_head = build_policy(config, model)
    reward = reward_from_config(config, accelerator.device)

    trainer = AgentTrainer(
        config,
        policy,
        processor,
        reward,
        make,
        train_seeds,
        eval_seeds,
        max_turns=env.max_turns,
        context=context,
        accelerator=accelerator,
        value_head=value_head,
    )
    if evaluate_only:
        return {"eval": trainer.evaluate(), "baselines": baselines(agent, env, eval_seeds)}
    # Supervised warm start on expert (shortest-path) turns of training maps, then RL
    base = warm_start(
        trainer,
        config,
        warm,
        lambda: expert_dataset(
            env, spec.expert, train_seeds[: agent.expert_warm_start_seeds], context=context
        ),
    )
    result = trainer.train()
    final = trainer.save_final(result["after"])

    reference = baselines(agent, env, eval_seeds) if accelerator.is_main_process else {}
    if accelerator.is_main_process:
        before, after = result["before"], result["after"]
        shown = ", ".join(f"{name.replace('_', ' ')} {value:.3f}" for name, value in reference.items())
        if base is not None:
            print(
                f"base policy: success rate {base['eval/success_rate']:.3f}; after the {warm.warm_start_steps}"
                f"-step warm start (RL starts here): {before['eval/success_rate']:.3f}"
            )
        what = {"frozenlake": "maps never seen in training", "sokoban": "rooms never seen in training"}.get(
            agent.env,
            "layouts never seen in training" if agent.env.startswith("babyai-") else "held-out seeds",
        )
        disjoint = (
            f"seeds disjoint from the {len(train_seeds)} training seeds"
            if set(train_seeds).isdisjoint(eval_seeds)
            else f"WARNING: {len(set(train_seeds) & set(eval_seeds))} of these seeds are training seeds too"
        )
        print(
            f"held-out ({len(eval_seeds)} {what}, {disjoint}): success rate {before['eval/success_rate']:.3f} -> "
            f"{after['eval/success_rate']:.3f}, return {before['eval/return']:.3f} -> {after['eval/return']:.3f}, "
            f"invalid actions {before['eval/invalid_action_rate']:.3f} -> {after['eval/invalid_action_rate']:.3f}; "
            f"baselines on the same episodes: {shown}; adapter saved to {final}"
        )
        if config.push_to_hub:
            from vlm_rl.hub import push_after_training

            print(push_after_training(config))
    return {**result, "baselines": reference}


if __name__ == "__main__":
    import sys

    from vlm_rl.errors import run_entry_point

    sys.exit(run_entry_point(main, sys.argv[1:], prog="ppo_agent.py"))
