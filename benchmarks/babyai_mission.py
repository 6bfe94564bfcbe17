"""Does a BabyAI agent read its mission? Held-out success of a finished run with and without it.

    python benchmarks/babyai_mission.py runs/babyai/seed0 --env babyai-gotoobj
    python benchmarks/babyai_mission.py runs/babyai/seed0 --env babyai-gotoobj --out mission.json -- --context_frames 2

The run's final adapter (`<run>/final`, on the base model its `vlm_rl_run.json` names) plays one
greedy episode on each held-out seed of `--env` twice: with the mission in every prompt, as in
training, and with it blanked (`make_env(..., blank_mission=True)`: the same frames and seeds, the
prompt holds only "action : left , right or forward ?"). Both go through the agent recipe itself
(`vlm_rl.recipes.ppo_agent.main(["--init_adapter", "<run>/final", ...], evaluate_only=True)`), so
they are evaluated exactly as the run's own held-out evaluation is (`EpisodeRollouts.evaluate`). A policy
reads the mission where the first figure beats the second; the issue's bar is held-out success >= 0.8
over 3 seeds, above the blanked figure. Flags after `--` go to the recipe (the run's own protocol
flags, such as --context_frames or --max_turns, where it used other than the defaults).

Prints one JSON object and writes it to `--out` (default `<run>/mission_blank.json`): success rate,
return and length with and without the mission, the uniform-random baseline on the same seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vlm_rl.recipes.ppo_agent import evaluate_run


def evaluate(run: Path, env: str, episodes: int, num_threads: int, extra: list[str], blank: bool) -> dict:
    """Held-out metrics of `run`'s final adapter on `env`, the mission blanked or not."""
    result = evaluate_run(
        run,
        ["--env", env, *extra],
        episodes=episodes,
        num_threads=num_threads,
        env_options={"blank_mission": True} if blank else None,
    )
    return {**{k.removeprefix("eval/"): v for k, v in result["eval"].items()}, **result["baselines"]}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished `vlm-rl agent` run folder (with final/)")
    parser.add_argument("--env", required=True, help="the BabyAI env it was trained on, e.g. babyai-gotoobj")
    parser.add_argument("--eval_episodes", type=int, default=100, help="held-out seeds (at most 100)")
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="the JSON file (default <run>/mission_blank.json)")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.num_threads))
    with_mission = evaluate(args.run, args.env, args.eval_episodes, args.num_threads, extra, blank=False)
    blanked = evaluate(args.run, args.env, args.eval_episodes, args.num_threads, extra, blank=True)
    figures = {
        "run": str(args.run),
        "env": args.env,
        "held_out_episodes": args.eval_episodes,
        "with_mission": {k: v for k, v in with_mission.items() if k != "random"},
        "mission_blanked": {k: v for k, v in blanked.items() if k != "random"},
        "random": with_mission["random"],
        "reads_the_mission": with_mission["success_rate"] > blanked["success_rate"],
    }
    (args.out or args.run / "mission_blank.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
