"""Resuming: drop what an interrupted run wrote after the checkpoint it resumes from."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm_rl.run_folder.durable import replace_file

if TYPE_CHECKING:
    from vlm_rl.run_folder.layout import RunFolder


def drop_rows_after(run: RunFolder, step: int, *, evaluates_again: bool = True) -> None:
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
        (run.metrics_file, metrics_kept),
        (run.samples_file, lambda row: row["step"] < step),
        (run.episodes_file, lambda row: row["step"] < step),
        *(
            (path, lambda row: row["step"] <= last_eval)
            for path in (run.eval_samples_file, run.eval_episodes_file, run.eval_scores_file)
        ),
    ]
    for path, kept in rules:
        if not path.is_file():
            continue
        lines = path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if line.strip() and kept(json.loads(line))]
        if len(keep) < len(lines):
            replace_file(path, "".join(keep))
