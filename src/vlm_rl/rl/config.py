"""The RL configuration: one documented dataclass for PPO, GRPO and RLOO (parsed by TrlParser)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from vlm_rl.errors import ConfigError, check_ranges


def _f(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class RLConfig:
    """Settings of an RL run. Every field is a command-line flag (`--name value`) and a YAML key."""

    # Algorithm
    algorithm: str = _f(
        "ppo",
        "ppo (critic + GAE), grpo (group-normalised), rloo (leave-one-out), or GRPO's advantages with "
        "another policy loss: gspo (sequence-level ratio), cispo (truncated IS-weighted REINFORCE), sapo "
        "(soft gate); any name registered with vlm_rl.rl.algorithms.register_algorithm.",
    )
    trainer: Literal["native", "trl"] = _f(
        "native",
        "GRPO engine: native (vlm_rl's RLTrainer) or trl (TRL's GRPOTrainer fed by vlm_rl's policy, data, "
        "rewards and held-out evaluation; --algorithm grpo, gspo, cispo or sapo, see vlm_rl.rl.trl_backend).",
    )
    use_vllm: bool = _f(False, "--trainer trl: generate with vLLM (TRL's use_vllm; needs GPU + vllm).")
    vllm_mode: Literal["colocate", "server"] = _f(
        "colocate", "--use_vllm: colocate (vLLM inside the training processes) or server (`trl vllm-serve`)."
    )
    # Model
    model_name_or_path: str = _f("tiny-llava", "Policy base VLM: hub id, local folder or tiny default.")
    lora_r: int = _f(16, "LoRA rank on the language model's linear layers.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    train_projector: bool = _f(True, "Also train the vision-to-text projector (fully).")
    init_adapter: str | None = _f(None, "Start from this saved adapter folder (e.g. an SFT warm start).")
    # Model loading (vlm_rl.models.load_model / wrap_with_lora; the reward model loads the same way)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto",
        "Weights' dtype: auto (the checkpoint's; the embedded models are fp32), bf16, fp16 or fp32. "
        "Training runs in it (no autocast); LoRA weights stay fp32.",
    )
    gradient_checkpointing: bool = _f(
        False, "Recompute each decoder layer's activations in the backward pass (less memory, more compute)."
    )
    attn_implementation: str | None = _f(
        None, "Attention kernel: sdpa, eager, flash_attention_2, ... (default: transformers' choice)."
    )
    load_in_4bit: bool = _f(
        False, "QLoRA: load the base in 4-bit NF4 (bitsandbytes, CUDA); projector and LM head unquantised."
    )
    load_in_8bit: bool = _f(False, "Load the base in 8-bit (bitsandbytes, CUDA).")
    lora_target_modules: list[str] = _f(
        None,
        "LoRA only on the language model's linear layers with these names (e.g. q_proj v_proj); "
        "default: all of them.",
    )
    trust_remote_code: bool = _f(
        False, "Run modelling code shipped with the checkpoint (only for repositories you trust)."
    )
    # Data
    dataset: str = _f(
        "easy-vqa:caption",
        "Prompts: 'easy-vqa:caption', 'easy-vqa:vqa', a .jsonl/.json/.parquet/.csv file, a save_to_disk or "
        "imagefolder folder, or a hub name.",
    )
    max_train_prompts: int | None = _f(None, "Use at most this many training prompts.")
    max_eval_prompts: int = _f(200, "Held-out prompts used at each evaluation.")
    eval_dataset: str | None = _f(
        None,
        "Held-out prompts (same forms as --dataset); default: the dataset's test split (easy-vqa: unseen "
        "images). A JSONL file or a saved Dataset has none: evaluation then uses training prompts and says so.",
    )
    # Rewards
    reward_model_path: str | None = _f(
        None, "Learned reward model folder or hub id (None: rule rewards only)."
    )
    reward_model_weight: float = _f(1.0, "Weight of the reward model in the total reward.")
    reward_funcs: list[str] = _f(
        None,
        "Reward functions: built-in rule names (vlm_rl.rewards.rules.RULE_REWARDS, e.g. exact_match) "
        "or import paths (my_pkg.rewards:fn or my_pkg.rewards.fn), as TRL's CLI.",
    )
    reward_weights: list[float] = _f(
        None, "Weights of the reward functions, in the same order (default 1.0 each)."
    )
    normalize_rewards: bool = _f(
        False, "Standardise each reward component across the batch before weighting."
    )
    missing_eos_penalty: float = _f(1.0, "Subtracted from the reward of a completion that never emitted EOS.")
    overlong_buffer: int = _f(
        0,
        "DAPO's soft overlong punishment: over the last this many tokens before max_new_tokens the reward "
        "falls linearly, down to -overlong_penalty at max_new_tokens (TRL's soft_punish_cache); 0 = off.",
    )
    overlong_penalty: float = _f(1.0, "The overlong punishment at max_new_tokens (--overlong_buffer > 0).")
    # Rollout
    prompts_per_step: int = _f(8, "Prompts per RL step (over all processes).")
    samples_per_prompt: int = _f(8, "Completions sampled per prompt (the group size of GRPO/RLOO).")
    max_new_tokens: int = _f(4, "Completion length limit.")
    temperature: float = _f(1.0, "Sampling temperature (log-probs are computed at the same temperature).")
    top_p: float = _f(1.0, "Nucleus sampling threshold.")
    rollout_engine: Literal["hf", "vllm"] = _f(
        "hf",
        "What samples the rollouts: hf (transformers' generate in the training process, each prompt "
        "prefilled once) or vllm (a vLLM server: yours at --vllm_url, or one the run starts and stops; "
        "the LoRA adapter is hot-loaded after each update; docs/rollout_engine.md).",
    )
    vllm_url: str | None = _f(
        None,
        "--rollout_engine vllm: the address of a server you run, e.g. http://127.0.0.1:8000 (default: the "
        "run starts its own from --vllm_python's venv and stops it at the end).",
    )
    vllm_python: str | None = _f(
        None,
        "--rollout_engine vllm without --vllm_url: the python of the venv holding vLLM, for the server the "
        "run starts (default: $VLM_RL_VLLM_PYTHON, else .venv-vllm/bin/python; `make vllm-env`).",
    )
    vllm_cpus: str | None = _f(
        None,
        "--rollout_engine vllm without --vllm_url: the CPU cores the started server is pinned to, e.g. 0 "
        "or 0-3 (vLLM's VLLM_CPU_OMP_THREADS_BIND; default: not pinned).",
    )
    async_rollouts: bool = _f(
        False,
        "One-step-off rollouts (--rollout_engine vllm): the server samples step t+1 while the trainer "
        "updates on step t, one update behind, corrected by the importance weights (verl's one-step-off).",
    )
    vllm_importance_sampling_cap: float = _f(
        2.0,
        "--rollout_engine vllm: truncated importance sampling for the engine/trainer mismatch, each token "
        "weighted by min(pi_trainer / pi_vllm, cap) (TRL's name; verl's tis_imp_ratio_cap).",
    )
    # Optimisation
    learning_rate: float = _f(1e-4, "Peak learning rate (AdamW).")
    lr_scheduler_type: str = _f(
        "cosine", "transformers scheduler name: cosine, linear, constant, constant_with_warmup, ..."
    )
    warmup_steps: int = _f(0, "Learning-rate warm-up steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    total_steps: int = _f(300, "RL steps to run.")
    lr_decay_steps: int | None = _f(None, "Steps over which the schedule decays (default total_steps).")
    ppo_epochs: int = _f(1, "Passes over each step's samples.")
    minibatch_size: int = _f(64, "Samples per forward/backward (per process).")
    gradient_accumulation_steps: int = _f(1, "Minibatches per optimizer step.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    clip_range: float = _f(
        0.2, "PPO ratio clip (lower side; also the upper side unless clip_range_high is set)."
    )
    clip_range_high: float | None = _f(None, "Upper ratio clip (DAPO clip-higher), e.g. 0.28.")
    loss_aggregation: Literal["token", "sequence", "fixed"] = _f(
        "token", "token (DAPO), sequence (GRPO) or fixed (Dr. GRPO: sum / max_new_tokens)."
    )
    entropy_coef: float = _f(
        0.02, "Entropy bonus coefficient (0: the entropy is only logged, computed without a graph)."
    )
    sapo_temperature_pos: float = _f(
        1.0, "--algorithm sapo: the gate's temperature on tokens of positive advantage (TRL's name)."
    )
    sapo_temperature_neg: float = _f(
        1.05, "--algorithm sapo: the gate's temperature on tokens of non-positive advantage (TRL's name)."
    )
    # Critic (PPO)
    value_coef: float = _f(0.1, "Value-loss coefficient.")
    value_learning_rate: float | None = _f(
        None, "Learning rate of the value head (default: 10 x learning_rate)."
    )
    value_clip_range: float = _f(0.2, "Value clip around the rollout-time value.")
    gamma: float = _f(1.0, "Discount factor.")
    lam: float = _f(0.95, "GAE lambda.")
    whiten_advantages: bool = _f(True, "Whiten PPO advantages over the batch.")
    # Agents (multi-turn episodes)
    turn_credit: Literal["bi_level", "turn"] = _f(
        "bi_level",
        "PPO over turns: bi_level (VAGEN: GAE across turns, then tokens inside a turn) or turn "
        "(one GAE step per turn, its advantage shared by the turn's tokens).",
    )
    turn_gamma: float = _f(0.95, "Discount across turns (agents).")
    turn_lam: float = _f(0.95, "GAE lambda across turns (agents).")
    step_group_weight: float = _f(
        0.0,
        "GRPO/RLOO agents: weight of GiGPO's step-level advantage (turns with identical observations "
        "in a group compared by return-to-go); 0 = episode-level advantages only.",
    )
    # Speed
    shared_prefix: bool = _f(
        True,
        "Scoring and update forward each prompt once for all its samples (their completions attend to "
        "its KV cache; same log-probs and gradients); False: a forward per sample.",
    )
    # Group methods (GRPO/RLOO)
    scale_rewards: bool = _f(True, "GRPO: divide by the group's reward std (False = Dr. GRPO).")
    dynamic_sampling: bool = _f(False, "Drop groups whose rewards are all equal (no learning signal).")
    # KL to the reference (= the base model, adapter disabled)
    kl_coef: float = _f(0.0, "KL coefficient; 0 skips the reference pass entirely.")
    kl_estimator: Literal["k1", "k2", "k3"] | None = _f(
        None,
        "KL estimator; default k1 for PPO (in the reward) and k3 for GRPO/RLOO (in the loss, as GRPO/TRL).",
    )
    kl_importance_weighted: bool = _f(
        False,
        "KL in the loss: weight each token's KL by the ratio pi/pi_old (DeepSeek-V3.2's unbiased "
        "estimate; TRL's use_bias_correction_kl).",
    )
    adaptive_kl: bool = _f(False, "Adapt kl_coef toward target_kl (Ziegler et al. 2019).")
    target_kl: float = _f(0.1, "Target KL per sequence for the adaptive controller.")
    kl_horizon: int = _f(10000, "Horizon of the adaptive KL controller.")
    # Bookkeeping
    output_dir: str | None = _f(
        None, "Run folder: config, metrics, samples, checkpoints, final adapter (default runs/<algorithm>)."
    )
    seed: int = _f(0, "Random seed.")
    logging_steps: int = _f(1, "Log metrics every this many steps.")
    eval_steps: int = _f(
        50, "Evaluate (greedy, held-out prompts) every this many steps; 0 = only at start and end."
    )
    save_steps: int = _f(100, "Checkpoint every this many steps; 0 = never.")
    save_total_limit: int = _f(2, "Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = _f(
        None, "A checkpoint folder, or 'latest' for the newest in output_dir."
    )
    num_threads: int | None = _f(None, "torch CPU threads (set it explicitly on shared CPUs).")
    sample_log_steps: int = _f(10, "Write sample completions every this many steps.")
    push_to_hub: bool = _f(False, "Push the final adapter to the hub.")
    hub_model_id: str | None = _f(None, "Hub repo id for --push_to_hub.")
    hub_private: bool = _f(False, "Create the hub repo as private.")
    hub_revision: str | None = _f(None, "Push to this branch of the repo (created if missing); default main.")
    hub_push_checkpoints: bool = _f(
        False,
        "With --push_to_hub, also push each checkpoint's adapter as it is saved (a failed push is logged).",
    )
    # Report
    report_to: str = _f(
        "tensorboard",
        "Trackers mirroring metrics.jsonl, comma-separated: tensorboard, trackio (local), wandb (offline "
        "unless $WANDB_MODE), or none.",
    )
    report_steps: int = _f(
        0, "Also write report.html every this many steps; 0 = only at the end (vlm_rl.report)."
    )

    def __post_init__(self):
        if self.reward_funcs is None:
            self.reward_funcs = []
        if self.reward_weights is None:
            self.reward_weights = [1.0] * len(self.reward_funcs)
        self.validate()
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("--load_in_4bit and --load_in_8bit exclude each other: pick one")
        from vlm_rl.rl.algorithms import ALGORITHMS, get_algorithm

        if self.algorithm not in ALGORITHMS:
            from vlm_rl.errors import closest

            raise ConfigError(
                f"--algorithm {self.algorithm!r}: unknown; choose among {', '.join(sorted(ALGORITHMS))}"
                f"{closest(self.algorithm, ALGORITHMS)}"
            )
        algorithm = get_algorithm(self.algorithm)
        if self.samples_per_prompt < algorithm.min_samples_per_prompt:
            raise ConfigError(
                f"--samples_per_prompt {self.samples_per_prompt}: {self.algorithm} needs samples_per_prompt >= "
                f"{algorithm.min_samples_per_prompt} (advantages come from the group)"
            )
        if self.kl_estimator is None:
            self.kl_estimator = algorithm.default_kl_estimator
        if self.output_dir is None:
            self.output_dir = f"runs/{self.algorithm}"
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"--reward_weights: {len(self.reward_weights)} weight(s) {self.reward_weights} for "
                f"{len(self.reward_funcs)} reward function(s) {self.reward_funcs} of --reward_funcs; give one "
                "weight per function, in the same order"
            )
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("--push_to_hub needs --hub_model_id")
        if self.hub_push_checkpoints and not self.push_to_hub:
            raise ConfigError("--hub_push_checkpoints needs --push_to_hub (and --hub_model_id)")
        if self.trainer == "trl":
            from vlm_rl.rl.trl_backend import TRL_LOSSES

            if self.algorithm not in TRL_LOSSES:
                raise ConfigError(
                    f"--trainer trl runs TRL's GRPOTrainer: it needs --algorithm grpo, not {self.algorithm} "
                    f"(or another of its loss types: {', '.join(sorted(set(TRL_LOSSES) - {'grpo'}))})"
                )
        if self.rollout_engine == "vllm":
            _check_vllm_engine(self)
        elif self.async_rollouts:
            raise ConfigError(
                "--async_rollouts needs --rollout_engine vllm: HF generate samples in the training process, "
                "from the weights being updated"
            )
        if self.use_vllm and self.trainer != "trl":
            raise ConfigError(
                "--use_vllm needs --trainer trl (the native engine generates with transformers)"
            )
        from vlm_rl.run_folder import parse_report_to

        parse_report_to(self.report_to)  # an unknown tracker fails here, before any model loads

    def validate(self) -> None:
        """Ranges of the numeric fields and consistent combinations (before anything is loaded)."""
        check_ranges(
            self,
            {
                "lora_r": ">= 1",
                "lora_alpha": "> 0",
                "max_train_prompts": ">= 1",
                "max_eval_prompts": ">= 1",
                "reward_model_weight": "finite",
                "reward_weights": "finite",
                "missing_eos_penalty": ">= 0",
                "overlong_buffer": ">= 0",
                "overlong_penalty": ">= 0",
                "sapo_temperature_pos": "> 0",
                "sapo_temperature_neg": "> 0",
                "prompts_per_step": ">= 1",
                "samples_per_prompt": ">= 1",
                "max_new_tokens": ">= 1",
                "temperature": "> 0",
                "top_p": "(0, 1]",
                "vllm_importance_sampling_cap": ">= 1",
                "learning_rate": "> 0",
                "warmup_steps": ">= 0",
                "weight_decay": ">= 0",
                "report_steps": ">= 0",
                "total_steps": ">= 1",
                "lr_decay_steps": ">= 1",
                "ppo_epochs": ">= 1",
                "minibatch_size": ">= 1",
                "gradient_accumulation_steps": ">= 1",
                "max_grad_norm": "> 0",
                "clip_range": "> 0",
                "clip_range_high": "> 0",
                "entropy_coef": ">= 0",
                "value_coef": ">= 0",
                "value_learning_rate": "> 0",
                "value_clip_range": "> 0",
                "gamma": "[0, 1]",
                "lam": "[0, 1]",
                "turn_gamma": "[0, 1]",
                "turn_lam": "[0, 1]",
                "step_group_weight": ">= 0",
                "kl_coef": ">= 0",
                "target_kl": "> 0",
                "kl_horizon": ">= 1",
                "seed": ">= 0",
                "logging_steps": ">= 1",
                "eval_steps": ">= 0",
                "save_steps": ">= 0",
                "save_total_limit": ">= 1",
                "num_threads": ">= 1",
                "sample_log_steps": ">= 0",
            },
        )
        _check_scheduler(self.lr_scheduler_type)
        if self.warmup_steps >= (self.lr_decay_steps or self.total_steps) and self.warmup_steps:
            raise ConfigError(
                f"--warmup_steps {self.warmup_steps}: the warm-up must end before the schedule does "
                f"(--lr_decay_steps/--total_steps {self.lr_decay_steps or self.total_steps}); lower it"
            )
        if self.clip_range_high is not None and self.clip_range_high < self.clip_range:
            raise ConfigError(
                f"--clip_range_high {self.clip_range_high}: must be >= --clip_range {self.clip_range} "
                "(clip-higher widens the upper side)"
            )
        if self.overlong_buffer > self.max_new_tokens:
            raise ConfigError(
                f"--overlong_buffer {self.overlong_buffer}: the punished stretch must fit in --max_new_tokens "
                f"{self.max_new_tokens}; lower it"
            )
        if self.adaptive_kl and not self.kl_coef:
            raise ConfigError(
                "--adaptive_kl adapts --kl_coef, which is 0 (no KL term at all); give a starting --kl_coef > 0"
            )
        if self.resume_from_checkpoint == "":
            raise ConfigError("--resume_from_checkpoint: empty; give 'latest' or a checkpoint folder")


def _check_vllm_engine(config: RLConfig) -> None:
    """--rollout_engine vllm: a server to reach, the native trainer, and only weights it can load."""
    if config.trainer != "native":
        raise ConfigError(
            "--rollout_engine vllm is the native trainer's engine; --trainer trl has its own (--use_vllm)"
        )
    if not config.vllm_url:  # the run starts its server: its python and cores, checked before any model loads
        from vlm_rl.rl.vllm_server import cpu_list, find_vllm_python

        if config.vllm_cpus is not None:
            try:
                cores = cpu_list(config.vllm_cpus)
            except ConfigError:
                cores = []
            if not cores or max(cores) >= (os.cpu_count() or 1):
                raise ConfigError(
                    f"--vllm_cpus {config.vllm_cpus}: give this machine's cores (0-{(os.cpu_count() or 1) - 1}) "
                    "as a list such as 0, 0-3 or 0,2"
                )
        find_vllm_python(config.vllm_python)
    if config.train_projector:
        raise ConfigError(
            "--rollout_engine vllm: vLLM applies a LoRA adapter to the language model only and would ignore the "
            "trained projector (its rollouts would come from another policy); add --train_projector false"
        )


def _check_scheduler(name: str) -> None:
    """The learning-rate schedule must be one transformers knows (`--lr_scheduler_type`)."""
    from transformers import SchedulerType

    from vlm_rl.errors import closest

    choices = [member.value for member in SchedulerType]
    if name not in choices:
        raise ConfigError(
            f"--lr_scheduler_type {name!r}: unknown schedule; choose among {', '.join(choices)}"
            f"{closest(name, choices)}"
        )


@dataclass
class WarmStartConfig:
    """Optional short supervised warm start before RL (answers from the dataset's `answer` column)."""

    warm_start_steps: int = _f(0, "Supervised steps before RL (0 = start RL from the base policy).")
    warm_start_learning_rate: float = _f(1e-3, "Learning rate of the warm start.")
    warm_start_batch_size: int = _f(32, "Prompts per warm-start step.")

    def __post_init__(self):
        check_ranges(
            self,
            {"warm_start_steps": ">= 0", "warm_start_learning_rate": "> 0", "warm_start_batch_size": ">= 1"},
        )


@dataclass
class AgentConfig:
    """The environment side of an agent run (recipes/ppo_agent.py); the RL side is `RLConfig`,
    where `prompts_per_step` = environment seeds per step and `samples_per_prompt` = episodes per
    seed (the group of GRPO/RLOO: the same map G times)."""

    env: str = _f(
        "frozenlake",
        "Environment: a built-in (frozenlake, numberline, cliffwalking, sokoban, babyai-gotoredballnodists, "
        "babyai-gotoobj), a gymnasium id (MiniGrid-Empty-5x5-v0), "
        "gymnasium's module:EnvId (minigrid:BabyAI-GoToRedBallNoDists-v0) or pkg.module:Class (a gymnasium.Env).",
    )
    env_size: int | None = _f(
        None, "Built-in grid size (FrozenLake: 4 = the 4x4 random maps; Sokoban: 6 = 6x6 rooms)."
    )
    slippery: bool = _f(False, "FrozenLake/CliffWalking built-ins: slippery moves.")
    render: str | None = _f(
        None,
        "flat (one cell per image patch; the default of the built-ins and MiniGrid/BabyAI) or env (the env's "
        "own frames; the default of other envs).",
    )
    max_turns: int | None = _f(
        None,
        "Turns per episode (default: the built-in's, else the gymnasium spec's max_episode_steps, or minigrid's "
        "max_steps).",
    )
    actions: str | None = _f(
        None,
        "Non-built-ins: the action words, comma-separated, in action order (default: the env's own names: "
        "action_names, an actions Enum, get_action_meanings()).",
    )
    instruction: str | None = _f(
        None, "Non-built-ins: the text opening every turn's prompt (default: 'action : w1 , w2 , ... ?')."
    )
    env_kwargs: str | None = _f(
        None, "Non-built-ins: the env's constructor arguments as a JSON object, e.g. '{\"size\": 6}'."
    )
    invalid_penalty: float = _f(0.1, "Reward subtracted on a turn whose reply holds no valid action.")
    context_frames: int = _f(1, "Frames in each turn's prompt: the current one and k-1 before it.")
    context_actions: int = _f(0, "Past actions listed in each turn's prompt (0 = none).")
    eval_episodes: int = _f(100, "Held-out episodes (one per held-out seed) at each evaluation.")
    expert_warm_start_seeds: int = _f(
        500, "Training seeds whose expert (shortest-path) turns feed the supervised warm start."
    )

    def env_options(self) -> dict:
        """Keyword arguments of `vlm_rl.envs.make_env`: every flag that is set, so that make_env can
        refuse one that does not apply to the environment's kind (never drop it)."""
        options: dict = {"invalid_penalty": self.invalid_penalty}
        set_flags = {
            "size": self.env_size,
            "slippery": True if self.slippery else None,
            "render": self.render,
            "max_turns": self.max_turns,
            "actions": self.actions.split(",") if self.actions is not None else None,
            "instruction": self.instruction,
            "env_kwargs": self.parsed_env_kwargs(),
        }
        options.update({key: value for key, value in set_flags.items() if value is not None})
        return options

    def parsed_env_kwargs(self) -> dict | None:
        """--env_kwargs as a dict (a JSON string on the command line, a mapping in a YAML config)."""
        import json

        if self.env_kwargs is None or isinstance(self.env_kwargs, dict):
            return self.env_kwargs
        try:
            parsed = json.loads(self.env_kwargs)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"--env_kwargs {self.env_kwargs!r}: not JSON ({error}); e.g. '{{\"size\": 6}}'"
            ) from error
        if not isinstance(parsed, dict):
            raise ConfigError(
                f"--env_kwargs {self.env_kwargs!r}: must be a JSON object, e.g. '{{\"size\": 6}}'"
            )
        return parsed

    def __post_init__(self):
        check_ranges(
            self,
            {
                "env_size": ">= 2",
                "max_turns": ">= 1",
                "invalid_penalty": ">= 0",
                "context_frames": ">= 1",
                "context_actions": ">= 0",
                "eval_episodes": ">= 1",
                "expert_warm_start_seeds": ">= 1",
            },
        )
        if self.render not in (None, "flat", "env"):
            raise ConfigError(
                f"--render {self.render!r}: choose flat (one cell per image patch) or env (the env's own frames)"
            )
        self.parsed_env_kwargs()
