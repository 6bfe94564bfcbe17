"""GRPO on TRL's GRPOTrainer (`--trainer trl`), fed by vlm_rl's policy, data, rewards and evaluation.

    vlm-rl grpo --trainer trl
    accelerate launch recipes/grpo_vqa.py --trainer trl                    # the same, from a checkout
    accelerate launch recipes/grpo_vqa.py --trainer trl --use_vllm true    # GPU + vllm: TRL's vLLM rollouts
    ... --use_vllm true --vllm_mode server        # with `trl vllm-serve --model <policy folder>` running

Why a second engine: TRL's brings vLLM generation (colocated or a server) and its loss variants;
vlm_rl brings what TRL lacks for VLMs: the loader and structural LoRA targets (`build_policy`), the
tasks, the rule rewards and the learned multimodal reward model, which needs the images (TRL hands
every dataset column, `images` included, to each reward function), and the held-out evaluation.
The held-out prompts are scored by the native engine's own evaluation (`PromptRollouts.evaluate`) before and after training, so the
closing line is computed exactly as the native engine's and the two compare directly.

One RL step = one generation of prompts_per_step x samples_per_prompt completions (TRL's
generation_batch_size), trained on in k = (samples per process / minibatch_size) x ppo_epochs /
gradient_accumulation_steps optimizer steps. TRL counts optimizer steps, so every step-counted flag
(total_steps, warmup_steps, logging_steps, save_steps, eval_steps) is multiplied by k; metrics.jsonl
is written at RL steps, as the native engine's.

    vlm_rl flag                     TRL GRPOConfig
    samples_per_prompt              num_generations
    prompts_per_step x samples      generation_batch_size; minibatch_size -> per_device_train_batch_size
    ppo_epochs                      num_iterations
    max_new_tokens                  max_completion_length
    temperature, top_p              temperature, top_p (top_k 0 on both)
    kl_coef, kl_importance_weighted beta, use_bias_correction_kl (TRL's KL is k3: kl_estimator k3)
    clip_range, clip_range_high     epsilon, epsilon_high
    loss_aggregation                loss_type: token -> dapo, sequence -> grpo, fixed -> dr_grpo
    algorithm (the policy loss)     `TRL_LOSSES`: grpo -> the loss_type above; gspo -> the same with
                                    importance_sampling_level "sequence"; cispo -> loss_type cispo
                                    (aggregation token), epsilon_high = 1 + clip_range_high; sapo ->
                                    loss_type sapo (aggregation sequence), sapo_temperature_pos/neg
    scale_rewards                   scale_rewards: group (True) / none (False)
    entropy_coef                    entropy_coef
    learning_rate, lr_scheduler_type, weight_decay, max_grad_norm, gradient_accumulation_steps, seed
    reward (rules, reward model)    reward_funcs[0]: the CombinedReward; each component is logged as
                                    rewards/<name>/mean through TRL's log_metric
    missing_eos_penalty             reward_funcs[1]: missing_eos (-1 without EOS), weight = the penalty
    overlong_buffer, _penalty       reward_funcs[2]: TRL's get_soft_overlong_punishment(max_new_tokens,
                                    overlong_buffer), weight = overlong_penalty
    use_vllm, vllm_mode             use_vllm, vllm_mode
    output_dir                      run_config.json, metrics.jsonl, tensorboard/, final/ as native;
                                    TRL's checkpoints in checkpoints/checkpoint-N (resume: latest|path)

Not mapped (one error names every such flag set away from its default): --algorithm ppo and rloo,
--kl_importance_weighted with gspo (TRL weights the KL by the sequence ratio), dynamic_sampling,
adaptive_kl (target_kl, kl_horizon), lr_decay_steps other than total_steps, kl_estimator other
than k3, the PPO-only and agent-only fields, sample_log_steps, hub_push_checkpoints.
Kept different: TRL's KL reference is a frozen copy of the starting adapter (native: the adapter
disabled; the same policy for a fresh adapter, not for --init_adapter), and with --use_vllm vLLM
samples (TRL only suppresses the image token there; without vLLM every special token but EOS is
suppressed, as native). Both train in the model's own dtype (no autocast).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from transformers import ProcessorMixin, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from vlm_rl.models.value import PolicyWithValue
from vlm_rl.report import report_at_step
from vlm_rl.rewards.compose import CombinedReward
from vlm_rl.rl.components import EvalMetric, PromptRollouts, RewardStage, TrainedPolicy
from vlm_rl.rl.config import RLConfig
from vlm_rl.rl.rollout import eos_token_ids, suppressed_tokens
from vlm_rl.run_folder import MetricsLogger, RunFolder

logger = logging.getLogger(__name__)

LOSS_TYPES = {"token": "dapo", "sequence": "grpo", "fixed": "dr_grpo"}
"""loss_aggregation -> TRL's loss_type (the same normalisations: DAPO, GRPO, Dr. GRPO)."""


