"""Checkpoints: atomic saves, rotation to a limit, and uploads in a background thread."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vlm_rl.run_folder.durable import _delete_dir, _fsync_dir, _fsync_tree, _replace_dir, _write_synced
from vlm_rl.run_folder.layout import TRAINER_STATE_NAME, RunFolder

logger = logging.getLogger(__name__)

# Hidden names of a save in progress (.step-N.tmp), a replaced save (.step-N.old<pid>) and a
# checkpoint being deleted (.step-N.deleting<pid>): what a killed run can leave behind.
STALE_CHECKPOINT_NAME = re.compile(r"^\.step-\d+\.(tmp|old\d+|deleting\d+)$")


class CheckpointManager:
    """Writes checkpoints atomically, keeps the last `save_total_limit`, uploads in the background.

    Under accelerate every process calls `begin` and saves into the folder it returns (with a
    barrier before and after the saves), then the main process alone calls `commit`, which writes
    the completion marker (trainer_state.json) last, renames the folder into place and deletes the
    checkpoints beyond the limit. A checkpoint queued for upload (`upload`) is never deleted before
    its upload returns; it is deleted then if it is beyond the limit.

    A kill at any moment leaves only complete checkpoints under their step-NNNNNN names: a save is
    written under a hidden temporary name and renamed when complete (files flushed to disk first),
    a checkpoint is renamed to a hidden name before it is deleted, and `RunFolder.checkpoints` (so
    "latest") skips any folder without the marker. Hidden leftovers of a killed run are removed by
    the next `begin`.

    `save` does all of it for accelerate's state (every trainer's checkpoints):

        path = manager.save(accelerator, step, {"step": step, ...}, write_extra=save_adapter)
        if accelerator.is_main_process:
            manager.upload(path, push)    # push(path) runs in the upload thread
        ...
        manager.wait_for_uploads()        # before the run ends
    """

    def __init__(self, run: RunFolder, save_total_limit: int, is_main_process: bool = True):
        if save_total_limit < 1:
            raise ValueError(f"save_total_limit must be at least 1, got {save_total_limit}")
        self.run = run
        self.save_total_limit = save_total_limit
        self.is_main_process = is_main_process
        self._lock = threading.Lock()  # the upload thread rotates too
        self._protected: dict[Path, int] = {}  # resolved checkpoint -> uploads queued or running
        self._uploads: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []

    def save(
        self,
        accelerator: Any,
        step: int,
        state: dict[str, Any],
        write_extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Checkpoint `step` of an accelerate run: accelerate's state (weights, optimizer, scheduler,
        RNG of every rank), what `write_extra(folder)` writes (main process: an adapter), then `state`
        as the completion marker, atomically (`begin`, `commit`). Every process calls it; returns the
        checkpoint folder."""
        accelerator.wait_for_everyone()
        tmp = self.begin(step)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank's RNG state is in tmp before it is renamed
        path = self.run.checkpoint_dir(step)
        if accelerator.is_main_process:
            if write_extra is not None:
                write_extra(tmp)
            path = self.commit(tmp, step, state)  # trainer_state.json: the marker, last
        accelerator.wait_for_everyone()
        return path

    @property
    def pending(self) -> int:
        """Uploads queued or running."""
        return sum(not future.done() for future in self._futures)

    def begin(self, step: int) -> Path:
        """The temporary folder to save checkpoint `step` into; the main process removes the hidden
        leftovers of interrupted saves and deletions first. Every process calls it; put a barrier
        after it."""
        tmp = self.run.checkpoints_dir / f".{self.run.checkpoint_dir(step).name}.tmp"
        if self.is_main_process:
            with self._lock:
                if self.run.checkpoints_dir.is_dir():
                    for stale in self.run.checkpoints_dir.iterdir():
                        if STALE_CHECKPOINT_NAME.match(stale.name):
                            shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int, state: dict[str, Any] | None = None) -> Path:
        """Make the saved `tmp` checkpoint `step`: flush its files to disk, write the completion
        marker trainer_state.json (`state`; {"step": step} when neither `state` nor the file is
        there), rename it into checkpoints/step-NNNNNN (replacing an earlier save of the same step),
        then rotate. Main process only; returns the checkpoint folder."""
        self._require_main("commit")
        tmp, path = Path(tmp), self.run.checkpoint_dir(step)
        marker = tmp / TRAINER_STATE_NAME
        _fsync_tree(tmp)
        if state is not None or not marker.is_file():
            _write_synced(marker, json.dumps(state if state is not None else {"step": step}))
        _fsync_dir(tmp)
        with self._lock:
            _replace_dir(tmp, path)
        _fsync_dir(path.parent)
        self._rotate()
        return path

    def upload(self, path: Path, fn: Callable[[Path], Any]) -> None:
        """Queue `fn(path)` in the upload thread (one thread: uploads run in order while training
        goes on). `path` is kept on disk until `fn` returns; an exception of `fn` is logged, never
        raised. Main process only."""
        self._require_main("upload")
        path = Path(path)
        with self._lock:
            key = path.resolve()
            self._protected[key] = self._protected.get(key, 0) + 1
        if self._uploads is None:
            self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm_rl-upload")
        self._futures.append(self._uploads.submit(self._run_upload, path, fn))

    def wait_for_uploads(self) -> None:
        """Block until every queued upload has returned (or failed and been logged)."""
        for future in self._futures:
            future.result()
        self._futures.clear()
        if self.is_main_process:
            self._rotate()

    def _rotate(self) -> None:
        """Delete the checkpoints older than the last `save_total_limit`, but none with an upload pending."""
        with self._lock:
            saved = self.run.checkpoints()
            for old in saved[: max(0, len(saved) - self.save_total_limit)]:
                if old.resolve() not in self._protected:
                    _delete_dir(old)

    def _run_upload(self, path: Path, fn: Callable[[Path], Any]) -> None:
        try:
            fn(path)
        except Exception:  # a vanished checkpoint, a bad repo id...: training goes on regardless
            logger.exception("checkpoint %s: upload failed; the checkpoint is on disk", path.name)
        finally:
            with self._lock:
                key = path.resolve()
                self._protected[key] -= 1
                if not self._protected[key]:
                    del self._protected[key]
            self._rotate()

    def _require_main(self, what: str) -> None:
        if not self.is_main_process:
            raise RuntimeError(f"CheckpointManager.{what} is for the main process only")
