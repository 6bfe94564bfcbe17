"""Learning benchmark: every default recipe over several seeds, held-out before -> after.

    python benchmarks/learning.py                                   # all recipes, seeds 0 1 2 (hours on CPU)
    python benchmarks/learning.py --recipes grpo rloo --seeds 0 1 2 3 4 --jobs 2 --num_threads 1
    python benchmarks/learning.py --recipes grpo numberline --seeds 0 1 --steps 2 --out /tmp/learning   # smoke test
    python benchmarks/learning.py --report_only --bars              # rewrite the report from the runs on disk

"A figure that a second seed does not reproduce tells a user nothing" (issue 23): each recipe runs
with its default config once per seed, as `python -m vlm_rl.cli <command> --seed S --num_threads T
--output_dir <out>/<recipe>/seed<S>` (the `vlm-rl` entry point), with OMP_NUM_THREADS=T and
HF_HUB_OFFLINE=1, up to `--jobs` runs at a time (default: available cores // T). The held-out
metric before RL (the first evaluation row of the run's metrics.jsonl: step 0, after the recipe's
supervised warm start) and after (its last evaluation row) are read from the run folder, not from
stdout. A recipe that `uses` a reward model gets the one its producer trained with the first seed
(`<out>/<producer>/seed<first>/final`, or the path given): `ppo_caption` is rewarded by
`reward_model`'s (`--reward_model_path`), `frozenlake6_turn_reward`'s turns by
`turn_reward_model`'s (`--turn_reward_model_path`); their runs wait for that one.

Written (cleanrl/openrlbenchmark and rl-baselines3-zoo style): `<docs>/learning.md` (per recipe the
exact command, before -> after per seed, mean and [min, max] of after over seeds, median wall time,
the bar of issue 23 with PASS/FAIL; commit, date and machine), `<docs>/learning.json` (the same
numbers and each run's curves) and `<docs>/learning/<recipe>.svg` (per seed: the held-out metric vs
step, and policy entropy vs step where the run logs it). `<docs>` is `--docs`, else docs/ of this
checkout, except for a smoke test (`--steps N`: every run stopped after N steps with small
evaluations, and the report says so at its top), whose report goes to `--out`.
A run that exits non-zero (or logs no held-out metric) is recorded as failed with the tail of its
stderr, and counts as FAIL for its recipe's bar; each run's stdout and stderr stay beside its
folder (`<out>/<recipe>/seed<S>.stdout.log`, `.stderr.log`) with its record (`seed<S>.json`).
Exit code: 0 when every run finished, 1 when one failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_rl.recipes import CONFIGS
from vlm_rl.report.page import STYLE
from vlm_rl.report.svg import HEIGHT, WIDTH, line_chart
from vlm_rl.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
SMOKE_EVAL_PROMPTS = 8  # held-out prompts / episodes of a smoke test's evaluations
SMOKE_EVAL_PAIRS_IMAGES = 16  # the reward model's held-out images (2 pairs each) in a smoke test
SMOKE_WARM_START_STEPS = 2
SMOKE_AGENT_MAPS = 4  # an agent's maps (prompts) per step in a smoke test (32 and 8 by default)
STDERR_TAIL_LINES = 15


@dataclass(frozen=True)
class Bar:
    """What issue 23 asks of a recipe's held-out metric after RL, over seeds."""

    min: float
    mean: float | None = None

    def __str__(self) -> str:
        return f"min ≥ {self.min:.2f}" + (f", mean ≥ {self.mean:.2f}" if self.mean is not None else "")

    def passes(self, values: list[float]) -> bool:
        return min(values) >= self.min and (self.mean is None or statistics.mean(values) >= self.mean)