def _clipped(config: RLConfig) -> dict[str, Any]:
    return {
        "loss_type": LOSS_TYPES[config.loss_aggregation],
        "epsilon": config.clip_range,
        "epsilon_high": config.clip_range_high,
    }


def _aggregated_as(config: RLConfig, aggregation: str, loss_type: str) -> None:
    if config.loss_aggregation != aggregation:
        raise ValueError(
            f"--trainer trl: TRL's loss_type {loss_type} aggregates as --loss_aggregation {aggregation}, not "
            f"{config.loss_aggregation}; set it, or run with --trainer native"
        )


def _gspo(config: RLConfig) -> dict[str, Any]:
    if config.kl_importance_weighted:
        raise ValueError(
            "--trainer trl cannot map --kl_importance_weighted with --algorithm gspo (TRL weights the KL by "
            "the sequence ratio, vlm_rl by each token's). Drop it, or run with --trainer native"
        )
    return {**_clipped(config), "importance_sampling_level": "sequence"}


def _cispo(config: RLConfig) -> dict[str, Any]:
    _aggregated_as(config, "token", "cispo")
    upper = config.clip_range if config.clip_range_high is None else config.clip_range_high
    return {"loss_type": "cispo", "epsilon_high": 1.0 + upper}  # TRL's epsilon_high is the bound itself


def _sapo(config: RLConfig) -> dict[str, Any]:
    _aggregated_as(config, "sequence", "sapo")
    return {
        "loss_type": "sapo",
        "sapo_temperature_pos": config.sapo_temperature_pos,
        "sapo_temperature_neg": config.sapo_temperature_neg,
    }


TRL_LOSSES: dict[str, Callable[[RLConfig], dict[str, Any]]] = {
    "grpo": _clipped,
    "gspo": _gspo,
    "cispo": _cispo,
    "sapo": _sapo,
}
"""--algorithm -> the GRPOConfig fields of its policy loss and aggregation (TRL's loss_type); an
algorithm missing here has no TRL counterpart (`RLConfig` refuses it with --trainer trl)."""


def shaping_rewards(
    config: RLConfig, eos_ids: Sequence[int] = ()
) -> list[tuple[Callable[..., list[float]], float]]:
    """The native engine's reward shaping as TRL reward functions with their weights: the missing-EOS
    penalty and, with --overlong_buffer, TRL's own soft overlong punishment (DAPO eq. 13)."""
    rewards = [(missing_eos(eos_ids), config.missing_eos_penalty)]
    if config.overlong_buffer:
        from trl.rewards import get_soft_overlong_punishment

        punishment = get_soft_overlong_punishment(config.max_new_tokens, config.overlong_buffer)
        rewards.append((punishment, config.overlong_penalty))
    return rewards


def check_mappable(config: RLConfig) -> None:
    """Raise one error naming every flag (set away from its default) that the native engine acts on
    and TRL's GRPOTrainer cannot honour (the rules: `vlm_rl.recipes.flags`)."""
    from vlm_rl.recipes.flags import Run, rules_for

    TRL_LOSSES[config.algorithm](config)  # raises for a loss setting TRL cannot take
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(RLConfig)}
    defaults = {f.name: f.default for f in dataclasses.fields(RLConfig)}
    native, trl = (
        Run("grpo_vqa", {**values, "trainer": "native"}),
        Run("grpo_vqa", {**values, "trainer": "trl"}),
    )
    problems = [
        f"--{name} ({why})"
        for name, rule in rules_for("grpo_vqa", values).items()
        if values[name] != defaults[name] and (why := rule(trl)) and not rule(native)
    ]
    if problems:
        raise ValueError(
            f"--trainer trl cannot map {'; '.join(problems)}. Drop them, or run with --trainer native"
        )


