"""Model sizes the benchmarks build from configs (random weights, nothing downloaded).

    python benchmarks/model_sizes.py --config qwen2.5-vl-3b --dtype bf16 --device cuda --out /tmp/qwen3b

Presets of the Qwen2.5-VL architecture (`vlm_rl.models.tiny.build_qwen2_5_vl`, the image-only
processor, the tiny word-level tokenizer): every image resized to 224x224, 14-pixel patches merged
2x2 -> 64 visual tokens.
  tiny           vision 2 x 64, text 2 x 128: the dry run of benchmarks/gpu_check.sh on CPU
  mid            vision 12 x 256, text 8 x 512 (benchmarks/grpo_vs_trl.py's CPU default)
  qwen2.5-vl-3b  Qwen2.5-VL-3B-Instruct's sizes: vision 32 x 1280 (full attention every 8th block),
                 text 36 x 2048 (GQA 16/2 heads, MLP 11008), vocabulary 151,936, tied embeddings:
                 3.75 B parameters, the real model's compute and memory with random weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_SIZE, PATCH, MERGE = 224, 14, 2

PRESETS: dict[str, dict] = {
    "tiny": dict(
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1]),
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        vocab_size=None,
        window=IMAGE_SIZE // 2,
    ),
    "mid": dict(
        vision=dict(
            depth=12, hidden_size=256, intermediate_size=1024, num_heads=4, fullatt_block_indexes=[3, 7, 11]
        ),
        text=dict(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
        ),
        vocab_size=None,
        window=IMAGE_SIZE // 2,  # 2x2 windows per image, as 112-pixel windows on Qwen2.5-VL
    ),
    "qwen2.5-vl-3b": dict(
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        text=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
        ),
        vocab_size=151936,
        window=112,
    ),
}


def build(preset: str, path: Path, *, dtype: str = "fp32", device: str = "cpu") -> dict[str, int]:
    """Write the random VLM of `preset` + its processor to `path`, built directly on `device` in
    `dtype` (a 3B model in bf16 on a GPU builds in seconds). Returns parameter counts."""
    import torch

    from vlm_rl.models import FAMILIES
    from vlm_rl.models.loading import resolve_dtype
    from vlm_rl.models.tiny import LM_HEAD_INIT_STD, build_qwen2_5_vl, build_tokenizer

    sizes = PRESETS[preset]
    family = FAMILIES["qwen2_5_vl"]
    tokenizer = build_tokenizer(family)
    torch.manual_seed(0)
    resolved = resolve_dtype(dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if resolved == "auto" else resolved)
    try:
        with torch.device(device):
            model, processor = build_qwen2_5_vl(
                family,
                tokenizer,
                image_size=IMAGE_SIZE,  # every image is resized to exactly 224x224
                patch=PATCH,
                merge=MERGE,
                vision=sizes["vision"],
                text=sizes["text"],
                window=sizes["window"],
                max_positions=4096,
            )
            if sizes["vocab_size"]:  # the real vocabulary: the embedding and LM head cost it
                model.resize_token_embeddings(sizes["vocab_size"], mean_resizing=False)
                model.config.tie_word_embeddings = True
                model.config.get_text_config().tie_word_embeddings = True
                model.tie_weights()
            torch.nn.init.normal_(model.get_output_embeddings().weight, std=LM_HEAD_INIT_STD)
    finally:
        torch.set_default_dtype(previous)
    for config in (model.generation_config, model.config.get_text_config()):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = None
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "vision": sum(p.numel() for p in model.model.visual.parameters()),
    }


def describe(preset: str, parameters: dict[str, int]) -> str:
    sizes = PRESETS[preset]
    vision, text = sizes["vision"], sizes["text"]
    return (
        f"{preset} Qwen2.5-VL-style VLM: {parameters['total'] / 1e6:.1f} M parameters (vision "
        f"{parameters['vision'] / 1e6:.1f} M, {vision['depth']} x {vision['hidden_size']}; text "
        f"{text['num_hidden_layers']} x {text['hidden_size']}), {(IMAGE_SIZE // PATCH // MERGE) ** 2} visual tokens per image"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, help="Folder to write the model to.")
    args = parser.parse_args()
    print(describe(args.config, build(args.config, Path(args.out), dtype=args.dtype, device=args.device)))


if __name__ == "__main__":
    main()
