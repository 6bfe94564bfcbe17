"""The RL loop for every algorithm (PPO, GRPO, RLOO, ...) on one engine.

One step reads as its stages, each timed (`train_step`):
    prompts -> generate (sample G completions per prompt) -> rewards (components, penalties)
    -> log-probs (old log-probs, values, reference log-probs: what the step's plan asks for)
    -> advantages (the algorithm's estimator) -> update (epochs x minibatches of `core.rl_objective`).

The algorithm (`vlm_rl.rl.algorithms`, `--algorithm`) only declares what it needs: whether it has a
critic, where its KL enters (reward or loss), its advantage estimator and its policy loss. The trainer
turns that and the config into one `StepPlan` per step and never branches on an algorithm's name.

The rollout stage is a component, the rollout source (`RolloutSource`): single-turn prompts
(`vlm_rl.rl.components.PromptRollouts`, built from the datasets) or an agent's episodes
(`vlm_rl.rl.agent.EpisodeRollouts`, one row per turn); it also runs held-out evaluation. Sampling
and saving the policy (`TrainedPolicy`) and the reward (`RewardStage`) are components too, the same
ones TRL's engine uses (`vlm_rl.rl.trl_backend.TRLRun`).

Several processes: every decision to skip (a non-finite reward, loss or gradient; no sample left
after dynamic sampling) is agreed by an all-reduce, so all ranks skip together and their optimizer
steps, schedulers and counters stay aligned. A skipped step still advances the step counter and the
learning-rate schedule, and is counted in `train/skipped_steps`.

Memory: one base model. The policy is base + LoRA; the reference is the same base with the
adapter disabled; a critic is a value head on the policy's trunk.

Speed (all exact up to float summation order): generation prefills each prompt once for its G
samples (`vlm_rl.models.prefill`); the scoring and update passes forward each prompt once for its
G completions (`vlm_rl.models.shared_prefix`, `RLConfig.shared_prefix`); a frozen vision encoder
encodes each distinct image once per step, its outputs reused by every pass
(`vlm_rl.models.share_image_encoding`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import ProcessorMixin, get_scheduler

from vlm_rl.data.collators import PromptBatch
from vlm_rl.distributed import check_prompts_per_step, make_accelerator
from vlm_rl.models import share_image_encoding
from vlm_rl.models.shared_prefix import PromptGroups
from vlm_rl.models.value import PolicyWithValue
from vlm_rl.report import report_at_step
from vlm_rl.rewards.compose import CombinedReward, NonFiniteRewardError
from vlm_rl.rl import core
from vlm_rl.rl.algorithms import StepPlan, get_algorithm, objective_settings
from vlm_rl.rl.components import EvalMetric, PromptRollouts, RewardStage, TrainedPolicy
from vlm_rl.rl.config import RLConfig
from vlm_rl.rl.engines import truncated_importance_weights
from vlm_rl.rl.rollout import Rollout
from vlm_rl.run_folder import (
    ADAPTER_NAME,
    TRAINER_STATE_NAME,
    CheckpointManager,
    MetricsLogger,
    RunFolder,
)

logger = logging.getLogger(__name__)

__all__ = ["EvalMetric", "RLTrainer", "RolloutSource", "SkippedStep"]


class RolloutSource(Protocol):
    """Where a step's rollout comes from and how held-out evaluation runs: `PromptRollouts`
    (single-turn prompts, G completions each) or `vlm_rl.rl.agent.EpisodeRollouts` (episodes of an
    environment, one row per turn). Everything after the rollout is the same trainer's."""

    def __len__(self) -> int:
        """How many distinct training items (prompts, environment seeds) there are."""

    def sample(
        self, policy: TrainedPolicy, indices: list[int]
    ) -> tuple[Rollout, PromptBatch, dict[str, float]]:
        """The rollout of training items `indices`: (rollout, the prompts its rows answer, metrics)."""

    def evaluate(
        self, policy: TrainedPolicy, rewards: RewardStage, gallery: RunFolder | None, step: int
    ) -> dict[str, float]:
        """Held-out metrics (eval/...), over all processes; `gallery`: where the report's examples go."""

    def write_samples(self, run: RunFolder, step: int, rollout: Rollout, batch: PromptBatch) -> None:
        """The step's samples into the run folder (every `sample_log_steps`, main process)."""