@dataclass(frozen=True)
class Recipe:
    """One benchmarked recipe: its `vlm-rl` arguments, the held-out key its metrics.jsonl logs, its bar."""

    args: tuple[str, ...]
    metric: str
    label: str
    bar: Bar | None
    """None: a comparison arm (the turn-reward runs), measured and shown without a verdict."""
    steps_flag: str = "--total_steps"
    smoke: tuple[str, ...] = ("--max_eval_prompts", str(SMOKE_EVAL_PROMPTS))
    """A smoke test's small evaluation (each recipe names its evaluation size its own way) and batch."""
    warm_start: bool = True
    uses: str | None = None
    """The recipe whose first seed's trained reward model (its final/) this recipe's runs get as
    --reward_model_path (`ppo_caption`: "reward_model")."""


FROZENLAKE6 = ("agent", "--env", "frozenlake", "--env_size", "6", "--warm_start_steps", "50")
AGENT_SMOKE = ("--eval_episodes", str(SMOKE_EVAL_PROMPTS), "--prompts_per_step", str(SMOKE_AGENT_MAPS))
RECIPES = {
    "reward_model": Recipe(
        ("train-reward-model",),
        "eval/accuracy",
        "held-out pairwise accuracy",
        Bar(0.95),
        steps_flag="--max_steps",
        smoke=("--max_eval_samples", str(SMOKE_EVAL_PAIRS_IMAGES)),
        warm_start=False,
    ),
    "ppo_caption": Recipe(
        ("ppo",), "eval/caption_accuracy", "held-out caption accuracy", Bar(0.80, 0.85), uses="reward_model"
    ),
    "grpo": Recipe(("grpo",), "eval/accuracy", "held-out answer accuracy", Bar(0.80)),
    "rloo": Recipe(("grpo", "--algorithm", "rloo"), "eval/accuracy", "held-out answer accuracy", Bar(0.75)),
    # GRPO with the projector frozen (what a vLLM server can serve): HF generate, synchronous ...
    "grpo_lm_adapter": Recipe(
        ("grpo", "--train_projector", "false"), "eval/accuracy", "held-out answer accuracy", Bar(0.80)
    ),
    # ... and the same sampled by a vLLM server the run starts (pinned to core 0), one step off
    "grpo_vllm_async": Recipe(
        (
            "grpo",
            "--train_projector",
            "false",
            "--rollout_engine",
            "vllm",
            "--async_rollouts",
            "true",
            "--vllm_cpus",
            "0",
        ),
        "eval/accuracy",
        "held-out answer accuracy",
        Bar(0.80),
    ),  # fmt: skip
    "ppo_agent": Recipe(
        ("agent",), "eval/success_rate", "FrozenLake held-out success", Bar(0.75, 0.85), smoke=AGENT_SMOKE
    ),
    "grpo_agent": Recipe(
        ("agent", "--config", str(CONFIGS / "grpo_agent.yaml")),
        "eval/success_rate",
        "FrozenLake held-out success",
        Bar(0.60),
        smoke=AGENT_SMOKE,
    ),
    "numberline": Recipe(
        ("agent", "--env", "numberline"),
        "eval/success_rate",
        "NumberLine held-out success",
        Bar(0.90),
        smoke=AGENT_SMOKE,
    ),
    # Sokoban 6x6, one box: held-out success after the supervised warm start alone (seed 0) 0.48
    # after 300 steps on 500 rooms' expert turns, 0.39 after 300 on 2,000, 0.68 after 800 on 2,000;
    # from there PPO at the default learning rate 3e-4 eroded it (0.59 after 25 steps) where 1e-4 held
    # it (0.69 after 25 and 50), as on BabyAI
    "sokoban": Recipe(
        (
            "agent",
            "--env",
            "sokoban",
            "--warm_start_steps",
            "800",
            "--expert_warm_start_seeds",
            "2000",
            "--learning_rate",
            "0.0001",
        ),
        "eval/success_rate",
        "Sokoban held-out success",
        Bar(0.50, 0.60),
        smoke=AGENT_SMOKE,
    ),
    # What a learned turn reward buys (docs/turn_reward.md): FrozenLake 6x6 from a short warm start
    # (held-out 0.02), 100 PPO steps, without and with the turn reward model (vlm-rl agent-preferences)
    "turn_reward_model": Recipe(
        ("agent-preferences", "--env", "frozenlake", "--env_size", "6"),
        "eval/accuracy",
        "held-out turn-pair accuracy",
        Bar(0.95),
        steps_flag="--max_steps",
        smoke=("--num_seeds", "20", "--eval_episodes", "10"),
        warm_start=False,
    ),
    "frozenlake6": Recipe(
        FROZENLAKE6, "eval/success_rate", "FrozenLake 6x6 held-out success", None, smoke=AGENT_SMOKE
    ),
    "frozenlake6_turn_reward": Recipe(
        (*FROZENLAKE6, "--reward_model_weight", "0.1"),
        "eval/success_rate",
        "FrozenLake 6x6 held-out success, learned turn reward",
        None,
        smoke=AGENT_SMOKE,
        uses="turn_reward_model",
    ),
    # BabyAI: the default learning rate 3e-4 erodes the warm start within a few PPO steps (0.92 ->
    # 0.72 after 3 on GoToObj); 1e-4 keeps it (docs/agents.md). 50 PPO steps: an RL step costs 2-3x
    # FrozenLake's (49 visual tokens a turn, up to 14 turns)
    "babyai_redball": Recipe(
        ("agent", "--env", "babyai-gotoredballnodists", "--learning_rate", "0.0001", "--total_steps", "50"),
        "eval/success_rate",
        "BabyAI GoToRedBallNoDists held-out success",
        Bar(0.80),
        smoke=AGENT_SMOKE,
    ),
    "babyai_goto_obj": Recipe(
        ("agent", "--env", "babyai-gotoobj", "--learning_rate", "0.0001", "--total_steps", "50"),
        "eval/success_rate",
        "BabyAI GoToObj held-out success",
        Bar(0.80),
        smoke=AGENT_SMOKE,
    ),
}
ENTROPY_KEY = "policy/entropy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--num_threads", type=int, default=1, help="torch threads of each run (and its OMP_NUM_THREADS)"
    )
    parser.add_argument("--jobs", type=int, help="runs at a time (default: available cores // --num_threads)")
    parser.add_argument("--out", type=Path, default=Path("runs/learning"), help="the runs' parent folder")
    parser.add_argument(
        "--docs",
        type=Path,
        help="where learning.md, learning.json and learning/ go (default: docs/ of this checkout; "
        "for a smoke test: --out)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="smoke test: stop every run after N steps, with small evaluations (not a learning figure)",
    )
    parser.add_argument(
        "--reward_model_path",
        type=Path,
        help="ppo_caption's reward model (default: <out>/reward_model/seed<first seed>/final, trained "
        "by the reward_model entry)",
    )
    parser.add_argument(
        "--turn_reward_model_path",
        type=Path,
        help="frozenlake6_turn_reward's turn reward model (default: <out>/turn_reward_model/seed<first "
        "seed>/final, trained by the turn_reward_model entry)",
    )
    parser.add_argument(
        "--bars", action="store_true", help="print each recipe's bar beside its measured min/mean"
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="run nothing: rewrite the report from the records of the runs in --out (same --recipes, --seeds)",
    )
    args = parser.parse_args(argv)
    if (
        args.num_threads < 1
        or (args.jobs is not None and args.jobs < 1)
        or (args.steps is not None and args.steps < 1)
    ):
        parser.error("--num_threads, --jobs and --steps must be >= 1")
    args.jobs = args.jobs or max(1, available_cores() // args.num_threads)
    args.seeds = list(dict.fromkeys(args.seeds))
    args.reward_model_path = (
        args.reward_model_path or args.out / "reward_model" / f"seed{args.seeds[0]}" / "final"
    )
    args.turn_reward_model_path = (
        args.turn_reward_model_path or args.out / "turn_reward_model" / f"seed{args.seeds[0]}" / "final"
    )
    return args


# -- the runs ---------------------------------------------------------------------------------
def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def recipe_args(name: str, args: argparse.Namespace, seed: int | str) -> list[str]:
    """The `vlm-rl` arguments of recipe `name`'s run with `seed` (a number, or "S" for the table)."""
    recipe = RECIPES[name]
    argv = [*recipe.args, "--seed", str(seed), "--num_threads", str(args.num_threads)]
    argv += ["--output_dir", str(args.out / name / f"seed{seed}")]
    if recipe.uses:
        argv += ["--reward_model_path", str(used_model_path(recipe.uses, args))]
    if args.steps:  # smoke test: short run, small evaluations, a midway evaluation for the curves
        argv += [
            recipe.steps_flag,
            str(args.steps),
            *recipe.smoke,
            "--eval_steps",
            str(max(1, args.steps // 2)),
        ]
        if recipe.warm_start:
            argv += ["--warm_start_steps", str(SMOKE_WARM_START_STEPS)]
    return argv


def used_model_path(producer: str, args: argparse.Namespace) -> Path:
    """Where the reward model that recipe `producer` trains (or the one given instead) is."""
    return {"reward_model": args.reward_model_path, "turn_reward_model": args.turn_reward_model_path}[
        producer
    ]


def shown_command(name: str, args: argparse.Namespace) -> str:
    """The exact command of a recipe's runs, with S for the seed and the package config path made
    relative to the checkout."""
    environment = f"OMP_NUM_THREADS={args.num_threads} HF_HUB_OFFLINE=1"
    argv = [arg.replace(str(ROOT) + os.sep, "") for arg in recipe_args(name, args, "S")]
    return f"{environment} vlm-rl {shlex.join(argv)}"


@dataclass
class Job:
    recipe: str
    seed: int
    argv: list[str]
    folder: Path
    process: subprocess.Popen | None = None
    started: float = 0.0

    @property
    def record_file(self) -> Path:
        return self.folder.parent / f"{self.folder.name}.json"

    def log_file(self, stream: str) -> Path:
        return self.folder.parent / f"{self.folder.name}.{stream}.log"


def run_all(args: argparse.Namespace, setting: dict[str, Any]) -> None:
    """Run every (recipe, seed), `args.jobs` at a time; a recipe that uses a reward model after the
    run that trains it. Each finished run's record is written to `<out>/<recipe>/seed<S>.json`."""
    producers = {RECIPES[name].uses for name in args.recipes} - {None}
    # the reward models' runs first: their users' runs wait for one of them
    recipes = sorted(args.recipes, key=lambda name: name not in producers)
    pending = [
        Job(name, seed, recipe_args(name, args, seed), args.out / name / f"seed{seed}")
        for name in recipes
        for seed in args.seeds
    ]
    trains: dict[str, Job | None] = {}  # producer -> the job that trains the model its users get
    for producer in sorted(producers):
        path = used_model_path(producer, args)
        trains[producer] = next((job for job in pending if job.folder / "final" == path), None)
        if trains[producer] is None and not (path / "reward_config.json").is_file():
            users = sorted(name for name in args.recipes if RECIPES[name].uses == producer)
            sys.exit(
                f"{', '.join(users)} need(s) the reward model {path}: add {producer} to --recipes (its first "
                f"seed trains it) or pass --{producer}_path"
            )
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.num_threads), "HF_HUB_OFFLINE": "1"}
    running: list[Job] = []
    records: dict[tuple[str, int], dict[str, Any]] = {}
    print(
        f"{len(pending)} runs, {args.jobs} at a time x {args.num_threads} thread(s), in {args.out}",
        flush=True,
    )

    def done(job: Job, record: dict[str, Any]) -> None:
        records[job.recipe, job.seed] = record
        print(
            f"[{len(records)}/{len(records) + len(pending) + len(running)}] {summary_line(record)}",
            flush=True,
        )

    try:
        while pending or running:
            for job in [job for job in running if job.process.poll() is not None]:
                running.remove(job)
                code = job.process.returncode
                error = None if code == 0 else f"exit code {code}"
                done(job, write_record(job, setting, code, time.perf_counter() - job.started, error))
            for job in list(pending):
                if len(running) >= args.jobs:
                    break
                reward_model = trains.get(RECIPES[job.recipe].uses)
                if reward_model is not None:
                    reward_record = records.get((reward_model.recipe, reward_model.seed))
                    if reward_record is None:
                        continue  # its reward model is still training
                    if not reward_record["ok"]:
                        pending.remove(job)
                        error = (
                            f"its reward model's run ({reward_model.folder}) failed: {reward_record['error']}"
                        )
                        done(job, write_record(job, setting, None, 0.0, error))
                        continue
                pending.remove(job)
                launch(job, environment)
                running.append(job)
            time.sleep(1.0)
    except KeyboardInterrupt:
        for job in running:  # only the processes this script started
            job.process.terminate()
        for job in running:
            job.process.wait()
        raise


def launch(job: Job, environment: dict[str, str]) -> None:
    job.folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"start {job.recipe} seed {job.seed}: vlm-rl {shlex.join(job.argv)}", flush=True)
    with job.log_file("stdout").open("w") as stdout, job.log_file("stderr").open("w") as stderr:
        job.process = subprocess.Popen(
            [sys.executable, "-m", "vlm_rl.cli", *job.argv], stdout=stdout, stderr=stderr, env=environment
        )
    job.started = time.perf_counter()


