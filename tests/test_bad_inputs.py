"""The bad-input corpus: every expected mistake ends in one line on stderr, exit code 2, no traceback.

Each case runs `vlm-rl <command> ...` and asserts the exit code 2, no "Traceback" on stderr, exactly
one error line, and that the line names the field, file, flag or value at fault (and the fix).
Every case fails before a model is loaded (configs, paths and data are validated first), so the
whole corpus is fast. Most cases run in this process through `vlm_rl.cli.main(argv)` (stderr
captured, the same code path as the console script); `SUBPROCESS_CASES` (a representative dozen,
one per case class) also run as real `vlm-rl` processes, started together, and one case runs
under `accelerate launch` with 2 CPU processes (the message printed once). Odd but valid inputs
(CMYK, I;16, LA and P images, extra columns, blank lines) load, and train one step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from ports import free_port

from vlm_rl import cli

ROOT = Path(__file__).resolve().parent.parent
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO vlm_rl[.\w]*: ")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")

PROMPT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape ?"}]}
]
GOOD_PROMPT_ROW = {"prompt": PROMPT, "images": ["img/good.png"], "answer": "red"}
GOOD_PAIR = {"prompt": PROMPT, "images": ["img/good.png"], "chosen": "red", "rejected": "blue"}
FAST_GRPO = ["--total_steps", "1", "--warm_start_steps", "0", "--report_to", "none"]


def jsonl(folder: Path, name: str, rows: list, raw: str | bytes | None = None) -> str:
    path = folder / name
    if raw is not None:
        path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def row(**changes) -> dict:
    return {key: value for key, value in {**GOOD_PROMPT_ROW, **changes}.items() if value is not ...}


def pair(**changes) -> dict:
    return {key: value for key, value in {**GOOD_PAIR, **changes}.items() if value is not ...}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder: good and bad images under img/, an image outside the folder, run folders."""
    root = tmp_path_factory.mktemp("bad_inputs")
    folder = root / "data"
    (folder / "img" / "a_folder").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "img" / "good.png")
    Image.new("CMYK", (32, 32), (0, 200, 200, 0)).save(folder / "img" / "cmyk.jpg")
    Image.new("I;16", (32, 32), 40000).save(folder / "img" / "i16.png")
    Image.new("LA", (32, 32), (100, 128)).save(folder / "img" / "la.png")
    Image.new("P", (32, 32), 3).save(folder / "img" / "p.png")
    (folder / "img" / "notes.png").write_text("not an image")
    png = (folder / "img" / "good.png").read_bytes()
    (folder / "img" / "truncated.png").write_bytes(png[: len(png) // 2])
    Image.new("1", (9000, 8000)).save(folder / "img" / "bomb.png")  # 72 M pixels > max_pixels
    Image.new("RGB", (32, 32)).save(root / "outside.png")
    (root / "a_file").write_text("I am a file")
    return folder


def run_in_process(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`vlm-rl argv` in this process: (exit code, stderr, stdout)."""
    handlers = list(logging.root.handlers)
    try:
        code = cli.main(argv)
    finally:  # a recipe's logging.basicConfig must not outlive this capture
        logging.root.handlers[:] = handlers
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def assert_one_line_error(code: int, stderr: str, command: str, expected: list[str]) -> None:
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith(f"vlm-rl {command}: error: ")]
    assert len(errors) == 1, stderr[-3000:]
    for fragment in expected:
        assert fragment in errors[0], (fragment, errors[0])


# Each case: (id, builder(data folder) -> argv, fragments the error line must contain).
Case = tuple[str, Callable[[Path], list[str]], list[str]]


def _grpo(dataset: Callable[[Path], str], *extra: str) -> Callable[[Path], list[str]]:
    return lambda d: ["grpo", "--dataset", dataset(d), "--output_dir", str(d.parent / "runs" / "g"), *extra]


def _reward(dataset: Callable[[Path], str], *extra: str) -> Callable[[Path], list[str]]:
    return lambda d: [
        "train-reward-model",
        "--dataset",
        dataset(d),
        "--output_dir",
        str(d.parent / "rm"),
        *extra,
    ]


def _prompts(name: str, rows: list | None = None, raw: str | bytes | None = None) -> Callable[[Path], str]:
    return lambda d: jsonl(d, name, rows or [], raw)


def _flags(*flags: str) -> Callable[[Path], list[str]]:
    return lambda d: ["grpo", "--output_dir", str(d.parent / "runs" / "g"), *flags]


def _reward_flags(*flags: str) -> Callable[[Path], list[str]]:
    return lambda d: ["train-reward-model", "--output_dir", str(d.parent / "rm"), *flags]


def _agent(*flags: str) -> Callable[[Path], list[str]]:
    return lambda d: ["agent", "--output_dir", str(d.parent / "runs" / "a"), *flags]


def _resume_run(d: Path) -> list[str]:
    run = d.parent / "runs" / "resumed"
    (run / "checkpoints" / "step-000002").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / "step-000002" / "trainer_state.json").write_text('{"step": 2}')
    (run / "run_config.json").write_text(json.dumps({"model_name_or_path": "tiny-llava", "lora_r": 16}))
    return ["grpo", "--output_dir", str(run), "--resume_from_checkpoint", "latest", "--lora_r", "8"]


def _model_folder(d: Path) -> str:
    (d / "not_a_model").mkdir(exist_ok=True)
    return str(d / "not_a_model")


UNKNOWN_WORDS = "giraffes graze beneath acacia trees during the dry season"

CASES: list[Case] = [
    # -- preference format (train-reward-model) ----------------------------------------------------
    (
        "pref-missing-rejected",
        _reward(_prompts("p1.jsonl", [pair(rejected=...)])),
        ["row 0", "'rejected'", "missing"],
    ),
    (
        "pref-chosen-mistyped",
        _reward(_prompts("p2.jsonl", [pair(chosen=3)])),
        ["row 0", "'chosen'", "got int"],
    ),
    ("pref-empty-chosen", _reward(_prompts("p3.jsonl", [pair(chosen="  ")])), ["'chosen'", "empty"]),
    (
        "pref-identical-pair",
        _reward(_prompts("p4.jsonl", [pair(), pair(rejected="red")])),
        ["row 1", "identical"],
    ),
    (
        "pref-message-without-role",
        _reward(_prompts("p5.jsonl", [pair(chosen=[{"content": "red"}])])),
        ["'chosen[0]'", "no 'role'"],
    ),
    (
        "pref-chosen-role-user",
        _reward(_prompts("p6.jsonl", [pair(chosen=[{"role": "user", "content": "red"}])])),
        ["chosen[0].role", "'assistant'"],
    ),
    (
        "pref-margin-text",
        _reward(_prompts("p7.jsonl", [pair(margin="big")])),
        ["'margin'", "must be a number"],
    ),
    (
        "pref-margin-nan",
        _reward(_prompts("p8.jsonl", raw=json.dumps(pair(margin=float("nan"))))),
        ["'margin'", "nan"],
    ),
    (
        "pref-image-in-completion",
        _reward(_prompts("p9.jsonl", [pair(chosen=[{"role": "assistant", "content": [{"type": "image"}]}])])),
        ["'chosen'", "cannot contain images"],
    ),
    # -- prompt format (grpo) ----------------------------------------------------------------------
    (
        "prompt-missing-column",
        _grpo(_prompts("q1.jsonl", [row(prompt=...)])),
        ["'prompt'", "missing required"],
    ),
    ("prompt-empty-text", _grpo(_prompts("q2.jsonl", [row(prompt="   ", images=[])])), ["'prompt'", "empty"]),
    ("prompt-not-a-list", _grpo(_prompts("q3.jsonl", [row(prompt=7)])), ["'prompt'", "got int"]),
    (
        "prompt-empty-messages",
        _grpo(_prompts("q4.jsonl", [row(prompt=[])])),
        ["'prompt'", "message list is empty"],
    ),
    (
        "prompt-item-without-text",
        _grpo(
            _prompts(
                "q5.jsonl", [row(prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text"}]}])]
            )
        ),
        ["prompt[0].content[1].text", "needs a string 'text'"],
    ),
    (
        "prompt-unknown-content-type",
        _grpo(_prompts("q6.jsonl", [row(prompt=[{"role": "user", "content": [{"type": "video"}]}])])),
        ["content[0].type", "'video'"],
    ),
    (
        "prompt-message-without-role",
        _grpo(_prompts("q7.jsonl", [row(prompt=[{"content": "what color is it ?"}], images=[])])),
        ["'prompt[0]'", "no 'role'"],
    ),
    # -- images ------------------------------------------------------------------------------------
    (
        "image-missing",
        _grpo(_prompts("i1.jsonl", [row(images=["img/gone.png"])])),
        ["'images[0]'", "file not found"],
    ),
    (
        "image-not-an-image",
        _grpo(_prompts("i2.jsonl", [row(images=["img/notes.png"])])),
        ["notes.png", "not a readable image"],
    ),
    (
        "image-truncated",
        _grpo(_prompts("i3.jsonl", [row(images=["img/truncated.png"])])),
        ["truncated.png", "truncated"],
    ),
    (
        "image-escapes-folder",
        _grpo(_prompts("i4.jsonl", [row(images=["../outside.png"])])),
        ["'../outside.png'", "outside the dataset folder"],
    ),
    (
        "image-absolute-outside",
        lambda d: _grpo(_prompts("i5.jsonl", [row(images=[str(d.parent / "outside.png")])]))(d),
        ["outside.png", "outside the dataset folder"],
    ),
    (
        "image-url",
        _grpo(_prompts("i6.jsonl", [row(images=["https://example.com/cat.png"])])),
        ["remote image", "allow_remote"],
    ),
    (
        "image-decompression-bomb",
        _grpo(_prompts("i7.jsonl", [row(images=["img/bomb.png"])])),
        ["bomb.png", "decompression bomb"],
    ),
    (
        "image-count-mismatch",
        _grpo(_prompts("i8.jsonl", [row(images=["img/good.png", "img/good.png"])])),
        ["2 image(s)", "1"],
    ),
    (
        "image-not-a-list",
        _grpo(_prompts("i9.jsonl", [row(images={"path": "img/good.png"})])),
        ["'images'", "expected a list"],
    ),
    (
        "image-column-missing",
        _grpo(_prompts("i10.jsonl", [row(images=...)])),
        ["'images'", "no 'images' column"],
    ),
    (
        "image-is-a-folder",
        _grpo(_prompts("i11.jsonl", [row(images=["img/a_folder"])])),
        ["a_folder", "is a directory"],
    ),
    # -- files -------------------------------------------------------------------------------------
    ("file-missing", _grpo(lambda d: str(d / "nowhere.jsonl")), ["nowhere.jsonl", "file not found"]),
    (
        "file-wrong-suffix",
        _grpo(_prompts("rows.tsv", raw="prompt\tanswer\n")),
        ["rows.tsv", "unsupported file type '.tsv'"],
    ),
    (
        "file-csv-no-rows",
        _grpo(_prompts("rows.csv", raw="prompt,answer\n")),
        ["rows.csv", "cannot be read as csv"],
    ),
    ("file-empty", _grpo(_prompts("empty.jsonl", raw="\n\n")), ["empty.jsonl", "no rows"]),
    (
        "file-invalid-json-line",
        _grpo(_prompts("f1.jsonl", raw=json.dumps(GOOD_PROMPT_ROW) + "\n{oops\n")),
        ["line 2", "invalid JSON"],
    ),
    ("file-not-utf8", _grpo(_prompts("f2.jsonl", raw=b'{"prompt": "caf\xe9"}\n')), ["f2.jsonl", "UTF-8"]),
    (
        "file-line-not-object",
        _grpo(_prompts("f3.jsonl", raw="[1, 2]\n")),
        ["line 1", "expected a JSON object"],
    ),
    ("file-config-missing", _flags("--config", "no_such.yaml"), ["--config no_such.yaml", "file not found"]),
    # -- configs -----------------------------------------------------------------------------------
    ("config-unknown-flag", _flags("--totl_steps", "5"), ["unknown flag --totl_steps", "--total_steps"]),
    (
        "config-trl-flag-name",
        _flags("--max_steps", "5"),
        ["unknown flag --max_steps", "TRL's --max_steps is --total_steps here"],
    ),
    (
        "config-trl-yaml-key",
        lambda d: _flags("--config", jsonl(d, "trl.yaml", [], raw="algorithm: grpo\nnum_generations: 4\n"))(
            d
        ),
        ["trl.yaml: unknown key 'num_generations'", "TRL's --num_generations is --samples_per_prompt here"],
    ),
    ("config-unexpected-argument", _flags("total_steps=5"), ["unexpected argument 'total_steps=5'"]),
    ("config-bad-int", _flags("--total_steps", "many"), ["--total_steps", "invalid int value: 'many'"]),
    ("config-top-p-range", _flags("--top_p", "1.5"), ["--top_p 1.5", "(0, 1]"]),
    ("config-gamma-range", _flags("--gamma", "1.2"), ["--gamma 1.2", "[0, 1]"]),
    ("config-negative-lr", _reward_flags("--learning_rate", "-0.1"), ["--learning_rate -0.1", "> 0"]),
    ("config-warmup-ratio", _reward_flags("--warmup_ratio", "1"), ["--warmup_ratio 1.0", "[0, 1)"]),
    ("config-pairs-per-image", _reward_flags("--pairs_per_image", "0"), ["--pairs_per_image 0", ">= 1"]),
    (
        "config-mismatched-weights",
        _flags("--reward_funcs", "exact_match", "--reward_weights", "1.0", "0.5"),
        ["--reward_weights", "2 weight(s)", "1 reward function(s)"],
    ),
    (
        "config-unknown-reward",
        _flags("--reward_funcs", "exact_mtch", "--reward_weights", "1.0"),
        ["--reward_funcs", "unknown reward function 'exact_mtch'", "exact_match"],
    ),
    (
        "config-unknown-algorithm",
        _flags("--algorithm", "dpo"),
        ["--algorithm 'dpo'", "cispo, grpo, gspo, ppo, rloo, sapo"],
    ),
    (
        "config-unknown-scheduler",
        _flags("--lr_scheduler_type", "cosin"),
        ["--lr_scheduler_type 'cosin'", "'cosine'"],
    ),
    (
        "config-group-of-one",
        _flags("--samples_per_prompt", "1"),
        ["--samples_per_prompt 1", "grpo needs samples_per_prompt >= 2"],
    ),
    (
        "config-clip-high-below-low",
        _flags("--clip_range_high", "0.1"),
        ["--clip_range_high 0.1", ">= --clip_range"],
    ),
    ("config-adaptive-kl-without-kl", _flags("--adaptive_kl", "true"), ["--adaptive_kl", "--kl_coef > 0"]),
    ("config-push-without-repo", _flags("--push_to_hub", "true"), ["--push_to_hub needs --hub_model_id"]),
    (
        "config-unknown-task",
        _flags("--dataset", "easy-vqa:captions"),
        ["easy-vqa:captions", "easy-vqa:caption"],
    ),
    (
        "config-yaml-invalid",
        lambda d: _flags("--config", jsonl(d, "bad.yaml", [], raw="total_steps: [1, 2\n"))(d),
        ["bad.yaml", "not valid YAML"],
    ),
    (
        "config-yaml-unknown-key",
        lambda d: _flags("--config", jsonl(d, "keys.yaml", [], raw="algorithm: grpo\ntotl_steps: 3\n"))(d),
        ["keys.yaml: unknown key 'totl_steps'", "total_steps"],
    ),
    # -- models --------------------------------------------------------------------------------------
    (
        "model-unknown-hub-id",
        _flags("--model_name_or_path", "nobody/no-such-vlm"),
        ["nobody/no-such-vlm", "offline", "--local-dir"],
    ),
    ("model-tiny-typo", _flags("--model_name_or_path", "tiny-lava"), ["'tiny-lava'", "'tiny-llava'"]),
    (
        "model-folder-without-config",
        lambda d: _flags("--model_name_or_path", _model_folder(d))(d),
        ["not_a_model", "no config.json"],
    ),
    # -- runs ----------------------------------------------------------------------------------------
    (
        "run-missing-checkpoint",
        _flags("--resume_from_checkpoint", "latest"),
        ["--resume_from_checkpoint latest", "no checkpoint"],
    ),
    (
        "run-output-dir-is-a-file",
        lambda d: ["grpo", "--output_dir", str(d.parent / "a_file")],
        ["a_file", "is a file"],
    ),
    (
        "run-output-dir-under-a-file",
        lambda d: _reward_flags("--output_dir", str(d.parent / "a_file" / "rm"))(d),
        ["is inside", "a_file"],
    ),
    ("run-resume-incompatible", _resume_run, ["--lora_r 16", "says 8"]),
    (
        "run-missing-reward-model",
        _flags("--reward_model_path", "nowhere/rm/final"),
        ["reward model not found", "train_reward_model.py"],
    ),
    (
        "run-missing-init-adapter",
        _flags("--init_adapter", "nowhere/final"),
        ["--init_adapter nowhere/final", "adapter_config.json"],
    ),
    ("run-evaluate-no-metrics", lambda d: ["evaluate", str(d)], ["no metrics.jsonl"]),
    (
        "run-push-missing-folder",
        lambda d: ["push", str(d / "no_run"), "--repo-id", "me/x"],
        ["no_run", "not a folder"],
    ),
    # -- agents --------------------------------------------------------------------------------------
    ("agent-unknown-env", _agent("--env", "frozenlak"), ["--env 'frozenlak'", "'frozenlake'"]),
    (
        "agent-action-words-do-not-fit",
        _agent(
            "--env",
            "CliffWalking-v1",
            "--actions",
            "north,east,south,west",
            "--max_turns",
            "20",
            "--warm_start_steps",
            "0",
        ),  # fmt: skip
        ["CliffWalking-v1", "action words", "tiny-llava-agent"],
    ),
    (
        "agent-env-names-no-actions",
        _agent("--env", "CartPole-v1", "--warm_start_steps", "0"),
        ["CartPole-v1", "--actions"],
    ),
    (
        "agent-continuous-actions",
        _agent("--env", "Pendulum-v1", "--warm_start_steps", "0"),
        ["Pendulum-v1", "Discrete"],
    ),
    (
        "agent-warm-start-without-expert",
        _agent("--env", "CliffWalking-v1", "--actions", "up,right,down,left", "--max_turns", "20"),
        ["--warm_start_steps 30", "needs an expert"],
    ),
    ("agent-context-frames", _agent("--context_frames", "0"), ["--context_frames 0", ">= 1"]),
    # -- rollout engine ----------------------------------------------------------------------------------
    (
        "engine-async-without-vllm",
        _agent("--async_rollouts", "true"),
        ["--async_rollouts", "--rollout_engine vllm"],
    ),
    (
        "engine-vllm-python-missing",
        lambda d: [
            "grpo",
            "--rollout_engine",
            "vllm",
            "--train_projector",
            "false",
            "--vllm_python",
            str(d / "nope"),
        ],
        ["--vllm_python", "nope", "no such file"],
    ),
    (
        "engine-vllm-cpus-absent",
        _agent("--rollout_engine", "vllm", "--train_projector", "false", "--vllm_cpus", "0-999"),
        ["--vllm_cpus 0-999", "this machine's cores"],
    ),
    (
        "engine-vllm-trained-projector",
        _agent("--rollout_engine", "vllm", "--vllm_url", "http://127.0.0.1:9"),
        ["--train_projector false"],
    ),
    # -- vocabulary guard ------------------------------------------------------------------------------
    (
        "vocab-prompts-unknown-to-tiny",
        _grpo(_prompts("v1.jsonl", [row(prompt=UNKNOWN_WORDS, images=[])] * 3)),
        ["v1.jsonl", "unknown to --model_name_or_path tiny-llava", "'giraffes'"],
    ),
    (
        "vocab-pairs-unknown-to-tiny",
        _reward(_prompts("v2.jsonl", [pair(chosen=UNKNOWN_WORDS, rejected="zebras sleep standing")] * 3)),
        ["v2.jsonl", "tiny-llava", "real tokenizer"],
    ),
]

SUBPROCESS_CASES = [
    "pref-margin-nan",
    "prompt-item-without-text",
    "image-escapes-folder",
    "image-decompression-bomb",
    "file-not-utf8",
    "config-unknown-flag",
    "config-top-p-range",
    "model-unknown-hub-id",
    "run-output-dir-is-a-file",
    "run-missing-checkpoint",
    "agent-unknown-env",
    "vocab-prompts-unknown-to-tiny",
]


def test_the_corpus_is_large_and_named_uniquely():
    names = [name for name, _, _ in CASES]
    assert len(names) >= 45 and len(set(names)) == len(names)
    assert set(SUBPROCESS_CASES) <= set(names)


@pytest.mark.parametrize(("argv", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2(argv, expected, data: Path, capsys: pytest.CaptureFixture):
    args = argv(data)
    code, stderr, _ = run_in_process(args, capsys)
    assert_one_line_error(code, stderr, args[0], expected)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


@pytest.mark.multiprocess  # a dozen processes at once
def test_a_dozen_cases_as_real_processes(data: Path):
    """The console script itself, started together: exit 2, one line, nothing else on stderr."""
    vlm_rl = str(Path(sys.executable).parent / "vlm-rl")
    cases = {name: (argv, expected) for name, argv, expected in CASES if name in SUBPROCESS_CASES}
    running = {
        name: subprocess.Popen(
            [vlm_rl, *argv(data)],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (argv, _) in cases.items()
    }
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        command = cases[name][0](data)[0]
        assert_one_line_error(process.returncode, stderr, command, cases[name][1])
        # Besides the error line, only the run's own INFO log lines (e.g. "dataset ...: 3 rows valid").
        noise = [
            line
            for line in stderr.splitlines()
            if not line.startswith(f"vlm-rl {command}: error: ") and not LOG_LINE.match(line)
        ]
        assert noise == [] and stdout == "", (name, noise, stdout)


def test_debug_shows_the_traceback(
    data: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    argv = ["grpo", "--top_p", "2", "--output_dir", str(data.parent / "runs" / "g")]
    code, stderr, _ = run_in_process([*argv, "--debug"], capsys)
    assert code == 2 and "Traceback" in stderr and "ConfigError: --top_p 2.0" in stderr
    monkeypatch.setenv("VLM_RL_DEBUG", "1")
    code, stderr, _ = run_in_process(argv, capsys)
    assert code == 2 and "Traceback" in stderr
    assert stderr.rstrip().endswith("vlm-rl grpo: error: --top_p 2.0: must be in (0, 1]")


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch):
    from vlm_rl.recipes import grpo_vqa

    def broken(argv):
        raise KeyError("a bug")

    monkeypatch.setattr(grpo_vqa, "main", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["grpo"])


@pytest.mark.multiprocess
def test_two_processes_print_the_message_once(data: Path):
    """Under `accelerate launch` with 2 CPU processes a rank exits 2 (the other too, unless torchrun
    has terminated it first) and only rank 0 prints.

    The launcher (torchrun's elastic agent) then reports the failed ranks itself, with its own
    traceback of the launcher and exit code 1: that part is accelerate's, not a vlm_rl frame."""
    bad = jsonl(data, "two.jsonl", [row(images=["../outside.png"])])
    command = [
        ACCELERATE, "launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(ROOT / "recipes" / "grpo_vqa.py"), "--dataset", bad, "--output_dir", str(data.parent / "runs" / "two"),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, env=_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=300
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("grpo_vqa.py: error: ")]
    assert len(errors) == 1, result.stderr[-4000:]
    assert "outside the dataset folder" in errors[0]
    assert result.returncode != 0
    # Each rank exits 2; torchrun SIGTERMs the other rank as soon as one fails, so the summary lists
    # rank 1's own exit code 2 only when it got there first (a race: 1 or 2 entries).
    assert 1 <= len(re.findall(r"exitcode\s+:\s*2 \(pid", result.stderr)) <= 2, result.stderr[-4000:]
    assert not re.search(r"exitcode\s+:\s*(?!2 |-15 )-?\d+ \(pid", result.stderr), result.stderr[-4000:]
    assert not re.search(r'File ".*vlm_rl', result.stderr), result.stderr[-4000:]


def test_one_process_accelerate_launch_quiet_prints_the_line_alone(data: Path):
    """`accelerate launch` with one process re-raises a failed child with its own traceback
    (CalledProcessError); with `-q` (as `make demo` runs) the line stays alone, exit code 1."""
    command = [
        ACCELERATE, "launch", "-q", "--num_processes", "1", "--cpu", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "recipes" / "grpo_vqa.py"), "--totl_steps", "5", "--output_dir", str(data.parent / "runs" / "q"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("grpo_vqa.py: error: ")]
    assert errors == [
        "grpo_vqa.py: error: unknown flag --totl_steps (did you mean '--total_steps'?); "
        "`grpo_vqa.py --help` lists the flags"
    ], result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 1


# -- odd but valid inputs -------------------------------------------------------------------------------
ODD_ROWS = [
    {**GOOD_PROMPT_ROW, "images": ["img/cmyk.jpg"], "answer": "teal", "source": "extra column"},
    {**GOOD_PROMPT_ROW, "images": ["img/i16.png"], "answer": "gray", "difficulty": 3},
    {**GOOD_PROMPT_ROW, "images": ["img/la.png"], "answer": "gray"},
    {**GOOD_PROMPT_ROW, "images": ["img/p.png"], "answer": "black"},
]


def test_odd_but_valid_images_and_rows_load(data: Path):
    from vlm_rl.data.loaders import load_jsonl, materialize_images

    path = jsonl(
        data,
        "odd.jsonl",
        [],
        raw="\n".join(json.dumps(r) for r in ODD_ROWS[:2])
        + "\n\n\n"
        + "\n".join(json.dumps(r) for r in ODD_ROWS[2:])
        + "\n",
    )
    dataset = load_jsonl(path, kind="prompt")
    assert len(dataset) == 4 and {"source", "difficulty"} <= set(dataset.column_names)
    images = [materialize_images(r["images"])[0] for r in dataset]
    assert [image.mode for image in images] == ["RGB"] * 4
    assert abs(images[1].getpixel((0, 0))[0] - 40000 * 255 / 65535) <= 1  # I;16 scaled, not clipped


def test_odd_but_valid_inputs_train_and_the_closing_line_is_honest(data: Path, capsys: pytest.CaptureFixture):
    """One GRPO step on the odd rows: without a held-out split the closing line says so; with an
    --eval_dataset sharing an image, it says how many images are shared."""
    train = jsonl(data, "odd_train.jsonl", ODD_ROWS)
    common = ["grpo", "--dataset", train, "--prompts_per_step", "2", "--samples_per_prompt", "2",
              "--max_eval_prompts", "4", "--num_threads", "1", *FAST_GRPO]  # fmt: skip
    code, stderr, out = run_in_process([*common, "--output_dir", str(data.parent / "runs" / "odd")], capsys)
    assert code == 0, stderr[-3000:]
    assert f"no held-out split in {train} (4 training prompts evaluated; pass --eval_dataset" in out, out
    assert "held-out (" not in out
    # `vlm-rl evaluate` and the report do not call these evaluations held-out either
    code, stderr, out = run_in_process(["evaluate", str(data.parent / "runs" / "odd")], capsys)
    assert code == 0, stderr[-3000:]
    assert "evaluation on training data (no held-out split in" in out and "held-out evaluation" not in out, (
        out
    )
    code, stderr, _ = run_in_process(["report", str(data.parent / "runs" / "odd")], capsys)
    page = (data.parent / "runs" / "odd" / "report.html").read_text()
    assert code == 0 and "Evaluation (training prompts)" in page and ">Held-out" not in page, stderr[-3000:]
    assert "held-out prompts" not in page and "training prompts (no held-out split)" in page
    assert f"(evaluation: no held-out split in {train} (4 training prompts evaluated" in page

    evaluation = jsonl(data, "odd_eval.jsonl", [ODD_ROWS[0], GOOD_PROMPT_ROW])
    code, stderr, out = run_in_process(
        [*common, "--eval_dataset", evaluation, "--output_dir", str(data.parent / "runs" / "odd2")], capsys
    )
    assert code == 0, stderr[-3000:]
    assert f"held-out (2 prompts of {evaluation}; 1 image(s) shared with training): accuracy" in out, out
    code, stderr, out = run_in_process(["evaluate", str(data.parent / "runs" / "odd2")], capsys)
    assert f"held-out evaluation (held-out (2 prompts of {evaluation}; 1 image(s) shared" in out, out


# -- the pieces ---------------------------------------------------------------------------------------
def test_errors_doctests_and_range_rules():
    import doctest
    from dataclasses import dataclass

    from vlm_rl import errors
    from vlm_rl.errors import ConfigError, check_ranges

    assert doctest.testmod(errors, raise_on_error=False).failed == 0

    @dataclass
    class Config:
        steps: int | None = 3
        rate: float = 0.5
        weights: list[float] | None = None

    check_ranges(
        Config(steps=None, weights=[1.0, -2.0]), {"steps": ">= 1", "rate": "(0, 1]", "weights": "finite"}
    )
    for config, message in [
        (Config(steps=0), "--steps 0: must be >= 1"),
        (Config(steps=2.5), "--steps 2.5: must be an integer"),
        (Config(steps=True), "must be an integer, got bool"),
        (Config(rate=0.0), "--rate 0.0: must be in (0, 1]"),
        (Config(rate="fast"), "--rate 'fast': must be a number, got str"),
        (Config(weights=[1.0, float("inf")]), "--weights inf: must be a finite number"),
    ]:
        with pytest.raises(ConfigError) as raised:
            check_ranges(config, {"steps": ">= 1", "rate": "(0, 1]", "weights": "finite"})
        assert message in str(raised.value), (str(raised.value), message)


def test_only_the_main_rank_prints(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    from vlm_rl.errors import ConfigError, run_entry_point

    def failing(argv):
        raise ConfigError("--x 1: bad")

    monkeypatch.setenv("RANK", "1")
    assert run_entry_point(failing, [], prog="p") == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert run_entry_point(failing, [], prog="p") == 2
    assert capsys.readouterr().err == "p: error: --x 1: bad\n"
