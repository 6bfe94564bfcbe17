"""Zero-shot generalisation of FrozenLake agents: trained on 4x4 maps, evaluated on larger ones.

    python benchmarks/learning.py --recipes ppo_agent --out runs/learning    # agents trained on 4x4
    python benchmarks/generalisation.py runs/learning/ppo_agent/seed0 runs/learning/ppo_agent/seed1 \
        runs/learning/ppo_agent/seed2 --sizes 4 5 6 --out docs/generalisation.json

Each run's final adapter (`<run>/final`, on the base model its `vlm_rl_run.json` names) plays one
greedy episode on each of 100 held-out maps of each size, through the agent recipe's own
evaluation (`vlm_rl.recipes.ppo_agent.main([... "--env_size", N], evaluate_only=True)`), so the
figure is exactly what `vlm-rl agent` reports as held-out success. No map of any size other than 4
is seen in training, and the 4x4 held-out maps are never seen either. Beside each figure: the random
policy, the best image-blind move distribution and the best fixed move sequence on the same maps.

The frame is the same 32x32 picture at every size: a 5x5 or 6x6 map is drawn into it with smaller
cells (6.4 or 5.3 pixels), so cells no longer coincide with the vision tower's 8x8 patches, and
the episode cap grows with the map (2 * (size - 1) + 2 turns). Both are part of what "novel" means
here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from vlm_rl.recipes.ppo_agent import evaluate_run


def evaluate(run: Path, size: int, episodes: int, num_threads: int) -> dict[str, float]:
    """Held-out success of `run`'s final adapter on `size` x `size` FrozenLake maps, with the baselines."""
    flags = ["--env", "frozenlake", "--env_size", str(size)]
    result = evaluate_run(run, flags, episodes=episodes, num_threads=num_threads)
    return {"success_rate": result["eval"]["eval/success_rate"], **result["baselines"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished `vlm-rl agent` runs on 4x4 FrozenLake")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 5, 6])
    parser.add_argument("--eval_episodes", type=int, default=100, help="held-out maps per size")
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.num_threads))
    figures: dict = {"runs": [str(run) for run in args.runs], "sizes": {}}
    for size in args.sizes:
        rows = [evaluate(run, size, args.eval_episodes, args.num_threads) for run in args.runs]
        success = [row["success_rate"] for row in rows]
        figures["sizes"][str(size)] = {
            "success_rate": success,
            "mean": statistics.mean(success),
            "min": min(success),
            "max": max(success),
            # the baselines do not depend on the run: the same maps for every run
            **{name: value for name, value in rows[0].items() if name != "success_rate"},
        }
        shown = ", ".join(
            f"{name.replace('_', ' ')} {value:.3f}"
            for name, value in rows[0].items()
            if name != "success_rate"
        )
        print(
            f"{size}x{size}: held-out success mean {statistics.mean(success):.3f} "
            f"[{min(success):.3f}, {max(success):.3f}] over {len(success)} runs ({shown})",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
