"""No flag is silently ignored: the rules of vlm_rl.recipes.flags against real runs.

The walk runs every recipe x engine x algorithm for two tiny steps with every config field's reads
recorded; a field the run never read must have a rule that names why (so setting it is an error).
The other tests set such flags and check the one-line errors, and that `--reward_funcs` on the
command line brings its own weights.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

import vlm_rl.errors
import vlm_rl.recipes
import vlm_rl.recipes.flags
import vlm_rl.rl.config
import vlm_rl.rl.trl_backend
from vlm_rl.errors import ConfigError
from vlm_rl.recipes import CONFIGS, parse_config
from vlm_rl.recipes.agent_preferences import TurnPairsConfig
from vlm_rl.recipes.flags import RL_RULES, Run, rules_for
from vlm_rl.rewards.trainer import RewardTrainingConfig
from vlm_rl.rl.config import AgentConfig, RLConfig, WarmStartConfig
from vlm_rl.tasks.easy_vqa import PreferenceOptions

CONFIG_TYPES = (
    RLConfig,
    AgentConfig,
    WarmStartConfig,
    RewardTrainingConfig,
    PreferenceOptions,
    TurnPairsConfig,
)
# Reads that check or copy a config rather than act on it.
NOT_ACTING = {dataclasses.__file__, copy.__file__, vlm_rl.errors.__file__, vlm_rl.recipes.flags.__file__}
NOT_ACTING.add(vlm_rl.recipes.__file__)


@pytest.fixture
def field_reads(monkeypatch) -> set[str]:
    """The config fields that code outside parsing and checking reads during the test."""
    reads: set[str] = set()
    for cls in CONFIG_TYPES:
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, names=names):
            if name in names:
                code = sys._getframe(1).f_code
                checking = code.co_name in ("__post_init__", "validate") or (
                    code.co_filename == vlm_rl.rl.trl_backend.__file__
                    and code.co_name in ("check_mappable", "<dictcomp>")
                )
                if code.co_filename not in NOT_ACTING and not checking:
                    reads.add(name)
            return object.__getattribute__(self, name)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)
    return reads


def test_every_rl_field_has_a_rule():
    names = [f.name for cls in (RLConfig, AgentConfig, WarmStartConfig) for f in dataclasses.fields(cls)]
    assert [name for name in names if name not in rules_for_all()] == []


def rules_for_all() -> dict:
    return {**RL_RULES, **vlm_rl.recipes.flags.WARM_START_RULES, **vlm_rl.recipes.flags.AGENT_RULES}


STEPS = ["--total_steps", "2", "--eval_steps", "1", "--save_steps", "1"]
STEPS += ["--prompts_per_step", "2", "--samples_per_prompt", "2", "--minibatch_size", "4"]
STEPS += [
    "--num_threads",
    "1",
    "--report_to",
    "none",
    "--warm_start_steps",
    "1",
    "--warm_start_batch_size",
    "4",
]
DATA = ["--max_train_prompts", "8", "--max_eval_prompts", "2"]
AGENT = ["--eval_episodes", "2", "--max_turns", "2", "--expert_warm_start_seeds", "2"]
RUNS = [
    ("grpo_vqa", "grpo", "native"),
    ("grpo_vqa", "rloo", "native"),
    ("grpo_vqa", "ppo", "native"),
    ("grpo_vqa", "grpo", "trl"),
    ("ppo_caption", "ppo", "native"),
    ("ppo_agent", "ppo", "native"),
    ("ppo_agent", "grpo", "native"),
    ("ppo_agent", "rloo", "native"),
]


REWARD_MODEL_STEPS = ["--max_steps", "2", "--max_train_samples", "8", "--max_eval_samples", "4"]
REWARD_MODEL_STEPS += ["--per_device_batch_size", "4", "--num_threads", "1", "--report_to", "none"]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    from vlm_rl.recipes import train_reward_model

    out = tmp_path_factory.mktemp("rm")
    train_reward_model.main([*REWARD_MODEL_STEPS, "--output_dir", str(out)])
    return out / "final"


def _run_recipe(recipe: str, args: list[str]) -> dict:
    """Run a recipe in this process; the values of every field it parsed."""
    module = __import__(f"vlm_rl.recipes.{recipe}", fromlist=["main"])
    parsed = []
    original = vlm_rl.recipes.flags.check_flags

    def observed(recipe, configs, *given):
        parsed.extend(configs)
        return original(recipe, configs, *given)

    vlm_rl.recipes.flags.check_flags = observed
    try:
        module.main(args)
    finally:
        vlm_rl.recipes.flags.check_flags = original
    return {f.name: object.__getattribute__(c, f.name) for c in parsed for f in dataclasses.fields(c)}


def _silent(recipe: str, values: dict, reads: set[str]) -> list[str]:
    run = Run(recipe, values)
    return [
        name for name, rule in rules_for(recipe, values).items() if name not in reads and rule(run) is None
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "algorithm", "engine"), RUNS)
def test_a_field_a_run_never_reads_is_an_error_to_set(
    recipe, algorithm, engine, field_reads, reward_model_dir, tmp_path
):
    args = [*STEPS, "--algorithm", algorithm, "--output_dir", str(tmp_path)]
    args += ["--trainer", engine] if recipe == "grpo_vqa" else []
    args += AGENT if recipe == "ppo_agent" else DATA
    if engine == "native":  # TRL logs completions its own way
        args += ["--sample_log_steps", "1"]
    if recipe == "ppo_caption":
        args += ["--reward_model_path", str(reward_model_dir)]
    values = _run_recipe(recipe, args)
    assert (tmp_path / "final").is_dir()
    silent = _silent(recipe, values, field_reads)
    assert silent == [], f"read by no code in this run, yet no rule says why: {silent}"


@pytest.mark.slow
def test_the_reward_model_recipe_reads_every_field_it_accepts(field_reads, tmp_path):
    args = [*REWARD_MODEL_STEPS, "--output_dir", str(tmp_path), "--save_steps", "1"]
    args += ["--eval_steps", "1", "--logging_steps", "1"]
    values = _run_recipe("train_reward_model", args)
    silent = _silent("train_reward_model", values, field_reads)
    assert silent == [], f"read by no code in this run, yet no rule says why: {silent}"


AGENT_PREFERENCE_RUNS = [
    ["--pairs", "expert"],
    ["--pairs", "return", "--behaviour_policy", "expert"],
    ["--pairs", "expert", "--pairs_only"],
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", AGENT_PREFERENCE_RUNS, ids=" ".join)
def test_agent_preferences_reads_every_field_it_accepts(mode, field_reads, tmp_path):
    args = [*mode, "--num_seeds", "2", "--eval_episodes", "2", "--output_dir", str(tmp_path)]
    if "--pairs_only" not in mode:
        args += [
            "--max_steps",
            "2",
            "--per_device_batch_size",
            "4",
            "--num_threads",
            "1",
            "--report_to",
            "none",
        ]
        args += ["--save_steps", "1", "--eval_steps", "1", "--logging_steps", "1"]
    if "return" in mode:
        args += ["--episodes_per_seed", "6"]
    values = _run_recipe("agent_preferences", args)
    silent = _silent("agent_preferences", values, field_reads)
    assert silent == [], f"read by no code in this run, yet no rule says why: {silent}"


def _parse(recipe: str, argv: list[str]) -> tuple:
    module = __import__(f"vlm_rl.recipes.{recipe}", fromlist=["DEFAULT_CONFIG"])
    types = {
        "ppo_agent": (RLConfig, AgentConfig, WarmStartConfig),
        "train_reward_model": (RewardTrainingConfig, PreferenceOptions),
    }.get(recipe, (RLConfig, WarmStartConfig))
    return parse_config(types, argv, module.DEFAULT_CONFIG, recipe=recipe)


@pytest.mark.parametrize(
    ("recipe", "argv", "named"),
    [
        (
            "grpo_vqa",
            ["--algorithm", "rloo", "--scale_rewards", "false"],
            "--scale_rewards: GRPO's group std",
        ),
        ("grpo_vqa", ["--algorithm", "grpo", "--value_coef", "0.3"], "--value_coef: PPO's critic only"),
        ("grpo_vqa", ["--trainer", "trl", "--shared_prefix", "false"], "--shared_prefix: --trainer trl"),
        ("grpo_vqa", ["--trainer", "trl", "--report_steps", "5"], "--report_steps: --trainer trl"),
        ("ppo_agent", ["--algorithm", "grpo", "--dynamic_sampling", "true"], "--dynamic_sampling: agents"),
        ("ppo_agent", ["--dataset", "my.jsonl"], "--dataset: agents play --env episodes"),
        ("ppo_caption", ["--trainer", "trl", "--algorithm", "grpo"], "--trainer: only `vlm-rl grpo`"),
        ("ppo_caption", ["--target_kl", "0.05"], "--target_kl: only with --adaptive_kl"),
        ("grpo_vqa", ["--hub_private", "true"], "--hub_private: needs --push_to_hub"),
        ("train_reward_model", ["--dataset", "pairs.jsonl", "--pairs_per_image", "3"], "--pairs_per_image"),
    ],
)
def test_a_flag_the_run_would_ignore_is_one_error_naming_it(recipe, argv, named):
    with pytest.raises(ConfigError, match="would ignore") as error:
        _parse(recipe, argv)
    assert named in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("recipe", "config"),
    [
        ("ppo_caption", "ppo_caption.yaml"),
        ("grpo_vqa", "grpo_vqa.yaml"),
        ("ppo_agent", "ppo_agent.yaml"),
        ("ppo_agent", "grpo_agent.yaml"),
        ("train_reward_model", "caption_preference.yaml"),
    ],
)
def test_every_shipped_config_sets_only_flags_its_recipe_reads(recipe, config, tmp_path, caplog):
    user_copy = tmp_path / config  # given as the user's own --config: every key counts as set
    user_copy.write_text((CONFIGS / config).read_text())
    configs = _parse(recipe, ["--config", str(user_copy)])
    assert vlm_rl.recipes.flags.unused_flags(recipe, configs, yaml.safe_load(user_copy.read_text())) == []
    assert "ignores" not in caplog.text


def test_a_config_key_the_command_line_turned_off_is_a_warning_not_an_error(tmp_path, caplog):
    """`--config grpo_agent.yaml --warm_start_steps 0`: the config's warm-start rate goes unused
    because the command line said so; the run goes on and the log names the key."""
    user_copy = tmp_path / "grpo_agent.yaml"
    user_copy.write_text((CONFIGS / "grpo_agent.yaml").read_text())
    _, _, warm = _parse("ppo_agent", ["--config", str(user_copy), "--warm_start_steps", "0"])
    assert warm.warm_start_steps == 0
    assert "warm_start_learning_rate (only with --warm_start_steps > 0)" in caplog.text


def test_overriding_reward_funcs_drops_the_configs_weights():
    config, _ = _parse("grpo_vqa", ["--reward_funcs", "exact_match"])
    assert (config.reward_funcs, config.reward_weights) == (["exact_match"], [1.0])
    config, _ = _parse(
        "grpo_vqa", ["--reward_funcs", "exact_match", "contains_answer", "--reward_weights", "1", "0.5"]
    )
    assert config.reward_weights == [1.0, 0.5]
    config, _ = _parse("grpo_vqa", [])  # the recipe's own functions keep their weights
    assert (config.reward_funcs, config.reward_weights) == (["exact_match", "format_one_word"], [1.0, 0.2])
    with pytest.raises(ConfigError, match="1 weight"):
        _parse("grpo_vqa", ["--reward_weights", "1.0"])  # two functions, one weight: still an error


@pytest.mark.parametrize(
    ("flag", "renamed"),
    [
        ("--rule_rewards", "--reward_funcs"),
        ("--report_to_tensorboard", "--report_to"),
        ("--rule_reward_weights", "--reward_weights"),
    ],
)
def test_a_renamed_flag_answers_with_its_new_name(flag, renamed):
    with pytest.raises(ConfigError, match=f"renamed: use {renamed}"):
        _parse("grpo_vqa", [flag, "false"])
