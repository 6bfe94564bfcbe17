"""Train a multimodal reward model from preference pairs with the Bradley-Terry loss.

loss = -log sigmoid(r_chosen - r_rejected - margin)          (Ouyang et al. 2022, eq. 1;
                                                               margin as in Llama 2, Touvron et al. 2023)
       + center_coef * mean((r_chosen + r_rejected)^2)        (reward centering, Eisenstein et al. 2023)

Runs under accelerate (one process or many), with gradient accumulation, a learning-rate
schedule, evaluation on held-out pairs every `eval_steps` (pairwise accuracy, mean margin),
metrics.jsonl + tensorboard, a progress bar, and the final and best models saved atomically.

Checkpoints (every `save_steps`, the run folder's `CheckpointManager`) hold accelerate's state
(weights, optimizer, scheduler, the RNG states of torch/python/numpy) and the position in the data
(epoch, batches done); the order of each epoch is a function of (seed, epoch) alone. So a run resumed
with `resume_from_checkpoint` ends with the weights of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler

from vlm_rl.data.collators import PreferenceBatch, PreferenceCollator
from vlm_rl.data.loaders import count_shared_images, load_eval_dataset, load_task_dataset
from vlm_rl.data.validation import completion_text
from vlm_rl.distributed import make_accelerator
from vlm_rl.errors import ConfigError, DataError, check_ranges
from vlm_rl.models.loading import loading_kwargs
from vlm_rl.models.shared_prefix import supports_shared_prefix
from vlm_rl.models.tiny import check_vocabulary
from vlm_rl.report import report_at_step
from vlm_rl.report.records import save_eval_scores
from vlm_rl.rewards.model import RewardModel, RewardScorer
from vlm_rl.run_folder import TRAINER_STATE_NAME, CheckpointManager, RunFolder, atomic_dir, parse_report_to
from vlm_rl.tasks import is_task_dataset

logger = logging.getLogger(__name__)


@dataclass
class RewardTrainingConfig:
    """Settings of a reward-model training run (every field is a command-line flag)."""

    model_name_or_path: str = field(
        default="tiny-llava", metadata={"help": "Backbone VLM: hub id, folder or tiny default."}
    )
    dataset: str = field(
        default="easy-vqa:caption_preference",
        metadata={
            "help": "Preference data: 'easy-vqa:caption_preference', a JSONL file, a saved dataset folder or a hub name."
        },
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Held-out pairs; default: the dataset's test split (easy-vqa: unseen images)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training images/pairs."}
    )
    max_eval_samples: int | None = field(
        default=400, metadata={"help": "Evaluate on at most this many held-out pairs."}
    )
    output_dir: str = field(
        default="reward_models/caption_preference", metadata={"help": "Where the run and the model go."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank on the language model's linear layers."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    train_projector: bool = field(
        default=True, metadata={"help": "Train the vision-to-text projector fully."}
    )
    # Model loading (vlm_rl.models.load_model / wrap_with_lora)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto",
        metadata={
            "help": "Weights' dtype: auto (the checkpoint's; the embedded models are fp32), bf16, fp16 or fp32."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute decoder activations in the backward pass (less memory)."}
    )
    shared_prefix: bool = field(
        default=True,
        metadata={
            "help": "Forward each pair's prompt (image + question) once for its chosen and rejected answers "
            "(families whose row allows it; off under gradient checkpointing). Same scores and gradients."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: sdpa, eager, flash_attention_2, ... (default: auto)."},
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the backbone in 4-bit NF4 (bitsandbytes, CUDA)."}
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Load the backbone in 8-bit (bitsandbytes, CUDA)."}
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "LoRA only on the language model's linear layers with these names (e.g. q_proj v_proj)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run modelling code shipped with the checkpoint (trusted repos only)."},
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "transformers scheduler name: cosine, linear, constant, ..."}
    )
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Fraction of steps spent warming up the learning rate."}
    )
    num_epochs: float = field(
        default=1.0, metadata={"help": "Passes over the training pairs (max_steps wins if set)."}
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps to run (overrides num_epochs)."}
    )
    per_device_batch_size: int = field(default=16, metadata={"help": "Pairs per device per micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    center_rewards_coefficient: float = field(
        default=0.0, metadata={"help": "Weight of the reward-centering term (0 = off)."}
    )
    eval_steps: int = field(
        default=50,
        metadata={"help": "Evaluate every this many optimizer steps; 0 = only at start and end."},
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Log training metrics every this many optimizer steps."}
    )
    save_steps: int = field(
        default=100, metadata={"help": "Checkpoint every this many optimizer steps; 0 = never."}
    )
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, or 'latest' for the newest in output_dir/checkpoints."},
    )
    seed: int = field(default=0, metadata={"help": "Random seed (data order, head init, sampling of pairs)."})
    num_threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads (default: torch's choice)."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final reward model to the hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id for --push_to_hub."})
    hub_private: bool = field(default=False, metadata={"help": "Create the hub repo as private."})
    hub_revision: str | None = field(
        default=None, metadata={"help": "Push to this branch of the repo (created if missing); default main."}
    )
    # Report
    report_to: str = field(
        default="tensorboard",
        metadata={
            "help": "Trackers mirroring metrics.jsonl, comma-separated: tensorboard, trackio (local), wandb "
            "(offline unless $WANDB_MODE), or none."
        },
    )
    report_steps: int = field(
        default=0,
        metadata={
            "help": "Also write report.html every this many steps; 0 = only at the end (vlm_rl.report)."
        },
    )

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("--load_in_4bit and --load_in_8bit exclude each other: pick one")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("--push_to_hub needs --hub_model_id")
        parse_report_to(self.report_to)  # an unknown tracker fails here, before any model loads
        self.validate()

    def validate(self) -> None:
        """Ranges of the numeric fields (before anything is loaded)."""
        check_ranges(
            self,
            {
                "max_train_samples": ">= 1",
                "max_eval_samples": ">= 1",
                "lora_r": ">= 1",
                "lora_alpha": "> 0",
                "learning_rate": "> 0",
                "weight_decay": ">= 0",
                "warmup_ratio": "[0, 1)",
                "num_epochs": "> 0",
                "max_steps": ">= 1",
                "per_device_batch_size": ">= 1",
                "gradient_accumulation_steps": ">= 1",
                "max_grad_norm": "> 0",
                "center_rewards_coefficient": ">= 0",
                "eval_steps": ">= 0",
                "logging_steps": ">= 1",
                "save_steps": ">= 0",
                "report_steps": ">= 0",
                "save_total_limit": ">= 1",
                "seed": ">= 0",
                "num_threads": ">= 1",
            },
        )
        from vlm_rl.rl.config import _check_scheduler

        _check_scheduler(self.lr_scheduler_type)


def pair_texts(dataset, limit: int = 2000) -> list[str]:
    """The prompt, chosen and rejected texts of at most `limit` preference rows."""
    rows = dataset.select(range(min(limit, len(dataset))))
    return [completion_text(value) for column in ("prompt", "chosen", "rejected") for value in rows[column]]


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin), averaged over pairs, plus optional reward centering.

    chosen_rewards, rejected_rewards, margin: (num_pairs,) -> scalar.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


class EpochPermutation(Sampler[int]):
    """A fresh shuffle of `num_items` per epoch, a function of (seed, `epoch`) alone, so a resumed run
    replays the order of an uninterrupted one. The trainer sets `epoch`; accelerate, which calls a
    sampler's `set_epoch` with its own count of passes, is deliberately given nothing to call."""

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())


