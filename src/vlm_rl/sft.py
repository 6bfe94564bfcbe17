"""Supervised warm start: teach the policy a task's answers before RL (as every RLHF pipeline does).

Cross-entropy on the completion tokens only (answer + EOS), through the same prompt rendering,
collator and completion-only log-prob pass the RL engine uses, so what SFT teaches is exactly
what RL later samples.
"""

from __future__ import annotations

import logging

import datasets
import torch
from transformers import ProcessorMixin

from vlm_rl.data.collators import PromptCollator
from vlm_rl.models.families import completion_token_type
from vlm_rl.models.inputs import append_completion
from vlm_rl.models.value import PolicyWithValue
from vlm_rl.rl.core import masked_mean

logger = logging.getLogger(__name__)


def completion_tensors(processor: ProcessorMixin, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of each text followed by EOS, right-padded: ids (N, T), mask (N, T)."""
    tokenizer = processor.tokenizer
    rows = [
        tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts
    ]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def supervised_warm_start(
    policy: torch.nn.Module,
    processor: ProcessorMixin,
    dataset: datasets.Dataset,
    *,
    steps: int,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    answer_column: str = "answer",
    seed: int = 0,
) -> list[float]:
    """Train `policy` (LoRA) for `steps` batches on (prompt, images) -> `answer_column`.

    Returns the loss of each step.
    """
    if steps <= 0:
        return []
    if answer_column not in dataset.column_names:
        raise ValueError(f"SFT needs an {answer_column!r} column; the dataset has {dataset.column_names}")
    module = PolicyWithValue(policy)
    collator = PromptCollator(processor)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    losses = []
    policy.train()
    for _ in range(steps):
        rows = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
        batch = collator([dataset[i] for i in rows])
        ids, mask = completion_tensors(processor, batch.columns[answer_column])
        inputs = append_completion(batch.inputs, ids, mask, completion_token_type(policy)).to(device)
        logprobs = module(inputs, ids.to(device))["logprobs"]
        loss = -masked_mean(logprobs, mask.to(device).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    logger.info("supervised warm start: %d steps, loss %.3f -> %.3f", steps, losses[0], losses[-1])
    return losses
