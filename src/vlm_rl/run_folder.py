"""The run folder: the one place that knows where a run (an RL or a reward-model output_dir) keeps what.

    output_dir/
        run_config.json              the resolved config (`save_config`)
        evaluation.json              whether the evaluations are held out, and on what
        metrics.jsonl                one JSON line per logging step (`MetricsLogger`)
        tensorboard/                 the same scalars, when tensorboard is on
        samples.jsonl                sampled completions with their rewards (RL runs)
        episodes.jsonl, episodes/    played episodes and their film strips (agent runs)
        eval_samples.jsonl, eval_samples/, eval_episodes.jsonl, eval_episodes/, eval_scores.jsonl
                                     what each held-out evaluation showed, for the report (vlm_rl.report)
        checkpoints/step-000100/     trainer_state.json, adapter/, accelerate state (RL runs)
        final/                       the trained model: vlm_rl_run.json (RL) or reward_config.json
        best/                        the best evaluation's reward model (reward-model runs)
        report.html                  a run report

    run = RunFolder("runs/ppo_caption")
    metrics_log = run.start(config)                   # main process: run_config.json, fresh metrics
    manager = CheckpointManager(run, save_total_limit=2, is_main_process=True)

Reward-model runs written before this layout kept their metrics in run/metrics.jsonl;
`RunFolder.read_metrics` and `find_metrics_file` read those too.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

RL_RUN_INFO_NAME = "vlm_rl_run.json"
# Equal to vlm_rl.rewards.model.CONFIG_NAME (tested): importing that module costs torch and
# transformers, which `vlm-rl evaluate` and `vlm-rl push` must not pay to read a JSON file.
REWARD_CONFIG_NAME = "reward_config.json"
TRAINER_STATE_NAME = "trainer_state.json"
ADAPTER_NAME = "adapter"
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")

RunKind = Literal["rl", "reward_model"]


class RunFolder:
    """Paths and reading/writing of one run folder; nothing is created until something is written."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config_file = self.root / "run_config.json"
        self.metrics_file = self.root / "metrics.jsonl"
        self.legacy_metrics_file = self.root / "run" / "metrics.jsonl"  # reward-model runs before this layout
        self.tensorboard_dir = self.root / "tensorboard"
        self.samples_file = self.root / "samples.jsonl"
        self.episodes_file = self.root / "episodes.jsonl"  # agent runs
        self.episodes_dir = self.root / "episodes"  # agent runs' film strips
        self.checkpoints_dir = self.root / "checkpoints"
        self.final_dir = self.root / "final"
        self.best_dir = self.root / "best"
        self.report_file = self.root / "report.html"
        # each held-out evaluation's samples, episodes or pair scores (vlm_rl.report.records)
        self.evaluation_file = (
            self.root / "evaluation.json"
        )  # what the evaluations score (`write_evaluation`)
        self.eval_samples_file = self.root / "eval_samples.jsonl"
        self.eval_images_dir = self.root / "eval_samples"
        self.eval_episodes_file = self.root / "eval_episodes.jsonl"
        self.eval_episodes_dir = self.root / "eval_episodes"
        self.eval_scores_file = self.root / "eval_scores.jsonl"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # -- config and metrics ---------------------------------------------------------------------
    def start(
        self,
        config: Any,
        *,
        tensorboard: bool = True,
        resume: bool = False,
        report_to: str | None = None,
        resumed_step: int | None = None,
        evaluates_again: bool = True,
    ) -> MetricsLogger:
        """Begin writing the run (main process only): run_config.json, and a metrics logger that
        mirrors to the trackers of `report_to` (see `MetricsLogger`).

        A fresh run (not `resume`) in an existing folder starts metrics.jsonl and samples.jsonl
        empty (episodes.jsonl too), so its rows never mix with an earlier run's. A resumed one from
        the checkpoint of `resumed_step` first drops what the interrupted run wrote after that
        checkpoint (`rewind`), so no step's rows appear twice.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(config, self.config_file)
        if resume and resumed_step is not None:
            self.rewind(resumed_step, evaluates_again=evaluates_again)
        if not resume:
            self.samples_file.unlink(missing_ok=True)
            self.episodes_file.unlink(missing_ok=True)
            for path in (self.eval_samples_file, self.eval_episodes_file, self.eval_scores_file):
                path.unlink(missing_ok=True)
            for folder in (self.eval_images_dir, self.eval_episodes_dir):
                shutil.rmtree(folder, ignore_errors=True)
        return MetricsLogger(
            self.root,
            tensorboard=tensorboard,
            fresh=not resume,
            report_to=report_to,
            config=config,
            resumed_step=resumed_step if resume else None,
        )

    def rewind(self, step: int, *, evaluates_again: bool = True) -> None:
        """Drop the rows an interrupted run wrote after its checkpoint at `step`: the resumed run
        writes them again. Kept: metrics of steps <= `step` (a metrics row's step counts the
        optimizer steps done), samples and episodes sampled before it (their step counts the steps
        done before sampling: < `step`), and the evaluations up to `step`, or before it when the
        resumed run `evaluates_again` at `step` (RL runs evaluate when they start). Each file is
        replaced atomically; a file without rows to drop is left untouched."""

        def is_eval(row: dict[str, Any]) -> bool:
            return any(key.startswith("eval/") for key in row)

        def metrics_kept(row: dict[str, Any]) -> bool:
            return row["step"] < step or (row["step"] == step and not (evaluates_again and is_eval(row)))

        last_eval = step - 1 if evaluates_again else step
        rules: list[tuple[Path, Callable[[dict[str, Any]], bool]]] = [
            (self.metrics_file, metrics_kept),
            (self.samples_file, lambda row: row["step"] < step),
            (self.episodes_file, lambda row: row["step"] < step),
            *(
                (path, lambda row: row["step"] <= last_eval)
                for path in (self.eval_samples_file, self.eval_episodes_file, self.eval_scores_file)
            ),
        ]
        for path, kept in rules:
            if not path.is_file():
                continue
            lines = path.read_text().splitlines(keepends=True)
            keep = [line for line in lines if line.strip() and kept(json.loads(line))]
            if len(keep) < len(lines):
                tmp = path.with_name(f".{path.name}.tmp")
                _write_synced(tmp, "".join(keep))
                os.replace(tmp, path)

    def write_evaluation(self, description: str, held_out: bool) -> None:
        """Record what the run's evaluations score (main process, before training): `held_out`
        False when they run on training prompts or pairs (a dataset without a held-out split), so
        `vlm-rl evaluate` and the report do not call them held-out. `description`: the recipe's
        closing-line words, e.g. "held-out (200 questions on unseen images; ...)"."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.evaluation_file.with_name(f".{self.evaluation_file.name}.tmp")
        _write_synced(tmp, json.dumps({"held_out": held_out, "description": description}, indent=2))
        os.replace(tmp, self.evaluation_file)

    def read_evaluation(self) -> dict[str, Any] | None:
        """{"held_out": bool, "description": str}, or None for a run that did not record it."""
        return read_json(self.evaluation_file) if self.evaluation_file.is_file() else None

    def evaluation_label(self) -> str:
        """ "Held-out", or "Evaluation (training prompts)" when the run recorded its evaluations
        run on training data; "Held-out" for a run that recorded nothing (runs before the record)."""
        evaluation = self.read_evaluation()
        return "Evaluation (training prompts)" if evaluation and not evaluation["held_out"] else "Held-out"

    def read_config(self) -> dict[str, Any]:
        return read_json(self.config_file)

    def find_metrics_file(self) -> Path | None:
        """metrics.jsonl, else an older reward-model run's run/metrics.jsonl; None when neither exists."""
        return next((path for path in (self.metrics_file, self.legacy_metrics_file) if path.is_file()), None)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged records in order (empty when the run has logged nothing yet)."""
        path = self.find_metrics_file()
        return _read_jsonl(path) if path is not None else []

    # -- samples --------------------------------------------------------------------------------
    def write_samples(self, records: Iterable[dict[str, Any]]) -> None:
        """Append one JSON line per sample (values JSON cannot hold are written as strings)."""
        with self.samples_file.open("a") as f:
            for record in records:
                f.write(json.dumps(record, default=str) + "\n")

    def read_samples(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.samples_file) if self.samples_file.is_file() else []

    # -- saved models and the kind of run -------------------------------------------------------
    def saved_model_info(self, folder: Path) -> Path | None:
        """The file describing the model saved in `folder` (final/, best/): vlm_rl_run.json of an RL
        policy or reward_config.json of a reward model; None when it holds neither."""
        return next(
            (folder / name for name in (RL_RUN_INFO_NAME, REWARD_CONFIG_NAME) if (folder / name).is_file()),
            None,
        )

    @property
    def kind(self) -> RunKind | None:
        """The kind of run by what final/ holds ("rl", "reward_model"); None when unfinished or foreign."""
        info = self.saved_model_info(self.final_dir)
        if info is None:
            return None
        return "rl" if info.name == RL_RUN_INFO_NAME else "reward_model"

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step:06d}"

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first: step-NNNNNN folders holding trainer_state.json, the
        completion marker `CheckpointManager.commit` writes last (temporary folders are hidden, and a
        folder without the marker, left by an interrupted write or deletion, is skipped)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [
            (int(match.group(1)), path)
            for path in self.checkpoints_dir.iterdir()
            if (match := CHECKPOINT_NAME.match(path.name)) and (path / TRAINER_STATE_NAME).is_file()
        ]
        return [path for _, path in sorted(found)]

    def resolve_checkpoint(self, name_or_path: str | Path) -> Path:
        """The checkpoint folder named by "latest", a name ("step-000100") or a path.

        Raises FileNotFoundError naming the saved checkpoints when there is no such checkpoint.
        """
        saved = self.checkpoints()
        listing = ", ".join(path.name for path in saved) or "none"
        if str(name_or_path) == "latest":
            if not saved:
                raise FileNotFoundError(f"no checkpoint to resume from in {self.checkpoints_dir}")
            return saved[-1]
        name = str(name_or_path)
        path = self.checkpoints_dir / name if Path(name).name == name else Path(name)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no checkpoint {name!r}: {path} does not exist; saved checkpoints in "
                f"{self.checkpoints_dir}: {listing}"
            )
        if not (path / TRAINER_STATE_NAME).is_file():
            raise FileNotFoundError(
                f"{path} is not a vlm_rl checkpoint (no {TRAINER_STATE_NAME}: not a checkpoint, or one whose "
                f"write was interrupted); complete checkpoints in {self.checkpoints_dir}: {listing}"
            )
        return path


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint was saved at: its trainer_state.json, else its name (step-000100)."""
    state_file = checkpoint / TRAINER_STATE_NAME
    if state_file.is_file():
        return read_json(state_file)["step"]
    match = CHECKPOINT_NAME.match(checkpoint.name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a checkpoint (no {TRAINER_STATE_NAME}, not named step-N)")
    return int(match.group(1))


# -- checkpoints: atomic saves, rotation, background uploads ------------------------------------
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

        tmp = manager.begin(step)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()           # every rank's files are in tmp
        if accelerator.is_main_process:
            path = manager.commit(tmp, step, {"step": step, ...})
            manager.upload(path, push)    # push(path) runs in the upload thread
        accelerator.wait_for_everyone()
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


# Hidden names of a save in progress (.step-N.tmp), a replaced save (.step-N.old<pid>) and a
# checkpoint being deleted (.step-N.deleting<pid>): what a killed run can leave behind.
STALE_CHECKPOINT_NAME = re.compile(r"^\.step-\d+\.(tmp|old\d+|deleting\d+)$")


def _delete_dir(path: Path) -> None:
    """Delete a checkpoint folder: renamed to a hidden name first, so an interrupted deletion never
    leaves a half-deleted folder under its step-NNNNNN name."""
    hidden = path.with_name(f".{path.name}.deleting{os.getpid()}")
    try:
        path.rename(hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` to disk (a rename must never publish data still in the page cache)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename `tmp` onto `path`; a `path` already there is moved aside first and deleted after."""
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Write a folder atomically: yields a temporary sibling, renamed onto `path` only on success.

    An interrupted or failing write leaves any previous `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, path)


# -- files --------------------------------------------------------------------------------------
TRACKERS = ("tensorboard", "trackio", "wandb")
TRACKER_PROJECT = "vlm_rl"


def parse_report_to(report_to: str | Iterable[str] | None) -> list[str]:
    """The trackers named by `--report_to` ("tensorboard,trackio,wandb", a list, "none"; None =
    tensorboard). Raises ConfigError (a ValueError) naming the known trackers for any other name.

    >>> parse_report_to("tensorboard, wandb"), parse_report_to("none"), parse_report_to(None)
    (['tensorboard', 'wandb'], [], ['tensorboard'])
    """
    if report_to is None:
        return ["tensorboard"]
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [name.strip().lower() for name in names if name.strip()]
    if names in (["none"], []):
        return []
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        from vlm_rl.errors import ConfigError

        raise ConfigError(
            f"--report_to {','.join(names)}: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)} "
            "(comma-separated) or none"
        )
    return list(dict.fromkeys(names))


class MetricsLogger:
    """Appends one JSON line per logging step to `run_dir/metrics.jsonl` and mirrors its finite
    scalars to the trackers of `report_to` (default tensorboard; `tensorboard=False` drops it).
    Only the main process should create one.

    - tensorboard: event files in `run_dir/tensorboard`; a fresh run removes an earlier run's, a
      run resumed from the checkpoint of `resumed_step` hides the steps after it (purge_step).
    - trackio (local-first): its SQLite store, `$TRACKIO_DIR` (default under the Hugging Face cache),
      project "vlm_rl", the run named after the run folder; `trackio show` opens the dashboard.
    - wandb: offline unless $WANDB_MODE says otherwise, files in `run_dir/wandb` (`wandb sync` uploads).
    """

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = True,
        fresh: bool = True,
        report_to: str | Iterable[str] | None = None,
        config: Any = None,
        resumed_step: int | None = None,
    ):
        run = RunFolder(run_dir)
        self.trackers = [t for t in parse_report_to(report_to) if tensorboard or t != "tensorboard"]
        run.root.mkdir(parents=True, exist_ok=True)
        self.run_dir = run.root
        self.path = run.metrics_file
        if fresh:  # a new run (not a resumed one) must not mix its rows with an earlier run's
            self.path.unlink(missing_ok=True)
        settings = _config_dict(config)
        self._writer = self._trackio = self._wandb = None
        if "tensorboard" in self.trackers:
            from torch.utils.tensorboard import SummaryWriter

            if fresh:  # as metrics.jsonl: an earlier run's curves would be drawn as this run's
                for events in run.tensorboard_dir.glob("events.out.tfevents.*"):
                    events.unlink()
            # a resumed run hides what the interrupted one logged after its checkpoint (as `rewind`
            # does in metrics.jsonl; the resumed step's own rows stay)
            purge_step = None if fresh or resumed_step is None else resumed_step + 1
            self._writer = SummaryWriter(log_dir=str(run.tensorboard_dir), purge_step=purge_step)
        if "trackio" in self.trackers:
            trackio = _import_tracker("trackio")
            self._trackio = trackio.init(
                project=TRACKER_PROJECT,
                name=run.root.resolve().name,
                config=settings,
                resume="never" if fresh else "allow",
                embed=False,
            )
        if "wandb" in self.trackers:
            wandb = _import_tracker("wandb")
            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", TRACKER_PROJECT),
                name=run.root.resolve().name,
                dir=str(run.root),
                mode=os.environ.get("WANDB_MODE", "offline"),
                config=settings,
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {
            key: value
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
        }
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, step)
        if self._trackio is not None and scalars:
            self._trackio.log(scalars, step=step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._trackio is not None:
            self._trackio.finish()
        if self._wandb is not None:
            self._wandb.finish()
        self._writer = self._trackio = self._wandb = None


def _import_tracker(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        from vlm_rl.errors import ConfigError

        raise ConfigError(f"--report_to {name} needs the {name} package: pip install {name} ({err})") from err


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    data = asdict(config) if is_dataclass(config) else dict(config)
    return json.loads(json.dumps(data, default=str))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl` (see `RunFolder.read_metrics` for either layout)."""
    return _read_jsonl(RunFolder(run_dir).metrics_file)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_config(config: Any, path: str | Path) -> None:
    """Write a (dataclass) config as JSON, the resolved settings of a run."""
    data = asdict(config) if is_dataclass(config) else dict(config)
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A run file's JSON; the errors say the run folder is incomplete or damaged."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the run folder is incomplete or was not written by vlm_rl"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the run folder is damaged") from err