@dataclass
class KLController:
    """Fixed or adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2): the coefficient moves so
    that the observed per-sequence KL approaches `target`."""

    coef: float
    target: float | None = None
    horizon: int = 10000

    @property
    def active(self) -> bool:
        """The KL term is on: a reference pass is needed."""
        return self.coef > 0 or self.target is not None

    def update(self, observed_kl: float, num_samples: int) -> None:
        if self.target is None:
            return
        error = float(np.clip(observed_kl / self.target - 1, -0.2, 0.2))
        self.coef *= 1 + error * num_samples / self.horizon


class SkippedStep(Exception):
    """Raised inside a step that every rank agreed to skip; `reason` goes to the log."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RLTrainer:
    """RL for VLMs with any registered algorithm. Components come in built; the trainer owns the loop.

    The rollout source is single-turn prompts (`train_dataset`, `eval_dataset`, `eval_metric`: a
    `PromptRollouts`) unless `rollouts` is given (the agent's `EpisodeRollouts`)."""

    def __init__(
        self,
        config: RLConfig,
        policy,
        processor: ProcessorMixin,
        reward: CombinedReward,
        train_dataset: datasets.Dataset | None,
        eval_dataset: datasets.Dataset | None = None,
        eval_metric: EvalMetric | None = None,
        accelerator: Accelerator | None = None,
        value_head: torch.nn.Linear | None = None,
        *,
        rollouts: RolloutSource | None = None,
    ):
        self.rollouts = (
            rollouts
            if rollouts is not None
            else PromptRollouts(processor, train_dataset, eval_dataset, eval_metric)
        )
        self.config = config
        self.algorithm = get_algorithm(config.algorithm)
        self.accelerator = accelerator or make_accelerator(config.gradient_accumulation_steps)
        self.processor = processor
        self.rewards = RewardStage(reward, config)
        self.output_dir = Path(config.output_dir)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        check_prompts_per_step(config.prompts_per_step, self.accelerator.num_processes)

        if not self.algorithm.uses_critic:
            value_head = None
        elif value_head is None:
            value_head = torch.nn.Linear(policy.config.get_text_config().hidden_size, 1)
            torch.nn.init.zeros_(value_head.weight)
            torch.nn.init.zeros_(value_head.bias)
        module = PolicyWithValue(policy, value_head)
        policy_params = [p for p in policy.parameters() if p.requires_grad]
        groups = [{"params": policy_params, "lr": config.learning_rate}]
        if value_head is not None:
            # A fresh head on a pretrained trunk must move its outputs to the reward's scale quickly.
            value_lr = config.value_learning_rate or 10 * config.learning_rate
            groups.append({"params": list(value_head.parameters()), "lr": value_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.lr_decay_steps or config.total_steps,
        )
        deepspeed = self.accelerator.state.deepspeed_plugin
        if deepspeed is not None:
            # DeepSpeed reads its batch size from a prepared dataloader (there is none), and clips the
            # gradients inside its own step (accelerate would fill in 1.0)
            deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = config.minibatch_size
            deepspeed.deepspeed_config["gradient_clipping"] = config.max_grad_norm
        # The scheduler steps once per RL step by hand (a prepared one steps once per process);
        # registered so checkpoints still carry it.
        self.module, self.optimizer = self.accelerator.prepare(module, self.optimizer)
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.policy = TrainedPolicy(self.module, self.accelerator, processor, config)
        # the prepared module's: FSDP2 replaces each parameter with its sharded DTensor
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.kl = KLController(
            config.kl_coef, config.target_kl if config.adaptive_kl else None, config.kl_horizon
        )
        self.step = 0
        self.skipped_steps = 0
        self.last_rollout: Rollout | None = None
        """The last training step's rollout (its episodes, for an agent)."""
        # One-step-off rollouts: step t+1's rollout is sampled by the engine in this thread while
        # step t updates (`sample`); the trainer syncs the engine between steps itself.
        self._prefetch = ThreadPoolExecutor(1, "vlm_rl-rollouts") if config.async_rollouts else None
        self._next: tuple[int, int, Future] | None = None
        """The rollout in flight: (its step, the weights' version that samples it, its future)."""
        self.policy.auto_sync = not config.async_rollouts
        self.metrics_log: MetricsLogger | None = None
        self.run = RunFolder(config.output_dir)
        self.checkpoints = CheckpointManager(
            self.run, config.save_total_limit, is_main_process=self.accelerator.is_main_process
        )

    # -- helpers --------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> PolicyWithValue:
        return self.policy.unwrapped

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def _prompt_indices(self, step: int) -> list[int]:
        """This process's prompts for `step`: a deterministic function of (seed, step), so a resumed
        run sees exactly the prompts an uninterrupted one would."""
        per_step, n = self.config.prompts_per_step, len(self.rollouts)
        start = step * per_step
        indices = []
        for position in range(start, start + per_step):
            epoch, offset = divmod(position, n)
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
            )
            indices.append(int(order[offset]))
        return indices[self.accelerator.process_index :: self.accelerator.num_processes]

    def _batch(self, dataset: datasets.Dataset, indices: list[int]) -> PromptBatch:
        return self.rollouts.batch(dataset, indices)

    def _all_ranks(self, ok: bool | torch.Tensor) -> bool:
        """True when `ok` holds on every process (an all-reduce: every rank must call it)."""
        ok = bool(ok)
        if self.accelerator.num_processes == 1:
            return ok
        failures = torch.tensor([0.0 if ok else 1.0], device=self.device)
        return self.accelerator.reduce(failures, reduction="sum").item() == 0

    def _max_over_ranks(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        return int(self.accelerator.gather(tensor).max().item())

    @contextmanager
    def _reference(self):
        """The reference policy: the same base with the LoRA adapter disabled."""
        with self.unwrapped.policy.disable_adapter():
            yield

    def _forward(self, rollout: Rollout, rows: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        completion_ids = rollout.completion_ids[rows].to(self.device)
        if self.config.shared_prefix:
            inputs = PromptGroups.of_rows(
                rollout.prompt_inputs,
                rollout.images_per_prompt,
                self._prompt_of_rows(rollout, rows),
                rollout.completion_mask[rows],
            ).to(self.device)
        else:
            inputs = rollout.model_inputs(rows).to(self.device)
        return self.module(
            inputs,
            completion_ids,
            temperature=self.config.temperature,
            excluded_tokens=rollout.excluded_tokens,
            **kwargs,
        )

    @staticmethod
    def _prompt_of_rows(rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """(R,) the prompt each row continues, equal prompts merged: agent turns with the same
        observation (`observation_keys`: same frames and text, e.g. the first turn of a group's
        episodes) are one prompt, so their prefix is shared too."""
        prompts = rollout.prompt_index[rows]
        if rollout.observation_keys is None:
            return prompts
        first: dict[str, int] = {}
        for row, prompt in enumerate(rollout.prompt_index.tolist()):
            first.setdefault(rollout.observation_keys[row], prompt)
        return torch.tensor([first[rollout.observation_keys[row]] for row in rows.tolist()], dtype=torch.long)

    def _minibatches(self, n: int, shuffle: bool) -> Iterator[torch.Tensor]:
        order = torch.randperm(n) if shuffle else torch.arange(n)
        for start in range(0, n, self.config.minibatch_size):
            yield order[start : start + self.config.minibatch_size]

    # -- the plan of a step ----------------------------------------------------------------------
    def plan(self, num_samples: int) -> StepPlan:
        """What this step computes for its algorithm and config, decided before any scoring."""
        return StepPlan(
            values=self.algorithm.uses_critic,
            ref_logprobs=self.kl.active,
            old_logprobs=not self._update_is_one_optimizer_step(num_samples),
            kl_in_loss=not self.algorithm.kl_in_reward,
        )

    def _update_is_one_optimizer_step(self, num_samples: int) -> bool:
        """True when the update takes a single optimizer step over the whole rollout (one epoch,
        every minibatch accumulated into it) and no critic or KL statistic needs the sampling
        policy's log-probs beforehand: then old log-probs = the update pass's own, detached
        (TRL's GRPOTrainer does the same), and the scoring pass is skipped."""
        config = self.config
        minibatches = -(-num_samples // config.minibatch_size)
        return (
            not self.algorithm.uses_critic
            and config.ppo_epochs == 1
            and minibatches <= config.gradient_accumulation_steps
            # accelerate counts minibatches across RL steps: the optimizer may only step at the last
            and self.accelerator.step % config.gradient_accumulation_steps == 0
            and not self.kl.active
        )

    # -- stages ---------------------------------------------------------------------------------
    def generate(self, batch: PromptBatch, greedy: bool = False, samples: int | None = None) -> Rollout:
        return self.policy.generate(batch, greedy=greedy, samples=samples)

    def compute_rewards(self, rollout: Rollout, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Sequence rewards (N,) and their metrics (`RewardStage`)."""
        return self.rewards(rollout, batch)

    @torch.no_grad()
    def compute_logprobs(self, rollout: Rollout, plan: StepPlan) -> None:
        """The plan's scoring pass: old log-probs and values under the sampling policy, and
        reference log-probs when the KL term is on. Nothing when the plan needs none of them."""
        rollout.old_logprobs = rollout.values = rollout.ref_logprobs = None
        if not plan.scoring_pass:
            return
        self.module.eval()
        old, values, ref = [], [], []
        for rows in self._minibatches(len(rollout), shuffle=False):
            out = self._forward(rollout, rows, with_values=plan.values)
            old.append(out["logprobs"])
            if plan.values:
                values.append(out["values"])
            if plan.ref_logprobs:
                with self._reference():
                    ref.append(self._forward(rollout, rows)["logprobs"])
        rollout.old_logprobs = torch.cat(old).cpu()
        rollout.values = torch.cat(values).cpu() if values else None
        rollout.ref_logprobs = torch.cat(ref).cpu() if ref else None

    def compute_advantages(self, rollout: Rollout) -> dict[str, float]:
        """The algorithm's advantages (and value targets) into the rollout; returns statistics."""
        stats: dict[str, float] = {}
        token_kl = None
        if rollout.ref_logprobs is not None:
            token_kl = core.kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, self.config.kl_estimator)
            mask = rollout.completion_mask.float()
            stats["objective/kl"] = core.masked_sum(token_kl, mask, dim=1).mean().item()
        result = self.algorithm.advantages(rollout, self.config, token_kl, self.kl.coef)
        rollout.advantages, rollout.returns = result.advantages, result.returns
        rollout.sample_mask = (
            result.sample_mask if result.sample_mask is not None else torch.ones(len(rollout))
        )
        return {**stats, **result.stats}

    def update(self, rollout: Rollout, plan: StepPlan | None = None) -> dict[str, float]:
        """Epochs over shuffled minibatches of `core.rl_objective`. Raises `SkippedStep` (weights
        restored) when any rank meets a non-finite loss or gradient, or no rank has a sample left.

        Ranks may hold different numbers of samples (dynamic sampling drops groups): every rank runs
        the same number of minibatches, a rank out of samples running a zero-weight one, so the
        gradient all-reduces and the optimizer steps stay matched.
        """
        config = self.config
        plan = plan or self.plan(len(rollout))
        settings = objective_settings(config, self.algorithm, self.kl.coef)
        self.module.train()
        sums: dict[str, list[float]] = defaultdict(list)
        rows_all = torch.nonzero(rollout.sample_mask > 0).flatten()
        local_minibatches = -(-len(rows_all) // config.minibatch_size)
        num_minibatches = self._max_over_ranks(local_minibatches)
        if num_minibatches == 0:
            raise SkippedStep("no sample left after dynamic sampling on any process")
        snapshot = None  # what an abort restores, copied before the first optimizer step
        for epoch in range(config.ppo_epochs):
            minibatches = list(self._minibatches(len(rows_all), shuffle=True))
            for index in range(num_minibatches):
                padding = index >= len(minibatches)
                rows = torch.zeros(1, dtype=torch.long) if padding else rows_all[minibatches[index]]
                with self.accelerator.accumulate(self.module):
                    loss, stats = self._minibatch_loss(rollout, rows, plan, settings)
                    if padding:
                        loss = loss * 0.0
                    if not self._all_ranks(torch.isfinite(loss)):
                        self._abort(snapshot)
                        raise SkippedStep("non-finite loss (weights left untouched)")
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients:
                        # a float under DeepSpeed (which clipped and stepped inside `backward`)
                        grad_norm = torch.as_tensor(
                            self.accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
                        )
                        if not self._all_ranks(torch.isfinite(grad_norm)):
                            self._abort(snapshot)
                            raise SkippedStep("non-finite gradient (weights left untouched)")
                        sums["loss/grad_norm"].append(float(grad_norm))
                        last = epoch == config.ppo_epochs - 1 and index == num_minibatches - 1
                        if snapshot is None and not last:  # a later minibatch could still abort
                            snapshot = self._snapshot()
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                if not padding:
                    for key, value in stats.items():
                        sums[key].append(value.item())
        return {k: float(np.max(v) if k.endswith("_max") else np.mean(v)) for k, v in sums.items()}

    def _minibatch_loss(
        self, rollout: Rollout, rows: torch.Tensor, plan: StepPlan, settings: core.ObjectiveSettings
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`core.rl_objective` on the rollout's `rows`, with what the plan computed."""
        # the entropy is logged (policy/entropy); it keeps a graph only when the bonus is on
        out = self._forward(
            rollout, rows, with_entropy=True, with_values=plan.values, entropy_grad=settings.entropy_coef != 0
        )

        def rollout_rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[rows].to(self.device)

        # on-policy single step: old = the update's own log-probs, detached (ratio 1; see plan())
        old = out["logprobs"].detach() if rollout.old_logprobs is None else rollout_rows(rollout.old_logprobs)
        advantages = rollout_rows(rollout.advantages)
        is_stats = {}
        if rollout.engine_logprobs is not None:
            # the engine (vLLM) sampled with its own numerics: truncated IS weights each token's
            # policy-gradient term (w > 0 scales a token's advantage: the same as weighting its loss)
            weights, is_stats = truncated_importance_weights(
                old,
                rollout_rows(rollout.engine_logprobs),
                rollout_rows(rollout.completion_mask),
                self.config.vllm_importance_sampling_cap,
            )
            advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages) * weights
        loss, stats = core.rl_objective(
            out["logprobs"],
            old,
            advantages,
            rollout_rows(rollout.completion_mask).float(),
            settings,
            entropy=out["entropy"],
            values=out.get("values"),
            old_values=rollout_rows(rollout.values),
            returns=rollout_rows(rollout.returns),
            ref_logprobs=rollout_rows(rollout.ref_logprobs) if plan.kl_in_loss else None,
        )
        return loss, {**stats, **{key: torch.tensor(value) for key, value in is_stats.items()}}

    def _snapshot(self) -> dict[str, Any]:
        """What `_abort` restores: the trainable weights and the optimizer's state (AdamW's moments
        and step counts). Copied just before the update's first optimizer step, and only when a
        minibatch follows it: until then nothing has changed, and the copy (3x the trainable
        parameters) is not held through the forward and backward passes."""
        return {
            "weights": {id(p): p.detach().clone() for p in self.params},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def _abort(self, snapshot: dict[str, Any] | None) -> None:
        """Undo this step's updates: weights and optimizer state back as they were (None: no
        optimizer step was taken yet), gradients cleared, and accelerate's accumulation counter
        realigned (the next step starts a fresh accumulation)."""
        with torch.no_grad():
            for p in self.params:
                if snapshot is not None:
                    p.copy_(snapshot["weights"][id(p)])
                p.grad = None  # the prepared optimizer's zero_grad is a no-op between accumulation syncs
        if snapshot is not None:
            self.optimizer.load_state_dict(snapshot["optimizer"])
        self.accelerator.step = 0

    # -- one step -----------------------------------------------------------------------------
    def sample(self, step: int) -> tuple[Rollout, PromptBatch, dict[str, float]]:
        """The rollout stage: this process's items of `step` (prompts, or environment seeds) from the
        rollout source. Returns (rollout, its prompts, metrics).

        One-step-off (--async_rollouts): step t's rollout was sampled while step t-1 updated, from the
        weights before that update (`rollout/policy_lag` 1); this waits for it and sets the engine
        sampling step t+1 from the current weights while step t updates. A step with nothing in
        flight (the first, the first after a resume) samples here, from the current weights."""
        if self._prefetch is None:
            return self._sample_now(step)
        if self._next is not None and self._next[0] == step:
            _, sampled_at, future = self._next
            result = future.result()
        else:
            self._wait_for_prefetch()
            self.policy.sync_engine()
            sampled_at, result = self.policy.version, self._sample_now(step)
        self._next = None
        lag = self.policy.version - sampled_at  # updates since the weights that sampled
        if step + 1 < self.config.total_steps:
            self.policy.sync_engine()
            future = self._prefetch.submit(self._sample_now, step + 1)
            self._next = (step + 1, self.policy.version, future)
        rollout, batch, metrics = result
        return rollout, batch, {**metrics, "rollout/policy_lag": lag}

    def _sample_now(self, step: int) -> tuple[Rollout, PromptBatch, dict[str, float]]:
        """`step`'s rollout from the engine as it is now, with the engine's time (`time/generate_s`)."""
        start = time.perf_counter()
        rollout, batch, metrics = self.rollouts.sample(self.policy, self._prompt_indices(step))
        return rollout, batch, {**metrics, "time/generate_s": time.perf_counter() - start}

    def _wait_for_prefetch(self) -> None:
        """Let the rollout in flight finish (kept for its step) before the engine is used or synced
        otherwise (held-out evaluation); its error, if any, is raised when its step takes it."""
        if self._next is not None:
            wait_for_future([self._next[2]])

    def train_step(self) -> dict[str, float]:
        """One RL step: its stages in order, each timed. Returns its metrics (mean over processes)."""
        timings: dict[str, float] = {}

        @contextmanager
        def timed(name: str):
            start = time.perf_counter()
            yield
            timings[f"time/{name}_s"] = time.perf_counter() - start

        step_start = time.perf_counter()
        try:
            # Generation, scoring and update see each prompt's images (G times each where a pass
            # is not shared): a frozen vision encoder encodes each distinct image once per step.
            with share_image_encoding(self.unwrapped.policy, remember=True) as image_encoding:
                with timed("rollout"):
                    rollout, batch, sample_metrics = self.sample(self.step)
                with timed("reward"):
                    rewards, reward_metrics, error = None, {}, None
                    try:
                        rewards, reward_metrics = self.compute_rewards(rollout, batch)
                    except NonFiniteRewardError as raised:
                        error = raised
                    if not self._all_ranks(error is None):
                        raise SkippedStep(str(error) if error else "non-finite reward on another process")
                    rollout.rewards = rewards
                plan = self.plan(len(rollout))
                with timed("score"):
                    self.compute_logprobs(rollout, plan)
                with timed("advantages"):
                    objective = self.compute_advantages(rollout)
                with timed("update"):
                    update = self.update(rollout, plan)
                self.policy.weights_changed()
                self.last_rollout = rollout
        except SkippedStep as skip:
            logger.warning("step %d skipped: %s", self.step, skip.reason)
            self.skipped_steps += 1
            self.scheduler.step()
            return self._gather_mean({"train/skipped_steps": self.skipped_steps})
        self.scheduler.step()
        if "objective/kl" in objective:
            self.kl.update(objective["objective/kl"], len(rollout) * self.accelerator.num_processes)
        lengths = rollout.completion_mask.sum(1).float()
        elapsed = time.perf_counter() - step_start
        prompt_lengths = rollout.prompt_inputs["attention_mask"].sum(1)[rollout.prompt_index].float()
        tokens = (prompt_lengths + lengths).sum().item()
        metrics = {
            "reward/mean": rollout.rewards.mean().item(),
            "reward/std": rollout.rewards.std().item() if len(rollout) > 1 else 0.0,
            **{k.replace("rewards/", "reward/"): v for k, v in reward_metrics.items()},
            "completions/mean_length": lengths.mean().item(),
            "completions/ended_fraction": rollout.ended.float().mean().item(),
            **sample_metrics,
            **objective,
            **update,
            "objective/kl_coef": self.kl.coef,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/skipped_steps": self.skipped_steps,
            **timings,
            **{key.removesuffix("_s") + "_share": value / elapsed for key, value in timings.items()},
            "time/weight_sync_s": self.policy.take_sync_time(),
            "time/step_s": elapsed,
            # verl's perf/*: tokens (prompt + completion) of the step; perf/throughput per process
            # (per GPU), perf/tokens_per_s over all processes (summed in `_gather_mean`)
            "perf/total_num_tokens": tokens,
            "perf/throughput": tokens / elapsed,
            "perf/tokens_per_s": tokens / elapsed,
            "throughput/tokens_per_s": lengths.sum().item() / elapsed,
            "throughput/image_encodings_saved": image_encoding.saved,
        }
        if (
            self.accelerator.is_main_process
            and self.config.sample_log_steps
            and self.step % self.config.sample_log_steps == 0
        ):
            self.rollouts.write_samples(self.run, self.step, rollout, batch)
        metrics = self._gather_mean(metrics)
        for key in ("perf/total_num_tokens", "perf/tokens_per_s"):  # totals over the processes
            metrics[key] *= self.accelerator.num_processes
        return metrics

    def _gather_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric's mean over the processes that have it (a rank with no sample left after
        dynamic sampling has no loss statistics, for instance)."""
        if self.accelerator.num_processes == 1:
            return metrics
        from accelerate.utils import gather_object

        keys = sorted(set(gather_object(sorted(metrics))))
        present = torch.tensor([k in metrics for k in keys], dtype=torch.float64, device=self.device)
        values = torch.tensor([metrics.get(k, 0.0) for k in keys], dtype=torch.float64, device=self.device)
        totals = self.accelerator.reduce(torch.stack([values * present, present]), reduction="sum")
        return {k: total / count for k, total, count in zip(keys, *totals.tolist(), strict=True) if count}

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The rollout source's held-out evaluation (greedy), over all processes."""
        gallery = self.run if self.metrics_log is not None else None  # main process, in a run: the report's
        self._wait_for_prefetch()
        self.policy.sync_engine()
        return self.rollouts.evaluate(self.policy, self.rewards, gallery, self.step)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """accelerate state (weights, optimizer, scheduler, RNG) + trainer state + the adapter, written
        atomically by the run's `CheckpointManager` (which rotates, sparing pending uploads)."""
        state = {"step": self.step, "kl_coef": self.kl.coef, "skipped_steps": self.skipped_steps}
        weights = self.policy.state_dict()  # every process: under FSDP or ZeRO-3 a gather
        path = self.checkpoints.save(
            self.accelerator,
            self.step,
            state,
            write_extra=lambda tmp: self.policy.save_adapter(tmp / ADAPTER_NAME, weights),
        )
        if self.accelerator.is_main_process and self.config.push_to_hub and self.config.hub_push_checkpoints:
            from vlm_rl.hub import push_checkpoint  # huggingface_hub is imported only when pushing

            self.checkpoints.upload(path, functools.partial(push_checkpoint, self.config))
        return path

    def wait_for_uploads(self) -> None:
        """Block until every queued checkpoint upload has finished (or failed and been logged)."""
        self.checkpoints.wait_for_uploads()

    def load_checkpoint(self, path: str | Path) -> None:
        path = self.run.resolve_checkpoint(path)
        if not (path / TRAINER_STATE_NAME).exists():
            raise FileNotFoundError(f"{path} is not a vlm_rl checkpoint (no {TRAINER_STATE_NAME})")
        self.accelerator.load_state(str(path))
        state = json.loads((path / TRAINER_STATE_NAME).read_text())
        self.step, self.kl.coef, self.skipped_steps = state["step"], state["kl_coef"], state["skipped_steps"]
        self.policy.weights_changed()
        logger.info("resumed from %s at step %d", path, self.step)

    def save_final(self, metrics: dict[str, float] | None = None) -> Path:
        """The adapter (+ value head) and rl_run.json into final/ (`TrainedPolicy.save_final`)."""
        return self.policy.save_final(self.run, self.step, metrics)

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, dict[str, float]]:
        """Run to `total_steps`; returns {"before": eval metrics, "after": eval metrics}."""
        config = self.config
        if config.resume_from_checkpoint:
            self.load_checkpoint(config.resume_from_checkpoint)
        if self.accelerator.is_main_process:  # a fresh run in an existing folder starts fresh logs
            self.metrics_log = self.run.start(
                config,
                resume=bool(config.resume_from_checkpoint),
                report_to=config.report_to,
                resumed_step=self.step if config.resume_from_checkpoint else None,
                evaluates_again=True,  # `before` below, at the resumed step
            )
        if self.accelerator.is_main_process:
            logger.info(
                "%s on %d process(es), %s",
                config.algorithm.upper(),
                self.accelerator.num_processes,
                self.accelerator.distributed_type,
            )
        try:
            return self._train()
        finally:
            if self._prefetch is not None:
                self._prefetch.shutdown(wait=False, cancel_futures=True)
                self._next = None
            self.policy.close()

    def _train(self) -> dict[str, dict[str, float]]:
        config = self.config
        before = self.evaluate()
        self._log(before)
        progress = tqdm(
            total=config.total_steps,
            initial=self.step,
            desc=config.algorithm,
            disable=not self.accelerator.is_local_main_process,
        )
        while self.step < config.total_steps:
            metrics = self.train_step()
            self.step += 1
            progress.update(1)
            progress.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}")
            if self.step % config.logging_steps == 0:
                self._log(metrics)
            if config.eval_steps and self.step % config.eval_steps == 0 and self.step < config.total_steps:
                self._log(self.evaluate())
            if config.save_steps and self.step % config.save_steps == 0:
                self.save_checkpoint()
            if self.metrics_log:
                report_at_step(self.run.root, self.step, config.report_steps)
        progress.close()
        after = self.evaluate()
        self._log(after)
        if self.checkpoints.pending:
            logger.info("waiting for %d checkpoint upload(s) to finish", self.checkpoints.pending)
        self.wait_for_uploads()
        if self.metrics_log:
            self.metrics_log.close()
            report_at_step(self.run.root, self.step, config.report_steps, final=True)
        return {"before": before, "after": after}

    def _log(self, metrics: dict[str, float]) -> None:
        if self.metrics_log and metrics:
            self.metrics_log.log(metrics, step=self.step)
