"""Every command that README.md and docs/*.md show runs, so the documentation cannot rot.

The pages follow one convention (docs/index.md, "About these pages"):

- a ```bash block holds commands the suite runs, each line one command; one that ends in
  `# needs a GPU` is skipped, by name;
- a ```console block holds `$ command` lines, each followed by lines it must print;
- a fenced block with `title="path"` (```python title="mypkg/rewards.py"```) is a file the reader
  writes: the test writes it before running the page's later commands;
- ```shell blocks (installation, `make`, full-length benchmarks) and untitled ```python blocks
  are not run here.

Each page runs in its own temporary folder (with `recipes/` linked in), its commands in page order.
Recipe commands get small step counts appended (`--total_steps 2`, a few evaluation prompts, no
warm start, no checkpoints unless the command asks for them), and PPO a tiny reward model when the
command names none. `vlm-rl` commands run in-process through `vlm_rl.cli.main`; `accelerate launch`,
`python` and commands that start trackers or push to a hub (a local hub server) run as subprocesses.
A command identical to one already run on another page is not run twice, and the in-process runs
build each easy-vqa dataset once.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hub_server import LocalHub
from ports import free_port

from vlm_rl import cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
TITLE = re.compile(r'title="([^"]+)"')
GPU = "# needs a GPU"
RECIPES = {
    "ppo_caption": "ppo",
    "grpo_vqa": "grpo",
    "ppo_agent": "agent",
    "train_reward_model": "train-reward-model",
}
# Flags that keep a recipe run to seconds: `force` ones replace a value the command gives (step and
# sample counts), the others are added only where the command does not set them.
RL_FORCE = {"--total_steps": "2", "--max_eval_prompts": "4"}
RL_DEFAULT = {
    "--eval_steps": "0",
    "--save_steps": "0",
    "--warm_start_steps": "0",
    "--prompts_per_step": "2",
    "--samples_per_prompt": "2",
    "--minibatch_size": "4",
    "--max_new_tokens": "4",
    "--num_threads": "1",
    "--report_to": "none",
}
SMALL = {
    "ppo": (RL_FORCE, RL_DEFAULT),
    "grpo": (RL_FORCE, RL_DEFAULT),
    "agent": ({"--total_steps": "2", "--eval_episodes": "2"}, {**RL_DEFAULT, "--max_turns": "4"}),
    "train-reward-model": (
        {"--max_steps": "2", "--max_train_samples": "16", "--max_eval_samples": "8"},
        {"--per_device_batch_size": "4", "--save_steps": "0", "--num_threads": "1", "--report_to": "none"},
    ),
}


@dataclass
class Step:
    page: Path
    index: int  # position on the page
    kind: str  # "file", "command" or "console"
    text: str  # the file's content, the command, or the console command
    path: str = ""  # a file's path
    expected: list[str] = field(default_factory=list)  # console: lines the command prints

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.index} {self.text[:90]}"


def normalized(command: str) -> str:
    """The command without its comment and extra spaces."""
    return " ".join(shlex.split(command, comments=True))


def commands_of(block: str) -> list[str]:
    """The commands of a bash block: one per line (a trailing backslash continues it)."""
    lines, current = [], ""
    for line in block.splitlines():
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            lines.append(current.strip())
        current = ""
    return lines


def parse(page: Path) -> list[Step]:
    steps: list[Step] = []
    for match in FENCE.finditer(page.read_text()):
        language, info, body = match.groups()
        title = TITLE.search(info)
        if title:
            steps.append(Step(page, len(steps), "file", body, path=title.group(1)))
        elif language == "bash":
            steps += [Step(page, len(steps) + i, "command", c) for i, c in enumerate(commands_of(body))]
        elif language == "console":
            for line in body.splitlines():
                if line.startswith("$ "):
                    steps.append(Step(page, len(steps), "console", line[2:].strip()))
                elif steps and steps[-1].kind == "console" and line.strip():
                    steps[-1].expected.append(line.strip())
    return steps


STEPS = {page: parse(page) for page in PAGES}
RUNNABLE = [step for steps in STEPS.values() for step in steps if step.kind != "file"]


def test_the_pages_hold_commands_and_follow_the_convention():
    """Commands shown outside the three block kinds would escape this test: fail on a `vlm-rl` or
    `accelerate launch` line in a block of another kind (text blocks show output, not commands)."""
    assert len(RUNNABLE) >= 30, len(RUNNABLE)
    for page in PAGES:
        for match in FENCE.finditer(page.read_text()):
            language, info, body = match.groups()
            if language in ("bash", "console", "shell", "python") or TITLE.search(info):
                continue
            for line in body.splitlines():
                assert not re.match(r"\s*(\$ )?(vlm-rl|accelerate launch|python) ", line), (
                    f"{page.name}: a command in a ```{language} block is not run by the suite: {line}"
                )


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict[Path, Path]:
    """A folder per page, with the checkout's recipes/ (configs, launch files) linked in."""
    folders = {}
    for page in PAGES:
        folder = tmp_path_factory.mktemp(page.stem.lower())
        (folder / "recipes").symlink_to(ROOT / "recipes")
        folders[page] = folder
    return folders


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory) -> Path:
    """A reward model trained for 2 steps: PPO commands that name none get this one."""
    from vlm_rl.rewards.trainer import RewardTrainingConfig, train_reward_model

    output_dir = tmp_path_factory.mktemp("reward_model")
    train_reward_model(
        RewardTrainingConfig(
            output_dir=str(output_dir),
            max_train_samples=16,
            max_eval_samples=8,
            per_device_batch_size=4,
            max_steps=2,
            report_to="none",
            num_threads=1,
        )
    )
    return output_dir / "final"


