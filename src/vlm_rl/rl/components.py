"""The parts an RL run is built from, shared by the native trainer (`RLTrainer`) and TRL's run
(`vlm_rl.rl.trl_backend.TRLRun`), so both sample, score and save exactly the same way:

- `TrainedPolicy`: the policy being trained as a run holds it (the module under accelerate and the
  processor): sample completions from it, write its adapter into a checkpoint or final/;
- `RewardStage`: the step's reward (the reward components, minus the missing-EOS penalty, plus
  DAPO's overlong shaping);
- `PromptRollouts`: the single-turn rollout source (a step's prompts and their G sampled
  completions; held-out evaluation by greedy completions). The agent's source, `EpisodeRollouts`
  (`vlm_rl.rl.agent`), plays episodes instead; `RLTrainer` takes either.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from transformers import ProcessorMixin

from vlm_rl.data.collators import PromptBatch, PromptCollator
from vlm_rl.models import share_image_encoding
from vlm_rl.models.value import PolicyWithValue, save_value_head
from vlm_rl.report.records import GALLERY_SIZE, save_eval_samples
from vlm_rl.rewards.compose import CombinedReward
from vlm_rl.rl import core
from vlm_rl.rl.config import RLConfig
from vlm_rl.rl.engines import SamplingParams, make_engine
from vlm_rl.rl.rollout import Rollout
from vlm_rl.run_folder import RL_RUN_INFO_NAME, RunFolder, atomic_dir

EVAL_BATCH_SIZE = 64
"""Held-out prompts (or episodes) generated together in one evaluation batch."""

EvalMetric = Callable[[list[str], dict[str, list[Any]]], dict[str, float]]
"""(completions, columns) -> task metrics, e.g. caption accuracy judged by rule."""


class TrainedPolicy:
    """The policy being trained: `module` (a `PolicyWithValue`, prepared by accelerate or not), its
    accelerator and processor, the config's sampling flags, and the rollout engine that samples from
    it (`--rollout_engine`, `vlm_rl.rl.engines`), kept in sync with its weights."""

    def __init__(
        self, module: torch.nn.Module, accelerator: Accelerator, processor: ProcessorMixin, config: RLConfig
    ):
        self.module = module
        self.accelerator = accelerator
        self.processor = processor
        self.config = config
        self.engine = make_engine(config.rollout_engine, config.vllm_url)
        self.server = None
        """The vLLM server this run started (`--rollout_engine vllm` without --vllm_url; main process),
        stopped by `close`."""
        self.version = 0
        """Bumped by the trainer after each update (`weights_changed`): an engine holding its own copy
        of the weights is synced before it samples again."""
        self._engine_version: int | None = None
        self._sync_seconds = 0.0
        self.auto_sync = True
        """Sync the engine before each generation. Off under one-step-off rollouts, where the trainer
        syncs between steps (a sample runs beside the update and must not sync mid-way)."""

    @property
    def unwrapped(self) -> PolicyWithValue:
        return self.accelerator.unwrap_model(self.module)

    @contextmanager
    def for_generation(self) -> Iterator[torch.nn.Module]:
        """The policy model in eval mode, ZeRO-3 shards gathered (TRL's `unwrap_model_for_generation`),
        FSDP2's root parameters unsharded."""
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(self.module, self.accelerator) as unwrapped:
            unwrapped.policy.eval()
            if not self.accelerator.is_fsdp2:
                yield unwrapped.policy
                return
            # Generation calls the policy, a child of the sharded root (`PolicyWithValue`): the root's
            # forward hook, which gathers the parameters outside the wrapped decoder layers (embeddings,
            # vision patch embedding, lm_head), never runs, so they are gathered here.
            self.module.unshard()
            try:
                yield unwrapped.policy
            finally:
                self.module.reshard()

    def sampling(self, greedy: bool = False) -> SamplingParams:
        """The config's sampling settings (greedy for held-out evaluation)."""
        config = self.config
        return SamplingParams(config.max_new_tokens, config.temperature, config.top_p, greedy)

    @contextmanager
    def sampler(self) -> Iterator[torch.nn.Module]:
        """The model the engine samples with, the engine synced first (`auto_sync`). An engine with its
        own copy of the weights (a vLLM server) reads only the model's config: the module is left as it
        is (under one-step-off rollouts it is training meanwhile)."""
        if self.auto_sync:
            self.sync_engine()
        if self.engine.adapter_sync:
            yield self.unwrapped.policy
            return
        with self.for_generation() as policy:
            yield policy

    def generate(self, batch: PromptBatch, greedy: bool = False, samples: int | None = None) -> Rollout:
        """`samples` (default: samples_per_prompt) completions of each prompt of `batch`, by the engine."""
        with self.sampler() as policy:
            return self.engine.generate(
                policy,
                self.processor,
                batch,
                samples or self.config.samples_per_prompt,
                self.sampling(greedy),
            )

    def weights_changed(self) -> None:
        """The trainer updated (or restored) the weights: the engine's copy is stale."""
        self.version += 1

    def sync_engine(self) -> None:
        """An engine with its own copy of the weights (a vLLM server) gets the current adapter: saved
        under <output_dir>/rollout_adapters/ and hot-loaded by the main process, then named by every
        process's requests. Nothing when the copy is current, or the engine samples from this module."""
        if not self.engine.adapter_sync or self._engine_version == self.version:
            return
        start = time.perf_counter()
        if self.engine.url is None:
            self._start_server()
            start = time.perf_counter()  # the server's start-up is no weight sync
        name = f"vlm_rl-v{self.version}"
        path = (Path(self.config.output_dir) / "rollout_adapters" / name).resolve()
        state_dict = self.state_dict()  # a collective under FSDP / ZeRO-3
        if self.accelerator.is_main_process:
            previous = self.engine.adapter_path
            with atomic_dir(path) as tmp:
                self.save_adapter(tmp, state_dict)
            self.engine.load_adapter(str(path), name)
            if previous is not None and Path(previous).parent == path.parent:
                shutil.rmtree(previous, ignore_errors=True)  # the server has read it (it served requests)
        else:
            self.engine.use_adapter(name, str(path))
        self.accelerator.wait_for_everyone()
        self._engine_version = self.version
        self._sync_seconds += time.perf_counter() - start

    def take_sync_time(self) -> float:
        """Seconds spent syncing the engine's weights since the last call (`time/weight_sync_s`)."""
        seconds, self._sync_seconds = self._sync_seconds, 0.0
        return seconds

    def _start_server(self) -> None:
        """The run's own vLLM server (no --vllm_url): the main process starts it from --vllm_python's
        venv (`vlm_rl.rl.vllm_server`), serving the base model exported under <output_dir>/vllm/, and
        every process learns its address."""
        from accelerate.utils import broadcast_object_list

        from vlm_rl.rl.vllm_server import VLLMServer, find_vllm_python

        url = [None]
        if self.accelerator.is_main_process:
            config = self.config
            self.server = VLLMServer(
                config.model_name_or_path,
                Path(config.output_dir) / "vllm",
                python=find_vllm_python(config.vllm_python),
                max_lora_rank=config.lora_r,
                cpus=config.vllm_cpus,
                # a step's sequences (GRPO's prompts x samples; an agent's live episodes) and an
                # evaluation batch in one batch of the server, not in waves
                max_num_seqs=max(config.prompts_per_step * config.samples_per_prompt, EVAL_BATCH_SIZE),
                seed=config.seed,
            )
            url = [self.server.start()]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(url)
        self.engine.url = url[0]

    def close(self) -> None:
        """Stop the vLLM server the run started, if any."""
        if self.server is not None:
            self.server.stop()
            self.server = None
            self.engine.url, self._engine_version = None, None  # a later generation starts another

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The module's weights (`policy.…`, `value_head.…`), gathered from the shards under FSDP or
        ZeRO-3 (`accelerator.get_state_dict`, a collective: every process calls it; the main
        process's is complete)."""
        return self.accelerator.get_state_dict(self.module)

    def save_adapter(self, path: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """Policy adapter (+ processor files, + value head with a critic) into `path`, from `state_dict`
        (`TrainedPolicy.state_dict`)."""
        unwrapped = self.unwrapped
        # Name the base as the user did ("tiny-llava", a hub id), not the local cache folder.
        unwrapped.policy.peft_config["default"].base_model_name_or_path = self.config.model_name_or_path
        # save_embedding_layers=False: embeddings are never trained, and "auto" would look the base up on
        # the hub (a network call for a tiny default's name) to compare vocabulary sizes
        unwrapped.policy.save_pretrained(
            str(path), state_dict=_submodule_state(state_dict, "policy"), save_embedding_layers=False
        )
        self.processor.save_pretrained(str(path))
        if unwrapped.value_head is not None:
            save_value_head(unwrapped.value_head, path, _submodule_state(state_dict, "value_head"))

    def save_final(self, run: RunFolder, step: int, metrics: dict[str, float] | None = None) -> Path:
        """The adapter and rl_run.json (algorithm, step, base model, metrics) into the run's final/,
        atomically (main process; every process calls it)."""
        path = run.final_dir
        self.accelerator.wait_for_everyone()
        state_dict = self.state_dict()
        if self.accelerator.is_main_process:
            with atomic_dir(path) as tmp:
                self.save_adapter(tmp, state_dict)
                info = {
                    "algorithm": self.config.algorithm,
                    "step": step,
                    "base_model": self.config.model_name_or_path,
                    "metrics": metrics or {},
                }
                (tmp / RL_RUN_INFO_NAME).write_text(json.dumps(info, indent=2, default=str))
        self.accelerator.wait_for_everyone()
        return path


def _submodule_state(state_dict: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The entries of submodule `name` in a module's `state_dict`, named as in the submodule's own."""
    prefix = f"{name}."
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


def _as_conversation(completion: str, prompt: Any) -> Any:
    """TRL's convention: a conversational prompt gets a conversational completion."""
    if isinstance(prompt, list):
        return [{"role": "assistant", "content": completion}]
    return completion


class RewardStage:
    """A rollout's sequence rewards: `reward`'s components, minus the missing-EOS penalty, plus DAPO's
    soft overlong punishment with --overlong_buffer."""

    def __init__(self, reward: CombinedReward, config: RLConfig):
        self.reward = reward
        self.config = config
        self.last_components: dict[str, torch.Tensor] = {}
        """Each component's rewards of the last call, per sample: for the report's gallery."""

    def __call__(self, rollout: Rollout, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Sequence rewards (N,) and their metrics. Raises `NonFiniteRewardError` when a component
        returns NaN or inf."""
        index = rollout.prompt_index.tolist()
        prompts = [batch.prompts[i] for i in index]
        columns = {key: [values[i] for i in index] for key, values in batch.columns.items()}
        columns["images"] = [batch.images[i] for i in index]
        completions = [
            _as_conversation(text, prompt) for text, prompt in zip(rollout.completions, prompts, strict=True)
        ]
        result = self.reward(prompts=prompts, completions=completions, **columns)
        self.last_components = result.per_component
        rewards = result.total.clone()
        rewards -= self.config.missing_eos_penalty * (~rollout.ended).float()
        metrics = result.metrics()
        if self.config.overlong_buffer:  # DAPO's soft overlong punishment
            lengths = rollout.completion_mask.sum(1)
            overlong = core.overlong_penalty(lengths, self.config.max_new_tokens, self.config.overlong_buffer)
            rewards += self.config.overlong_penalty * overlong
            metrics["rewards/overlong_penalty/mean"] = (self.config.overlong_penalty * overlong).mean().item()
        return rewards, metrics


class PromptRollouts:
    """The single-turn rollout source: training prompts (`train_dataset`, sampled G times each) and
    held-out prompts scored by greedy completions (`eval_dataset`, `eval_metric`)."""

    def __init__(
        self,
        processor: ProcessorMixin,
        train_dataset: datasets.Dataset | None,
        eval_dataset: datasets.Dataset | None = None,
        eval_metric: EvalMetric | None = None,
    ):
        if train_dataset is not None and len(train_dataset) == 0:
            raise ValueError("the training prompt dataset is empty; check --dataset and its split")
        self.collator = PromptCollator(processor)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.eval_metric = eval_metric

    def __len__(self) -> int:
        """How many distinct training prompts there are."""
        return len(self.train_dataset)

    def batch(self, dataset: datasets.Dataset, indices: list[int]) -> PromptBatch:
        return self.collator([dataset[i] for i in indices])

    def sample(
        self, policy: TrainedPolicy, indices: list[int]
    ) -> tuple[Rollout, PromptBatch, dict[str, float]]:
        """The training prompts `indices` and their sampled completions: (rollout, prompts, metrics)."""
        batch = self.batch(self.train_dataset, indices)
        return policy.generate(batch), batch, {}

    def write_samples(self, run: RunFolder, step: int, rollout: Rollout, batch: PromptBatch) -> None:
        """Every completion of the step with its prompt and reward, into samples.jsonl."""
        image_ids = batch.columns.get("image_id", [None] * len(batch))
        run.write_samples(
            {
                "step": step,
                "image_id": image_ids[int(rollout.prompt_index[i])],
                "prompt": batch.prompts[int(rollout.prompt_index[i])],
                "completion": rollout.completions[i],
                "reward": float(rollout.rewards[i]),
            }
            for i in range(len(rollout))
        )

    @torch.no_grad()
    def evaluate(
        self, policy: TrainedPolicy, rewards: RewardStage, gallery: RunFolder | None, step: int
    ) -> dict[str, float]:
        """Greedy completions on the held-out prompts: mean reward and the task metric, over all
        processes. With `gallery` (the main process of a run) the first ones are kept for the report."""
        accelerator = policy.accelerator
        dataset = self.eval_dataset
        if dataset is None or len(dataset) == 0:
            return {}
        indices = list(range(len(dataset)))[accelerator.process_index :: accelerator.num_processes]
        totals: dict[str, float] = defaultdict(float)
        count = 0
        for start in range(0, len(indices), EVAL_BATCH_SIZE):
            batch = self.batch(dataset, indices[start : start + EVAL_BATCH_SIZE])
            with share_image_encoding(policy.unwrapped.policy):  # prompts may share an image
                rollout = policy.generate(batch, greedy=True, samples=1)
            sequence_rewards, _ = rewards(rollout, batch)
            if start == 0 and gallery is not None:
                self._keep_eval_samples(gallery, step, indices, batch, rollout, sequence_rewards, rewards)
            n = len(rollout)
            totals["eval/reward"] += sequence_rewards.sum().item()
            if self.eval_metric is not None:
                for key, value in self.eval_metric(rollout.completions, batch.columns).items():
                    totals[f"eval/{key}"] += value * n
            count += n
        keys = sorted(totals)
        values = torch.tensor(
            [totals[k] for k in keys] + [count], dtype=torch.float64, device=accelerator.device
        )
        values = accelerator.reduce(values, reduction="sum")
        return {k: v / values[-1].item() for k, v in zip(keys, values[:-1].tolist(), strict=True)}

    @staticmethod
    def _keep_eval_samples(
        run: RunFolder,
        step: int,
        indices: list[int],
        batch: PromptBatch,
        rollout: Rollout,
        sequence_rewards: torch.Tensor,
        rewards: RewardStage,
    ) -> None:
        """The first held-out prompts of this evaluation (one greedy completion each), for the report."""
        n = min(GALLERY_SIZE, len(rollout))
        save_eval_samples(
            run,
            step,
            indices[:n],
            batch.prompts[:n],
            batch.images[:n],
            rollout.completions[:n],
            sequence_rewards[:n].tolist(),
            {name: values[:n].tolist() for name, values in rewards.last_components.items()},
            {key: values[:n] for key, values in batch.columns.items()},
        )
