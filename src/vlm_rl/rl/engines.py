"""Rollout engines: what samples a step's completions, behind one call.

    engine.generate(model, processor, prompts (a PromptBatch: text + images), samples_per_prompt,
                    sampling) -> Rollout (token ids, masks, texts; the engine's log-probs if it has them)

Two engines (`--rollout_engine`):

- `HFEngine` (hf, the default): transformers' `generate` in the training process, each prompt
  prefilled once for its G samples (`vlm_rl.rl.rollout.generate`). It samples with the trainer's
  own weights and numerics, so it returns no log-probs of its own: the trainer's are the
  behaviour policy's.
- `VLLMEngine` (vllm): a vLLM server the user runs (`--vllm_url`), reached over its
  OpenAI-compatible HTTP API (stdlib `urllib` only): one chat-completions request per prompt
  (`n` = samples per prompt, the images as base64 PNG data URLs), all of a batch's requests in
  flight together so the server batches them (an agent's turn: one request per live episode). It
  returns the sampled token ids (`return_token_ids`) and their log-probs, which the trainer uses as
  the behaviour policy's through a truncated importance weight (`truncated_importance_weights`).
  The policy's LoRA adapter reaches the server by hot-loading (`load_adapter`, after every
  update: `vlm_rl.rl.components.TrainedPolicy.sync_engine`). docs/rollout_engine.md.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from vlm_rl.data.collators import PromptBatch
from vlm_rl.errors import ConfigError, VlmRlError
from vlm_rl.models.families import completion_token_type
from vlm_rl.rl.rollout import Rollout, completion_mask_from_ids, eos_token_ids, generate, suppressed_tokens

logger = logging.getLogger(__name__)

__all__ = [
    "HFEngine",
    "RolloutEngine",
    "SamplingParams",
    "VLLMEngine",
    "VLLMServerError",
    "make_engine",
    "truncated_importance_weights",
]


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled: every setting given, none taken from the checkpoint."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False


class RolloutEngine(Protocol):
    """Samples completions of a batch of prompts with their images."""

    adapter_sync: bool
    """The engine holds its own copy of the weights: the policy's adapter is hot-loaded into it
    after every update (`load_adapter`)."""

    def generate(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        batch: PromptBatch,
        samples_per_prompt: int,
        sampling: SamplingParams,
    ) -> Rollout:
        """`samples_per_prompt` completions of each prompt of `batch` (its copies contiguous)."""


def images_per_prompt(batch: PromptBatch) -> torch.Tensor:
    """(P,) the number of images of each prompt of `batch`."""
    return torch.tensor([len(images) for images in batch.images])


class HFEngine:
    """transformers' `generate` on the policy in this process (`vlm_rl.rl.rollout.generate`)."""

    adapter_sync = False

    def generate(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        batch: PromptBatch,
        samples_per_prompt: int,
        sampling: SamplingParams,
    ) -> Rollout:
        return generate(
            model,
            processor,
            batch.inputs,
            images_per_prompt(batch),
            samples_per_prompt=samples_per_prompt,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            greedy=sampling.greedy,
        )


class VLLMServerError(VlmRlError, RuntimeError):
    """The vLLM server could not be reached, refused a request, or answered something unusable."""


