"""The rollout-engine seam (vlm_rl.rl.engines): HF generate is the default and unchanged; the vLLM
client's requests, response parsing, adapter hot-loading and truncated importance sampling,
against a stand-in server.

The stand-in (`StandIn`) is a small in-process HTTP server answering the OpenAI-compatible routes a
vLLM server has (/v1/models, /v1/chat/completions, /v1/load_lora_adapter, /v1/unload_lora_adapter):
it records every request and answers chat completions with the tokens and log-probs a test gives.
It is no model: a real vLLM server is tested by tests/test_vllm_server.py (marked slow and vllm).
"""

from __future__ import annotations

import base64
import io
import json
import math
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from vlm_rl.data.collators import PromptCollator
from vlm_rl.errors import ConfigError
from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.recipes.flags import unused_flags
from vlm_rl.rewards.compose import CombinedReward
from vlm_rl.rewards.rules import completion_text
from vlm_rl.rl.config import RLConfig
from vlm_rl.rl.engines import (
    HFEngine,
    SamplingParams,
    VLLMEngine,
    VLLMServerError,
    truncated_importance_weights,
)
from vlm_rl.rl.rollout import eos_token_ids, generate
from vlm_rl.rl.trainer import RLTrainer
from vlm_rl.tasks.easy_vqa import caption_dataset, caption_match

Respond = Callable[[dict], list[tuple[list[int], list[float]]]]
"""(a chat-completions request) -> (token ids, log-probs) of each of its n completions."""


