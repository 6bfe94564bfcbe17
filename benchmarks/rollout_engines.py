"""Rollout engines and one-step-off rollouts: steps per second, tokens per second and each stage's
share of the step, for HF generate, a vLLM server (synchronous) and a vLLM server one step off.

    python benchmarks/rollout_engines.py                           # agent and grpo, 12 steps each mode
    python benchmarks/rollout_engines.py --recipes agent --steps 20 --out /tmp/engines
    VLM_RL_VLLM_PYTHON=/path/to/.venv-vllm/bin/python python benchmarks/rollout_engines.py

Each (recipe, mode) is one `vlm-rl` run in a subprocess, the runs one after another in the same
invocation, on the same machine state:

- `hf`: transformers' generate in the training process (`--rollout_engine hf`);
- `vllm`: a vLLM server the run starts (`--rollout_engine vllm`), synchronous: generate, then train;
- `vllm_async`: the same server, one step off (`--async_rollouts true`): step t+1 is sampled while
  step t updates.

Every run trains the language model's adapter only (`--train_projector false`, what vLLM can serve),
with one torch thread. The trainer process is pinned to `--trainer_cpus` (default core 1) and the
server to `--server_cpus` (`--vllm_cpus`, default core 0): on 2 cores, one each, as verl's
one-step-off puts rollout and training on separate devices. `hf` uses the trainer's core only.

Read from each run's metrics.jsonl, over the steps after the first `--skip` (the first step of an
async run samples synchronously, and the first steps warm caches): steps per second (1 / mean
`time/step_s`), `perf/tokens_per_s` (prompt + completion tokens per second, verl's
perf/throughput summed over processes), the mean share of the step of each stage (`time/*_share`;
under one-step-off `rollout` is the wait for the rollout sampled during the previous update), the
engine's own time (`time/generate_s`), `rollout/policy_lag` and `rollout/is_ratio_mean`. The
speedup is vllm_async's steps per second over vllm's. Written: `--out`/rollout_engines.json, and a
markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SPEEDUP = 1.5
"""Issue 27: one-step-off steps per second against the synchronous loop, server and trainer on a
core each."""

RECIPES = {
    # the PPO agent recipe (FrozenLake): multi-turn episodes, a critic, 2 epochs
    "agent": ("agent", "--warm_start_steps", "20", "--eval_episodes", "4"),
    # the same with 4 PPO epochs a rollout (OpenAI's and Stable-Baselines' PPO default): the update's
    # time near the rollout's, where overlap can gain most
    "agent_4_epochs": ("agent", "--warm_start_steps", "20", "--eval_episodes", "4", "--ppo_epochs", "4"),
    # the GRPO recipe (easy-vqa): 8 prompts x 16 samples of 3 tokens, one optimizer step
    "grpo": ("grpo", "--max_eval_prompts", "8"),
}
MODES = {
    "hf": (),
    "vllm": ("--rollout_engine", "vllm"),
    "vllm_async": ("--rollout_engine", "vllm", "--async_rollouts", "true"),
}
STAGES = ("rollout", "reward", "score", "advantages", "update")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=12, help="RL steps per run.")
    parser.add_argument("--skip", type=int, default=2, help="First steps left out of the figures.")
    parser.add_argument("--trainer_cpus", default="1", help="Cores of the training process (taskset).")
    parser.add_argument("--server_cpus", default="0", help="Cores of the vLLM server (--vllm_cpus).")
    parser.add_argument("--out", default="benchmarks/out/rollout_engines", help="Runs and the JSON.")
    return parser.parse_args()


def run(recipe: str, mode: str, args: argparse.Namespace, folder: Path) -> dict:
    """One run; its figures from metrics.jsonl."""
    shutil.rmtree(folder, ignore_errors=True)
    command = [
        *(["taskset", "-c", args.trainer_cpus] if shutil.which("taskset") else []),
        sys.executable,
        "-m",
        "vlm_rl.cli",
        *RECIPES[recipe],
        *MODES[mode],
        *(("--vllm_cpus", args.server_cpus) if mode != "hf" else ()),
        "--train_projector", "false",
        "--total_steps", str(args.steps),
        "--eval_steps", "0",
        "--save_steps", "0",
        "--num_threads", "1",
        "--report_to", "none",
        "--seed", "0",
        "--output_dir", str(folder),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{recipe}/{mode} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    steps = [row for row in rows if "time/step_s" in row][args.skip :]
    if not steps:
        raise SystemExit(f"{recipe}/{mode}: no step after the first {args.skip} in {folder}/metrics.jsonl")

    def mean(key: str) -> float | None:
        values = [row[key] for row in steps if key in row]
        return statistics.mean(values) if values else None

    step_s = mean("time/step_s")
    return {
        "steps": len(steps),
        "steps_per_s": 1 / step_s,
        "step_s": step_s,
        "tokens_per_s": mean("perf/tokens_per_s"),
        "completion_tokens_per_s": mean("throughput/tokens_per_s"),
        "generate_s": mean("time/generate_s"),
        "weight_sync_s": mean("time/weight_sync_s"),
        "shares": {stage: mean(f"time/{stage}_share") for stage in STAGES},
        "policy_lag": mean("rollout/policy_lag"),
        "is_ratio_mean": mean("rollout/is_ratio_mean"),
        "wall_s": wall,
        "command": " ".join(command),
    }


def table(results: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| recipe | mode | steps/s | tokens/s | rollout | update | score | engine time (s) | policy lag | IS ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe, modes in results.items():
        for mode, r in modes.items():
            if mode == "speedup":
                continue
            shares = r["shares"]

            def pct(value: float | None) -> str:
                return "—" if value is None else f"{100 * value:.0f}%"

            lines.append(
                f"| {recipe} | {mode} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:.0f} | "
                f"{pct(shares['rollout'])} | {pct(shares['update'])} | {pct(shares['score'])} | "
                f"{r['generate_s']:.2f} | {r['policy_lag'] if r['policy_lag'] is not None else 0:.0f} | "
                f"{'—' if r['is_ratio_mean'] is None else format(r['is_ratio_mean'], '.3f')} |"
            )
        if "speedup" in modes:
            lines.append(
                f"| {recipe} | **one-step-off / sync** | **{modes['speedup']:.2f}x** | | | | | | | |"
            )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    results: dict[str, dict] = {}
    for recipe in args.recipes:
        results[recipe] = {}
        for mode in args.modes:
            print(f"{recipe} / {mode} ...", flush=True)
            results[recipe][mode] = run(recipe, mode, args, out / recipe / mode)
        if "vllm" in results[recipe] and "vllm_async" in results[recipe]:
            speedup = results[recipe]["vllm_async"]["steps_per_s"] / results[recipe]["vllm"]["steps_per_s"]
            results[recipe]["speedup"] = speedup
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    record = {
        "date": datetime.date.today().isoformat(),
        "commit": commit.stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "trainer_cpus": args.trainer_cpus,
        "server_cpus": args.server_cpus,
        "steps": args.steps,
        "skip": args.skip,
        "target_speedup": TARGET_SPEEDUP,
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout_engines.json").write_text(json.dumps(record, indent=2))
    print(table(results))
    print(f"written: {out / 'rollout_engines.json'}")


if __name__ == "__main__":
    main()
