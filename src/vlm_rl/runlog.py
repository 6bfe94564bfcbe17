"""Old import path of the run-folder helpers, which live in `vlm_rl.run_folder` now.

Kept while rl/trainer.py still imports from here; new code imports `vlm_rl.run_folder`.
"""

from vlm_rl.run_folder import MetricsLogger, atomic_dir, read_metrics, save_config

__all__ = ["MetricsLogger", "atomic_dir", "read_metrics", "save_config"]