def score_pairs(scorer: RewardScorer, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    if batch.groups is not None:  # through the (possibly DDP-wrapped) module's forward
        rewards = scorer(groups=batch.groups, completion_ids=batch.completion_ids)
    else:
        rewards = scorer(**batch.inputs)
    return rewards[: batch.num_pairs], rewards[batch.num_pairs :]


@torch.no_grad()
def evaluate(
    scorer: RewardScorer,
    loader: DataLoader,
    accelerator: Accelerator,
    keep_scores: Callable[[list[float], list[float]], None] | None = None,
) -> dict[str, float]:
    """Pairwise accuracy (r_chosen > r_rejected) and mean margin over held-out pairs;
    `keep_scores(chosen, rejected)` receives every pair's scores (the report's histograms)."""
    scorer.eval()
    chosen_scores, rejected_scores = [], []
    for batch in loader:
        chosen, rejected = score_pairs(scorer, batch)
        chosen_scores.append(accelerator.gather_for_metrics(chosen))
        rejected_scores.append(accelerator.gather_for_metrics(rejected))
    scorer.train()
    chosen, rejected = torch.cat(chosen_scores).float(), torch.cat(rejected_scores).float()
    margin = chosen - rejected
    if keep_scores is not None:
        keep_scores(chosen.tolist(), rejected.tolist())
    return {
        "eval/accuracy": (margin > 0).float().mean().item(),
        "eval/margin": margin.mean().item(),
        "eval/pairs": len(margin),
    }


def train_reward_model(
    config: RewardTrainingConfig, dataset_options: dict[str, Any] | None = None
) -> dict[str, float]:
    """Train, evaluate and save a reward model; returns the final evaluation metrics.

    `dataset_options` go to a task dataset's builder (e.g. easy-vqa's
    `tasks.easy_vqa.PreferenceOptions`: pairs per image, graded and malformed fractions), for the
    held-out pairs too when they come from the same dataset; they are saved in run_config.json."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    accelerator = make_accelerator(config.gradient_accumulation_steps)
    set_seed(config.seed)
    run = RunFolder(config.output_dir)
    options = dict(dataset_options or {})

    # Data (validated before any training starts)
    pairs = load_pairs(config, options)
    if accelerator.is_main_process:
        where = config.eval_dataset or config.dataset
        held_out = "held-out" if pairs.held_out else "training"
        run.write_evaluation(f"{len(pairs.eval)} {held_out} pairs of {where}", pairs.held_out)

    # Model, loaders, optimizer
    reward_model = build_reward_model(config, accelerator)
    collator = PreferenceCollator(reward_model.processor, shared_prefix=shares_prefix(config, reward_model))
    order = EpochPermutation(len(pairs.train), config.seed)
    train_loader = DataLoader(
        pairs.train, batch_size=config.per_device_batch_size, sampler=order, collate_fn=collator
    )
    eval_loader = DataLoader(pairs.eval, batch_size=config.per_device_batch_size, collate_fn=collator)
    max_steps = total_steps(config, len(train_loader), accelerator.num_processes)
    params = [p for p in reward_model.scorer.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(config, params, max_steps)
    # The scheduler is stepped by hand once per optimizer step (a prepared one steps once per process);
    # registered so checkpoints still carry it.
    scorer, optimizer, train_loader, eval_loader = accelerator.prepare(
        reward_model.scorer, optimizer, train_loader, eval_loader
    )
    accelerator.register_for_checkpointing(scheduler)

    # Run folder: where a resumed run stands, checkpoints, metrics
    state = (
        resume(run, config.resume_from_checkpoint, accelerator)
        if config.resume_from_checkpoint
        else TrainingState()
    )
    checkpoints = CheckpointManager(run, config.save_total_limit, is_main_process=accelerator.is_main_process)
    metrics_log = None
    if accelerator.is_main_process:  # the same layout as RL runs: metrics.jsonl at the top
        metrics_log = run.start(
            {**asdict(config), **options},
            resume=bool(config.resume_from_checkpoint),
            report_to=config.report_to,
            resumed_step=state.step if config.resume_from_checkpoint else None,
            evaluates_again=False,  # its evaluations are kept in the checkpoint's state
        )

    def evaluate_now() -> dict[str, float]:
        """Held-out accuracy and margin at the current step (their scores kept for the report)."""
        keep = (
            (lambda chosen, rejected: save_eval_scores(run, state.step, chosen, rejected))
            if metrics_log
            else None
        )
        metrics = evaluate(scorer, eval_loader, accelerator, keep)
        if metrics_log:
            metrics_log.log(metrics, step=state.step)
        return metrics

    # Training
    if state.initial is None:
        state.initial = state.final = evaluate_now()
        if accelerator.is_main_process:
            logger.info("held-out pairwise accuracy before training: %.3f", state.initial["eval/accuracy"])
    progress = tqdm(
        total=max_steps,
        initial=state.step,
        desc="reward model",
        disable=not accelerator.is_local_main_process,
    )
    scorer.train()
    while state.step < max_steps:
        order.epoch = state.epoch
        # A resumed run skips the micro-batches its checkpoint's epoch had already consumed.
        batches = (
            accelerator.skip_first_batches(train_loader, state.batches_done)
            if state.batches_done
            else train_loader
        )
        for batch in batches:
            state.batches_done += 1
            with accelerator.accumulate(scorer):
                chosen, rejected = score_pairs(scorer, batch)
                loss = bradley_terry_loss(chosen, rejected, batch.margin, config.center_rewards_coefficient)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            state.running.append(pair_metrics(loss, chosen, rejected))
            if not accelerator.sync_gradients:
                continue  # the optimizer step comes with the last micro-batch of the accumulation
            state.step += 1
            progress.update(1)
            if state.step % config.logging_steps == 0 or state.step == max_steps:
                train_metrics = state.log_train(accelerator, scheduler.get_last_lr()[0])
                progress.set_postfix(
                    loss=f"{train_metrics['train/loss']:.3f}", acc=f"{train_metrics['train/accuracy']:.2f}"
                )
                if metrics_log:
                    metrics_log.log(train_metrics, step=state.step)
            if (config.eval_steps and state.step % config.eval_steps == 0) or state.step == max_steps:
                state.final = evaluate_now()
                if state.final["eval/accuracy"] > state.best_accuracy:
                    state.best_accuracy = state.final["eval/accuracy"]
                    reward_model.config["eval_accuracy"] = state.best_accuracy
                    save_reward_model(accelerator, reward_model, scorer, run.best_dir)
            if config.save_steps and state.step % config.save_steps == 0:
                save_checkpoint(accelerator, checkpoints, state, epoch_length=len(train_loader))
            if metrics_log:
                report_at_step(run.root, state.step, config.report_steps)
            if state.step >= max_steps:
                break
        else:
            state.epoch, state.batches_done = state.epoch + 1, 0
    progress.close()

    # Final model and report
    reward_model.config["eval_accuracy"] = state.final["eval/accuracy"]
    save_reward_model(accelerator, reward_model, scorer, run.final_dir)
    if metrics_log:
        metrics_log.close()
        report_at_step(run.root, state.step, config.report_steps, final=True)
    return {
        **state.final,
        "eval/accuracy_before": state.initial["eval/accuracy"],
        "train/steps": state.step,
        **pairs.report(),
    }


# -- the stages of `train_reward_model` ------------------------------------------------------------
@dataclass
class PreferencePairs:
    """The training and evaluation pairs of a run; `held_out` False when the evaluation pairs are
    the training pairs (a dataset without a held-out split)."""

    train: Any
    eval: Any
    held_out: bool

    def report(self) -> dict[str, float]:
        """What the closing metrics say about the evaluation pairs."""
        shared = float(count_shared_images(self.train, self.eval)) if self.held_out else 0.0
        return {"eval/held_out": float(self.held_out), "eval/images_shared_with_training": shared}


def load_pairs(config: RewardTrainingConfig, options: dict[str, Any]) -> PreferencePairs:
    """The run's preference pairs: `config.dataset`'s training split (its words checked against a
    tiny default's vocabulary) and the held-out pairs (`config.eval_dataset`, else the dataset's test
    split, else the training pairs). `options` go to a task dataset's builder."""
    train = load_task_dataset(
        config.dataset,
        "train",
        kind="preference",
        num_samples=config.max_train_samples,
        seed=config.seed,
        **options,
    )
    if not is_task_dataset(config.dataset):
        check_vocabulary(config.model_name_or_path, pair_texts(train), config.dataset)
    eval_pairs, held_out = load_eval_dataset(
        config.dataset,
        config.eval_dataset,
        kind="preference",
        num_samples=config.max_eval_samples,
        seed=config.seed,
        **options,
    )
    if len(train) == 0:
        raise DataError(f"dataset {config.dataset!r} has no training pairs; check the path/split")
    return PreferencePairs(train, eval_pairs, held_out)


def build_reward_model(config: RewardTrainingConfig, accelerator: Accelerator) -> RewardModel:
    """The reward model to train: `config.model_name_or_path` with a fresh LoRA adapter and score head."""
    with accelerator.main_process_first():  # the first build of a tiny model writes the cache
        reward_model = RewardModel.from_base(
            config.model_name_or_path,
            lora_r=config.lora_r,
            lora_alpha=config.lora_alpha,
            train_projector=config.train_projector,
            seed=config.seed,
            target_modules=config.lora_target_modules,
            gradient_checkpointing=config.gradient_checkpointing,
            **loading_kwargs(config),
        )
    reward_model.config["dataset"] = config.dataset
    return reward_model


def shares_prefix(config: RewardTrainingConfig, reward_model: RewardModel) -> bool:
    """Whether a pair's chosen and rejected completions run on one forward of their prompt."""
    # HF turns the cache off under gradient checkpointing: the prefix could not be shared
    wanted = config.shared_prefix and not config.gradient_checkpointing
    return wanted and supports_shared_prefix(reward_model.scorer.backbone)


def total_steps(config: RewardTrainingConfig, batches_per_epoch: int, num_processes: int) -> int:
    """Optimizer steps of the run: `config.max_steps`, else `config.num_epochs` epochs of
    `batches_per_epoch` micro-batches shared by `num_processes` processes."""
    steps_per_epoch = math.ceil(batches_per_epoch / num_processes / config.gradient_accumulation_steps)
    return config.max_steps or max(1, int(config.num_epochs * steps_per_epoch))


def make_optimizer(config: RewardTrainingConfig, params: list[torch.nn.Parameter], max_steps: int):
    """AdamW over `params` and the learning-rate schedule of `config` over `max_steps` steps."""
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * max_steps),
        num_training_steps=max_steps,
    )
    return optimizer, scheduler


