"""Cheap losses: the entropy keeps no full-vocabulary tensor for the backward pass (and no graph at
all when its coefficient is 0, as it is then only logged), and a step aborted mid-update leaves the
optimizer's state (AdamW's moments, step counts) as well as the weights as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_rl_trainer import make_trainer

from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.models.value import PolicyWithValue
from vlm_rl.rl import core
from vlm_rl.rl.trainer import SkippedStep
from vlm_rl.tasks.easy_vqa import caption_dataset


def autograd_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_probs = F.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


@pytest.mark.parametrize("chunk", [core.ENTROPY_CHUNK, 7 * 50])  # one chunk; 7 positions at a time
def test_entropy_and_its_gradient_equal_autograds(chunk, monkeypatch):
    monkeypatch.setattr(core, "ENTROPY_CHUNK", chunk)
    logits = (3 * torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(0))).requires_grad_()
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    (core.entropy_from_logits(logits) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    expected = autograd_entropy(logits)
    (expected * weights).sum().backward()
    torch.testing.assert_close(core.entropy_from_logits(logits), expected)
    torch.testing.assert_close(ours, logits.grad, rtol=1e-5, atol=1e-6)


def saved_bytes(function, logits: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of `function(logits)`, beyond `logits` itself."""
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(logits)
    return sum(saved)


def test_entropy_keeps_nothing_of_vocabulary_size_for_backward():
    logits = torch.randn(4, 8, 1000, requires_grad=True)
    full = 4 * 8 * 1000 * 4  # one float32 (N, T, V) tensor
    assert saved_bytes(autograd_entropy, logits) >= 2 * full  # log-softmax and its exp
    assert saved_bytes(core.entropy_from_logits, logits) == 0


def test_entropy_is_only_logged_without_a_graph_when_its_coefficient_is_0():
    torch.manual_seed(0)
    model, processor = load_model("tiny-llava")
    module = PolicyWithValue(wrap_with_lora(model, r=4, alpha=8))
    inputs = processor(text=["<image> what shape ?"], images=[torch.zeros(3, 32, 32)], return_tensors="pt")
    completion_ids = torch.tensor([[5, 6, 7]])
    from vlm_rl.models.inputs import append_completion

    full = append_completion(inputs, completion_ids, torch.ones_like(completion_ids))
    trained = module(full, completion_ids, with_entropy=True)
    logged = module(full, completion_ids, with_entropy=True, entropy_grad=False)
    assert trained["entropy"].requires_grad and not logged["entropy"].requires_grad
    assert logged["logprobs"].requires_grad
    torch.testing.assert_close(trained["entropy"].detach(), logged["entropy"])


def test_aborted_update_restores_the_optimizer_state(tmp_path):
    """A clean first minibatch takes an optimizer step (AdamW's moments move), the second is
    non-finite: the weights and every optimizer state tensor are back to what they were."""
    prompts = caption_dataset("train", num_samples=16, seed=0)
    trainer = make_trainer(tmp_path, prompts, algorithm="grpo", total_steps=2, sample_log_steps=0)
    trainer.train_step()  # AdamW now has moments
    trainer.step += 1
    batch = trainer._batch(prompts, [4, 5, 6, 7])
    rollout = trainer.generate(batch)
    rollout.rewards, _ = trainer.compute_rewards(rollout, batch)
    rollout.rewards[0] += 1.0  # a group with signal in the first minibatch, whatever was sampled
    plan = trainer.plan(len(rollout))
    trainer.compute_logprobs(rollout, plan)
    trainer.compute_advantages(rollout)
    rollout.advantages[8:] = float("inf")  # the second minibatch's loss is not finite
    trainer._minibatches = lambda n, shuffle: iter([torch.arange(0, 8), torch.arange(8, 16)])
    state = {id(p): {k: v.clone() for k, v in trainer.optimizer.state[p].items()} for p in trainer.params}
    weights = [p.detach().clone() for p in trainer.params]
    steps = []
    original_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(1), original_step(*a, **k))[1]
    with pytest.raises(SkippedStep, match="non-finite loss"):
        trainer.update(rollout, plan)
    assert steps, "the first minibatch took no optimizer step: nothing to restore"
    for p, weight in zip(trainer.params, weights, strict=True):
        assert torch.equal(p.detach(), weight)
        restored = trainer.optimizer.state[p]
        assert restored.keys() == state[id(p)].keys()
        for key, value in state[id(p)].items():
            assert torch.equal(restored[key], value), key


@pytest.mark.parametrize(("minibatch_size", "copies"), [(16, 0), (8, 1)])
def test_the_abort_snapshot_is_taken_only_when_a_step_could_be_undone(tmp_path, minibatch_size, copies):
    """One optimizer step per update (the default on-policy GRPO step): nothing to undo after it,
    no copy of the weights and AdamW's state. Two minibatches: one copy, before the first step."""
    prompts = caption_dataset("train", num_samples=16, seed=0)
    trainer = make_trainer(tmp_path, prompts, algorithm="grpo", minibatch_size=minibatch_size, total_steps=1)
    taken = []
    snapshot = trainer._snapshot
    trainer._snapshot = lambda: (taken.append(trainer.optimizer.state_dict()["state"] != {}), snapshot())[1]
    trainer.train_step()
    assert len(taken) == copies
