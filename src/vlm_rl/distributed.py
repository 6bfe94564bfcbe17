"""The Accelerator every vlm_rl job uses (one place for launch-environment quirks)."""

from __future__ import annotations

import atexit
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs


def make_accelerator(gradient_accumulation_steps: int = 1) -> Accelerator:
    """An Accelerator for the current launch.

    Launched with several processes on a machine without GPUs (`accelerate launch --multi_gpu
    --num_processes 2` or `torchrun`), accelerate would otherwise give each rank a separate
    single-process state; `cpu=True` makes them one MULTI_CPU (gloo) group. A DeepSpeed config runs
    there too (DeepSpeed's CPU accelerator over gloo); an FSDP config is refused (`ConfigError`):
    accelerate runs FSDP only on GPUs, and the run would silently be plain data parallel.
    """
    distributed_without_gpu = launched_processes() > 1 and not torch.cuda.is_available()
    if distributed_without_gpu and _launched_with("DEEPSPEED"):
        accelerator = Accelerator(
            gradient_accumulation_steps=gradient_accumulation_steps,
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
        )
    else:
        accelerator = Accelerator(
            gradient_accumulation_steps=gradient_accumulation_steps, cpu=distributed_without_gpu
        )
    if _launched_with("FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        from vlm_rl.errors import ConfigError

        raise ConfigError(
            f"the accelerate config asks for FSDP, but accelerate made this a {accelerator.distributed_type} "
            "run: accelerate runs FSDP only on GPUs (from a MULTI_GPU-like process group, never MULTI_CPU). "
            "On CPUs use recipes/accelerate/multi_cpu.yaml (data parallel) or zero2.yaml/zero3.yaml "
            "(DeepSpeed on its CPU accelerator); see docs/distributed.md"
        )
    if launched_processes() > 1:
        # The process group ends before the interpreter does (as torch.distributed asks): left to
        # the interpreter's teardown, gloo's threads once aborted a rank that had finished its run
        # ("terminate called without an active exception", exit -6) in a loaded make test.
        atexit.register(_end_process_group)
    return accelerator


def _end_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _launched_with(engine: str) -> bool:
    """Whether the accelerate config asks for `engine` ("FSDP", "DEEPSPEED"): `accelerate launch`
    passes it as ACCELERATE_USE_<engine>."""
    return os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"


def launched_processes() -> int:
    """How many processes this launch runs (the launcher's WORLD_SIZE; 1 without one), known before
    any Accelerator exists."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_prompts_per_step(prompts_per_step: int, num_processes: int) -> None:
    """Every process samples `prompts_per_step / num_processes` prompts a step: a `ConfigError`
    (a ValueError) when they do not divide."""
    if prompts_per_step % num_processes:
        from vlm_rl.errors import ConfigError

        raise ConfigError(
            f"--prompts_per_step {prompts_per_step}: must be divisible by the {num_processes} processes"
        )