class StandIn:
    """A stand-in for a vLLM server's OpenAI-compatible API, in this process (a thread)."""

    def __init__(self, respond: Respond, prompt_token_ids: Callable[[dict], list[int]] | None = None):
        self.respond = respond
        self.prompt_token_ids = prompt_token_ids
        self.requests: list[tuple[str, dict]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body: object) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                stand_in.requests.append((self.path, {}))
                self._answer({"data": [{"id": "base-model"}]})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append((self.path, payload))
                if self.path == "/v1/chat/completions":
                    self._answer(stand_in.completion(payload))
                else:  # load / unload an adapter: vLLM answers plain text
                    self._answer("Success")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def completion(self, payload: dict) -> dict:
        choices = []
        for index, (ids, logprobs) in enumerate(self.respond(payload)):
            content = [
                {"token": f"token_id:{i}", "logprob": lp, "top_logprobs": []}
                for i, lp in zip(ids, logprobs, strict=True)
            ]
            choices.append({"index": index, "token_ids": ids, "logprobs": {"content": content}})
        answer: dict = {"choices": choices}
        if self.prompt_token_ids is not None:
            answer["prompt_token_ids"] = self.prompt_token_ids(payload)
        return answer

    def chat_requests(self) -> list[dict]:
        return [payload for path, payload in self.requests if path == "/v1/chat/completions"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in() -> Iterator[Callable[..., StandIn]]:
    servers: list[StandIn] = []

    def start(respond: Respond, **kwargs) -> StandIn:
        servers.append(StandIn(respond, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def tiny():
    model, processor = load_model("tiny-llava")
    return model, processor


@pytest.fixture(scope="module")
def prompts():
    return caption_dataset("train", num_samples=16, seed=0)


def word_ids(processor, *words: str) -> list[int]:
    return [processor.tokenizer.convert_tokens_to_ids(w) for w in words]


def decode_data_url(url: str) -> Image.Image:
    header, data = url.split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_the_request_carries_images_as_data_urls_and_every_sampling_setting(tiny, prompts, stand_in):
    model, processor = tiny
    eos = eos_token_ids(model, processor)
    red = word_ids(processor, "red")[0]
    server = stand_in(lambda payload: [([red, eos[0]], [-0.5, -0.1])] * payload["n"])
    batch = PromptCollator(processor)([prompts[i] for i in range(2)])
    engine = VLLMEngine(server.url)
    engine.generate(model, processor, batch, 3, SamplingParams(4, temperature=0.7, top_p=0.9))

    requests = server.chat_requests()
    assert len(requests) == 2  # one per prompt, its 3 samples as n
    for request, prompt, images in zip(requests, batch.prompts, batch.images, strict=True):
        assert request["model"] == "base-model"  # no adapter loaded yet: the server's listed model
        assert (request["n"], request["max_tokens"]) == (3, 4)
        assert (request["temperature"], request["top_p"], request["top_k"]) == (0.7, 0.9, -1)
        assert request["stop_token_ids"] == eos
        assert request["logprobs"] and request["return_token_ids"] and request["return_tokens_as_token_ids"]
        # no per-request seed: vLLM's CPU worker cannot rewind a seeded request's generator when its
        # prompt is prefilled in chunks (more prompt tokens in flight than a step's budget)
        assert "seed" not in request
        # special tokens other than EOS (the image token) are banned, as HF generate suppresses them
        image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
        assert request["logit_bias"][str(image_token)] == -100
        parts = request["messages"][0]["content"]
        urls = [part["image_url"]["url"] for part in parts if part["type"] == "image_url"]
        assert len(urls) == len(images) == 1
        assert decode_data_url(urls[0]).tobytes() == images[0].convert("RGB").tobytes()
        texts = [part["text"] for part in parts if part["type"] == "text"]
        assert texts == [p["text"] for p in prompt[0]["content"] if p["type"] == "text"]

    engine.generate(model, processor, batch, 1, SamplingParams(4, greedy=True))
    assert server.chat_requests()[-1]["temperature"] == 0.0


def test_the_response_gives_token_ids_masks_texts_and_log_probs(tiny, prompts, stand_in):
    model, processor = tiny
    eos = eos_token_ids(model, processor)[0]
    red, circle, blue = word_ids(processor, "red", "circle", "blue")
    answers = [([red, circle, eos], [-0.1, -0.2, -0.3]), ([blue, red, blue, red], [-1.0, -2.0, -3.0, -4.0])]
    batch = PromptCollator(processor)([prompts[0]])

    def ids_of(payload):  # the trainer's prompt tokens, as a vLLM server returns them
        mask = batch.inputs["attention_mask"][0].bool()
        return batch.inputs["input_ids"][0][mask].tolist()

    server = stand_in(lambda payload: answers, prompt_token_ids=ids_of)
    rollout = VLLMEngine(server.url).generate(model, processor, batch, 2, SamplingParams(4))
    pad = processor.tokenizer.pad_token_id
    assert rollout.completion_ids.tolist() == [[red, circle, eos, pad], [blue, red, blue, red]]
    assert rollout.completion_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert rollout.ended.tolist() == [True, False]
    assert rollout.completions == [
        processor.tokenizer.decode([red, circle], skip_special_tokens=True).strip(),
        processor.tokenizer.decode([blue, red, blue, red], skip_special_tokens=True).strip(),
    ]
    torch.testing.assert_close(
        rollout.engine_logprobs, torch.tensor([[-0.1, -0.2, -0.3, 0.0], [-1.0, -2.0, -3.0, -4.0]])
    )
    assert rollout.prompt_index.tolist() == [0, 0]
    # the trainer can score it: prompt + completion inputs of the usual shape
    assert rollout.model_inputs(torch.arange(2))["input_ids"].shape[0] == 2

    # a server whose prompt differs from the trainer's (another model or chat template) is refused
    other = stand_in(lambda payload: answers, prompt_token_ids=lambda payload: [1, 2, 3])
    with pytest.raises(VLLMServerError, match="prompt tokens differ from the trainer's"):
        VLLMEngine(other.url).generate(model, processor, batch, 2, SamplingParams(4))


def test_an_unreachable_server_is_one_clear_error(tiny, prompts):
    model, processor = tiny
    batch = PromptCollator(processor)([prompts[0]])
    engine = VLLMEngine("http://127.0.0.1:9", model="base", timeout=5)
    with pytest.raises(VLLMServerError, match="unreachable.*--vllm_url"):
        engine.generate(model, processor, batch, 1, SamplingParams(4))


def test_an_engine_rollout_is_scored_over_the_tokens_the_engine_may_sample(tiny, prompts, stand_in):
    """The server never samples the banned special tokens and normalises its log-probs without them:
    the rollout says which (`excluded_tokens`), and the trainer's probabilities of every other first
    token then sum to 1 (over the whole vocabulary they sum to less)."""
    from vlm_rl.models.value import PolicyWithValue

    model, processor = tiny
    eos = processor.tokenizer.eos_token_id
    server = stand_in(lambda payload: [([eos], [-0.5])] * payload["n"])
    batch = PromptCollator(processor)([prompts[0]])
    rollout = VLLMEngine(server.url).generate(model, processor, batch, 1, SamplingParams(2, temperature=1.3))
    banned = server.chat_requests()[0]["logit_bias"]
    assert sorted(rollout.excluded_tokens.tolist()) == sorted(int(token) for token in banned)

    allowed = [i for i in range(len(processor.tokenizer)) if i not in set(rollout.excluded_tokens.tolist())]
    inputs = rollout.model_inputs(torch.zeros(len(allowed), dtype=torch.long))
    candidates = torch.tensor(allowed).unsqueeze(1)  # every allowed first token, one row each

    def first_token_mass(excluded):
        with torch.no_grad():
            out = PolicyWithValue(model, None)(inputs, candidates, temperature=1.3, excluded_tokens=excluded)
        return out["logprobs"][:, 0].exp().sum().item()

    assert first_token_mass(rollout.excluded_tokens) == pytest.approx(1.0, abs=1e-5)
    assert first_token_mass(None) < 1.0 - 1e-4


def test_truncated_importance_weights_by_hand():
    """ratio = pi_trainer / pi_engine = [2, 0.5, (masked) 8]; capped at 1.5: weights [1.5, 0.5, 0]."""
    logprobs = torch.log(torch.tensor([[0.5, 0.2, 0.8]]))
    engine_logprobs = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))
    mask = torch.tensor([[1, 1, 0]])
    weights, stats = truncated_importance_weights(logprobs, engine_logprobs, mask, cap=1.5)
    torch.testing.assert_close(weights, torch.tensor([[1.5, 0.5, 0.0]]))
    assert stats["rollout/is_ratio_mean"] == pytest.approx(1.25)
    assert stats["rollout/is_ratio_max"] == pytest.approx(2.0)
    weights, _ = truncated_importance_weights(logprobs, engine_logprobs, mask, cap=10.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 0.0]]))


