"""Where a run folder keeps what (`RunFolder`), and reading its files."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vlm_rl.run_folder.durable import replace_file
from vlm_rl.run_folder.rewind import drop_rows_after

if TYPE_CHECKING:
    from vlm_rl.run_folder.trackers import MetricsLogger

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
        from vlm_rl.run_folder.trackers import MetricsLogger  # which builds a RunFolder itself

        return MetricsLogger(
            self.root,
            tensorboard=tensorboard,
            fresh=not resume,
            report_to=report_to,
            config=config,
            resumed_step=resumed_step if resume else None,
        )

    def rewind(self, step: int, *, evaluates_again: bool = True) -> None:
        """Drop the rows an interrupted run wrote after its checkpoint at `step` (see
        `run_folder.rewind.drop_rows_after`): the resumed run writes them again."""
        drop_rows_after(self, step, evaluates_again=evaluates_again)

    def write_evaluation(self, description: str, held_out: bool) -> None:
        """Record what the run's evaluations score (main process, before training): `held_out`
        False when they run on training prompts or pairs (a dataset without a held-out split), so
        `vlm-rl evaluate` and the report do not call them held-out. `description`: the recipe's
        closing-line words, e.g. "held-out (200 questions on unseen images; ...)"."""
        self.root.mkdir(parents=True, exist_ok=True)
        replace_file(
            self.evaluation_file, json.dumps({"held_out": held_out, "description": description}, indent=2)
        )

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


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl` (see `RunFolder.read_metrics` for either layout)."""
    return _read_jsonl(RunFolder(run_dir).metrics_file)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def config_dict(config: Any) -> dict[str, Any]:
    """A (dataclass) config as plain JSON values (what JSON cannot hold written as strings)."""
    if config is None:
        return {}
    data = asdict(config) if is_dataclass(config) else dict(config)
    return json.loads(json.dumps(data, default=str))


def save_config(config: Any, path: str | Path) -> None:
    """Write a (dataclass) config as JSON, the resolved settings of a run."""
    Path(path).write_text(json.dumps(config_dict(config), indent=2) + "\n")


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
