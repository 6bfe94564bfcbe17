"""Load any VLM that `AutoModelForImageTextToText` + `AutoProcessor` load, and wrap it with LoRA."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.utils import is_torchvision_available

from vlm_rl.errors import MissingPathError, ModelNotFoundError, one_line
from vlm_rl.hub_ids import is_hub_id
from vlm_rl.models.families import FamilyFacts, chat_template, family_of, model_family
from vlm_rl.models.processors import load_image_only_processor
from vlm_rl.models.tiny import ensure_tiny, resolve_tiny_name
from vlm_rl.run_folder import REWARD_CONFIG_NAME

logger = logging.getLogger(__name__)


GENERIC_VISION_MODULES = ("vision_tower", "vision_model", "visual")
GENERIC_PROJECTOR_MODULES = ("multi_modal_projector", "connector", "merger")
"""Module-name fragments of the vision tower and projector of a family without a row."""


DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""--dtype names; "auto" (not listed) keeps the checkpoint's dtype (float32 for the embedded models)."""

MODEL_LOADING_FIELDS = ("dtype", "attn_implementation", "load_in_4bit", "load_in_8bit", "trust_remote_code")
"""The config fields (RLConfig, RewardTrainingConfig: their "Model loading" section) that
`load_model` takes as keyword arguments; `loading_kwargs(config)` reads them."""


def loading_kwargs(config) -> dict:
    """`load_model`'s keyword arguments from a config's "Model loading" fields."""
    return {name: getattr(config, name) for name in MODEL_LOADING_FIELDS}


def resolve_model_path(model_name_or_path: str) -> str:
    """A hub id or local folder as given; an embedded name ("tiny-llava", "smol-llava") -> its cached
    folder (built on first use)."""
    from vlm_rl.models.smol_llava import SMOL_LLAVA, ensure_smol_llava

    if model_name_or_path == SMOL_LLAVA:
        return str(ensure_smol_llava())
    tiny = resolve_tiny_name(model_name_or_path)
    return str(ensure_tiny(*tiny)) if tiny else model_name_or_path


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """A torch dtype, "auto", or a --dtype name (bf16, fp16, fp32; bfloat16, float16, float32 too)."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    found = getattr(torch, str(dtype), None)
    if isinstance(found, torch.dtype) and found.is_floating_point:
        return found
    raise ValueError(f"--dtype {dtype!r}: choose auto, bf16, fp16 or fp32")


def quantization_config(
    model_name_or_path: str,
    *,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    dtype: torch.dtype | str = "auto",
    trust_remote_code: bool = False,
):
    """The bitsandbytes config of a QLoRA load (None without 4/8-bit), as TRL's
    `get_quantization_config`: 4-bit NF4 with double quantisation, computing (and storing, so FSDP
    can shard it) in the run's dtype (bfloat16 for "auto" or fp32). The projector and the LM head
    stay unquantised: the projector may be trained fully (--train_projector) and the LM head
    produces the log-probs."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("--load_in_4bit and --load_in_8bit exclude each other: pick one")
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    family = _checkpoint_family(model_name_or_path, trust_remote_code)
    projector = family.projector_modules if family else GENERIC_PROJECTOR_MODULES
    # bitsandbytes matches a skip pattern as a regex from the start of a module's full name
    skip = [r"(?:.*\.)?" + re.escape(name) for name in projector] + ["lm_head"]
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    compute = resolve_dtype(dtype)
    compute = compute if compute in (torch.bfloat16, torch.float16) else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
        llm_int8_skip_modules=skip,
    )


RETURN_FREED_MIN_PARAMETERS = 50_000_000
"""CPU models from this size on get `return_freed_tensors_to_the_os` (smol-llava does; the tiny
defaults do not: they gain nothing from it, and 4-step agent runs measured their update
~1.3-2x slower with it, on a CPU shared with another run, so a noisy figure)."""

HEAP_MMAP_THRESHOLD = 1 << 20
"""Bytes from which glibc serves (and, once freed, unmaps) an allocation with mmap; see
`return_freed_tensors_to_the_os`."""