def make_trainer(tmp_path, prompts, eval_dataset=None, reward=None, **overrides) -> RLTrainer:
    torch.manual_seed(0)
    settings = dict(
        algorithm="grpo",
        prompts_per_step=2,
        samples_per_prompt=2,
        minibatch_size=8,
        total_steps=2,
        eval_steps=0,
        save_steps=0,
        output_dir=str(tmp_path / "run"),
        report_to="none",
        learning_rate=1e-3,
        max_new_tokens=3,
    )
    settings.update(overrides)
    model, processor = load_model("tiny-llava")
    policy = wrap_with_lora(model, r=8, alpha=16, train_projector=settings.get("train_projector", True))
    reward = reward or CombinedReward([caption_match])
    return RLTrainer(RLConfig(**settings), policy, processor, reward, prompts, eval_dataset)


def test_a_vllm_run_hot_loads_the_adapter_after_each_update_and_weights_by_is(tmp_path, prompts, stand_in):
    _, processor = load_model("tiny-llava")
    red, circle = word_ids(processor, "red", "circle")
    eos = processor.tokenizer.eos_token_id
    # the engine's log-probs are a constant: the trainer's differ, so the IS ratio is not 1
    server = stand_in(lambda payload: [([red, circle, eos], [-6.0, -6.0, -6.0])] * payload["n"])
    trainer = make_trainer(
        tmp_path,
        prompts,
        prompts.select(range(2)),
        rollout_engine="vllm",
        vllm_url=server.url,
        train_projector=False,
        vllm_importance_sampling_cap=1.5,
    )
    trainer.train()
    trainer.save_final()

    loads = [(path, payload) for path, payload in server.requests if path.endswith("_lora_adapter")]
    # step 0's adapter (the fresh one), then after each update a new one; each replaced one unloaded
    assert [(path, payload["lora_name"]) for path, payload in loads] == [
        ("/v1/load_lora_adapter", "vlm_rl-v0"),
        ("/v1/load_lora_adapter", "vlm_rl-v1"),
        ("/v1/unload_lora_adapter", "vlm_rl-v0"),
        ("/v1/load_lora_adapter", "vlm_rl-v2"),
        ("/v1/unload_lora_adapter", "vlm_rl-v1"),
    ]
    adapter = tmp_path / "run" / "rollout_adapters" / "vlm_rl-v2"
    assert (adapter / "adapter_config.json").is_file()
    assert [p.name for p in adapter.parent.iterdir()] == ["vlm_rl-v2"]  # older copies removed
    # the last adapter holds the trained weights: the final adapter's
    from safetensors.torch import load_file

    final = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    synced = load_file(adapter / "adapter_model.safetensors")
    assert synced.keys() == final.keys() and all(torch.equal(synced[k], final[k]) for k in final)
    # each request names the adapter of the weights it samples from: evaluation, step 1 (no update
    # yet), step 2 (after one), evaluation after the last update
    names = [payload["model"] for payload in server.chat_requests()]
    assert names == ["vlm_rl-v0"] * 2 + ["vlm_rl-v0"] * 2 + ["vlm_rl-v1"] * 2 + ["vlm_rl-v2"] * 2

    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [m for m in metrics if "rollout/is_ratio_mean" in m]
    assert len(steps) == 2
    for m in steps:
        assert m["rollout/is_ratio_max"] >= m["rollout/is_ratio_mean"] > 0
        assert math.isfinite(m["rollout/is_ratio_max"])
        # the trainer's probabilities beat exp(-6) for these tokens: some ratio exceeds the cap
        assert m["rollout/is_ratio_max"] > 1.5


