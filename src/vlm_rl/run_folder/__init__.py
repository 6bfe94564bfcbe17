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

One module a job: layout.py (where what lives, reading it, starting a run), rewind.py (a resumed
run drops what the killed one wrote after its checkpoint), durable.py (fsync and atomic renames),
checkpointing.py (`CheckpointManager`: atomic saves, rotation, the upload thread) and trackers.py
(`MetricsLogger`: metrics.jsonl and the trackers of `--report_to`). Import every name from here.
"""

from vlm_rl.run_folder.checkpointing import STALE_CHECKPOINT_NAME, CheckpointManager
from vlm_rl.run_folder.durable import atomic_dir, replace_file
from vlm_rl.run_folder.layout import (
    ADAPTER_NAME,
    CHECKPOINT_NAME,
    REWARD_CONFIG_NAME,
    RL_RUN_INFO_NAME,
    TRAINER_STATE_NAME,
    RunFolder,
    RunKind,
    checkpoint_step,
    config_dict,
    read_json,
    read_metrics,
    save_config,
)
from vlm_rl.run_folder.layout import (
    _read_jsonl as _read_jsonl,
)
from vlm_rl.run_folder.rewind import drop_rows_after
from vlm_rl.run_folder.trackers import (
    TRACKER_PROJECT,
    TRACKERS,
    MetricsLogger,
    parse_report_to,
)

__all__ = [
    "ADAPTER_NAME",
    "CHECKPOINT_NAME",
    "REWARD_CONFIG_NAME",
    "RL_RUN_INFO_NAME",
    "STALE_CHECKPOINT_NAME",
    "TRACKERS",
    "TRACKER_PROJECT",
    "TRAINER_STATE_NAME",
    "CheckpointManager",
    "MetricsLogger",
    "RunFolder",
    "RunKind",
    "atomic_dir",
    "checkpoint_step",
    "config_dict",
    "drop_rows_after",
    "parse_report_to",
    "read_json",
    "read_metrics",
    "replace_file",
    "save_config",
]
