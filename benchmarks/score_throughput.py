"""Reward-model scoring throughput: batched `RewardModel.score` against one call per sample.

    python benchmarks/score_throughput.py                      # make bench
    python benchmarks/score_throughput.py --model tiny-qwen2.5-vl --n 512 --batch-size 64 --threads 1

Scores n (image, prompt, completion) triples from easy-vqa's test split (the true caption for even
samples, a wrong one for odd samples, so batches hold sequences of different lengths) with an
untrained reward model: the speed does not depend on the weights. The batched path forwards each
prompt once for its two completions (`RewardModel.shared_prefix`); it is also timed with full
sequences. The paths are warmed up first and must give the same scores. Prints samples/s of each,
the batched/per-sample speed-up and the shared/full ratio.
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="tiny-llava", help="Backbone VLM: a tiny default name, hub id or folder."
    )
    parser.add_argument("--n", type=int, default=256, help="Number of (image, prompt, completion) triples.")
    parser.add_argument("--batch-size", type=int, default=32, help="Batch size of the batched path.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # OpenMP's default spin-waiting collapses under contention: on the shared 2-core machines 2 threads
    # scored 18 samples/s with the default policy and 518 with PASSIVE (read when torch loads libgomp).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)

    from vlm_rl.rewards.model import RewardModel
    from vlm_rl.tasks.easy_vqa import caption_preference_dataset

    # Data: n triples, alternating true and wrong captions
    pairs = caption_preference_dataset("test", num_samples=(args.n + 1) // 2, seed=0)
    images = [row_images for row_images in pairs["images"] for _ in range(2)][: args.n]
    prompts = [prompt for prompt in pairs["prompt"] for _ in range(2)][: args.n]
    completions = [text for pair in zip(pairs["chosen"], pairs["rejected"], strict=True) for text in pair][
        : args.n
    ]
    if len(completions) < args.n:
        raise SystemExit(f"easy-vqa's test split has only {len(completions)} triples; use --n <= that")

    # Model
    rm = RewardModel.from_base(args.model)
    parameters = sum(p.numel() for p in rm.scorer.parameters())

    # Warm-up: one batch and one single sample
    rm.score(
        images[: args.batch_size],
        prompts[: args.batch_size],
        completions[: args.batch_size],
        batch_size=args.batch_size,
    )
    rm.score(images[:1], prompts[:1], completions[:1], batch_size=1)

    # Timing
    start = time.perf_counter()
    batched = rm.score(images, prompts, completions, batch_size=args.batch_size)
    batched_s = time.perf_counter() - start
    rm.shared_prefix = False  # each row's full sequence, the prompt forwarded once per row
    start = time.perf_counter()
    whole = rm.score(images, prompts, completions, batch_size=args.batch_size)
    whole_s = time.perf_counter() - start
    rm.shared_prefix = True
    start = time.perf_counter()
    per_sample = [
        rm.score([i], [p], [c], batch_size=1)[0] for i, p, c in zip(images, prompts, completions, strict=True)
    ]
    per_sample_s = time.perf_counter() - start

    max_diff = max(
        (torch.tensor(batched) - torch.tensor(scores)).abs().max().item() for scores in (per_sample, whole)
    )
    print(f"model {args.model} ({parameters / 1e6:.2f} M parameters), n={args.n}, threads={args.threads}")
    print(f"batched (batch size {args.batch_size}): {args.n / batched_s:8.1f} samples/s ({batched_s:.2f} s)")
    print(f"batched, full sequences: {args.n / whole_s:8.1f} samples/s ({whole_s:.2f} s)")
    print(f"per-sample loop:            {args.n / per_sample_s:8.1f} samples/s ({per_sample_s:.2f} s)")
    print(f"max |batched - other path| score difference: {max_diff:.2e}")
    print(f"batched/per-sample speed-up: {per_sample_s / batched_s:.1f}x")
    print(f"shared prefix / full sequences: {batched_s / whole_s:.2f}x the batched scoring time")
    if max_diff > 1e-4:
        raise SystemExit(f"the paths' scores differ by {max_diff:.2e}")


if __name__ == "__main__":
    main()