def test_one_step_off_samples_the_next_step_during_the_update_one_version_behind(tmp_path, prompts, stand_in):
    """--async_rollouts: step t+1's requests reach the server while step t updates (the update below
    waits for them: without the overlap it would time out), name the adapter of the weights before
    that update, and the step logs a policy lag of 1; evaluation syncs the newest weights."""
    import time

    _, processor = load_model("tiny-llava")
    red, circle = word_ids(processor, "red", "circle")
    eos = processor.tokenizer.eos_token_id
    server = stand_in(lambda payload: [([red, circle, eos], [-1.0, -1.0, -1.0])] * payload["n"])
    trainer = make_trainer(
        tmp_path,
        prompts,
        prompts.select(range(2)),
        rollout_engine="vllm",
        vllm_url=server.url,
        train_projector=False,
        async_rollouts=True,
        total_steps=4,
    )
    update, overlapped = trainer.update, []

    def update_waiting_for_the_next_rollout(rollout, plan=None):
        if trainer.step + 1 < trainer.config.total_steps:
            # 2 evaluation prompts, then 2 prompts a step: steps 0..t+1's are asked by now
            asked = 2 + 2 * (trainer.step + 2)
            deadline = time.monotonic() + 20
            while len(server.chat_requests()) < asked and time.monotonic() < deadline:
                time.sleep(0.01)
            overlapped.append(len(server.chat_requests()) == asked)
        return update(rollout, plan)

    trainer.update = update_waiting_for_the_next_rollout
    trainer.train()
    assert overlapped == [True, True, True]
    names = [payload["model"] for payload in server.chat_requests()]
    # evaluation, step 0 (sampled now), steps 1-3 (sampled during the update before), evaluation
    assert names == ["vlm_rl-v0"] * 6 + ["vlm_rl-v1"] * 2 + ["vlm_rl-v2"] * 2 + ["vlm_rl-v4"] * 2
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [m for m in metrics if "reward/mean" in m]
    assert [m["rollout/policy_lag"] for m in steps] == [0, 1, 1, 1]
    for m in steps:
        assert m["time/generate_s"] > 0 and 0 <= m["time/rollout_share"] <= 1
        assert m["perf/total_num_tokens"] > 0 and m["perf/throughput"] > 0
    # the lag is corrected by the IS weights: the trainer's log-probs differ from the server's -1
    assert all(m["rollout/is_ratio_mean"] != 1.0 for m in steps)


def test_one_step_off_agent_episodes_stay_with_their_step(tmp_path, stand_in):
    """An agent under --async_rollouts: each step's episodes.jsonl rows are the episodes of that
    step's own rollout (the next step's, played meanwhile, do not replace them)."""
    from vlm_rl.recipes.ppo_agent import main

    _, processor = load_model("tiny-llava-agent")
    left, down = word_ids(processor, "left", "down")
    eos = processor.tokenizer.eos_token_id
    server = stand_in(
        lambda payload: [([left, eos], [-1.0, -1.0]), ([down, eos], [-1.0, -1.0])][: payload["n"]]
    )
    main(
        [
            "--output_dir", str(tmp_path / "run"),
            "--rollout_engine", "vllm", "--vllm_url", server.url, "--async_rollouts", "true",
            "--train_projector", "false",
            "--total_steps", "3", "--prompts_per_step", "2", "--samples_per_prompt", "1",
            "--eval_episodes", "2", "--eval_steps", "0", "--save_steps", "0", "--sample_log_steps", "1",
            "--warm_start_steps", "0", "--num_threads", "1", "--report_to", "none",
        ]
    )  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "run" / "episodes.jsonl").open()]
    seeds = {step: sorted(r["seed"] for r in rows if r["step"] == step) for step in range(3)}
    assert all(len(s) == 2 for s in seeds.values())
    assert seeds[0] != seeds[1] != seeds[2]  # each step wrote its own episodes, not the next step's
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [m["rollout/policy_lag"] for m in metrics if "reward/mean" in m] == [0, 1, 1]