def return_freed_tensors_to_the_os(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes, so that freed activation tensors go back to the
    OS instead of staying in the heap. With glibc's default (a threshold that rises to 32 MB as large
    blocks are freed) a training step's transient tensors stay in the heap, fragmented: on smol-llava
    the reward trainer's step peaked at 8.4 GB RSS for 4.1 GB of activations and 0.5 GB of weights
    (benchmarks/smol_llava_memory.py, 16 pairs); with the threshold at 1 MiB, 5.2 GB. Skipped where
    the user set MALLOC_MMAP_THRESHOLD_ or the C library is not glibc. Returns True when set."""
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _checkpoint_family(path: str, trust_remote_code: bool) -> FamilyFacts | None:
    """The row of the family of the checkpoint at `path` (a folder or hub id), None without one."""
    return family_of(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type)


def _needs_video_processor(path: str, trust_remote_code: bool) -> bool:
    """True for a local model folder of a family whose stock processor needs torchvision."""
    if not (Path(path) / "config.json").is_file():
        return False
    family = _checkpoint_family(path, trust_remote_code)
    return bool(family and family.image_only_processor)


def load_processor(model_name_or_path: str, *, trust_remote_code: bool = False) -> ProcessorMixin:
    path = resolve_model_path(model_name_or_path)
    processor_kwargs = dict(trust_remote_code=trust_remote_code)
    try:
        if not is_torchvision_available() and _needs_video_processor(path, trust_remote_code):
            # The stock processor would load the tokenizer (seconds for a real 151k vocabulary) and
            # then fail on its video sub-processor: go to the fallback below at once.
            raise ImportError("torchvision is not installed (the stock video processor needs it)")
        processor = AutoProcessor.from_pretrained(path, **processor_kwargs)
    except (ImportError, ValueError, OSError) as error:
        family = _checkpoint_family(path, trust_remote_code)
        if not (family and family.image_only_processor and re.search("torchvision|video", repr(error), re.I)):
            raise
        logger.info(
            "video sub-processor unavailable (%s); using an image-only %s processor", error, family.model_type
        )
        processor = load_image_only_processor(family.image_only_processor, path)
    if getattr(processor, "chat_template", None) is None:  # PaliGemma checkpoints ship none
        family = _checkpoint_family(path, trust_remote_code)
        if family is not None:
            processor.chat_template = chat_template(family.chat_template)
    processor.tokenizer.padding_side = "left"
    return processor


def load_model(
    model_name_or_path: str,
    *,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a VLM and its processor: a hub id, a local folder, or an embedded name.

    Args:
        model_name_or_path: e.g. "Qwen/Qwen2.5-VL-3B-Instruct", "./my-model", "tiny-llava" or
            "smol-llava".
        dtype: "auto" (the checkpoint's; the embedded models are float32), "bf16", "fp16", "fp32"
            or a torch dtype.
        device: where to put the model; None leaves it on CPU (accelerate moves it later).
        trust_remote_code: only for checkpoints that need custom code; off by default.
        attn_implementation: "sdpa", "eager", "flash_attention_2", ... (None: transformers' choice).
        load_in_4bit, load_in_8bit: QLoRA (bitsandbytes, CUDA only; see `quantization_config`); the
            model is placed on this process's GPU and `wrap_with_lora` prepares it for k-bit training.
    """
    path = resolve_model_path(model_name_or_path)
    quantization = quantization_config(
        path,
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    extra = {}
    if quantization is not None:
        from accelerate import PartialState

        # bitsandbytes weights are placed at load time, one copy per process (TRL's kbit device map)
        extra = {"quantization_config": quantization, "device_map": {"": PartialState().local_process_index}}
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=resolve_dtype(dtype),
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            use_safetensors=True,  # never unpickle weights
            # transformers >= 5.25 swaps layers for Hub kernels by default (fetched on GPU, chosen
            # for inference as the model loads in eval mode): vlm_rl trains them, and stays offline.
            use_kernels=False,
            **extra,
        )
    except OSError as error:
        raise _model_not_found(model_name_or_path, error) from error
    if device is not None and quantization is None:
        model.to(device)
    on_cpu = device is None or torch.device(device).type == "cpu"
    if on_cpu and model.num_parameters() >= RETURN_FREED_MIN_PARAMETERS:
        return_freed_tensors_to_the_os()  # host RAM is where a CPU run's activations live
    processor = load_processor(model_name_or_path, trust_remote_code=trust_remote_code)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def _model_not_found(model_name_or_path: str, error: OSError) -> ModelNotFoundError:
    """The error of a model that cannot be loaded: the id, why, and how to point at a local folder."""
    reason = one_line(str(error)).split(". Check")[0]
    if Path(model_name_or_path).is_dir() and not any(Path(model_name_or_path).glob("*.safetensors")):
        reason = "no *.safetensors weights there (vlm_rl loads weights only from safetensors; convert a pickled checkpoint with `model.save_pretrained(dir)` in a trusted session)"
    return ModelNotFoundError(
        f"--model_name_or_path {model_name_or_path}: cannot load the model ({reason}); give a hub id that exists "
        "(offline: one already in the hub cache), or a local folder holding config.json, model.safetensors "
        "and the processor files"
    )


