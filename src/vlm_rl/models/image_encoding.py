"""Encode each distinct image once per call of a VLM's vision module.

In an RL step every prompt's image is repeated G times (G samples per prompt), in generation and
in every scoring/update pass, so the vision encoder would run G times on identical pixels.
`share_image_encoding(model)` hooks the family's image encoder (`FamilyFacts.image_encoder`: the
module that takes pixel values, e.g. LLaVA's `vision_tower`, Qwen2.5-VL's `visual`): within each
call it encodes the bitwise-distinct images only and gathers the outputs back to every copy with
an index-select. Outputs equal the unshared ones up to float summation order; under autograd the
gradient of a trainable part of the encoder (Qwen2.5-VL's merger) is the sum over the copies,
exactly as if each copy had been encoded.

Two input layouts, told apart by the arguments (as in `models.inputs`):
- one row per image: `pixel_values` (images, C, H, W), optionally `patch_attention_mask`
  (images, h, w) (Idefics3, which passes each sub-image of a split image as its own row);
- flattened patches: `hidden_states` (patches, dim) with `grid_thw` (images, 3) (Qwen-VL).
A call with any other tensor, list or tuple argument (e.g. Pixtral's `image_sizes`: its tower packs
all images into one sequence), or to an encoder in training mode with dropout, runs unshared.

Across calls (`remember=True`, an RL step: generation, scoring and update see the same images): an
encoder with no trainable parameter (a frozen vision tower; LLaVA's and Idefics3's projectors lie
outside it, so a trained projector still runs on every call) computes a function of the pixels
alone, so each image's outputs are kept for the rest of the block (keyed by a digest of its bytes)
and later calls encode only images not seen before. Outputs are the very tensors first computed.
An encoder holding a trained part (Qwen2.5-VL's `visual` includes its merger) is not remembered.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn

from vlm_rl.models.families import model_family

logger = logging.getLogger(__name__)

PER_IMAGE_ARGUMENTS = ("patch_attention_mask",)
"""Tensor arguments with one row per image, besides the pixels (one-row-per-image layout)."""
GRID_ARGUMENT = "grid_thw"
"""(images, 3) patch grid of each image (flattened-patch layout)."""
SETTING_ARGUMENTS = ("output_hidden_states",)
"""Lists that configure the call, not data: which hidden layers to return (LLaVA passes its
`vision_feature_layer`, an int or a list)."""

_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(eq=False)  # contexts are told apart by identity (nested blocks may have equal counts)
class ImageEncodingStats:
    """What one `share_image_encoding` context did."""

    images: int = 0
    """Images the vision module was given in the calls it could share (every copy counted)."""
    encoded: int = 0
    """Images it encoded in those calls (the distinct ones of each call)."""

    @property
    def saved(self) -> int:
        """Image encodings skipped."""
        return self.images - self.encoded


@dataclass
class _Plan:
    """How to map one call's outputs on the distinct images back to every image."""

    inverse: torch.Tensor
    """(images,) index of each image among the distinct ones."""
    distinct_patches: torch.Tensor | None = None
    """(distinct,) patches of each distinct image (flattened-patch layout), else None."""


@dataclass
class _Sharing:
    """The hooks on one image encoder and every open context's stats."""

    pixel_argument: str
    handles: list = field(default_factory=list)
    stats: list[ImageEncodingStats] = field(default_factory=list)
    plans: list[_Plan | None] = field(default_factory=list)
    """One entry per call in progress (None: that call runs unshared)."""
    remembering: int = 0
    """Open blocks with `remember=True`: while > 0 the encoder's forward is wrapped by `_remembering`."""
    instance_forward: Any = None
    """The encoder's instance-level `forward` before `_remembering` wrapped it (None: the class's)."""
    memory: dict[bytes, Any] = field(default_factory=dict)
    """Digest of one image's inputs -> that image's outputs (the call's outputs sliced to it)."""


_ACTIVE: WeakKeyDictionary[nn.Module, _Sharing] = WeakKeyDictionary()


