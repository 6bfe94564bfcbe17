"""The `vlm-rl` command, run as a user runs it: in a subprocess, against run folders and a LocalHub.

The pushes go to a LocalHub started in the test (127.0.0.1); the subprocess gets its token through
HF_TOKEN and an isolated HF_HOME, as a user's shell would. Run folders are built by the helpers of
test_hub_runs.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import LocalHub
from test_hub import TOKEN, digest
from test_hub_runs import folder_files, pushed_files, reward_model_run_folder, rl_run_folder

import vlm_rl
from vlm_rl import cli
from vlm_rl.recipes import CONFIGS, project_dir

ROOT = Path(__file__).resolve().parent.parent
VLM_RL = [sys.executable, "-m", "vlm_rl.cli"]
REPO = "tester/ppo-caption"


def cli_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The environment of a user with a token in HF_TOKEN and the hub reachable (conftest set offline mode)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_TOKEN=TOKEN,
    )
    return {**env, **overrides}


def vlm_rl_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run([*VLM_RL, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_version_from_the_module_and_the_console_script():
    console_script = Path(sys.executable).with_name("vlm-rl")  # pyproject's [project.scripts] entry
    assert console_script.is_file(), "install the package (`make install`) to get the vlm-rl command"

    for command in (VLM_RL, [str(console_script)]):
        result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stdout) == (0, f"vlm-rl {vlm_rl.__version__}\n"), result.stderr


def test_recipe_help_lists_the_config_fields_of_the_recipe(tmp_path: Path):
    # ppo gets a config of its own: its value showing as the default proves --config reached the
    # recipe's parser; grpo runs with its shipped default config.
    config = tmp_path / "ppo.yaml"
    config.write_text("algorithm: ppo\nsamples_per_prompt: 3\n")
    expected = {
        ("ppo", "--config", str(config), "--help"): [
            "--samples_per_prompt",
            "--kl_coef",
            "--reward_weights",
            "--hub_model_id",
            "Completions sampled per prompt (the group size of GRPO/RLOO). (default: 3)",
        ],
        ("grpo", "--help"): ["--warm_start_steps", "--loss_aggregation", "--dynamic_sampling"],
        ("train-reward-model", "--help"): [
            "--center_rewards_coefficient",
            "--pairs_per_image",
            "Weight of the reward-centering term (0 = off).",
        ],
    }
    # Both at once: each imports torch, transformers and trl (~10 s apiece on a loaded machine).
    running = {
        args: subprocess.Popen([*VLM_RL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in expected
    }
    for args, texts in expected.items():
        stdout, stderr = running[args].communicate(timeout=180)
        assert running[args].returncode == 0, stderr
        assert stdout.startswith(f"usage: vlm-rl {args[0]} [-h]"), stdout[:200]
        help_text = " ".join(stdout.split())  # argparse wraps lines
        for text in texts:
            assert text in help_text, f"{text!r} missing from `vlm-rl {' '.join(args)}`"


@pytest.mark.parametrize(
    ("command", "module"),
    [
        ("ppo", "ppo_caption"),
        ("grpo", "grpo_vqa"),
        ("train-reward-model", "train_reward_model"),
        ("agent", "ppo_agent"),
        ("agent-preferences", "agent_preferences"),
    ],
)
def test_a_recipe_command_calls_its_package_module_with_the_arguments_untouched(
    monkeypatch: pytest.MonkeyPatch, command: str, module: str
):
    calls = []
    recipe = types.ModuleType(f"vlm_rl.recipes.{module}")
    recipe.main = lambda argv: calls.append((argv, sys.argv[0]))
    monkeypatch.setitem(sys.modules, recipe.__name__, recipe)
    argv = ["--config", "my.yaml", "--total_steps", "5", "--help"]

    assert cli.main([command, *argv]) == 0
    assert calls == [(argv, f"vlm-rl {command}")]  # sys.argv[0]: argparse's usage line
    assert sys.argv[0] != f"vlm-rl {command}"  # restored
    help_text = " ".join(cli.build_parser().format_help().split())
    assert f"{command} " in help_text and f"(vlm_rl.recipes.{module})" in help_text


def test_the_checkout_links_its_configs_to_the_package_and_keeps_its_reward_models(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    # One copy of each YAML: the documented checkout paths are links into the package data.
    assert (ROOT / "recipes" / "configs").resolve() == CONFIGS
    assert (
        ROOT / "reward_models" / "caption_preference.yaml"
    ).resolve() == CONFIGS / "caption_preference.yaml"
    # From a checkout the default reward model stays in its reward_models/, whatever the current folder.
    monkeypatch.chdir(tmp_path)
    assert project_dir() == ROOT


def test_ppo_trains_the_missing_default_reward_model_through_the_package_recipe(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
):
    from vlm_rl.recipes import ppo_caption, train_reward_model

    trained = []
    monkeypatch.setattr(train_reward_model, "main", trained.append)
    accelerator = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    final = tmp_path / "reward_models" / "caption_preference" / "final"

    ppo_caption.ensure_default_reward_model(final, accelerator)
    assert trained == [["--output_dir", str(final.parent)]]
    assert f"reward model {final} not found: training the default one first" in capsys.readouterr().out

    final.mkdir(parents=True)
    (final / "reward_config.json").write_text("{}")
    ppo_caption.ensure_default_reward_model(final, accelerator)
    assert len(trained) == 1  # there: not trained again


def test_unknown_command_is_a_usage_error():
    result = vlm_rl_cli("sft")

    assert result.returncode == 2
    assert "invalid choice: 'sft'" in result.stderr and "ppo" in result.stderr


# -- evaluate ---------------------------------------------------------------------------------
def test_evaluate_summarises_an_rl_run(tmp_path: Path):
    run_dir = rl_run_folder(tmp_path)

    result = vlm_rl_cli("evaluate", str(run_dir))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{run_dir / 'metrics.jsonl'}: 6 records, last step 3"
    assert lines[1:4] == [
        "held-out evaluation, step 0 -> step 3:",
        "  eval/caption_accuracy  0.125 -> 0.75",
        "  eval/reward            -0.4 -> 0.6",
    ]
    assert lines[4] == "training at step 3: reward/mean 0.6"
    assert lines[5] == (
        f"{run_dir / 'final' / 'vlm_rl_run.json'} (ppo on tiny-llava, step 3): "
        "eval/caption_accuracy 0.75, eval/reward 0.6"
    )


@pytest.mark.parametrize("legacy", [False, True], ids=["metrics.jsonl", "old-layout-run/metrics.jsonl"])
def test_evaluate_summarises_a_reward_model_run(tmp_path: Path, legacy: bool):
    run_dir = reward_model_run_folder(tmp_path, legacy=legacy)

    result = vlm_rl_cli("evaluate", str(run_dir))

    assert result.returncode == 0, result.stderr
    metrics_file = run_dir / "run" / "metrics.jsonl" if legacy else run_dir / "metrics.jsonl"
    assert result.stdout.startswith(f"{metrics_file}: 5 records, last step 20\n")
    assert "held-out evaluation, step 0 -> step 20:" in result.stdout
    assert "  eval/accuracy  0.5 -> 0.85" in result.stdout
    assert "training at step 20: train/accuracy 0.8, train/loss 0.5" in result.stdout
    assert (
        f"{run_dir / 'best' / 'reward_config.json'} (reward model on tiny-llava, "
        "dataset easy-vqa:caption_preference): eval_accuracy 0.9"
    ) in result.stdout


def test_evaluate_of_a_folder_without_metrics_fails_clearly(tmp_path: Path):
    result = vlm_rl_cli("evaluate", str(tmp_path))

    assert result.returncode == 2
    assert result.stderr.startswith(f"vlm-rl evaluate: error: no metrics.jsonl in {tmp_path}")
    assert "Traceback" not in result.stderr


# -- push -------------------------------------------------------------------------------------
@pytest.fixture
def hub() -> Iterator[LocalHub]:
    with LocalHub(token=TOKEN) as local_hub:
        yield local_hub


def vlm_rl_push(
    run_dir: Path, endpoint: str, *options: str, env: dict[str, str]
) -> subprocess.CompletedProcess:
    return vlm_rl_cli("push", str(run_dir), "--repo-id", REPO, "--endpoint", endpoint, *options, env=env)


def test_push_uploads_the_final_adapter_byte_for_byte_with_a_card(hub: LocalHub, tmp_path: Path):
    run_dir = rl_run_folder(tmp_path / "runs")
    before = digest(run_dir)

    result = vlm_rl_push(run_dir, hub.endpoint, "--private", env=cli_env(tmp_path))

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{hub.endpoint}/{REPO}/commit/{hub.repo(REPO).branches['main']}\n"
    assert pushed_files(hub, REPO) == folder_files(run_dir / "final")
    assert hub.repo(REPO).private is True
    assert [commit.summary for commit in hub.commits] == ["vlm_rl ppo run 'ppo_caption' step 3"]
    readme = hub.files(REPO)["README.md"].decode()
    assert "- Algorithm: **PPO**" in readme
    assert "| `format_caption` | 0.5 |" in readme
    assert "| `reward_model (caption_preference/final)` | 1 |" in readme
    assert hub.authorizations() == {f"Bearer {TOKEN}"}
    for path in tmp_path.rglob("*"):  # the run folder and the subprocess's HF_HOME
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"
    assert TOKEN not in result.stdout + result.stderr
    assert digest(run_dir) == before


def test_push_of_a_checkpoint_to_a_branch(hub: LocalHub, tmp_path: Path):
    run_dir = rl_run_folder(tmp_path / "runs")

    result = vlm_rl_push(
        run_dir, hub.endpoint, "--checkpoint", "step-000002", "--revision", "step-2", env=cli_env(tmp_path)
    )

    assert result.returncode == 0, result.stderr
    adapter = run_dir / "checkpoints" / "step-000002" / "adapter"
    assert pushed_files(hub, REPO, "step-2") == folder_files(adapter)
    assert [(c.summary, c.branch) for c in hub.commits] == [("vlm_rl ppo run 'ppo_caption' step 2", "step-2")]


def test_push_of_a_reward_model_run_in_the_old_layout_reads_its_metrics(hub: LocalHub, tmp_path: Path):
    run_dir = reward_model_run_folder(tmp_path / "runs", legacy=True)  # metrics in run/metrics.jsonl

    result = vlm_rl_push(run_dir, hub.endpoint, env=cli_env(tmp_path))

    assert result.returncode == 0, result.stderr
    assert pushed_files(hub, REPO) == folder_files(run_dir / "final")
    # The step and the first evaluation come from run/metrics.jsonl.
    assert [c.summary for c in hub.commits] == ["vlm_rl reward model run 'caption_preference' step 20"]
    readme = hub.files(REPO)["README.md"].decode()
    assert "| `eval/accuracy_before` | 0.5 |" in readme and "| `steps_trained` | 20 |" in readme


@pytest.mark.parametrize(
    ("hub_options", "token", "expected"),
    [
        (dict(fail_with=500), TOKEN, "the hub had a server error (500"),
        (dict(token=TOKEN), "hf_wrongToken0123456789", "authentication failed (401"),
    ],
    ids=["server-error", "wrong-token"],
)
def test_push_failure_exits_2_with_the_reason_and_leaves_the_run_folder(
    tmp_path: Path, hub_options: dict, token: str, expected: str
):
    run_dir = rl_run_folder(tmp_path / "runs")
    before = digest(run_dir)

    with LocalHub(**hub_options) as failing_hub:
        result = vlm_rl_push(run_dir, failing_hub.endpoint, env=cli_env(tmp_path, HF_TOKEN=token))

        assert result.returncode == 2
        assert result.stdout == ""
        error = result.stderr.splitlines()[-1]
        assert error.startswith(
            f"vlm-rl push: error: creating the repo '{REPO}' at {failing_hub.endpoint} failed: {expected}"
        )
        assert error.endswith(f"The local folder {run_dir / 'final'} was left intact.")
        assert "Traceback" not in result.stderr and token not in result.stderr
        assert failing_hub.commits == []
    assert digest(run_dir) == before


def test_push_of_an_unfinished_run_exits_2_before_contacting_the_hub(hub: LocalHub, tmp_path: Path):
    run_dir = rl_run_folder(tmp_path / "runs")
    (run_dir / "final" / "vlm_rl_run.json").unlink()
    (run_dir / "final").rename(run_dir / "partial")

    result = vlm_rl_push(run_dir, hub.endpoint, env=cli_env(tmp_path))

    assert result.returncode == 2
    assert result.stderr.startswith(f"vlm-rl push: error: {run_dir} has no final/ folder")
    assert "--checkpoint step-000002" in result.stderr and "Traceback" not in result.stderr
    assert hub.requests == []