def _vision_and_projector_prefixes(model: nn.Module) -> tuple[list[str], list[str]]:
    """Module-name prefixes of the vision tower and of the projector, found from the model itself."""
    family = model_family(model)
    vision_keys = family.vision_modules if family else GENERIC_VISION_MODULES
    projector_keys = family.projector_modules if family else GENERIC_PROJECTOR_MODULES
    vision, projector = [], []
    for name, _ in model.named_modules():
        if any(name == k or name.endswith("." + k) for k in projector_keys):
            projector.append(name)
        elif any(name == k or name.endswith("." + k) for k in vision_keys):
            vision.append(name)
    return vision, projector


def language_model_linear_names(model: nn.Module) -> list[str]:
    """Full names of the nn.Linear layers of the language model (not vision, projector or lm_head)."""
    vision, projector = _vision_and_projector_prefixes(model)
    excluded = tuple(p + "." for p in vision + projector)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.startswith(excluded) or name.endswith("lm_head"):
            continue
        if "." + name in ("." + p for p in vision + projector):
            continue
        names.append(name)
    return names


def _projector_parts(model: nn.Module, projector: list[str]) -> list[str]:
    """peft `modules_to_save` names of the projector modules (a list's elements: Qwen3-VL's
    DeepStack mergers are a ModuleList, which peft cannot save whole)."""
    parts = []
    for prefix in projector:
        name = prefix.rsplit(".", 1)[-1]
        module = model.get_submodule(prefix)
        parts += [f"{name}.{i}" for i in range(len(module))] if isinstance(module, nn.ModuleList) else [name]
    return parts