def small(argv: list[str], recipe: str, reward_model: Path | None) -> list[str]:
    """`argv` of a recipe with the small step counts of `SMALL` (see the module docstring)."""
    argv = list(argv)
    force, default = SMALL[recipe]
    for flag, value in force.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    for flag, value in default.items():
        # a warm start configured by --config stays on (its rate and batch size stay used) but short;
        # one resumed by --init_adapter stays as the command has it
        if flag == "--warm_start_steps" and flag not in argv and "--config" in argv:
            argv += [flag, "2"]
        elif flag not in argv and not (flag == "--warm_start_steps" and "--init_adapter" in argv):
            argv += [flag, value]
    if recipe == "ppo" and "--reward_model_path" not in argv:
        argv += ["--reward_model_path", str(reward_model)]
    return argv


def needs_subprocess(argv: list[str]) -> bool:
    """Trackers other than TensorBoard and hub pushes keep process-wide state: run those apart."""
    if argv[:1] == ["push"]:
        return True
    if "--report_to" in argv:
        return bool({"trackio", "wandb"} & set(argv[argv.index("--report_to") + 1].split(",")))
    return False


def run_command(
    command: str, workdir: Path, reward_model: Path, monkeypatch, capsys, shrink: bool = True
) -> tuple[int, str]:
    """Run one documented command in `workdir` (recipes with small step counts unless not `shrink`);
    its exit code and its output (stdout + stderr)."""
    words = shlex.split(command, comments=True)
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")]),
        "TRACKIO_DIR": str(workdir / "trackio"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    if words[0] == "vlm-rl":
        argv = words[1:]
        if shrink and argv and argv[0] in SMALL and "--help" not in argv:
            argv = small(argv, argv[0], reward_model)
        if argv[:1] == ["push"]:
            env.pop("HF_HUB_OFFLINE")  # the local hub stands in for the real one
        if needs_subprocess(argv):
            return run_process([sys.executable, "-m", "vlm_rl.cli", *argv], workdir, env)
        monkeypatch.chdir(workdir)
        monkeypatch.syspath_prepend(str(workdir))
        try:
            code = cli.main(argv)
        except SystemExit as exit:  # --help
            code = exit.code or 0
        captured = capsys.readouterr()
        return code, captured.out + captured.err
    if words[:2] == ["accelerate", "launch"]:
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        recipe = RECIPES[Path(words[script]).stem]
        argv = [*words[2 : script + 1], *small(words[script + 1 :], recipe, reward_model)]
        if "--main_process_port" not in argv:  # several pytest workers: no shared default port
            argv = ["--main_process_port", str(free_port()), *argv]
        return run_process([sys.executable, "-m", "accelerate.commands.launch", *argv], workdir, env)
    if words[0] == "python":
        return run_process([sys.executable, *words[1:]], workdir, env)
    raise AssertionError(
        f"the suite does not know how to run {command!r}; use a ```shell block or teach this test"
    )


def run_process(argv: list[str], workdir: Path, env: dict[str, str]) -> tuple[int, str]:
    result = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module", autouse=True)
def easy_vqa_built_once():
    """Build each easy-vqa task dataset once for the in-process commands (each build crops and
    encodes thousands of images, ~15 s per split on 2 cores); the commands get the same dataset."""
    from vlm_rl.tasks import easy_vqa

    build, built = easy_vqa.load_dataset, {}

    def load_dataset(task, split="train", **kwargs):
        key = (task, split, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build(task, split, **kwargs)
        return built[key]

    easy_vqa.load_dataset = load_dataset
    yield
    easy_vqa.load_dataset = build


@pytest.fixture(scope="module")
def local_hub():
    """A local stand-in for the hub, for the documented `vlm-rl push` commands."""
    with LocalHub() as hub:
        yield hub


@pytest.mark.slow
@pytest.mark.documented
@pytest.mark.parametrize("step", RUNNABLE, ids=[step.id for step in RUNNABLE])
def test_documented_command_runs(step, workdirs, tiny_reward_model, local_hub, monkeypatch, capsys):
    if step.text.endswith(GPU):
        pytest.skip(f"needs a GPU: {step.text}")
    first = next(s for s in RUNNABLE if (s.kind, normalized(s.text)) == (step.kind, normalized(step.text)))
    if first is not step and not any(s.kind == "file" for s in STEPS[step.page][: step.index]):
        pytest.skip(f"the same command runs as {first.id}")
    workdir = workdirs[step.page]
    for earlier in STEPS[step.page][: step.index]:  # the files the reader wrote before this command
        if earlier.kind == "file":
            (workdir / earlier.path).parent.mkdir(parents=True, exist_ok=True)
            (workdir / earlier.path).write_text(earlier.text)
    monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_documented_commands")
    code, output = run_command(
        step.text, workdir, tiny_reward_model, monkeypatch, capsys, step.kind == "command"
    )
    if step.kind == "console":
        printed = [line.strip() for line in output.splitlines()]
        for line in step.expected:
            assert line in printed, f"`{step.text}` no longer prints:\n{line}\nit printed:\n{output[-3000:]}"
    else:
        assert code == 0, f"`{step.text}` exited with {code}:\n{output[-5000:]}"
