"""Agent runs as real processes: two CPU ranks (gloo) end with the same weights; the agent recipe
killed with SIGKILL after a checkpoint resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ports import free_port
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess  # launches several training processes (make test only)

REPO = Path(__file__).resolve().parent.parent
AGENT_RUN = REPO / "tests" / "scripts" / "agent_run.py"
RECIPE = REPO / "recipes" / "ppo_agent.py"
ENV = {
    "CUDA_VISIBLE_DEVICES": "",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
}
# Small enough for a few seconds per step on a loaded 2-core machine.
RECIPE_FLAGS = [
    "--total_steps", "6", "--save_steps", "2", "--eval_steps", "0", "--warm_start_steps", "0",
    "--prompts_per_step", "2", "--samples_per_prompt", "2",
    "--max_new_tokens", "2", "--eval_episodes", "4", "--sample_log_steps", "0",
    "--report_to", "none", "--num_threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def tiny_agent_model() -> None:
    from vlm_rl.models import ensure_tiny

    ensure_tiny("tiny-llava-agent")  # built once here: processes building it at once would race


def two_rank_agent_run(output_dir: Path, *args: str) -> None:
    """tests/scripts/agent_run.py on two CPU ranks (gloo)."""
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(AGENT_RUN), str(output_dir), *args,
    ]  # fmt: skip
    env = {**os.environ, **ENV, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.slow
def test_two_rank_agent_run_ends_with_identical_weights(tmp_path: Path) -> None:
    two_rank_agent_run(tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["step"] == rank1["step"] == 3
    assert rank0["policy_moved"], "the adapter did not train"
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    # each rank plays its own half of the step's maps (2 maps x 2 episodes)
    assert rank0["last_step_episodes"] == rank1["last_step_episodes"] == 4
    assert not set(rank0["last_step_seeds"]) & set(rank1["last_step_seeds"])

    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    steps = [row["step"] for row in rows if "reward/mean" in row]
    assert steps == [1, 2, 3], steps  # once per step: only the main process writes
    assert all("episodes/success_rate" in row for row in rows if "reward/mean" in row)
    episodes = [json.loads(line) for line in (run / "episodes.jsonl").open()]
    # the main process records its own episodes (rank 1's are in the metrics, not in the file)
    assert [e["step"] for e in episodes] == [s for s in range(3) for _ in range(4)]
    assert sorted({e["seed"] for e in episodes if e["step"] == 2}) == rank0["last_step_seeds"]
    assert {"seed", "actions", "rewards", "success"} <= episodes[0].keys()
    assert (run / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_two_ranks_sample_one_step_off_from_one_server(tmp_path: Path) -> None:
    """--rollout_engine vllm --async_rollouts on two ranks, against a stand-in server: only the main
    process hot-loads each version of the adapter, both ranks' requests name it, every step after
    the first trains on a rollout one update old, and the ranks end with the same weights."""
    from test_rollout_engine import StandIn

    from vlm_rl.models import load_model

    _, processor = load_model("tiny-llava-agent")
    left, down = (processor.tokenizer.convert_tokens_to_ids(w) for w in ("left", "down"))
    eos = processor.tokenizer.eos_token_id
    server = StandIn(
        lambda payload: [([left, eos], [-1.0, -1.0]), ([down, eos], [-1.0, -1.0])][: payload["n"]]
    )
    try:
        two_rank_agent_run(tmp_path, server.url)
    finally:
        server.close()
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["step"] == rank1["step"] == 3 and rank0["policy_moved"]
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    loads = [payload["lora_name"] for path, payload in server.requests if path == "/v1/load_lora_adapter"]
    # evaluation and steps 0-1 on v0, step 2 on v1 (synced after step 1's rollout), evaluation on v3
    assert loads == ["vlm_rl-v0", "vlm_rl-v1", "vlm_rl-v3"]
    assert {payload["model"] for payload in server.chat_requests()} == set(loads)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [row["rollout/policy_lag"] for row in rows if "reward/mean" in row] == [0, 1, 1]


def _recipe(output_dir: Path, *extra: str, log: Path) -> subprocess.Popen:
    command = [sys.executable, str(RECIPE), *RECIPE_FLAGS, "--output_dir", str(output_dir), *extra]
    # its own process group, so the kill reaches everything it started
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen, log: Path) -> str:
    try:
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text()
    assert process.returncode == 0, text[-4000:]
    return text


def _wait_for_checkpoint(process: subprocess.Popen, run: Path, log: Path) -> Path:
    """The first complete checkpoint: trainer_state.json in place and no temporary folder being
    written next to it (a checkpoint is written under .step-NNNNNN.tmp, then renamed)."""
    deadline = time.monotonic() + 300
    checkpoints = run / "checkpoints"
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-4000:]
        complete = sorted(checkpoints.glob("step-*/trainer_state.json")) if checkpoints.is_dir() else []
        if complete and not list(checkpoints.glob(".*.tmp*")):
            return complete[-1].parent
        time.sleep(0.05)
    raise AssertionError("no checkpoint within 300 s:\n" + log.read_text()[-4000:])


@pytest.mark.slow
def test_agent_recipe_killed_after_a_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    straight_log, killed_log, resumed_log = (tmp_path / f"{n}.log" for n in ("straight", "killed", "resumed"))
    straight_out = _finish(_recipe(tmp_path / "straight", log=straight_log), straight_log)
    held_out = [line for line in straight_out.splitlines() if line.startswith("held-out (4 maps never seen")]
    assert len(held_out) == 1, straight_out[-4000:]

    run = tmp_path / "interrupted"
    process = _recipe(run, log=killed_log)
    try:
        checkpoint = _wait_for_checkpoint(process, run, killed_log)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] in (2, 4)
    assert not (run / "final").exists(), "killed too late: the run had finished"

    resumed_out = _finish(_recipe(run, "--resume_from_checkpoint", "latest", log=resumed_log), resumed_log)
    assert "resumed from" in resumed_out
    expected = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    resumed = load_file(run / "final" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys() and expected
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
    assert any(value.abs().max() > 0 for name, value in expected.items() if "lora_B" in name), (
        "nothing trained"
    )
    assert json.loads((run / "final" / "vlm_rl_run.json").read_text())["step"] == 6