def lora_targets(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[str]:
    """Full names of the layers LoRA wraps: every linear layer of the language model, or with
    `target_modules` those whose name is, or ends with ".<name>", one of them (a full name works)."""
    targets = language_model_linear_names(model)
    if not targets:
        raise ValueError(f"no linear layers found in the language model of {type(model).__name__}")
    if not target_modules:
        return targets
    chosen = [t for t in targets if any(t == n or t.endswith("." + n) for n in target_modules)]
    unmatched = [n for n in target_modules if not any(t == n or t.endswith("." + n) for t in targets)]
    if unmatched:
        suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
        raise ValueError(
            f"--lora_target_modules {' '.join(unmatched)}: no such linear layer in the language model of "
            f"{type(model).__name__}; its layers are named {', '.join(suffixes)}"
        )
    return chosen


def is_quantized(model: nn.Module) -> bool:
    """True for a model loaded in 4 or 8 bits (bitsandbytes)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_for_training(model: PreTrainedModel, *, gradient_checkpointing: bool = False) -> PreTrainedModel:
    """Before adapters go on: a 4/8-bit model through peft's `prepare_model_for_kbit_training`
    (weights frozen, the unquantised half-precision ones upcast to fp32, checkpointing as asked);
    otherwise gradient checkpointing, non-reentrant, when asked."""
    checkpointing_kwargs = {"use_reentrant": False}
    if is_quantized(model):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
    return model


def wrap_with_lora(
    model: PreTrainedModel,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    train_projector: bool = False,
    adapter_name: str = "default",
    target_modules: Sequence[str] | None = None,
    gradient_checkpointing: bool = False,
):
    """Wrap `model` with a LoRA adapter on the language model's linear layers (peft).

    The vision tower and projector stay frozen; `train_projector=True` trains the projector fully
    (peft `modules_to_save`). Targets come from the model's structure, not a per-checkpoint list;
    `target_modules` (e.g. ["q_proj", "v_proj"]) narrows them to the language-model layers whose
    name ends with one of those names. `gradient_checkpointing` recomputes each decoder layer's
    activations in the backward pass (non-reentrant) instead of keeping them. A 4/8-bit model
    (`load_model(load_in_4bit=True)`) goes through peft's `prepare_model_for_kbit_training` first.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, target_modules)
    model = prepare_for_training(model, gradient_checkpointing=gradient_checkpointing)
    _, projector = _vision_and_projector_prefixes(model)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$",
        modules_to_save=_projector_parts(model, projector) if train_projector else None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info(
        "LoRA r=%d on %d language-model layers: %d trainable of %d parameters (%.2f%%)",
        r,
        len(targets),
        trainable,
        total,
        100 * trainable / total,
    )
    return peft_model


ADAPTER_CONFIG_NAME = "adapter_config.json"


def check_adapter_folder(folder: str | Path, name: str) -> Path:
    """`folder`'s adapter_config.json, the mark of a saved LoRA adapter; without it a
    `MissingPathError` (a FileNotFoundError) that names `name` (the flag and value, or the path) and
    what to pass instead."""
    config_file = Path(folder) / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise MissingPathError(
            f"{name}: no LoRA adapter there (no {ADAPTER_CONFIG_NAME}); pass a saved adapter folder such as "
            "a run's final/, a checkpoint's adapter/ or a repo pushed with `vlm-rl push`"
        )
    return config_file


def load_policy(
    path_or_repo: str | Path,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    **loading: Any,
) -> tuple[nn.Module, ProcessorMixin]:
    """A trained policy: the base VLM named by the adapter's config plus the LoRA adapter.

    path_or_repo: a saved adapter folder (a run's final/, a checkpoint's adapter/) or a hub repo id
    that `vlm-rl push` or `--push_to_hub` wrote (downloaded through `vlm_rl.hub.download`, with
    `revision` and a custom `endpoint`; the token comes from the environment or the login). The
    base is loaded by `load_model`, so tiny defaults ("tiny-llava") and hub ids both work. Returns
    (policy in eval mode, processor: the adapter folder's own if it has one, else the base's).
    `loading` (dtype, device, trust_remote_code, attn_implementation, load_in_4bit, load_in_8bit)
    goes to `load_model`.
    """
    from peft import PeftModel

    path = Path(path_or_repo)
    if not path.is_dir():
        name = str(path_or_repo)
        if not is_hub_id(name):
            raise FileNotFoundError(f"{name} is neither a folder nor a hub repo id (owner/name)")
        from vlm_rl.hub import download

        path = download(name, revision=revision, endpoint=endpoint)
    if (path / REWARD_CONFIG_NAME).is_file():
        raise ValueError(f"{path_or_repo} is a reward model: load it with RewardModel.from_pretrained")
    config_file = check_adapter_folder(path, str(path_or_repo))
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{config_file} names no base model (base_model_name_or_path): cannot load the policy"
        )
    model, processor = load_model(base, **loading)
    policy = PeftModel.from_pretrained(model, str(path)).eval()
    if (path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file():
        processor = load_processor(str(path), trust_remote_code=loading.get("trust_remote_code", False))
    return policy, processor


def vlm_trunk(model: nn.Module) -> nn.Module:
    """The part of a (possibly LoRA-wrapped) VLM that returns hidden states: everything but the LM head.

    Calling it instead of the full model skips the vocabulary projection, which dominates the cost
    of a small model's forward pass and is not needed by reward and value heads.
    """
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.model


def hidden_size(model: nn.Module) -> int:
    config = model.config
    return config.get_text_config().hidden_size
