"""Metrics: metrics.jsonl, mirrored to the trackers of `--report_to` (tensorboard, trackio, wandb)."""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlm_rl.run_folder.layout import RunFolder, config_dict

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
        settings = config_dict(config)
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


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