def image_data_url(image: Image.Image) -> str:
    """`image` as a base64 PNG data URL (lossless: the server sees the pixels the trainer does)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_messages(prompt: Any, images: list[Image.Image]) -> list[dict]:
    """A conversational prompt (TRL's format, `{"type": "image"}` placeholders) as OpenAI chat
    messages: each placeholder becomes an `image_url` part holding the next image as a data URL."""
    if not isinstance(prompt, list):
        raise ConfigError(
            "--rollout_engine vllm needs conversational prompts (a list of chat messages with "
            "{'type': 'image'} placeholders): the server renders them with its chat template; got a "
            f"plain string prompt {str(prompt)[:60]!r}"
        )
    remaining = iter(images)
    messages = []
    for message in prompt:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    parts.append({"type": "image_url", "image_url": {"url": image_data_url(next(remaining))}})
                else:
                    parts.append(part)
            content = parts
        messages.append({"role": message["role"], "content": content})
    return messages


def parse_choice(choice: dict) -> tuple[list[int], list[float]]:
    """(token ids, log-prob of each) of one sampled completion of a vLLM chat response: the ids
    from `token_ids` (`return_token_ids`), else from the log-prob entries' `token_id:<id>` names
    (`return_tokens_as_token_ids`)."""
    content = (choice.get("logprobs") or {}).get("content")
    if content is None:
        raise VLLMServerError("the vLLM server returned no log-probs (the request asked for logprobs=true)")
    logprobs = [float(entry["logprob"]) for entry in content]
    ids = choice.get("token_ids")
    if ids is None:
        ids = [int(entry["token"].removeprefix("token_id:")) for entry in content]
    if len(ids) != len(logprobs):
        raise VLLMServerError(
            f"the vLLM server returned {len(ids)} token ids but {len(logprobs)} log-probs for one completion"
        )
    return [int(i) for i in ids], logprobs


class VLLMEngine:
    """A vLLM server's OpenAI-compatible API (`url`, e.g. http://127.0.0.1:8000).

    Requests name `adapter` (the LoRA adapter last hot-loaded by `load_adapter`), or the server's
    base model (`model`, default: the first the server lists) before any adapter is loaded. Log-probs
    are the server's for the sampled tokens: those of its sampling distribution when it runs with
    `--logprobs-mode processed_logprobs` (what the importance weights need), else raw (the model's
    softmax at temperature 1: the trainer's numbers at --temperature 1, not the sampling distribution).
    """

    adapter_sync = True

    def __init__(
        self,
        url: str | None,
        *,
        model: str | None = None,
        timeout: float = 600.0,
        max_workers: int = 64,
    ):
        self.url = url.rstrip("/") if url else None
        """None until the server the run starts is up (`vlm_rl.rl.vllm_server`)."""
        self.model = model
        self.timeout = timeout
        self.max_workers = max_workers
        self.adapter: str | None = None
        self.adapter_path: str | None = None

    # -- HTTP ---------------------------------------------------------------------------------------
    def _post(self, route: str, payload: dict) -> Any:
        request = urllib.request.Request(
            self.url + route,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        return self._send(request, route)

    def _send(self, request: urllib.request.Request, route: str) -> Any:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            raise VLLMServerError(f"vLLM server {self.url}{route}: HTTP {error.code}: {detail}") from error
        except (urllib.error.URLError, OSError) as error:
            raise VLLMServerError(
                f"vLLM server {self.url}{route} unreachable ({error}); start it (docs/rollout_engine.md) or "
                "fix --vllm_url"
            ) from error
        try:
            return json.loads(body) if body.strip() else None
        except json.JSONDecodeError:
            return body  # load_lora_adapter answers plain text

    def served_model(self) -> str:
        """The name requests use: the hot-loaded adapter's, else the base model's."""
        if self.adapter is not None:
            return self.adapter
        if self.model is None:
            listing = self._send(urllib.request.Request(self.url + "/v1/models"), "/v1/models")
            self.model = listing["data"][0]["id"]
        return self.model

    def load_adapter(self, path: str, name: str) -> None:
        """Hot-load the LoRA adapter folder `path` (readable by the server) as `name`, which later
        requests name; the adapter loaded before is unloaded. The server needs `--enable-lora`
        (with `--max-lora-rank` >= --lora_r) and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True."""
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        previous = self.adapter
        self.adapter, self.adapter_path = name, str(path)
        if previous is not None and previous != name:
            self._post("/v1/unload_lora_adapter", {"lora_name": previous})

    def use_adapter(self, name: str, path: str) -> None:
        """Name `name` in requests (another process loaded it into the server)."""
        self.adapter, self.adapter_path = name, str(path)

    # -- generation --------------------------------------------------------------------------------
    def request(
        self,
        prompt: Any,
        images: list[Image.Image],
        n: int,
        sampling: SamplingParams,
        stop: list[int],
        banned: list[int],
    ) -> dict:
        """The chat-completions request of one prompt's `n` samples."""
        return {
            "model": self.served_model(),
            "messages": chat_messages(prompt, images),
            "n": n,
            "max_tokens": sampling.max_new_tokens,
            # every setting given: the server would otherwise take the checkpoint's generation_config
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "top_p": 1.0 if sampling.greedy else sampling.top_p,
            "top_k": -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "stop_token_ids": stop,
            "logit_bias": {str(token): -100 for token in banned},
            "logprobs": True,
            "top_logprobs": 0,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
            # no per-request "seed": a seeded request crashes vLLM's CPU worker when its prompt is
            # prefilled in chunks (more prompt tokens in flight than a step's budget: its generator
            # cannot rewind), and it does not make a batch reproducible anyway; the server's own
            # --seed does what it can (VLLMServer passes the run's)
        }

    def generate(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        batch: PromptBatch,
        samples_per_prompt: int,
        sampling: SamplingParams,
    ) -> Rollout:
        eos = eos_token_ids(model, processor)
        banned = suppressed_tokens(processor, keep=eos)
        payloads = [
            self.request(prompt, images, samples_per_prompt, sampling, eos, banned)
            for prompt, images in zip(batch.prompts, batch.images, strict=True)
        ]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(payloads))) as pool:
            responses = list(pool.map(lambda payload: self._post("/v1/chat/completions", payload), payloads))
        ids, logprobs = [], []
        for prompt_number, response in enumerate(responses):
            self._check_prompt(response, batch, prompt_number)
            choices = sorted(response["choices"], key=lambda choice: choice["index"])
            if len(choices) != samples_per_prompt:
                raise VLLMServerError(
                    f"the vLLM server returned {len(choices)} completions for {samples_per_prompt} asked"
                )
            for choice in choices:
                choice_ids, choice_logprobs = parse_choice(choice)
                ids.append(choice_ids)
                logprobs.append(choice_logprobs)
        pad_id = processor.tokenizer.pad_token_id
        width = max(1, max(len(row) for row in ids))
        completion_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in ids], dtype=torch.long)
        engine_logprobs = torch.tensor(
            [row + [0.0] * (width - len(row)) for row in logprobs], dtype=torch.float32
        )
        completion_mask, ended = completion_mask_from_ids(completion_ids, eos)
        # an empty completion is padding only: nothing was sampled
        lengths = torch.tensor([len(row) for row in ids])
        completion_mask = completion_mask * (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1))
        completion_ids = torch.where(completion_mask.bool(), completion_ids, pad_id)
        engine_logprobs = engine_logprobs * completion_mask
        texts = processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollout(
            prompt_inputs=batch.inputs,
            images_per_prompt=images_per_prompt(batch),
            prompt_index=torch.arange(len(batch)).repeat_interleave(samples_per_prompt),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            ended=ended,
            completions=[t.strip() for t in texts],
            completion_token_type=completion_token_type(model),
            engine_logprobs=engine_logprobs,
            excluded_tokens=torch.tensor(banned, dtype=torch.long),
        )

    def _check_prompt(self, response: dict, batch: PromptBatch, prompt_number: int) -> None:
        """The server's prompt tokens must be the trainer's: it scores the completions after them."""
        served = response.get("prompt_token_ids")
        if served is None:
            return
        mask = batch.inputs["attention_mask"][prompt_number].bool()
        ours = batch.inputs["input_ids"][prompt_number][mask].tolist()
        if list(served) != ours:
            at = next(
                (k for k, (a, b) in enumerate(zip(served, ours, strict=False)) if a != b),
                min(len(served), len(ours)),
            )
            raise VLLMServerError(
                f"the vLLM server's prompt tokens differ from the trainer's (prompt {prompt_number}: "
                f"{len(served)} vs {len(ours)} tokens, first difference at position {at}): the server must "
                "serve the policy's base model with its processor files and chat template (docs/rollout_engine.md)"
            )


