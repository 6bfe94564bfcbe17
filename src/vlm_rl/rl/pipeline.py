"""The RL recipes' common run: policy, data, optional supervised warm start, RL, save, report, push.

A recipe (recipes/ppo_caption.py, recipes/grpo_vqa.py) parses its config, builds its reward and
names its held-out task metric; `run_rl` does the rest the same way for every algorithm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import PreTrainedModel, ProcessorMixin
from transformers.integrations import is_deepspeed_zero3_enabled

from vlm_rl.data.loaders import count_shared_images, load_eval_dataset, load_task_dataset
from vlm_rl.data.validation import completion_text
from vlm_rl.distributed import make_accelerator
from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.models.loading import (
    check_adapter_folder,
    loading_kwargs,
    prepare_for_training,
    resolve_model_path,
)
from vlm_rl.models.tiny import check_vocabulary
from vlm_rl.models.value import load_value_head
from vlm_rl.rewards.build import build_reward
from vlm_rl.rewards.compose import CombinedReward
from vlm_rl.rl.components import EvalMetric
from vlm_rl.rl.config import RLConfig, WarmStartConfig
from vlm_rl.rl.trainer import RLTrainer
from vlm_rl.run_folder import RunFolder
from vlm_rl.sft import supervised_warm_start
from vlm_rl.tasks import is_task_dataset

if TYPE_CHECKING:
    from vlm_rl.rl.trl_backend import TRLRun

logger = logging.getLogger(__name__)


def start(config: RLConfig) -> Accelerator:
    """Logging, CPU threads, the accelerator and the seed: what every recipe does first."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    accelerator = make_accelerator(config.gradient_accumulation_steps)
    torch.manual_seed(config.seed)
    return accelerator


def reward_from_config(config: RLConfig, device: torch.device) -> CombinedReward:
    """The reward the config names: rule rewards and/or a learned reward model, weighted."""
    with _outside_zero3():
        return build_reward(
            reward_model_path=config.reward_model_path,
            reward_model_weight=config.reward_model_weight,
            reward_funcs=config.reward_funcs,
            reward_weights=config.reward_weights,
            normalize=config.normalize_rewards,
            device=device,
            loading=loading_kwargs(config),
        )


@contextmanager
def _outside_zero3() -> Iterator[None]:
    """Models loaded here are whole on every process, even under ZeRO-3, where transformers would
    build them under zero.Init: a frozen reward model is never gathered for its forward (only the
    prepared policy is), and a model built under zero.Init after another one lacks its attention
    layers' `_kernel_funcs` (docs/distributed.md)."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # accelerate's zero3_init_context_manager(enable=False) leaves it set
    try:
        yield
    finally:
        AcceleratorState().deepspeed_plugin.set_deepspeed_weakref()


def load_base(config: RLConfig, accelerator: Accelerator) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The base VLM and processor of `config.model_name_or_path`, loaded with the config's "Model
    loading" options (dtype, attention kernel, 4/8-bit, trust_remote_code); both engines (native and
    --trainer trl) and the agent recipe load it here."""
    if is_deepspeed_zero3_enabled():
        # ZeRO-3 builds the model under zero.Init, which partitions each weight as it is created (a
        # broadcast): every process loads at once, or the first would wait for the others forever
        with accelerator.main_process_first():  # the first build of an embedded model writes the cache
            resolve_model_path(config.model_name_or_path)
        return load_model(config.model_name_or_path, **loading_kwargs(config))
    with accelerator.main_process_first():  # the first build of an embedded model writes the cache
        return load_model(config.model_name_or_path, **loading_kwargs(config))