def image_encoder(model: nn.Module) -> nn.Module | None:
    """The module of `model` (a VLM, LoRA-wrapped or not) whose image encoding can be shared, or
    None when its family has no `image_encoder` entry or the model holds no single such module."""
    family = model_family(model)
    if family is None or family.image_encoder is None:
        return None
    key = family.image_encoder
    found = [module for name, module in model.named_modules() if name == key or name.endswith("." + key)]
    if len(found) != 1:
        logger.warning("%d modules named %r in %s: image encoding not shared", len(found), key, type(model))
        return None
    return found[0]


@contextmanager
def share_image_encoding(model: nn.Module, *, remember: bool = False) -> Iterator[ImageEncodingStats]:
    """Within the block, every call of `model`'s image encoder encodes each distinct image once;
    with `remember`, once for the whole block where the encoder is frozen (module docstring).

    Yields the block's `ImageEncodingStats` (images given, encoded, saved). Nested blocks on the
    same model share the hooks and each count the calls made inside them. On a family without an
    `image_encoder` entry nothing changes and the stats stay at zero.

    >>> with share_image_encoding(policy) as stats:  # doctest: +SKIP
    ...     policy.generate(**repeat_rows(prompt_inputs, 8, images_per_prompt))
    >>> stats.saved  # 7 of every 8 copies  # doctest: +SKIP
    """
    stats = ImageEncodingStats()
    encoder = image_encoder(model)
    if encoder is None:
        yield stats
        return
    sharing = _ACTIVE.get(encoder)
    if sharing is None:
        # The class's signature: the instance's `forward` may be replaced by a wrapper (accelerate).
        pixel_argument = list(inspect.signature(type(encoder).forward).parameters)[1]  # after self
        sharing = _Sharing(pixel_argument=pixel_argument)
        sharing.handles = [
            encoder.register_forward_pre_hook(_before(sharing), with_kwargs=True),
            encoder.register_forward_hook(_after(sharing), with_kwargs=True),
        ]
        _ACTIVE[encoder] = sharing
    sharing.stats.append(stats)
    if remember:
        if not sharing.remembering:
            sharing.instance_forward = encoder.__dict__.get("forward")  # a wrapper set before (accelerate)
            encoder.forward = _remembering(sharing, encoder, encoder.forward)
        sharing.remembering += 1
    try:
        yield stats
    finally:
        sharing.stats.remove(stats)
        if remember:
            sharing.remembering -= 1
            if not sharing.remembering:
                if sharing.instance_forward is None:
                    del encoder.forward  # back to the class's forward
                else:
                    encoder.forward = sharing.instance_forward
                sharing.memory.clear()
        if not sharing.stats:
            for handle in sharing.handles:
                handle.remove()
            del _ACTIVE[encoder]


def _before(sharing: _Sharing):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        name = sharing.pixel_argument
        pixels = args[0] if args else kwargs.get(name)
        grid = kwargs.get(GRID_ARGUMENT)
        plan = None
        if _shareable(module, pixels, args, kwargs, name):
            if grid is not None:
                plan, args, kwargs = _dedup_patches(pixels, grid, args, kwargs, name)
            else:
                plan, args, kwargs = _dedup_rows(pixels, args, kwargs, name)
            images, encoded = len(plan.inverse), int(plan.inverse.max()) + 1
            for stats in sharing.stats:
                stats.images += images
                stats.encoded += encoded
            if encoded == images:
                plan = None
        sharing.plans.append(plan)
        return (args, kwargs) if plan is not None else None

    return hook


def _after(sharing: _Sharing):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        plan = sharing.plans.pop()
        if plan is None:
            return None
        return _map_tensors(output, lambda name, tensor: _gather(name, tensor, plan))

    return hook


def _shareable(module: nn.Module, pixels: Any, args: tuple, kwargs: dict, pixel_argument: str) -> bool:
    """Whether a call can be shared: at least two images in a known layout, no argument of unknown
    layout (a tensor, list or tuple: e.g. Pixtral's `image_sizes`), no random dropout."""
    images = _known_layout_images(pixels, args, kwargs, pixel_argument)
    return images >= 2 and not (module.training and _has_dropout(module))


