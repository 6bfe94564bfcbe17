"""The RL loop: learning, exact resume, skipped steps, errors. Real training steps on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.rewards.compose import CombinedReward
from vlm_rl.rewards.rules import completion_text
from vlm_rl.rl.config import RLConfig
from vlm_rl.rl.rollout import completion_mask_from_ids
from vlm_rl.rl.trainer import RLTrainer, SkippedStep
from vlm_rl.run_folder import RunFolder
from vlm_rl.tasks.easy_vqa import caption_dataset, caption_match


@pytest.fixture(scope="module")
def prompts():
    return caption_dataset("train", num_samples=64, seed=0)


def make_trainer(tmp_path, prompts, reward=None, eval_dataset=None, **overrides) -> RLTrainer:
    torch.manual_seed(0)
    settings = dict(
        algorithm="ppo",
        prompts_per_step=4,
        samples_per_prompt=4,
        minibatch_size=8,
        total_steps=4,
        lr_decay_steps=4,
        eval_steps=0,
        save_steps=0,
        output_dir=str(tmp_path / "run"),
        report_to="none",
        sample_log_steps=1,
        learning_rate=1e-3,
    )
    settings.update(overrides)
    config = RLConfig(**settings)
    model, processor = load_model("tiny-llava")
    policy = wrap_with_lora(model, r=8, alpha=16)
    return RLTrainer(
        config, policy, processor, reward or CombinedReward([caption_match]), prompts, eval_dataset
    )


def trainable_state(trainer: RLTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("algorithms", [("ppo", "grpo", "rloo"), ("gspo", "cispo", "sapo")])
def test_says_red_is_learned_by_every_algorithm(tmp_path, prompts, algorithms):
    """A reward only for answering "red" first: each algorithm (and each policy loss) must raise the
    sampled reward."""

    def says_red(prompts, completions, **columns):
        return [1.0 if completion_text(c).split()[:1] == ["red"] else 0.0 for c in completions]

    for algorithm in algorithms:
        trainer = make_trainer(
            tmp_path / algorithm,
            prompts,
            CombinedReward([says_red]),
            algorithm=algorithm,
            total_steps=12,
            lr_decay_steps=None,
            lr_scheduler_type="constant",
            missing_eos_penalty=0.0,
            entropy_coef=0.0,
            learning_rate=3e-3,
        )
        trainer.train()
        rewards = [
            r["reward/mean"]
            for r in map(json.loads, (tmp_path / algorithm / "run" / "metrics.jsonl").open())
            if "reward/mean" in r
        ]
        assert len(rewards) == 12
        assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, (algorithm, rewards)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, prompts):
    straight = make_trainer(tmp_path / "straight", prompts, total_steps=4, save_steps=2)
    straight.train()
    expected = trainable_state(straight)

    # "Killed" after step 3, its last checkpoint at step 2: the resumed run redoes step 3.
    first = make_trainer(tmp_path / "resumed", prompts, total_steps=3, save_steps=2)
    first.train()
    assert (tmp_path / "resumed" / "run" / "checkpoints" / "step-000002" / "trainer_state.json").exists()
    torch.manual_seed(123)  # a different process state: the checkpoint must restore everything
    second = make_trainer(
        tmp_path / "resumed", prompts, total_steps=4, save_steps=2, resume_from_checkpoint="latest"
    )
    second.train()
    assert second.step == 4
    resumed = trainable_state(second)
    assert expected.keys() == resumed.keys()
    moved = any(
        not torch.equal(v, trainable_state(make_trainer(tmp_path / "fresh", prompts))[k])
        for k, v in expected.items()
    )
    assert moved, "training did not change the weights"
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
    # The resumed run's rows replace what the first one logged after its checkpoint: no step twice.
    run = RunFolder(tmp_path / "resumed" / "run")
    assert [row["step"] for row in run.read_metrics() if "reward/mean" in row] == [1, 2, 3, 4]
    sampled = [row["step"] for row in run.read_samples()]
    assert sorted(set(sampled)) == [0, 1, 2, 3] and all(sampled.count(step) == 16 for step in range(4))


def test_non_finite_reward_skips_the_step_and_leaves_weights_untouched(tmp_path, prompts):
    calls = {"n": 0}

    def sometimes_nan(prompts, completions, **columns):
        calls["n"] += 1
        return [math.nan] * len(completions) if calls["n"] == 2 else [1.0] * len(completions)

    trainer = make_trainer(tmp_path, prompts, CombinedReward([sometimes_nan]), total_steps=1)
    trainer.train_step()  # call 1: a normal step
    trainer.step += 1
    before = trainable_state(trainer)
    metrics = trainer.train_step()  # call 2: NaN
    assert metrics["train/skipped_steps"] == 1
    for name, value in trainable_state(trainer).items():
        assert torch.equal(value, before[name]), name


def test_non_finite_loss_restores_the_weights(tmp_path, prompts):
    trainer = make_trainer(tmp_path, prompts, total_steps=1)
    batch = trainer._batch(prompts, [0, 1, 2, 3])
    rollout = trainer.generate(batch)
    rollout.rewards, _ = trainer.compute_rewards(rollout, batch)
    plan = trainer.plan(len(rollout))
    trainer.compute_logprobs(rollout, plan)
    trainer.compute_advantages(rollout)
    rollout.advantages[1:, :] = float("inf")  # poison all but the first minibatch
    before = trainable_state(trainer)
    with pytest.raises(SkippedStep, match="non-finite loss"):
        trainer.update(rollout, plan)
    for name, value in trainable_state(trainer).items():
        assert torch.equal(value, before[name]), name


def test_run_folder_has_config_metrics_samples_checkpoint_and_adapter(tmp_path, prompts):
    trainer = make_trainer(
        tmp_path, prompts, eval_dataset=prompts.select(range(8)), total_steps=2, save_steps=2, eval_steps=2
    )
    result = trainer.train()
    final = trainer.save_final(result["after"])
    run = tmp_path / "run"
    assert json.loads((run / "run_config.json").read_text())["algorithm"] == "ppo"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    step_rows = [r for r in rows if "reward/mean" in r]
    for key in (
        "reward/caption_match/mean",
        "objective/explained_variance",
        "policy/entropy",
        "policy/clip_fraction",
        "policy/approx_kl",
        "loss/value",
        "completions/mean_length",
        "time/rollout_s",
        "time/update_share",
        "perf/throughput",
        "throughput/tokens_per_s",
    ):
        assert key in step_rows[-1], key
    assert "eval/reward" in rows[0] and "eval/reward" in rows[-1]
    samples = [json.loads(line) for line in (run / "samples.jsonl").open()]
    assert {"image_id", "prompt", "completion", "reward"} <= samples[0].keys()
    assert (run / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors").exists()
    assert (final / "adapter_model.safetensors").exists() and (final / "value_head.safetensors").exists()


def test_throughput_counts_the_steps_tokens_and_the_stages_shares(tmp_path, prompts):
    """verl's perf/*: the step's prompt + completion tokens, per second of the step; each stage's
    time as a share of the step's."""
    trainer = make_trainer(tmp_path, prompts, algorithm="grpo", kl_coef=0.0)
    metrics = trainer.train_step()
    rollout = trainer.last_rollout
    prompt_tokens = rollout.prompt_inputs["attention_mask"].sum(1)[rollout.prompt_index].sum()
    tokens = int(prompt_tokens + rollout.completion_mask.sum())
    assert metrics["perf/total_num_tokens"] == tokens
    assert metrics["perf/throughput"] == pytest.approx(tokens / metrics["time/step_s"])
    assert metrics["perf/tokens_per_s"] == metrics["perf/throughput"]  # one process
    stages = ("rollout", "reward", "score", "advantages", "update")
    for stage in stages:
        assert metrics[f"time/{stage}_share"] == pytest.approx(
            metrics[f"time/{stage}_s"] / metrics["time/step_s"]
        )
    assert sum(metrics[f"time/{stage}_share"] for stage in stages) <= 1