def pair_metrics(loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(3,): a micro-batch's loss, pairwise accuracy and mean margin, without a graph."""
    return torch.stack(
        [loss.detach(), (chosen > rejected).float().mean(), (chosen - rejected).mean().detach()]
    )


@dataclass
class TrainingState:
    """Where a run stands: what a checkpoint holds besides accelerate's state (trainer_state.json)."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    """Micro-batches of `epoch` this process has consumed."""
    best_accuracy: float = -1.0
    initial: dict[str, float] | None = None
    """Held-out metrics before training."""
    final: dict[str, float] | None = None
    """The latest held-out metrics."""
    running: list[torch.Tensor] = field(default_factory=list)
    """`pair_metrics` of the micro-batches since the last log."""
    started: float = field(default_factory=time.perf_counter)
    """`time.perf_counter()` when the run started (earlier by a resumed run's elapsed time)."""

    def log_train(self, accelerator: Accelerator, learning_rate: float) -> dict[str, float]:
        """The train metrics since the last log, averaged over them and over processes; starts anew."""
        mean = accelerator.reduce(torch.stack(self.running).mean(0), reduction="mean").tolist()
        self.running = []
        return {
            "train/loss": mean[0],
            "train/accuracy": mean[1],
            "train/margin": mean[2],
            "train/lr": learning_rate,
            "time/elapsed_s": time.perf_counter() - self.started,
        }

    def to_json(self, epoch_length: int) -> dict[str, Any]:
        """The state as trainer_state.json holds it; a finished epoch (all `epoch_length` micro-batches
        done) is saved as the start of the next."""
        finished = self.batches_done == epoch_length
        return {
            "step": self.step,
            "epoch": self.epoch + 1 if finished else self.epoch,
            "batches_done": 0 if finished else self.batches_done,
            "best_accuracy": self.best_accuracy,
            "initial": self.initial,
            "final": self.final,
            "running": [values.tolist() for values in self.running],
            "elapsed_s": time.perf_counter() - self.started,
        }

    @classmethod
    def from_json(cls, saved: dict[str, Any], device: torch.device) -> TrainingState:
        return cls(
            step=saved["step"],
            epoch=saved["epoch"],
            batches_done=saved["batches_done"],
            best_accuracy=saved["best_accuracy"],
            initial=saved["initial"],
            final=saved["final"],
            running=[torch.tensor(values, device=device) for values in saved["running"]],
            started=time.perf_counter() - saved["elapsed_s"],
        )


def resume(run: RunFolder, checkpoint: str, accelerator: Accelerator) -> TrainingState:
    """Load the checkpoint `checkpoint` of `run` ("latest", a name or a path) into the prepared
    objects (accelerate's state) and return where that run stood."""
    resumed = run.resolve_checkpoint(checkpoint)
    accelerator.load_state(str(resumed))
    state = TrainingState.from_json(
        json.loads((resumed / TRAINER_STATE_NAME).read_text()), accelerator.device
    )
    if accelerator.is_main_process:
        logger.info("resumed from %s at step %d", resumed, state.step)
    return state


def save_reward_model(accelerator: Accelerator, reward_model: RewardModel, scorer, folder: Path) -> None:
    """Write the reward model (with the trained `scorer`'s weights) to `folder`, atomically."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(folder) as tmp:
            reward_model.save_pretrained(tmp, scorer=accelerator.unwrap_model(scorer))


def save_checkpoint(
    accelerator: Accelerator, checkpoints: CheckpointManager, state: TrainingState, epoch_length: int
) -> None:
    """accelerate's state + `state` (the completion marker), atomically; rotated to the limit."""
    checkpoints.save(accelerator, state.step, state.to_json(epoch_length))