def _known_layout_images(pixels: Any, args: tuple, kwargs: dict, pixel_argument: str) -> int:
    """How many images a call holds when its arguments are in a known layout, else 0."""
    if not isinstance(pixels, torch.Tensor) or pixels.dim() < 2:
        return 0
    known = (pixel_argument, *PER_IMAGE_ARGUMENTS, GRID_ARGUMENT, *SETTING_ARGUMENTS)
    structured = (torch.Tensor, list, tuple)
    unknown = [k for k, v in kwargs.items() if isinstance(v, structured) and k not in known]
    unknown += [f"argument {i}" for i, v in enumerate(args[1:], 1) if isinstance(v, structured)]
    if unknown:
        logger.debug("image encoding not shared: arguments of unknown layout %s", unknown)
        return 0
    grid = kwargs.get(GRID_ARGUMENT)
    if grid is not None:
        if grid.dim() != 2 or int(grid.prod(-1).sum()) != len(pixels):
            return 0
        return len(grid)
    per_image = [kwargs[k] for k in PER_IMAGE_ARGUMENTS if isinstance(kwargs.get(k), torch.Tensor)]
    return 0 if any(len(v) != len(pixels) for v in per_image) else len(pixels)


def _has_dropout(module: nn.Module) -> bool:
    """Dropout modules with p > 0, or a config dropout rate > 0 (attention dropout is functional)."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules()):
        return True
    config = getattr(module, "config", None)
    rates = [v for k, v in vars(config).items() if "dropout" in k] if config is not None else []
    return any(isinstance(v, float) and v > 0 for v in rates)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers, so equal means bitwise identical (-0.0 != 0.0, NaN == NaN)."""
    return tensor.view(_BITS_DTYPE[tensor.element_size()]) if tensor.is_floating_point() else tensor