def test_grpo_without_kl_skips_the_reference_pass(tmp_path, prompts):
    trainer = make_trainer(tmp_path, prompts, algorithm="grpo", kl_coef=0.0)
    batch = trainer._batch(prompts, [0, 1])
    rollout = trainer.generate(batch)
    trainer.compute_logprobs(rollout, trainer.plan(len(rollout)))
    assert rollout.ref_logprobs is None and rollout.values is None
    with_kl = make_trainer(tmp_path / "kl", prompts, algorithm="grpo", kl_coef=0.05)
    rollout = with_kl.generate(with_kl._batch(prompts, [0, 1]))
    with_kl.compute_logprobs(rollout, with_kl.plan(len(rollout)))
    # A fresh LoRA adapter (B = 0) leaves the policy equal to the reference.
    torch.testing.assert_close(rollout.ref_logprobs, rollout.old_logprobs)


def test_completion_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 2, 7, 7], [2, 9, 9, 9], [5, 6, 7, 8]])
    mask, ended = completion_mask_from_ids(ids, eos_token_ids=[2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_config_rejects_group_methods_with_one_sample():
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        RLConfig(algorithm="grpo", samples_per_prompt=1)


def test_empty_dataset_is_refused(tmp_path, prompts):
    with pytest.raises(ValueError, match="empty"):
        make_trainer(tmp_path, prompts.select([]))


def test_single_on_policy_step_skips_scoring_with_the_same_result(tmp_path, prompts, monkeypatch):
    """GRPO with one epoch and one optimizer step: old log-probs are the update's own, detached, so
    the scoring pass is skipped; the weights after a step equal those with the scoring pass."""
    settings = dict(algorithm="grpo", minibatch_size=16, total_steps=1, kl_coef=0.0, sample_log_steps=0)
    checks = {
        "one step": ({}, True),
        "two optimizer steps": (dict(minibatch_size=8), False),
        "accumulated into one": (dict(minibatch_size=8, gradient_accumulation_steps=2), True),
        "two epochs": (dict(ppo_epochs=2), False),
        "ppo (critic)": (dict(algorithm="ppo"), False),
        "kl term": (dict(kl_coef=0.1), False),
    }
    for name, (overrides, expected) in checks.items():
        trainer = make_trainer(tmp_path / "check", prompts, **{**settings, **overrides})
        assert trainer._update_is_one_optimizer_step(16) is expected, name
        if name == "accumulated into one":  # accelerate's counter mid-accumulation: it would step early
            trainer.accelerator.step = 1
            assert trainer._update_is_one_optimizer_step(16) is False

    initial = trainable_state(make_trainer(tmp_path / "init", prompts, **settings))
    fast = make_trainer(tmp_path / "fast", prompts, **settings)
    fast.train_step()
    monkeypatch.setattr(RLTrainer, "_update_is_one_optimizer_step", lambda self, num_samples: False)
    full = make_trainer(tmp_path / "full", prompts, **settings)
    full.train_step()

    fast_state, full_state = trainable_state(fast), trainable_state(full)
    assert any(not torch.equal(fast_state[k], v) for k, v in initial.items()), "the step changed nothing"
    for name, value in full_state.items():
        torch.testing.assert_close(fast_state[name], value, rtol=1e-4, atol=1e-6, msg=name)