def build_policy(config: RLConfig, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear | None]:
    """The policy RL starts from: a fresh LoRA adapter on `model`, or with `config.init_adapter` a
    saved one (e.g. an SFT adapter, or an earlier run's final/), trainable; with it the saved value
    head, if the folder has one (a PPO run's). Returns (policy, value head or None).
    `config.lora_target_modules` and `config.gradient_checkpointing` apply to a fresh adapter; a
    saved one keeps its targets (gradient checkpointing applies to it too)."""
    if not config.init_adapter:
        policy = wrap_with_lora(
            model,
            r=config.lora_r,
            alpha=config.lora_alpha,
            train_projector=config.train_projector,
            target_modules=config.lora_target_modules,
            gradient_checkpointing=config.gradient_checkpointing,
        )
        return policy, None
    from peft import PeftModel

    model = prepare_for_training(model, gradient_checkpointing=config.gradient_checkpointing)

    folder = Path(config.init_adapter)
    check_adapter_folder(folder, f"--init_adapter {config.init_adapter}")
    policy = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    logger.info("policy starts from the adapter in %s", folder)
    return policy, load_value_head(folder)


def warm_start(
    trainer: RLTrainer | TRLRun,
    config: RLConfig,
    warm: WarmStartConfig,
    dataset: Callable[[], datasets.Dataset],
) -> dict[str, float] | None:
    """The supervised warm start (SFT stage) before RL, when `warm.warm_start_steps` and not
    resuming: evaluates the base policy first (`trainer.evaluate`) and returns its metrics (else
    None), then trains `trainer.policy`. `dataset` builds the supervised examples (prompt, images,
    answer) only when they are needed."""
    if not warm.warm_start_steps or config.resume_from_checkpoint:
        return None
    engine = trainer.accelerator.distributed_type
    if engine in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        from vlm_rl.errors import ConfigError

        # the warm start trains the unwrapped policy outside accelerate: FSDP and ZeRO-3 hold it in
        # shards (FSDP2: "got mixed torch.Tensor and DTensor"), ZeRO-1/2 would overwrite it with
        # their own fp32 copy at the first RL step
        raise ConfigError(
            f"--warm_start_steps {warm.warm_start_steps}: the supervised warm start does not run under "
            f"{engine.value}; pass --warm_start_steps 0 (or start from a trained adapter: --init_adapter)"
        )
    base = trainer.evaluate()
    supervised_warm_start(
        trainer.policy.unwrapped.policy,
        trainer.policy.processor,
        dataset(),
        steps=warm.warm_start_steps,
        learning_rate=warm.warm_start_learning_rate,
        batch_size=warm.warm_start_batch_size,
        seed=config.seed,
    )
    trainer.policy.weights_changed()  # a rollout engine with its own copy of the weights reloads them
    return base


def load_rl_datasets(config: RLConfig, held_out: str) -> tuple[datasets.Dataset, datasets.Dataset, str, bool]:
    """(training prompts, evaluation prompts, how the closing line names the evaluation, whether it
    is held out): the
    evaluation prompts come from --eval_dataset, else the dataset's test split (`held_out` names
    them, e.g. "unseen images"), else (a JSONL file, a saved Dataset) the training prompts, and the
    name says so. Images shared by both sets (identical content) are counted and named too. The
    tiny default refuses text it would read as mostly <unk>."""
    train_dataset = load_task_dataset(
        config.dataset, "train", num_samples=config.max_train_prompts, seed=config.seed
    )
    if not is_task_dataset(config.dataset):
        check_vocabulary(config.model_name_or_path, _texts(train_dataset), config.dataset)
    eval_dataset, is_held_out = load_eval_dataset(
        config.dataset, config.eval_dataset, num_samples=config.max_eval_prompts, seed=config.seed
    )
    if not is_held_out:
        name = (
            f"no held-out split in {config.dataset} ({len(eval_dataset)} training prompts evaluated; pass "
            "--eval_dataset for a held-out score)"
        )
        return train_dataset, eval_dataset, name, False
    shared = count_shared_images(train_dataset, eval_dataset)
    if config.eval_dataset:
        held_out = f"prompts of {config.eval_dataset}"
    if shared:
        logger.warning("%d image(s) of the evaluation prompts also appear in the training prompts", shared)
    overlap = f"{shared} image(s) shared with training" if shared else "no image shared with training"
    return train_dataset, eval_dataset, f"held-out ({len(eval_dataset)} {held_out}; {overlap})", True


