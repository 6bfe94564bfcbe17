"""Skips agreed across ranks: two real CPU processes (gloo), a bad step on one rank only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port

pytestmark = pytest.mark.multiprocess  # launches several training processes (make test only)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "rank_agreement.py"


def run_two_ranks(output_dir: Path, mode: str) -> tuple[dict, dict, str]:
    from vlm_rl.models import ensure_tiny

    ensure_tiny("tiny-llava")  # built once here: two ranks building it at once would race
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(SCRIPT), str(output_dir), mode,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    ranks = [json.loads((output_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks[0], ranks[1], log


@pytest.mark.slow
def test_non_finite_reward_on_one_rank_is_skipped_by_both(tmp_path: Path) -> None:
    rank0, rank1, log = run_two_ranks(tmp_path, "nan_reward")
    assert rank0["step"] == rank1["step"] == 4
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == 1, (rank0, rank1)
    assert rank0["weights_moved"], "the other steps trained nothing"
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    assert rank0["lr"] == rank1["lr"] == 0.0  # both schedulers stepped every step, the skipped one too
    assert "step 1 skipped" in log
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    skips = [row["train/skipped_steps"] for row in metrics if "train/skipped_steps" in row]
    assert skips == [0, 1, 1, 1], skips


@pytest.mark.slow
def test_empty_batch_on_one_rank_trains_and_on_all_ranks_skips(tmp_path: Path) -> None:
    rank0, rank1, log = run_two_ranks(tmp_path, "empty_batch")
    assert rank0["step"] == rank1["step"] == 4
    # step 1: rank 0 has nothing left, rank 1 does: both update (rank 0 with a zero-weight minibatch)
    # step 2: nothing left anywhere: both skip it
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == 1, (rank0, rank1)
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    assert rank0["accelerator_step"] == rank1["accelerator_step"]
    assert "step 2 skipped: no sample left" in log