def _row_ids(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(n,) id per row: equal ids iff the rows of every tensor (each (n, ...)) are bitwise equal."""
    ids = None
    for tensor in tensors:
        rows = _bits(tensor).reshape(len(tensor), -1)
        inverse = torch.unique(rows, dim=0, return_inverse=True)[1].cpu()
        ids = (
            inverse
            if ids is None
            else torch.unique(torch.stack([ids, inverse], 1), dim=0, return_inverse=True)[1]
        )
    return ids


def _first_appearance(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct images in order of first appearance.

    ids: (n,) long, values 0..U-1 all present -> keep (U,) the first index of each id in
    ascending order, inverse (n,) each image's position in `keep`.
    """
    n = len(ids)
    first = torch.full((int(ids.max()) + 1,), n).scatter_reduce(0, ids, torch.arange(n), reduce="amin")
    keep = first.sort().values
    rank = torch.empty_like(first)
    rank[ids[keep]] = torch.arange(len(keep))
    return keep, rank[ids]


def _replace_pixels(args: tuple, kwargs: dict, name: str, pixels: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (pixels, *args[1:]), kwargs
    return args, {**kwargs, name: pixels}


def _dedup_rows(pixels: torch.Tensor, args: tuple, kwargs: dict, name: str) -> tuple[_Plan, tuple, dict]:
    """One row per image: pixels (n, C, H, W) and per-image arguments -> their distinct rows."""
    per_image = [k for k in PER_IMAGE_ARGUMENTS if isinstance(kwargs.get(k), torch.Tensor)]
    keep, inverse = _first_appearance(_row_ids([pixels, *(kwargs[k] for k in per_image)]))
    if len(keep) < len(inverse):
        args, kwargs = _replace_pixels(args, kwargs, name, pixels[keep.to(pixels.device)])
        kwargs = {**kwargs, **{k: kwargs[k][keep.to(kwargs[k].device)] for k in per_image}}
    return _Plan(inverse), args, kwargs


def _dedup_patches(
    patches: torch.Tensor, grid: torch.Tensor, args: tuple, kwargs: dict, name: str
) -> tuple[_Plan, tuple, dict]:
    """Flattened patches (P, dim), split per image by grid (n, 3) -> the distinct images' patches."""
    counts = grid.prod(-1).cpu()
    segments = patches.split(counts.tolist())
    grid_ids = _row_ids([grid])
    ids = torch.empty(len(counts), dtype=torch.long)
    next_id = 0
    for group in range(int(grid_ids.max()) + 1):  # images of one grid shape can be compared
        members = torch.nonzero(grid_ids == group).flatten()
        group_ids = _row_ids([torch.stack([segments[i] for i in members.tolist()])])
        ids[members] = group_ids + next_id
        next_id += int(group_ids.max()) + 1
    keep, inverse = _first_appearance(ids)
    if len(keep) < len(inverse):
        starts = torch.cumsum(counts, 0) - counts
        rows = torch.cat([torch.arange(starts[i], starts[i] + counts[i]) for i in keep.tolist()])
        args, kwargs = _replace_pixels(args, kwargs, name, patches[rows.to(patches.device)])
        kwargs = {**kwargs, GRID_ARGUMENT: grid[keep.to(grid.device)]}
    return _Plan(inverse, distinct_patches=counts[keep]), args, kwargs


def _gather(name: str, tensor: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """An output on the distinct images -> the same output on every image (index-select)."""
    distinct = int(plan.inverse.max()) + 1
    if plan.distinct_patches is None:
        if tensor.dim() == 0 or tensor.shape[0] != distinct:
            raise RuntimeError(
                f"image encoder output {name!r} of shape {tuple(tensor.shape)} has no row per image "
                f"({distinct} distinct images): cannot share its encoding; set this family's "
                "`image_encoder` to None in vlm_rl.models.families"
            )
        return tensor.index_select(0, plan.inverse.to(tensor.device))
    # Flattened layout: per-patch or per-merged-token outputs (r patches each), image after image.
    total = int(plan.distinct_patches.sum())
    ratio = total // tensor.shape[0] if tensor.dim() and tensor.shape[0] else 0
    if not ratio or ratio * tensor.shape[0] != total or (plan.distinct_patches % ratio).any():
        raise RuntimeError(
            f"image encoder output {name!r} of shape {tuple(tensor.shape)} is not split per image like "
            f"its {total} input patches: cannot share its encoding; set this family's `image_encoder` "
            "to None in vlm_rl.models.families"
        )
    lengths = plan.distinct_patches // ratio
    starts = torch.cumsum(lengths, 0) - lengths
    rows = torch.cat([torch.arange(starts[j], starts[j] + lengths[j]) for j in plan.inverse.tolist()])
    return tensor.index_select(0, rows.to(tensor.device))


def _map_tensors(output: Any, fn, name: str = "output") -> Any:
    """Apply fn(name, tensor) to every tensor of a model output, tuple or list (None kept)."""
    if isinstance(output, torch.Tensor):
        return fn(name, output)
    if isinstance(output, dict):  # ModelOutput
        return type(output)(**{k: _map_tensors(v, fn, k) for k, v in output.items()})
    if isinstance(output, (tuple, list)):
        return type(output)(_map_tensors(v, fn, f"{name}[{i}]") for i, v in enumerate(output))
    return output


# -- remembering across calls -----------------------------------------------------------------------
def _remembering(sharing: _Sharing, encoder: nn.Module, forward):
    """`forward` (receiving the distinct images of a call, after `_before`) encoding only images
    whose outputs the block has not kept yet, while the encoder has no trainable parameter."""
    name = sharing.pixel_argument

    def remembering_forward(*args, **kwargs):
        pixels = args[0] if args else kwargs.get(name)
        images = _known_layout_images(pixels, args, kwargs, name)
        if (
            not images
            or (encoder.training and _has_dropout(encoder))
            or any(p.requires_grad for p in encoder.parameters())
        ):
            return forward(*args, **kwargs)
        grid = kwargs.get(GRID_ARGUMENT)
        patches = grid.prod(-1).cpu() if grid is not None else None
        keys = _image_digests(pixels, kwargs, patches)
        missing = [i for i, key in enumerate(keys) if key not in sharing.memory and keys.index(key) == i]
        if missing:
            picked = torch.tensor(missing)
            if patches is None:
                args, kwargs = _replace_pixels(args, kwargs, name, pixels[picked.to(pixels.device)])
                per_image = [k for k in PER_IMAGE_ARGUMENTS if isinstance(kwargs.get(k), torch.Tensor)]
                kwargs = {**kwargs, **{k: kwargs[k][picked.to(kwargs[k].device)] for k in per_image}}
            else:
                starts = torch.cumsum(patches, 0) - patches
                rows = torch.cat([torch.arange(starts[i], starts[i] + patches[i]) for i in missing])
                args, kwargs = _replace_pixels(args, kwargs, name, pixels[rows.to(pixels.device)])
                kwargs = {**kwargs, GRID_ARGUMENT: grid[picked.to(grid.device)]}
            output = forward(*args, **kwargs)
            pieces = _split_per_image(output, len(missing), None if patches is None else patches[picked])
            for i, piece in zip(missing, pieces, strict=True):
                sharing.memory[keys[i]] = piece
        for stats in sharing.stats:
            stats.encoded -= images - len(missing)
        return _join([sharing.memory[key] for key in keys])

    return remembering_forward


def _image_digests(pixels: torch.Tensor, kwargs: dict, patches: torch.Tensor | None) -> list[bytes]:
    """One digest per image of its pixels (and per-image arguments or grid), shape and dtype included."""
    if patches is None:
        per_image = [kwargs[k] for k in PER_IMAGE_ARGUMENTS if isinstance(kwargs.get(k), torch.Tensor)]
        parts = [[pixels[i], *(v[i] for v in per_image)] for i in range(len(pixels))]
    else:
        grid = kwargs[GRID_ARGUMENT]
        parts = [[segment, grid[i]] for i, segment in enumerate(pixels.split(patches.tolist()))]
    digests = []
    for tensors in parts:
        digest = hashlib.blake2b(digest_size=20)
        for tensor in tensors:
            digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(_bits(tensor.detach()).contiguous().cpu().numpy().tobytes())
        digests.append(digest.digest())
    return digests


def _split_per_image(output: Any, images: int, patches: torch.Tensor | None) -> list[Any]:
    """A call's outputs on `images` images -> each image's outputs (same structure, sliced)."""
    pieces: list[dict[str, torch.Tensor]] = [{} for _ in range(images)]

    def split(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if patches is None:
            if tensor.dim() == 0 or tensor.shape[0] != images:
                raise RuntimeError(
                    f"image encoder output {name!r} of shape {tuple(tensor.shape)} has no row per image: "
                    "cannot remember it; set this family's `image_encoder` to None in vlm_rl.models.families"
                )
            parts = tensor.split(1)
        else:
            total = int(patches.sum())
            ratio = total // tensor.shape[0] if tensor.dim() and tensor.shape[0] else 0
            if not ratio or ratio * tensor.shape[0] != total or (patches % ratio).any():
                raise RuntimeError(
                    f"image encoder output {name!r} of shape {tuple(tensor.shape)} is not split per image: "
                    "cannot remember it; set this family's `image_encoder` to None in vlm_rl.models.families"
                )
            parts = tensor.split((patches // ratio).tolist())
        for piece, part in zip(pieces, parts, strict=True):
            piece[name] = part
        return tensor

    _map_tensors(output, split)
    return [_map_tensors(output, lambda name, tensor, piece=piece: piece[name]) for piece in pieces]


def _join(pieces: list[Any]) -> Any:
    """Per-image outputs (same structure) -> the outputs of all of them, concatenated image after image."""
    first = pieces[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(pieces)
    if isinstance(first, dict):  # ModelOutput
        return type(first)(**{k: _join([p[k] for p in pieces]) for k in first})
    if isinstance(first, (tuple, list)):
        return type(first)(_join([p[i] for p in pieces]) for i in range(len(first)))
    return first
