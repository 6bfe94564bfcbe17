"""Load any VLM that `AutoModelForImageTextToText` + `AutoProcessor` load, and wrap it with LoRA."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

from vlm_rl.errors import ModelNotFoundError, one_line
from vlm_rl.models.families import FamilyFacts, family_of
from vlm_rl.models.processors import ImageOnlyQwen2_5_VLProcessor
from vlm_rl.models.tiny import ensure_tiny, resolve_tiny_name
from vlm_rl.run_folder import REWARD_CONFIG_NAME

logger = logging.getLogger(__name__)


def resolve_model_path(model_name_or_path: str) -> str:
    """A hub id or local folder as given; a tiny default name ("tiny-llava") -> its cached folder."""
    tiny = resolve_tiny_name(model_name_or_path)
    return str(ensure_tiny(*tiny)) if tiny else model_name_or_path


def load_processor(model_name_or_path: str, *, trust_remote_code: bool = False) -> ProcessorMixin:
    path = resolve_model_path(model_name_or_path)
    processor_kwargs = dict(trust_remote_code=trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(path, **processor_kwargs)
    except (ImportError, ValueError, OSError) as error:
        family = family_of(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type)
        if not (family and family.image_only_processor and re.search("torchvision|video", repr(error), re.I)):
            raise
        logger.info(
            "video sub-processor unavailable (%s); using an image-only %s processor", error, family.model_type
        )
        from transformers import AutoImageProcessor, AutoTokenizer

        processor = ImageOnlyQwen2_5_VLProcessor(
            image_processor=AutoImageProcessor.from_pretrained(path, backend="pil"),
            tokenizer=AutoTokenizer.from_pretrained(path),
        )
        processor.chat_template = processor.tokenizer.chat_template
    processor.tokenizer.padding_side = "left"
    return processor


def load_model(
    model_name_or_path: str,
    *,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a VLM and its processor: a hub id, a local folder, or a tiny default name.

    Args:
        model_name_or_path: e.g. "Qwen/Qwen2.5-VL-3B-Instruct", "./my-model" or "tiny-llava".
        dtype: torch dtype or "auto" (the checkpoint's); tiny models are float32.
        device: where to put the model; None leaves it on CPU (accelerate moves it later).
        trust_remote_code: only for checkpoints that need custom code; off by default.
    """
    path = resolve_model_path(model_name_or_path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            use_safetensors=True,  # never unpickle weights
        )
    except OSError as error:
        raise _model_not_found(model_name_or_path, error) from error
    if device is not None:
        model.to(device)
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


def family_facts(model: PreTrainedModel) -> FamilyFacts | None:
    return family_of(model.config.model_type)


def _vision_and_projector_prefixes(model: nn.Module) -> tuple[list[str], list[str]]:
    """Module-name prefixes of the vision tower and of the projector, found from the model itself."""
    family = family_of(getattr(model.config, "model_type", ""))
    vision_keys = family.vision_modules if family else ("vision_tower", "vision_model", "visual")
    projector_keys = family.projector_modules if family else ("multi_modal_projector", "connector", "merger")
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


def wrap_with_lora(
    model: PreTrainedModel,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    train_projector: bool = False,
    adapter_name: str = "default",
):
    """Wrap `model` with a LoRA adapter on the language model's linear layers (peft).

    The vision tower and projector stay frozen; `train_projector=True` trains the projector fully
    (peft `modules_to_save`). Targets come from the model's structure, not a per-checkpoint list.
    """
    from peft import LoraConfig, get_peft_model

    targets = language_model_linear_names(model)
    if not targets:
        raise ValueError(f"no linear layers found in the language model of {type(model).__name__}")
    _, projector = _vision_and_projector_prefixes(model)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$",
        modules_to_save=[p.rsplit(".", 1)[-1] for p in projector] if train_projector else None,
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


def load_policy(
    path_or_repo: str | Path,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """A trained policy: the base VLM named by the adapter's config plus the LoRA adapter.

    path_or_repo: a saved adapter folder (a run's final/, a checkpoint's adapter/) or a hub repo id
    that `vlm-rl push` or `--push_to_hub` wrote (downloaded through `vlm_rl.hub.download`, with
    `revision` and a custom `endpoint`; the token comes from the environment or the login). The
    base is loaded by `load_model`, so tiny defaults ("tiny-llava") and hub ids both work. Returns
    (policy in eval mode, processor: the adapter folder's own if it has one, else the base's).
    """
    from peft import PeftModel

    path = Path(path_or_repo)
    if not path.is_dir():
        name = str(path_or_repo)
        if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") != 1:
            raise FileNotFoundError(f"{name} is neither a folder nor a hub repo id (owner/name)")
        from vlm_rl.hub import download

        path = download(name, revision=revision, endpoint=endpoint)
    if (path / REWARD_CONFIG_NAME).is_file():
        raise ValueError(f"{path_or_repo} is a reward model: load it with RewardModel.from_pretrained")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path_or_repo} holds no LoRA adapter (no adapter_config.json): pass a run's final/ folder, a "
            "checkpoint's adapter/ folder or a repo pushed with `vlm-rl push`"
        )
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{config_file} names no base model (base_model_name_or_path): cannot load the policy"
        )
    model, processor = load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    policy = PeftModel.from_pretrained(model, str(path)).eval()
    if (path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file():
        processor = load_processor(str(path), trust_remote_code=trust_remote_code)
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
