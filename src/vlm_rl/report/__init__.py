"""The run report: `vlm-rl report RUN_DIR` writes RUN_DIR/report.html, one self-contained page
(inline SVG curves, base64 images, no network) that every RL, agent and reward-model run also
writes at its end (and every `--report_steps`).

    from vlm_rl.report import write_report
    write_report("runs/grpo_vqa")

`vlm_rl.report.records` holds what the trainers keep of each held-out evaluation for it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlm_rl.report.page import build_report, write_report

__all__ = ["build_report", "report_at_step", "write_report"]

logger = logging.getLogger(__name__)


def report_at_step(run_dir: str | Path, step: int, report_steps: int, final: bool = False) -> Path | None:
    """Write the report when `final` or every `report_steps` steps (0 = only when final); main
    process only. A failure is logged, never raised: the run's results matter more than its page."""
    if not final and not (report_steps and step % report_steps == 0):
        return None
    try:
        path = write_report(run_dir)
    except Exception:
        logger.exception("the run report could not be written at step %d", step)
        return None
    if final:
        logger.info("run report: %s", path)
    return path