def minibatch_plan(config: RLConfig, num_processes: int) -> tuple[int, int]:
    """(per_device_train_batch_size, optimizer steps per RL step) for TRL, from the native batch flags.

    A step's samples are split over the processes, then into equal minibatches of `minibatch_size`
    (fewer samples: one minibatch); TRL cannot take a ragged last minibatch, nor an accumulation
    window that straddles two generations.
    """
    samples = config.prompts_per_step * config.samples_per_prompt
    if samples % num_processes:
        raise ValueError(
            f"--prompts_per_step x --samples_per_prompt ({samples}) must be divisible by the "
            f"{num_processes} processes for --trainer trl"
        )
    local = samples // num_processes
    batch = min(config.minibatch_size, local)
    if local % batch:
        raise ValueError(
            f"--minibatch_size {config.minibatch_size} must divide the {local} samples per process of a "
            "step for --trainer trl (TRL splits a generation into equal minibatches)"
        )
    minibatches = local // batch * config.ppo_epochs
    if minibatches % config.gradient_accumulation_steps:
        raise ValueError(
            f"--gradient_accumulation_steps {config.gradient_accumulation_steps} must divide the {minibatches} "
            "minibatches of a step (x ppo_epochs) for --trainer trl"
        )
    return batch, minibatches // config.gradient_accumulation_steps


def grpo_config(
    config: RLConfig, *, num_processes: int, use_cpu: bool, generation_kwargs: dict | None = None
):
    """The GRPOConfig that runs `config` (see the module docstring's table); raises on unmapped flags."""
    from trl import GRPOConfig

    check_mappable(config)
    batch, k = minibatch_plan(config, num_processes)
    return GRPOConfig(
        output_dir=str(RunFolder(config.output_dir).checkpoints_dir),
        use_cpu=use_cpu,
        bf16=False,
        fp16=False,
        # TRL's default is on; as the native engine, recompute only with --gradient_checkpointing
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        report_to="none",  # metrics.jsonl and tensorboard/ are written at RL steps by `_RunLog`
        seed=config.seed,
        max_steps=config.total_steps * k,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        generation_batch_size=config.prompts_per_step * config.samples_per_prompt,
        num_iterations=config.ppo_epochs,
        num_generations=config.samples_per_prompt,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        generation_kwargs=generation_kwargs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps * k,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        beta=config.kl_coef,
        use_bias_correction_kl=config.kl_importance_weighted,
        **TRL_LOSSES[config.algorithm](config),
        scale_rewards="group" if config.scale_rewards else "none",
        entropy_coef=config.entropy_coef,
        reward_weights=[1.0, *(weight for _, weight in shaping_rewards(config))],  # CombinedReward first
        use_vllm=config.use_vllm,
        vllm_mode=config.vllm_mode,
        logging_steps=config.logging_steps * k,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=max(config.save_steps, 1) * k,
        save_total_limit=config.save_total_limit,
    )


def optimizer_steps_per_rl_step(args) -> int:
    """k of a GRPOConfig: TRL steps (optimizer steps) per generation."""
    return args.steps_per_generation * args.num_iterations // args.gradient_accumulation_steps


def missing_eos(eos_ids: Sequence[int]) -> Callable[..., list[float]]:
    """A TRL reward function: -1.0 for a completion with no EOS among its ids (it ran into
    max_new_tokens), else 0.0. With reward weight `missing_eos_penalty` it subtracts the penalty the
    native engine's `compute_rewards` subtracts."""
    eos = set(eos_ids)

    def reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        return [0.0 if eos.intersection(ids) else -1.0 for ids in columns["completion_ids"]]

    reward.__name__ = reward.__qualname__ = "missing_eos"
    return reward