def make_engine(rollout_engine: str, vllm_url: str | None = None) -> HFEngine | VLLMEngine:
    """The engine `--rollout_engine` names (vllm without a url: the server the run starts, its url
    given when it is up)."""
    if rollout_engine == "hf":
        return HFEngine()
    if rollout_engine == "vllm":
        return VLLMEngine(vllm_url)
    raise ConfigError(f"--rollout_engine {rollout_engine!r}: choose hf or vllm")


def truncated_importance_weights(
    logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance sampling (TIS, Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"; TRL's vllm_importance_sampling_correction, verl's
    tis_imp_ratio_cap) for the engine/trainer mismatch: the engine sampled from its own numerics of
    the policy (log-probs `engine_logprobs`), the trainer's objective assumes its own (`logprobs`,
    the same weights). Each token's policy-gradient term is weighted by

        w_t = min(pi_trainer(y_t) / pi_engine(y_t), cap)

    logprobs, engine_logprobs, mask: (N, T). Returns the weights (N, T) (no grad; 0 off the mask) and
    the ratio's mean and max over the mask, before truncation (`rollout/is_ratio_mean`, `_max`).
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs.detach() - engine_logprobs.to(logprobs.dtype))
    weights = ratio.clamp(max=cap) * mask
    tokens = mask.sum().clamp(min=1)
    on_mask = ratio.masked_fill(mask == 0, float("-inf"))
    stats = {
        "rollout/is_ratio_mean": float((ratio * mask).sum() / tokens),
        "rollout/is_ratio_max": float(on_mask.max()) if mask.any() else 1.0,
    }
    return weights, stats
