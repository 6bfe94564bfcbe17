"""Run a recipe under accelerate's FSDP on CPU processes (gloo), for tests/test_distributed_engines.py:

    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/scripts/fsdp_on_cpu.py recipes/grpo_vqa.py --total_steps 2 ...

accelerate 1.16 turns an FSDP config into FSDP only from a GPU-like process group (its
AcceleratorState switches to DistributedType.FSDP from MULTI_GPU/MULTI_XPU/..., never from
MULTI_CPU), while torch's FSDP2 itself runs on CPU with gloo. This script starts the CPU (gloo)
process group and presents it to accelerate as MULTI_GPU, so that accelerate's own FSDP2 code
(`fully_shard` in `prepare`, sharded `save_state`/`load_state`, `get_state_dict`) runs what vlm_rl
runs on GPUs. Tests only: without it, vlm_rl refuses an FSDP config on a machine without a GPU.
"""

from __future__ import annotations

import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

if __name__ == "__main__":
    PartialState(cpu=True)  # the gloo process group of the launched ranks
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    recipe, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(recipe, run_name="__main__")