def test_the_warm_start_reloads_the_adapter_into_the_server(tmp_path, prompts, stand_in):
    """The warm start trains the policy after the base policy's evaluation: the next generation
    hot-loads the warm-started adapter (not the base one the evaluation loaded)."""
    from vlm_rl.rl.config import WarmStartConfig
    from vlm_rl.rl.pipeline import warm_start

    _, processor = load_model("tiny-llava")
    red, eos = word_ids(processor, "red")[0], processor.tokenizer.eos_token_id
    server = stand_in(lambda payload: [([red, eos], [-1.0, -1.0])] * payload["n"])
    trainer = make_trainer(
        tmp_path,
        prompts,
        prompts.select(range(2)),
        rollout_engine="vllm",
        vllm_url=server.url,
        train_projector=False,
    )
    warm = WarmStartConfig(warm_start_steps=1, warm_start_batch_size=4)
    warm_start(trainer, trainer.config, warm, lambda: prompts)
    trainer.evaluate()
    loaded = [payload["lora_name"] for path, payload in server.requests if path == "/v1/load_lora_adapter"]
    assert loaded == ["vlm_rl-v0", "vlm_rl-v1"]
    assert [payload["model"] for payload in server.chat_requests()] == ["vlm_rl-v0"] * 2 + ["vlm_rl-v1"] * 2


def test_the_is_weight_scales_the_policy_gradient(tmp_path, prompts, stand_in):
    """An engine far surer of its tokens than the trainer (ratio ~ e^-40) weights the policy
    gradient to ~0: with no entropy bonus and no KL, the gradient vanishes."""
    _, processor = load_model("tiny-llava")
    red, blue = word_ids(processor, "red", "blue")
    eos = processor.tokenizer.eos_token_id

    def says_red(prompts, completions, **columns):
        return [float(completion_text(c).startswith("red")) for c in completions]

    def grad_norm(engine_logprob: float) -> float:
        # a group of two: "red" (reward 1) and "blue" (reward 0), so the advantages are not 0
        server = stand_in(
            lambda payload: [([red, eos], [engine_logprob] * 2), ([blue, eos], [engine_logprob] * 2)]
        )
        trainer = make_trainer(
            tmp_path / str(engine_logprob),
            prompts,
            reward=CombinedReward([says_red]),
            rollout_engine="vllm",
            vllm_url=server.url,
            train_projector=False,
            entropy_coef=0.0,
            total_steps=1,
            lr_decay_steps=None,
        )
        return trainer.train_step()["loss/grad_norm"]

    assert grad_norm(-6.0) > 1e-3
    assert grad_norm(40.0) < 1e-12


def test_the_agent_sends_one_request_per_live_episode_each_turn(stand_in):
    from vlm_rl.envs import make_env
    from vlm_rl.rl.agent import play_episodes

    model, processor = load_model("tiny-llava-agent")
    left = word_ids(processor, "left")[0]
    eos = processor.tokenizer.eos_token_id
    server = stand_in(lambda payload: [([left, eos], [-0.25, -0.5])])
    envs = [make_env("frozenlake") for _ in range(3)]
    rollout, batch, episodes = play_episodes(
        model, processor, envs, [1, 2, 3], max_turns=2, max_new_tokens=3, engine=VLLMEngine(server.url)
    )
    requests = server.chat_requests()
    turns = sum(e.turns for e in episodes)
    assert len(requests) == turns == len(rollout)
    assert all(r["n"] == 1 for r in requests)
    assert all(e.actions[0] == "left" for e in episodes)
    torch.testing.assert_close(
        rollout.engine_logprobs, torch.tensor([[-0.25, -0.5]] * turns) * rollout.completion_mask
    )


