"""Reward-model training step: each pair's prompt forwarded once for its chosen and rejected answers
against the two full sequences.

    python benchmarks/reward_step.py                               # mid Qwen2.5-VL-style, 1 thread
    python benchmarks/reward_step.py --config tiny --pairs 32 --rounds 5
    python benchmarks/reward_step.py --model tiny-llava            # a tiny default (or a folder, hub id)

The step is the reward trainer's: `PreferenceCollator` (with `shared_prefix` on or off), the
Bradley-Terry loss on `score_pairs`, backward, an AdamW step, on `--pairs` easy-vqa caption
preference pairs (chosen: the true caption, rejected: a wrong one). The model is a random
Qwen2.5-VL-style VLM of `--config` (benchmarks/model_sizes.py: 64 visual tokens per image) with the
trainer's LoRA (r 16) and trained projector, unless `--model` names another. After a warm-up step of
each, `--rounds` rounds run one step of each in alternating order (shared first in even rounds), so
both see the same machine load; prints the median seconds per step of each, their ratio, the tokens
each forwards, and the largest reward difference between the two on the same batch (exactness).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="mid", help="benchmarks/model_sizes.py preset (tiny, mid, ...).")
    parser.add_argument(
        "--model", default=None, help="Another backbone: a tiny default name, folder or hub id."
    )
    parser.add_argument("--pairs", type=int, default=16, help="Preference pairs per step.")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds (one step of each per round).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/score_throughput.py
    import torch

    torch.set_num_threads(args.threads)
    from model_sizes import build, describe

    from vlm_rl.data.collators import PreferenceCollator
    from vlm_rl.rewards.model import RewardModel
    from vlm_rl.rewards.trainer import bradley_terry_loss, score_pairs
    from vlm_rl.tasks.easy_vqa import caption_preference_dataset

    with tempfile.TemporaryDirectory() as folder:
        if args.model is None:
            described = describe(args.config, build(args.config, Path(folder)))
            model = folder
        else:
            described, model = args.model, args.model
        torch.manual_seed(0)
        reward_model = RewardModel.from_base(model)
    scorer = reward_model.scorer.train()
    optimizer = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=1e-5)
    rows = list(caption_preference_dataset("train", num_samples=args.pairs, seed=0))
    collators = {
        shared: PreferenceCollator(reward_model.processor, shared_prefix=shared) for shared in (True, False)
    }
    tokens: dict[bool, int] = {}
    embeddings = scorer.backbone.get_input_embeddings()
    calls: list[tuple[int, ...]] = []
    embeddings.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape)))

    def step(shared: bool) -> float:
        calls.clear()
        start = time.perf_counter()
        batch = collators[shared](rows)
        assert (batch.groups is not None) == shared, "the texts did not tokenize apart: nothing to share"
        chosen, rejected = score_pairs(scorer, batch)
        loss = bradley_terry_loss(chosen, rejected, None, 0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds = time.perf_counter() - start
        tokens[shared] = sum(r * t for r, t in calls)
        return seconds

    with torch.no_grad():
        rewards = {
            shared: torch.cat(score_pairs(scorer, collators[shared](rows))) for shared in (True, False)
        }
    difference = (rewards[True] - rewards[False]).abs().max().item()
    for shared in (True, False):  # warm-up
        step(shared)
    times: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds):
        for shared in (True, False) if round_ % 2 == 0 else (False, True):
            times[shared].append(step(shared))
    shared_s, full_s = statistics.median(times[True]), statistics.median(times[False])
    print(f"{described}; {args.pairs} pairs per step, {args.threads} thread(s), {args.rounds} rounds")
    print(f"shared prefix: {shared_s:.3f} s per step ({tokens[True]} tokens forwarded)")
    print(f"full sequences: {full_s:.3f} s per step ({tokens[False]} tokens forwarded)")
    print(f"max |reward difference| on one batch: {difference:.2e}")
    print(f"shared / full: {shared_s / full_s:.2f}x the step time")


if __name__ == "__main__":
    main()