class TRLRun:
    """GRPO on TRL's GRPOTrainer with `RLTrainer`'s surface (`evaluate`, `train`, `save_final`,
    `policy`), so `vlm_rl.rl.pipeline.run_rl` warm-starts, trains and saves either engine the same way.

    The native engine's parts run over TRL's model: held-out numbers come from the same greedy
    decoding (`TrainedPolicy`), reward with the missing-EOS penalty (`RewardStage`) and task metric
    (`PromptRollouts.evaluate`) as the native engine's, and final/ is written the same way
    (`--init_adapter`, `vlm-rl push` read it). `RLTrainer`'s arguments; no critic, so no `value_head`
    (`check_mappable` refuses --algorithm ppo)."""

    def __init__(
        self,
        config: RLConfig,
        policy: torch.nn.Module,
        processor: ProcessorMixin,
        reward: CombinedReward,
        train_dataset: datasets.Dataset,
        eval_dataset: datasets.Dataset | None,
        eval_metric: EvalMetric | None,
        accelerator: Accelerator,
        value_head: torch.nn.Linear | None = None,  # not read: GRPO has no critic
    ):
        from trl import GRPOTrainer

        eos = eos_token_ids(policy, processor)
        args = grpo_config(
            config,
            num_processes=accelerator.num_processes,
            use_cpu=accelerator.device.type == "cpu",
            # vLLM takes no suppress_tokens; transformers' generate gets the native engine's list
            generation_kwargs=None
            if config.use_vllm
            else {"suppress_tokens": suppressed_tokens(processor, eos)},
        )
        self.trainer = GRPOTrainer(
            model=policy,
            reward_funcs=[reward.as_reward_function(), *(fn for fn, _ in shaping_rewards(config, eos))],
            args=args,
            train_dataset=train_dataset,
            processing_class=processor,
        )
        self.config = config
        self.accelerator = self.trainer.accelerator
        self.processor = self.trainer.processing_class
        self.policy = TrainedPolicy(
            PolicyWithValue(self.trainer.model), self.accelerator, self.processor, config
        )
        self.rewards = RewardStage(reward, config)
        self.prompts = PromptRollouts(self.processor, None, eval_dataset, eval_metric)
        self.run = RunFolder(config.output_dir)
        self.steps_per_rl_step = optimizer_steps_per_rl_step(args)
        self.step = 0  # RL steps done (TRL's global_step / k)
        self.metrics_log: MetricsLogger | None = None  # main process: evaluations keep the report's gallery
        if accelerator.is_main_process:
            self.metrics_log = self.run.start(
                config,
                resume=bool(config.resume_from_checkpoint),
                report_to=config.report_to,
                resumed_step=resumed_rl_step(
                    args.output_dir, config.resume_from_checkpoint, self.steps_per_rl_step
                ),
                evaluates_again=True,  # _RunLog evaluates when training begins, after the checkpoint is loaded
            )
        self.run_log = _RunLog(self, self.metrics_log)
        self.trainer.add_callback(self.run_log)
        logger.info(
            "GRPO on TRL's GRPOTrainer, %d process(es), k=%d",
            accelerator.num_processes,
            self.steps_per_rl_step,
        )

    @property
    def unwrapped(self) -> PolicyWithValue:
        return self.policy.unwrapped

    def evaluate(self) -> dict[str, float]:
        gallery = self.run if self.metrics_log is not None else None
        return self.prompts.evaluate(self.policy, self.rewards, gallery, self.step)

    def train(self) -> dict[str, dict[str, float]]:
        """TRL's training to `total_steps` (resuming as --resume_from_checkpoint says); returns
        {"before": eval metrics, "after": eval metrics}."""
        resume = self.config.resume_from_checkpoint
        self.trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
        before, after = self.run_log.before, self.run_log.evaluate(self.trainer.state)
        self.step = self.trainer.state.global_step // self.steps_per_rl_step
        if self.metrics_log is not None:
            self.metrics_log.close()
            report_at_step(self.run.root, self.step, self.config.report_steps, final=True)
        return {"before": before, "after": after}

    def save_final(self, metrics: dict[str, float] | None = None) -> Path:
        return self.policy.save_final(self.run, self.step, metrics)


class _RunLog(TrainerCallback):
    """vlm_rl's held-out evaluations (at the start of training, after any checkpoint is loaded, and
    every eval_steps) and TRL's logs into the run's metrics.jsonl, at RL steps."""

    def __init__(self, run: TRLRun, metrics_log: MetricsLogger | None):
        self.run = run
        self.metrics_log = metrics_log
        self.before: dict[str, float] = {}

    def evaluate(self, state) -> dict[str, float]:
        """Every process (the metrics are reduced over all); the model's mode is kept, as TRL files a
        step's metrics under it."""
        training = self.run.policy.module.training
        metrics = self.run.evaluate()
        self.run.policy.module.train(training)
        if self.metrics_log is not None:
            self.metrics_log.log(metrics, step=state.global_step // self.run.steps_per_rl_step)
        return metrics

    def on_train_begin(self, args, state, control, **kwargs):
        self.before = self.evaluate(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.metrics_log is not None and logs:
            self.metrics_log.log(logs, step=state.global_step // self.run.steps_per_rl_step)

    def on_step_end(self, args, state, control, **kwargs):
        step, within = divmod(state.global_step, self.run.steps_per_rl_step)
        every = self.run.config.eval_steps
        if not within and every and step % every == 0 and state.global_step < state.max_steps:
            self.evaluate(state)


def resumed_rl_step(checkpoints_dir: str, resume: str | None, steps_per_rl_step: int) -> int | None:
    """The RL step of the TRL checkpoint that `resume` ("latest" or a checkpoint-N folder) loads,
    read from its trainer_state.json; None when nothing is resumed or no checkpoint is there yet
    (TRL then says so itself)."""
    if not resume or (resume == "latest" and not Path(checkpoints_dir).is_dir()):
        return None
    path = get_last_checkpoint(checkpoints_dir) if resume == "latest" else resume
    state_file = Path(path) / TRAINER_STATE_NAME if path else None
    if state_file is None or not state_file.is_file():
        return None
    return TrainerState.load_from_json(str(state_file)).global_step // steps_per_rl_step