def test_hf_generate_is_the_default_engine_and_unchanged(tmp_path, tiny, prompts):
    model, processor = tiny
    assert RLConfig().rollout_engine == "hf"
    trainer = make_trainer(tmp_path, prompts)
    assert isinstance(trainer.policy.engine, HFEngine)
    batch = PromptCollator(processor)([prompts[i] for i in range(2)])
    sampling = SamplingParams(4, temperature=1.0, top_p=1.0)
    torch.manual_seed(3)
    through_seam = HFEngine().generate(model, processor, batch, 3, sampling)
    torch.manual_seed(3)
    direct = generate(
        model, processor, batch.inputs, torch.tensor([1, 1]), samples_per_prompt=3, max_new_tokens=4
    )
    assert torch.equal(through_seam.completion_ids, direct.completion_ids)
    assert through_seam.engine_logprobs is None  # the trainer's own log-probs are the behaviour policy's


def test_vllm_flags_follow_the_rules(monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_RL_VLLM_PYTHON", sys.executable)  # a server the run would start: its python
    # --vllm_url (and the IS cap) without --rollout_engine vllm would be ignored: an error
    given = {"vllm_url", "vllm_importance_sampling_cap"}
    problems = dict(unused_flags("grpo_vqa", [RLConfig(vllm_url="http://x")], given))
    assert problems == {
        "vllm_url": "needs --rollout_engine vllm",
        "vllm_importance_sampling_cap": "needs --rollout_engine vllm",
    }
    config = RLConfig(rollout_engine="vllm", vllm_url="http://x", train_projector=False)
    assert unused_flags("grpo_vqa", [config], given | {"rollout_engine"}) == []
    assert unused_flags("ppo_agent", [config], given | {"rollout_engine"}) == []
    # without --vllm_url the run starts its own server: --vllm_python and --vllm_cpus are its flags
    managed = {"vllm_python", "vllm_cpus"}
    assert unused_flags("grpo_vqa", [config], managed | {"rollout_engine"}) == [
        ("vllm_python", "the server at --vllm_url is yours: the run starts none"),
        ("vllm_cpus", "the server at --vllm_url is yours: the run starts none"),
    ]
    own = RLConfig(rollout_engine="vllm", train_projector=False, async_rollouts=True)
    assert unused_flags("grpo_vqa", [own], managed | {"rollout_engine", "async_rollouts"}) == []
    assert dict(unused_flags("grpo_vqa", [RLConfig()], {"async_rollouts"})) == {
        "async_rollouts": "needs --rollout_engine vllm"
    }
    with pytest.raises(ConfigError, match="--async_rollouts needs --rollout_engine vllm"):
        RLConfig(async_rollouts=True)
    # the server's python and cores are checked before any model loads
    with pytest.raises(ConfigError, match="--vllm_python .*nowhere/python: no such file"):
        RLConfig(rollout_engine="vllm", train_projector=False, vllm_python=str(tmp_path / "nowhere/python"))
    for cpus in ("first", "0-999"):
        with pytest.raises(ConfigError, match=f"--vllm_cpus {cpus}: give this machine's cores"):
            RLConfig(rollout_engine="vllm", train_projector=False, vllm_cpus=cpus)
    monkeypatch.delenv("VLM_RL_VLLM_PYTHON")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vlm_rl.rl.vllm_server.VENV_PYTHON", tmp_path / "no-venv" / "python")
    with pytest.raises(ConfigError, match="no vLLM venv found.*make vllm-env"):
        RLConfig(rollout_engine="vllm", train_projector=False)
    with pytest.raises(ConfigError, match="ignore the trained projector.*--train_projector false"):
        RLConfig(rollout_engine="vllm", vllm_url="http://x")
    with pytest.raises(ConfigError, match="--trainer trl has its own"):
        RLConfig(
            rollout_engine="vllm", vllm_url="http://x", train_projector=False, trainer="trl", algorithm="grpo"
        )
    with pytest.raises(ConfigError, match="vllm_importance_sampling_cap"):
        RLConfig(
            rollout_engine="vllm",
            vllm_url="http://x",
            train_projector=False,
            vllm_importance_sampling_cap=0.5,
        )


def test_the_cli_refuses_vllm_url_without_the_vllm_engine(capsys):
    from vlm_rl.errors import run_entry_point
    from vlm_rl.recipes import grpo_vqa

    code = run_entry_point(
        grpo_vqa.main, ["--vllm_url", "http://127.0.0.1:8000", "--num_threads", "1"], "grpo"
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vllm_url: needs --rollout_engine vllm" in err[0]
