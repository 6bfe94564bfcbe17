"""vlm_rl.run_folder: the run-folder layout, and CheckpointManager's atomic saves, rotation and
background uploads, on real files with a real upload thread."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlm_rl.run_folder import (
    REWARD_CONFIG_NAME,
    RL_RUN_INFO_NAME,
    CheckpointManager,
    MetricsLogger,
    RunFolder,
    atomic_dir,
    checkpoint_step,
    read_metrics,
)


@dataclass
class Config:
    output_dir: str
    learning_rate: float = 1e-3


def save_checkpoint(manager: CheckpointManager, step: int) -> Path:
    """What a trainer does: every process saves into begin()'s folder, the main process commits."""
    tmp = manager.begin(step)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_model.safetensors").write_bytes(bytes([step]) * 64)
    return manager.commit(tmp, step)


def names(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- layout -----------------------------------------------------------------------------------
def test_the_layout_of_a_run_folder(tmp_path: Path):
    run = RunFolder(tmp_path / "run")

    assert run.config_file == tmp_path / "run" / "run_config.json"
    assert run.metrics_file == tmp_path / "run" / "metrics.jsonl"
    assert run.tensorboard_dir == tmp_path / "run" / "tensorboard"
    assert run.samples_file == tmp_path / "run" / "samples.jsonl"
    assert run.checkpoints_dir == tmp_path / "run" / "checkpoints"
    assert run.checkpoint_dir(100) == tmp_path / "run" / "checkpoints" / "step-000100"
    assert (run.final_dir, run.best_dir) == (tmp_path / "run" / "final", tmp_path / "run" / "best")
    assert run.report_file == tmp_path / "run" / "report.html"
    assert not run.root.exists()  # nothing is created until something is written


def test_reward_config_name_is_the_reward_models(tmp_path: Path):
    from vlm_rl.rewards.model import CONFIG_NAME

    assert REWARD_CONFIG_NAME == CONFIG_NAME


def test_start_writes_the_config_and_starts_fresh_logs_unless_resuming(tmp_path: Path):
    run = RunFolder(tmp_path / "run")
    metrics_log = run.start(Config(str(run.root)), tensorboard=False)
    metrics_log.log({"reward/mean": 0.25}, step=1)
    metrics_log.close()
    run.write_samples([{"step": 1, "completion": "red circle", "reward": 1.0, "image": Path("a.png")}])

    assert json.loads(run.config_file.read_text()) == {"output_dir": str(run.root), "learning_rate": 1e-3}
    assert run.read_metrics() == [{"step": 1, "reward/mean": 0.25}]
    assert run.read_samples() == [{"step": 1, "completion": "red circle", "reward": 1.0, "image": "a.png"}]

    resumed = run.start(Config(str(run.root)), tensorboard=False, resume=True)
    resumed.log({"reward/mean": 0.5}, step=2)
    resumed.close()
    assert [row["step"] for row in run.read_metrics()] == [1, 2]
    assert len(run.read_samples()) == 1

    run.start(Config(str(run.root)), tensorboard=False).close()  # a new run in the same folder
    assert run.read_metrics() == [] and run.read_samples() == []


@pytest.mark.parametrize("evaluates_again", [True, False])
def test_a_resumed_run_drops_what_the_interrupted_run_wrote_after_its_checkpoint(
    tmp_path: Path, evaluates_again: bool
):
    """Killed after step 3 with a checkpoint at step 2: rows of step 3 (and the samples drawn for it,
    at step 2) go; the evaluation at step 2 goes too when the resumed run evaluates there again."""
    run = RunFolder(tmp_path / "run")
    metrics_log = run.start(Config(str(run.root)), tensorboard=False)
    for step in range(4):
        if step:
            metrics_log.log({"reward/mean": step / 10}, step=step)
        if step % 2 == 0:
            metrics_log.log({"eval/accuracy": step / 4}, step=step)
    metrics_log.close()
    run.write_samples([{"step": step, "completion": "c"} for step in range(4)])
    run.eval_samples_file.write_text("".join(json.dumps({"step": s, "index": 0}) + "\n" for s in (0, 2)))
    untouched = run.episodes_file
    untouched.write_text(json.dumps({"step": 1}) + "\n")
    before = untouched.stat().st_mtime_ns

    resumed = run.start(
        Config(str(run.root)), tensorboard=False, resume=True, resumed_step=2, evaluates_again=evaluates_again
    )
    resumed.close()
    kept = [(row["step"], next(k for k in row if k != "step")) for row in run.read_metrics()]
    expected = [(0, "eval/accuracy"), (1, "reward/mean"), (2, "reward/mean")]
    assert kept == expected + ([] if evaluates_again else [(2, "eval/accuracy")])
    assert [row["step"] for row in run.read_samples()] == [0, 1]
    eval_rows = [json.loads(line)["step"] for line in run.eval_samples_file.read_text().splitlines()]
    assert eval_rows == ([0] if evaluates_again else [0, 2])
    assert untouched.stat().st_mtime_ns == before  # nothing to drop: not rewritten


def test_tensorboard_curves_of_a_resumed_run_hide_the_steps_after_its_checkpoint(tmp_path: Path):
    """Killed after step 4 with a checkpoint at step 2: TensorBoard shows steps 1-2 of the first run
    and 3 of the resumed one; a fresh run in the same folder starts its curves empty."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def curve() -> list[tuple[int, float]]:
        events = EventAccumulator(str(run.tensorboard_dir))
        events.Reload()
        return [(e.step, round(e.value, 3)) for e in events.Scalars("reward/mean")]

    run = RunFolder(tmp_path / "run")
    metrics_log = run.start(Config(str(run.root)))
    for step in range(1, 5):
        metrics_log.log({"reward/mean": step / 10}, step=step)
    metrics_log.close()
    time.sleep(1.1)  # event files are named by the second they were opened
    resumed = run.start(Config(str(run.root)), resume=True, resumed_step=2)
    resumed.log({"reward/mean": 0.75}, step=3)
    resumed.close()
    assert curve() == [(1, 0.1), (2, 0.2), (3, 0.75)]

    time.sleep(1.1)
    fresh = run.start(Config(str(run.root)))
    fresh.log({"reward/mean": 0.5}, step=1)
    fresh.close()
    assert curve() == [(1, 0.5)]


def test_metrics_of_an_old_reward_model_run_are_read_from_run(tmp_path: Path):
    run = RunFolder(tmp_path / "rm")
    assert run.find_metrics_file() is None and run.read_metrics() == []
    old = MetricsLogger(run.root / "run", tensorboard=False)  # the layout before RunFolder
    old.log({"eval/accuracy": 0.5}, step=0)
    old.close()

    assert run.find_metrics_file() == run.root / "run" / "metrics.jsonl"
    assert run.read_metrics() == [{"step": 0, "eval/accuracy": 0.5}]

    new = MetricsLogger(run.root, tensorboard=False)  # a newer run in the same folder wins
    new.log({"eval/accuracy": 0.75}, step=0)
    new.close()
    assert run.find_metrics_file() == run.metrics_file
    assert run.read_metrics() == read_metrics(run.root) == [{"step": 0, "eval/accuracy": 0.75}]


def test_the_kind_of_run_comes_from_what_final_holds(tmp_path: Path):
    rl, reward_model, unfinished = (RunFolder(tmp_path / name) for name in ("rl", "rm", "unfinished"))
    rl.final_dir.mkdir(parents=True)
    (rl.final_dir / RL_RUN_INFO_NAME).write_text("{}")
    reward_model.best_dir.mkdir(parents=True)
    (reward_model.best_dir / REWARD_CONFIG_NAME).write_text("{}")
    assert reward_model.kind is None  # best/ alone: the run has not finished
    reward_model.final_dir.mkdir()
    (reward_model.final_dir / REWARD_CONFIG_NAME).write_text("{}")
    unfinished.final_dir.mkdir(parents=True)

    assert (rl.kind, reward_model.kind, unfinished.kind) == ("rl", "reward_model", None)
    assert rl.saved_model_info(rl.final_dir) == rl.final_dir / RL_RUN_INFO_NAME
    assert reward_model.saved_model_info(reward_model.best_dir) == reward_model.best_dir / REWARD_CONFIG_NAME
    assert rl.saved_model_info(rl.best_dir) is None


# -- checkpoints ------------------------------------------------------------------------------
def test_checkpoints_are_listed_by_step_without_temporary_folders(tmp_path: Path):
    run = RunFolder(tmp_path)
    assert run.checkpoints() == []
    for step in (999_999, 2, 1_000_000, 10):
        run.checkpoint_dir(step).mkdir(parents=True)
        (run.checkpoint_dir(step) / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run.checkpoints_dir / ".step-000011.tmp").mkdir()  # a save in progress
    (run.checkpoints_dir / "step-000012").write_text("not a folder")
    run.checkpoint_dir(13).mkdir()  # no completion marker (trainer_state.json): incomplete
    (run.checkpoints_dir / "step-latest").mkdir()

    assert names(run.checkpoints()) == ["step-000002", "step-000010", "step-999999", "step-1000000"]


def test_resolve_checkpoint_by_latest_name_or_path(tmp_path: Path):
    run = RunFolder(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from in .*checkpoints"):
        run.resolve_checkpoint("latest")
    manager = CheckpointManager(run, save_total_limit=3)
    for step in (100, 200):
        save_checkpoint(manager, step)

    assert run.resolve_checkpoint("latest") == run.checkpoint_dir(200)
    assert run.resolve_checkpoint("step-000100") == run.checkpoint_dir(100)
    assert run.resolve_checkpoint(str(run.checkpoint_dir(100))) == run.checkpoint_dir(100)
    assert checkpoint_step(run.checkpoint_dir(200)) == 200
    with pytest.raises(FileNotFoundError, match=r"no checkpoint 'step-000300'.*step-000100, step-000200"):
        run.resolve_checkpoint("step-000300")
    with pytest.raises(FileNotFoundError, match="is not a vlm_rl checkpoint"):
        run.resolve_checkpoint(str(run.root))


def test_a_failing_save_leaves_the_previous_checkpoint(tmp_path: Path):
    run = RunFolder(tmp_path)
    manager = CheckpointManager(run, save_total_limit=2)
    first = save_checkpoint(manager, 1)
    before = (first / "adapter" / "adapter_model.safetensors").read_bytes()

    tmp = manager.begin(2)
    (tmp / "trainer_state.json").write_text('{"step": 2}')  # ... and the process dies before commit
    assert run.checkpoints() == [first]
    assert run.resolve_checkpoint("latest") == first

    tmp = manager.begin(2)  # the next save starts from an empty folder
    assert list(tmp.iterdir()) == []
    (tmp / "trainer_state.json").write_text('{"step": 2}')
    second = manager.commit(tmp, 2)
    assert names(run.checkpoints()) == ["step-000001", "step-000002"]
    assert (first / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert not tmp.exists() and checkpoint_step(second) == 2


def test_a_checkpoint_saved_again_replaces_the_earlier_save(tmp_path: Path):
    run = RunFolder(tmp_path)
    manager = CheckpointManager(run, save_total_limit=2)
    path = save_checkpoint(manager, 3)
    (path / "stale.bin").write_bytes(b"from the first save")

    assert save_checkpoint(manager, 3) == path
    assert not (path / "stale.bin").exists()
    assert names(run.checkpoints()) == ["step-000003"]
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step-000003"]  # no .old or .tmp left


def test_rotation_keeps_the_last_save_total_limit(tmp_path: Path):
    run = RunFolder(tmp_path)
    manager = CheckpointManager(run, save_total_limit=2)
    for step in (1, 2, 3, 4):
        save_checkpoint(manager, step)

    assert names(run.checkpoints()) == ["step-000003", "step-000004"]
    with pytest.raises(ValueError, match="save_total_limit must be at least 1"):
        CheckpointManager(run, save_total_limit=0)


def test_a_checkpoint_is_kept_until_its_slow_upload_ends(tmp_path: Path):
    """Limit 1: step 1 is queued for upload behind a hub that answers only when released. Steps 2
    and 3 are saved meanwhile; step 2 rotates away at once, step 1 survives until its upload
    returns, and is rotated away then, by the upload thread."""
    run = RunFolder(tmp_path)
    manager = CheckpointManager(run, save_total_limit=1)
    release = threading.Event()
    uploaded: list[tuple[str, bytes, str]] = []

    def slow_upload(path: Path) -> None:
        assert release.wait(timeout=10)
        weights = (path / "adapter" / "adapter_model.safetensors").read_bytes()
        uploaded.append((path.name, weights, threading.current_thread().name))

    first = save_checkpoint(manager, 1)
    manager.upload(first, slow_upload)
    save_checkpoint(manager, 2)
    save_checkpoint(manager, 3)

    assert manager.pending == 1
    assert names(run.checkpoints()) == ["step-000001", "step-000003"]  # 1 protected, 2 gone
    release.set()
    wait_until(lambda: manager.pending == 0)
    assert uploaded == [("step-000001", bytes([1]) * 64, uploaded[0][2])]
    assert uploaded[0][2].startswith("vlm_rl-upload")  # in the background thread
    assert names(run.checkpoints()) == ["step-000003"]  # rotated when its upload ended
    manager.wait_for_uploads()
    assert names(run.checkpoints()) == ["step-000003"]


def test_uploads_run_in_order_and_a_failure_is_logged_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    run = RunFolder(tmp_path)
    manager = CheckpointManager(run, save_total_limit=1)
    order: list[str] = []

    def upload(path: Path) -> None:
        time.sleep(0.2)
        if path.name == "step-000002":
            raise ConnectionError("hub down")
        order.append(path.name)

    with caplog.at_level(logging.ERROR, logger="vlm_rl"):
        for step in (1, 2, 3):
            manager.upload(save_checkpoint(manager, step), upload)
        assert manager.pending >= 2  # save_checkpoint returned while the uploads were on their way
        manager.wait_for_uploads()

    assert order == ["step-000001", "step-000003"]
    failures = [record for record in caplog.records if "upload failed" in record.getMessage()]
    assert [record.getMessage() for record in failures] == [
        "checkpoint step-000002: upload failed; the checkpoint is on disk"
    ]
    assert "ConnectionError: hub down" in caplog.text  # the traceback is logged
    assert manager.pending == 0 and names(run.checkpoints()) == ["step-000003"]


def test_only_the_main_process_clears_renames_and_uploads(tmp_path: Path):
    """Two processes share the temporary folder: the other process's begin() leaves what the
    main process has put there, and commit/upload refuse to run outside the main process."""
    run = RunFolder(tmp_path)
    main = CheckpointManager(run, save_total_limit=2, is_main_process=True)
    other = CheckpointManager(run, save_total_limit=2, is_main_process=False)

    tmp = main.begin(5)
    (tmp / "model.safetensors").write_bytes(b"rank 0")
    assert other.begin(5) == tmp
    (tmp / "model_1.safetensors").write_bytes(b"rank 1")
    with pytest.raises(RuntimeError, match="main process only"):
        other.commit(tmp, 5)
    with pytest.raises(RuntimeError, match="main process only"):
        other.upload(tmp, print)
    other.wait_for_uploads()  # nothing queued: returns at once

    path = main.commit(tmp, 5)
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "model_1.safetensors",
        "trainer_state.json",  # the completion marker commit writes when the trainer wrote none
    ]


def test_torn_writes_never_leave_a_checkpoint_latest_would_pick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """What a SIGKILL can leave at each moment of a save or a rotation, simulated: `latest` always
    names the newest complete checkpoint, and the next save clears the leftovers."""
    import vlm_rl.run_folder as run_folder

    run = RunFolder(tmp_path)
    manager = CheckpointManager(run, save_total_limit=2)
    save_checkpoint(manager, 2)
    four = save_checkpoint(manager, 4)

    # killed while the ranks write into the temporary folder: half a weights file, no marker
    tmp = manager.begin(6)
    (tmp / "model.safetensors").write_bytes(b"half a tens")

    # killed while writing the marker: the rename never happens
    def killed_marker_write(path: Path, text: str) -> None:
        path.write_text(text[:3])
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder.checkpointing, "_write_synced", killed_marker_write)
    with pytest.raises(KeyboardInterrupt):
        manager.commit(tmp, 6, {"step": 6})
    monkeypatch.undo()
    # a folder under a step name without the marker (copied or deleted half-way by hand)
    run.checkpoint_dir(8).mkdir()
    (run.checkpoint_dir(8) / "model.safetensors").write_bytes(b"partial")
    assert names(run.checkpoints()) == ["step-000002", "step-000004"]
    assert run.resolve_checkpoint("latest") == four
    # killed in the middle of rotating step 2 away: the folder is renamed hidden before deletion
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):
        if ".deleting" in str(path):
            (Path(path) / "trainer_state.json").unlink()  # deletion got this far, then the kill
            raise KeyboardInterrupt
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(manager, 10)
    monkeypatch.undo()

    ten = run.checkpoint_dir(10)
    assert names(run.checkpoints()) == ["step-000004", "step-000010"]
    assert run.resolve_checkpoint("latest") == ten
    leftovers = sorted(p.name for p in run.checkpoints_dir.iterdir() if p.name.startswith("."))
    assert leftovers == [f".step-000002.deleting{os.getpid()}"]  # step 10's begin cleared .step-000006.tmp
    with pytest.raises(FileNotFoundError, match=r"step-000008 is not a vlm_rl checkpoint.*interrupted"):
        run.resolve_checkpoint("step-000008")

    # without step 10, latest falls back to step 4 (the torn 6 and 8 are never picked)
    shutil.rmtree(ten)
    assert run.resolve_checkpoint("latest") == four
    # the next save clears the hidden leftovers and starts from an empty folder
    tmp = manager.begin(12)
    assert list(tmp.iterdir()) == []
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == [
        ".step-000012.tmp",
        "step-000004",
        "step-000008",
    ]
    path = manager.commit(tmp, 12, {"step": 12, "kl_coef": 0.1})
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 12, "kl_coef": 0.1}
    assert names(run.checkpoints()) == ["step-000004", "step-000012"]


def test_atomic_dir_keeps_the_previous_folder_when_the_write_fails(tmp_path: Path):
    final = tmp_path / "final"
    with atomic_dir(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"first")
    with pytest.raises(RuntimeError, match="disk full"), atomic_dir(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    assert (final / "weights.bin").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