def _texts(dataset: datasets.Dataset, limit: int = 2000) -> list[str]:
    """The prompt (and chosen/rejected) texts of at most `limit` rows."""
    rows = dataset.select(range(min(limit, len(dataset))))
    columns = [column for column in ("prompt", "chosen", "rejected") if column in rows.column_names]
    return [completion_text(value) for column in columns for value in rows[column]]


def run_rl(
    config: RLConfig,
    warm: WarmStartConfig,
    reward: CombinedReward,
    eval_metric: EvalMetric,
    accelerator: Accelerator,
    *,
    metric: str,
    held_out: str,
) -> dict:
    """Train and report. Returns the {"before", "after"} held-out metrics of RL.

    The policy is the base + LoRA (reference = adapter disabled, PPO critic = value head on the
    same trunk); prompts come from `config.dataset` (held-out ones on the test split). With
    `warm.warm_start_steps`, a short supervised warm start (the SFT stage of RLHF) runs first and
    the base policy's score is reported too. RL runs on the native engine (`RLTrainer`), or with
    `--trainer trl` on TRL's GRPOTrainer (`vlm_rl.rl.trl_backend.TRLRun`). The main process
    prints `metric` (e.g. "caption_accuracy") and the reward before and after, for `held_out` items
    (e.g. "unseen images"), then pushes the run when `config.push_to_hub`.
    """
    on_trl = config.trainer == "trl"
    if on_trl:
        from vlm_rl.rl import trl_backend

        trl_backend.check_mappable(config)  # before anything is loaded
    train_dataset, eval_dataset, held_out, is_held_out = load_rl_datasets(
        config, held_out
    )  # before the model
    if accelerator.is_main_process:
        RunFolder(config.output_dir).write_evaluation(held_out, is_held_out)
    model, processor = load_base(config, accelerator)
    policy, value_head = build_policy(config, model)

    engine = trl_backend.TRLRun if on_trl else RLTrainer
    trainer = engine(
        config, policy, processor, reward, train_dataset, eval_dataset, eval_metric, accelerator, value_head
    )
    base = warm_start(trainer, config, warm, lambda: train_dataset)
    result = trainer.train()
    final = trainer.save_final(result["after"])

    if accelerator.is_main_process:
        label = "TRL GRPOTrainer, " if on_trl else ""
        print_closing(config, warm, metric, held_out, base, result["before"], result["after"], final, label)
    return result


def print_closing(
    config: RLConfig,
    warm: WarmStartConfig,
    metric: str,
    held_out: str,
    base: dict | None,
    before: dict,
    after: dict,
    final: str | Path,
    engine: str = "",
) -> None:
    """The closing lines of an RL run (main process): the warm start's effect when one ran, `metric`
    and the reward before -> after on the `held_out` items, where the adapter is, then the push."""
    label = metric.replace("_", " ")

    def score(metrics: dict) -> str:
        return f"{metrics.get(f'eval/{metric}', float('nan')):.3f}"

    if base is not None:
        print(
            f"base policy: {label} {score(base)}; after the {warm.warm_start_steps}-step warm start "
            f"(RL starts here): {score(before)}"
        )
    # A user's dataset without the task metric's column (e.g. `solution` instead of `answer`) has
    # only the reward to show; "accuracy nan -> nan" would read as a failure.
    shown = f"{label} {score(before)} -> {score(after)}, " if f"eval/{metric}" in after else ""
    print(
        f"{engine}{held_out}: {shown}reward "
        f"{before['eval/reward']:.3f} -> {after['eval/reward']:.3f}; adapter saved to {final}"
    )
    if config.push_to_hub:
        from vlm_rl.hub import push_after_training

        print(push_after_training(config))