def write_record(
    job: Job, setting: dict[str, Any], returncode: int | None, wall_s: float, error: str | None
) -> dict[str, Any]:
    """The record of a finished run (`error` None: it exited 0): its held-out metric before ->
    after and curves from the run folder; a run that failed, or logged no held-out metric, has an
    error and the tail of its stderr."""
    record: dict[str, Any] = {
        "recipe": job.recipe,
        "seed": job.seed,
        "command": f"vlm-rl {shlex.join(job.argv)}",
        "output_dir": str(job.folder),
        "returncode": returncode,
        "wall_s": round(wall_s, 1),
        **setting,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if error is None:
        record.update(read_run(job.folder, RECIPES[job.recipe].metric))
        error = record.pop("error", None)
    record["ok"] = error is None
    record["error"] = error
    stderr = job.log_file("stderr")
    record["stderr_tail"] = tail(stderr) if error is not None and stderr.is_file() else None
    job.record_file.parent.mkdir(parents=True, exist_ok=True)
    job.record_file.write_text(json.dumps(record, indent=1) + "\n")
    return record


def read_run(folder: Path, metric: str) -> dict[str, Any]:
    """Held-out `metric` before (first evaluation row) and after (last one), its curve and the
    policy entropy curve from the run's metrics.jsonl, and what the evaluation set is."""
    run = RunFolder(folder)
    records = run.read_metrics()
    curve = [(row["step"], row[metric]) for row in records if isinstance(row.get(metric), (int, float))]
    if not curve:
        return {"error": f"no {metric} in {run.metrics_file}"}
    evaluation = run.read_evaluation() or {}
    return {
        "before": curve[0][1],
        "after": curve[-1][1],
        "before_step": curve[0][0],
        "after_step": curve[-1][0],
        "evaluation": evaluation.get("description"),
        "held_out": evaluation.get("held_out"),
        "curve": [[step, round(value, 5)] for step, value in curve],
        "entropy": [
            [row["step"], round(row[ENTROPY_KEY], 5)]
            for row in records
            if isinstance(row.get(ENTROPY_KEY), (int, float))
        ],
    }


def tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    """The last `lines` lines of a log, progress-bar redraws (carriage returns) counted as lines."""
    data = path.read_bytes()[-20_000:].decode(errors="replace")
    kept = [line.rstrip() for line in data.replace("\r", "\n").split("\n") if line.strip()]
    return "\n".join(kept[-lines:])


def summary_line(record: dict[str, Any]) -> str:
    where = f"{record['recipe']} seed {record['seed']}"
    if not record["ok"]:
        return f"{where}: FAILED ({record['error']}); log: {record['output_dir']}.stderr.log"
    return f"{where}: {record['before']:.3f} -> {record['after']:.3f} ({record['wall_s']:.0f} s)"


# -- the report -------------------------------------------------------------------------------
def git_commit() -> str:
    """`git rev-parse --short HEAD`, plus "+dirty" when tracked files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if changed else "")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "available_cores": available_cores(),
        "torch": importlib.metadata.version("torch"),
        "python": platform.python_version(),
    }


def summarize(args: argparse.Namespace, setting: dict[str, Any]) -> dict[str, Any]:
    """learning.json: the setting, and per recipe its runs' records and the numbers over seeds. The
    setting (step count, commit, benchmark command, jobs, threads) and dates are the runs' own, so
    that --report_only describes the runs, not itself."""
    records = {}
    for name in args.recipes:
        for seed in args.seeds:
            record_file = args.out / name / f"seed{seed}.json"
            missing = {"recipe": name, "seed": seed, "ok": False, "error": f"no run ({record_file} missing)"}
            records[name, seed] = json.loads(record_file.read_text()) if record_file.is_file() else missing
    steps = args.steps or next((run["steps"] for run in records.values() if run.get("steps")), None)
    args = argparse.Namespace(**{**vars(args), "steps": steps})  # the commands as the runs had them
    recipes = {}
    for name in args.recipes:
        recipe = RECIPES[name]
        runs = [records[name, seed] for seed in args.seeds]
        ok = [run for run in runs if run["ok"]]
        after = [run["after"] for run in ok]
        entry: dict[str, Any] = {
            "command": shown_command(name, args),
            "metric": recipe.metric,
            "label": recipe.label,
            "bar": {"min": recipe.bar.min, "mean": recipe.bar.mean} if recipe.bar else None,
            "runs": runs,
            "failed_runs": len(runs) - len(ok),
            "before": spread([run["before"] for run in ok]),
            "after": spread(after),
            "median_wall_s": statistics.median(run["wall_s"] for run in ok) if ok else None,
            "passed": None
            if recipe.bar is None
            else bool(ok) and len(ok) == len(runs) and recipe.bar.passes(after),
        }
        if recipe.uses:
            entry["reward_model_path"] = str(used_model_path(recipe.uses, args))
        recipes[name] = entry

    def of_runs(key: str) -> Any:
        """The runs' value of `key` (a list when they differ; this invocation's when none has it)."""
        values = list(dict.fromkeys(run[key] for run in records.values() if key in run))
        return values[0] if len(values) == 1 else values or setting[key]

    dates = sorted({run["finished"][:10] for run in records.values() if "finished" in run})
    return {
        "smoke_test": steps is not None,
        "steps": steps,
        "command": of_runs("benchmark"),
        "commit": of_runs("commit"),
        "date": " to ".join(dict.fromkeys([dates[0], dates[-1]])) if dates else str(datetime.date.today()),
        "machine": machine(),
        "seeds": args.seeds,
        "jobs": of_runs("jobs"),
        "num_threads": of_runs("num_threads"),
        "recipes": recipes,
    }


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def verdict(entry: dict[str, Any]) -> str:
    if entry["failed_runs"]:
        return f"**FAIL** ({entry['failed_runs']} of {len(entry['runs'])} runs failed)"
    if entry["passed"] is None:
        return "— (no bar: a comparison)"
    return "PASS" if entry["passed"] else "**FAIL**"


def measured(entry: dict[str, Any]) -> str:
    after = entry["after"]
    return f"min {after['min']:.3f}, mean {after['mean']:.3f}" if after else "no finished run"


def markdown(summary: dict[str, Any], svg_folder: str) -> str:
    machine_ = summary["machine"]
    lines = ["# Learning benchmark", ""]
    if summary["smoke_test"]:
        lines += [
            f"> **SMOKE TEST, NOT A LEARNING FIGURE.** Every run stopped after {summary['steps']} step(s) "
            "with small evaluations (`--steps`): these numbers say that the benchmark runs, not what the "
            "recipes learn.",
            "",
        ]

    def joined(value: Any, separator: str = ", ") -> str:
        return separator.join(map(str, value)) if isinstance(value, list) else str(value)

    lines += [
        f"Each recipe with its default config over seed(s) {joined(summary['seeds'])}: the held-out metric before RL (the run's "
        "first evaluation: step 0, after the recipe's supervised warm start; the reward model: before "
        "training) -> after the last step, per seed, and over seeds the mean and [min, max] of *after*. "
        "Numbers are read from each run's metrics.jsonl. A recipe passes when every seed finished and its "
        "*after* values meet the bar of issue 23.",
        "",
        f"Benchmark command: `{joined(summary['command'], '`, `')}`  ",
        f"Commit `{joined(summary['commit'])}`, {summary['date']}; {machine_['cpu']}, {machine_['cores']} cores "
        f"({machine_['available_cores']} available), torch {machine_['torch']}, Python {machine_['python']}; "
        f"{joined(summary['jobs'])} run(s) at a time with {joined(summary['num_threads'])} thread(s) each.",
        "",
        "| recipe | command | metric | before → after, per seed | before: mean | after: mean [min, max] "
        "| median wall time | bar | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["recipes"].items():
        per_seed = "<br>".join(
            f"seed {run['seed']}: {run['before']:.3f} → {run['after']:.3f}"
            if run["ok"]
            else f"seed {run['seed']}: FAILED"
            for run in entry["runs"]
        )
        before, after = entry["before"], entry["after"]
        command = f"`{entry['command']}`"
        if RECIPES[name].uses:
            producer = RECIPES[name].uses
            command += (
                f"<br>every seed is rewarded by the reward model that `{producer}` trained with the first seed "
                f"(`{entry['reward_model_path']}`), not by one of its own; its training time is in {producer}'s row"
            )
        before_mean = f"{before['mean']:.3f}" if before else "-"
        over_seeds = f"{after['mean']:.3f} [{after['min']:.3f}, {after['max']:.3f}]" if after else "-"
        lines.append(
            f"| {name} | {command} | {entry['label']} (`{entry['metric']}`) | {per_seed} | {before_mean} "
            f"| {over_seeds} | {minutes(entry['median_wall_s'])} | {bar_text(entry['bar'])} | {verdict(entry)} |"
        )
    lines += [
        "",
        "S is the seed. Evaluation sets (from each recipe's first finished run's evaluation.json):",
        "",
    ]
    for name, entry in summary["recipes"].items():
        run = next((run for run in entry["runs"] if run["ok"]), None)
        if run is not None:
            held = "" if run.get("held_out") else " — **not held out**"
            lines.append(f"- {name}: {run.get('evaluation') or 'not recorded'}{held}")
    failed = [run for entry in summary["recipes"].values() for run in entry["runs"] if not run["ok"]]
    if failed:
        lines += ["", "## Failed runs", ""]
        for run in failed:
            lines += [f"**{run['recipe']} seed {run['seed']}**: {run['error']}"]
            if run.get("command"):
                lines += ["", f"`{run['command']}`"]
            if run.get("stderr_tail"):
                lines += ["", "```text", run["stderr_tail"], "```"]
            lines.append("")
    lines += [
        "",
        "## Curves",
        "",
        "Per seed: the held-out metric vs step, and policy entropy vs step where logged.",
        "",
    ]
    for name in summary["recipes"]:
        lines += [f"### {name}", "", f"![{name}: per-seed curves]({svg_folder}/{name}.svg)", ""]
    return "\n".join(lines).rstrip() + "\n"


def bar_text(bar: dict[str, float | None] | None) -> str:
    return "none" if bar is None else str(Bar(bar["min"], bar["mean"]))


def svg(name: str, entry: dict[str, Any]) -> str:
    """One SVG file: the report's line charts (vlm_rl.report.svg) of the held-out metric and of
    policy entropy, one series per seed, side by side with the report's chart styles."""
    runs = [run for run in entry["runs"] if run["ok"]]
    charts = [
        line_chart(
            f"{name} held-out {entry['metric'].removeprefix('eval/')}",
            {f"seed {run['seed']}": [tuple(point) for point in run["curve"]] for run in runs},
        ),
        line_chart(
            f"{name} policy entropy",
            {
                f"seed {run['seed']}": [tuple(point) for point in run["entropy"]]
                for run in runs
                if run["entropy"]
            },
        ),
    ]
    charts = [chart for chart in charts if chart]
    width = WIDTH * max(len(charts), 1)
    styles = "\n".join(line for line in STYLE.splitlines() if line.startswith("svg"))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {HEIGHT}" width="{width}" '
        f'height="{HEIGHT}" font-family="Helvetica,Arial,sans-serif">',
        f"<style>{styles}</style>",
        f'<rect width="{width}" height="{HEIGHT}" fill="#fcfcfc"/>',
    ]
    if not charts:
        parts.append(f'<text x="12" y="24" font-size="13">{name}: no finished run</text>')
    for index, chart in enumerate(charts):
        parts.append(f'<g transform="translate({index * WIDTH},0)">{chart}</g>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_report(summary: dict[str, Any], docs: Path) -> Path:
    folder = docs / "learning"
    folder.mkdir(parents=True, exist_ok=True)
    for name, entry in summary["recipes"].items():
        (folder / f"{name}.svg").write_text(svg(name, entry))
    (docs / "learning.json").write_text(json.dumps(summary, indent=1) + "\n")
    path = docs / "learning.md"
    path.write_text(markdown(summary, folder.name))
    return path


def print_results(summary: dict[str, Any], bars: bool) -> None:
    for name, entry in summary["recipes"].items():
        before, after = entry["before"], entry["after"]
        line = f"{name:12} {entry['label']}: "
        if after:
            line += (
                f"before {before['mean']:.3f} -> after {after['mean']:.3f} "
                f"[{after['min']:.3f}, {after['max']:.3f}] over {len(entry['runs']) - entry['failed_runs']} seed(s)"
            )
        else:
            line += "no finished run"
        if entry["failed_runs"]:
            line += f", {entry['failed_runs']} failed"
        print(line)
        if bars:
            print(
                f"{'':12} bar {bar_text(entry['bar'])}: {measured(entry)} -> {verdict(entry).replace('**', '')}"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setting = {  # recorded with each run
        "benchmark": "python benchmarks/learning.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "commit": git_commit(),
        "steps": args.steps,
        "jobs": args.jobs,
        "num_threads": args.num_threads,
    }
    if not args.report_only:
        run_all(args, setting)
    summary = summarize(args, setting)
    # a smoke test's report never lands in docs/ unless asked for (--docs)
    docs = args.docs or (args.out if summary["smoke_test"] else ROOT / "docs")
    path = write_report(summary, docs)
    if summary["smoke_test"]:
        print("SMOKE TEST, NOT A LEARNING FIGURE")
    print_results(summary, args.bars)
    print(f"wrote {path}, {docs / 'learning.json'} and {docs / 'learning'}/*.svg")
    return 1 if any(entry["failed_runs"] for entry in summary["recipes"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
