"""Batched multi-turn rollouts: N episodes of a visual environment played together by a VLM.

Each turn, the live episodes' prompts (their current frame(s) and text) go through ONE batched
call of the rollout engine (`vlm_rl.rl.engines`: transformers' `generate`, or one request per live
episode to a vLLM server, all in flight together); each reply is parsed into an action and stepped; finished episodes leave the
batch. The result is a `Rollout` whose rows are turns (one row per turn of every episode, with
`episode_index`, `turn_index` and `group_index`), so scoring, advantages and the update are the
single-turn engine's: a single-turn task is an episode of one turn.

Context per turn (`AgentContext`): the current frame only (default: the cheapest, and the
episode's state is on the frame for the built-in environments), the last k frames, and/or a text
history of the last m actions; the prompt is built from the current observation each turn, so the
context length stays constant (as verl-agent does) whatever the episode length.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from vlm_rl.data.collators import PromptBatch, PromptCollator
from vlm_rl.envs.adapter import StepResult, Turn, TurnEnv
from vlm_rl.models.families import completion_token_type
from vlm_rl.report.records import FILM_STRIPS, save_eval_episodes
from vlm_rl.rewards.compose import CombinedReward
from vlm_rl.rl.components import EVAL_BATCH_SIZE, RewardStage, TrainedPolicy
from vlm_rl.rl.config import RLConfig
from vlm_rl.rl.engines import HFEngine, RolloutEngine, SamplingParams
from vlm_rl.rl.rollout import Rollout
from vlm_rl.rl.trainer import RLTrainer
from vlm_rl.run_folder import RunFolder


@dataclass(frozen=True)
class AgentContext:
    """What each turn's prompt holds besides the current frame and the instruction."""

    frames: int = 1
    """The last k frames (the current one last); earlier turns of a short episode have fewer."""
    actions: int = 0
    """A text history of the last m actions taken ("history : left down")."""


@dataclass
class Episode:
    """One played episode, as recorded in the run folder."""

    seed: int
    group: int
    frames: list[Image.Image] = field(default_factory=list)
    """The frame shown at each turn, then the final frame."""
    prompts: list[str] = field(default_factory=list)
    """The prompt text of each turn (instruction, env text such as BabyAI's mission, history)."""
    replies: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    """Environment reward of each turn (invalid-action penalties included)."""
    invalid: list[bool] = field(default_factory=list)
    success: bool = False
    terminated: bool = False

    @property
    def turns(self) -> int:
        return len(self.actions)

    @property
    def episode_return(self) -> float:
        return float(sum(self.rewards))

    def record(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "group": self.group,
            "prompts": self.prompts,
            "replies": self.replies,
            "actions": self.actions,
            "rewards": self.rewards,
            "invalid": self.invalid,
            "success": self.success,
            "return": self.episode_return,
            "turns": self.turns,
        }


def turn_example(
    turn: Turn, previous_frames: Sequence[Image.Image], past_actions: Sequence[str], context: AgentContext
) -> dict:
    """The conversational prompt of a turn under `context` (TRL's prompt + images format)."""
    frames = (
        [*previous_frames[len(previous_frames) - (context.frames - 1) :], turn.image]
        if context.frames > 1
        else [turn.image]
    )
    text = turn.text
    if context.actions and past_actions:
        text = f"{text} history : {' '.join(past_actions[-context.actions :])}"
    content = [{"type": "image"} for _ in frames] + [{"type": "text", "text": text}]
    return {"prompt": [{"role": "user", "content": content}], "images": frames}


def check_context_length(model: PreTrainedModel, length: int) -> None:
    """The context-length guard: a turn's prompt plus its reply must fit the model's positions."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ValueError(
            f"a turn needs {length} positions (prompt + max_new_tokens) but the model has {limit}: lower "
            "--context_frames, --context_actions or --max_new_tokens"
        )


def observation_key(example: dict) -> str:
    """A hash of what the policy sees on a turn (frames + text): equal keys = the same state for
    GiGPO's step groups."""
    digest = hashlib.sha1()
    for image in example["images"]:
        digest.update(image.tobytes())
    digest.update(repr(example["prompt"]).encode())
    return digest.hexdigest()


@torch.no_grad()
def play_episodes(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    envs: Sequence[TurnEnv],
    seeds: Sequence[int],
    groups: Sequence[int] | None = None,
    *,
    max_turns: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    context: AgentContext = AgentContext(),
    engine: RolloutEngine | None = None,
) -> tuple[Rollout, PromptBatch, list[Episode]]:
    """Play one episode per env (env i reset with seeds[i]) to its end or `max_turns`, each turn's
    replies sampled by `engine` (default: transformers' generate on `model`).

    Returns the turns as one `Rollout` (row order: turn 0 of every episode, then turn 1 of the
    live ones, ...), the turns' prompts as a `PromptBatch` (row i of the rollout answers prompt i;
    its `env_reward` column holds each turn's environment reward, penalties included: the
    `env_reward` reward function reads it) and the episodes.
    """
    groups = list(groups) if groups is not None else list(range(len(envs)))
    engine = engine if engine is not None else HFEngine()
    sampling = SamplingParams(max_new_tokens, temperature, top_p, greedy)
    collator = PromptCollator(processor)
    episodes = [Episode(seed=int(s), group=int(g)) for s, g in zip(seeds, groups, strict=True)]
    turns = [env.reset(seed=int(seed)) for env, seed in zip(envs, seeds, strict=True)]
    examples, rows = [], []  # every turn's prompt example, and its (episode, turn index)
    completion_ids, completion_masks, ended, texts, rewards = [], [], [], [], []
    engine_logprobs, excluded_tokens = [], None
    live = list(range(len(envs)))
    for turn_number in range(max_turns):
        if not live:
            break
        batch_examples = [
            turn_example(turns[i], episodes[i].frames, episodes[i].actions, context) for i in live
        ]
        batch = collator(batch_examples)
        check_context_length(model, batch.inputs["input_ids"].shape[1] + max_new_tokens)
        sampled = engine.generate(model, processor, batch, 1, sampling)
        still_live = []
        for position, i in enumerate(live):
            episode = episodes[i]
            result = envs[i].step(sampled.completions[position])
            episode.frames.append(turns[i].image)
            episode.prompts.append(batch_examples[position]["prompt"][0]["content"][-1]["text"])
            episode.replies.append(sampled.completions[position])
            episode.actions.append(result.action)
            episode.rewards.append(result.reward)
            episode.invalid.append(not result.valid)
            examples.append(batch_examples[position])
            rows.append((i, turn_number))
            completion_ids.append(sampled.completion_ids[position])
            completion_masks.append(sampled.completion_mask[position])
            if sampled.engine_logprobs is not None:
                engine_logprobs.append(sampled.engine_logprobs[position])
                excluded_tokens = sampled.excluded_tokens
            ended.append(sampled.ended[position])
            texts.append(sampled.completions[position])
            rewards.append(result.reward)
            turns[i] = result.turn
            if result.done:
                episode.success, episode.terminated = bool(result.info.get("success")), result.terminated
                episode.frames.append(result.turn.image)
            else:
                still_live.append(i)
        live = still_live
    for i in live:  # cut at max_turns
        episodes[i].frames.append(turns[i].image)

    pad_id = processor.tokenizer.pad_token_id
    width = max(len(ids) for ids in completion_ids)

    def padded(tensors: list[torch.Tensor], value: float) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(t, (0, width - len(t)), value=value) for t in tensors])

    all_turns = collator(examples)
    rollout = Rollout(
        prompt_inputs=all_turns.inputs,
        images_per_prompt=torch.tensor([len(e["images"]) for e in examples]),
        prompt_index=torch.arange(len(examples)),
        completion_ids=padded(completion_ids, pad_id),
        completion_mask=padded(completion_masks, 0),
        ended=torch.stack(ended),
        completions=texts,
        episode_index=torch.tensor([episode for episode, _ in rows]),
        turn_index=torch.tensor([turn for _, turn in rows]),
        group_index=torch.tensor([episodes[episode].group for episode, _ in rows]),
        observation_keys=[observation_key(e) for e in examples],
        completion_token_type=completion_token_type(model),
        engine_logprobs=padded(engine_logprobs, 0.0) if engine_logprobs else None,
        excluded_tokens=excluded_tokens,
    )
    all_turns.columns["env_reward"] = rewards
    return rollout, all_turns, episodes


def env_reward(
    prompts: Sequence[Any], completions: Sequence[Any], env_reward: Sequence[float], **columns: Any
) -> list[float]:
    """The environment's reward of each turn (invalid-action penalty included), as a reward
    function, so it composes with a learned reward model on turns like any other component."""
    return [float(r) for r in env_reward]


class EpisodeRollouts:
    """The agent's rollout source: a step plays `prompts_per_step` environment seeds x
    `samples_per_prompt` episodes each (a group, for GRPO/RLOO: the same seed, so the same map), one
    rollout row per turn; held-out evaluation plays one greedy episode per held-out seed."""

    def __init__(
        self,
        make_env: Callable[[], TurnEnv],
        train_seeds: Sequence[int],
        eval_seeds: Sequence[int] = (),
        *,
        max_turns: int,
        context: AgentContext = AgentContext(),
    ):
        if len(train_seeds) == 0:
            raise ValueError("no training seeds: the environment's train_seeds range is empty")
        self.make_env = make_env
        self.train_seeds, self.eval_seeds = list(train_seeds), list(eval_seeds)
        self.max_turns, self.context = max_turns, context
        self._envs: list[TurnEnv] = []

    def __len__(self) -> int:
        """How many training seeds there are."""
        return len(self.train_seeds)

    def _env_pool(self, n: int) -> list[TurnEnv]:
        while len(self._envs) < n:
            self._envs.append(self.make_env())
        return self._envs[:n]

    def play(
        self, policy: TrainedPolicy, seeds: Sequence[int], groups: Sequence[int], greedy: bool
    ) -> tuple[Rollout, PromptBatch, list[Episode]]:
        """One episode per seed (`groups`: each episode's group), sampled or greedy, by the policy's
        rollout engine."""
        with policy.sampler() as model:
            return play_episodes(
                model,
                policy.processor,
                self._env_pool(len(seeds)),
                seeds,
                groups,
                max_turns=self.max_turns,
                max_new_tokens=policy.config.max_new_tokens,
                temperature=policy.config.temperature,
                top_p=policy.config.top_p,
                greedy=greedy,
                context=self.context,
                engine=policy.engine,
            )

    def sample(
        self, policy: TrainedPolicy, indices: list[int]
    ) -> tuple[Rollout, PromptBatch, dict[str, float]]:
        """G episodes of each training seed `indices`: (their turns, the turns' prompts, episode metrics)."""
        G = policy.config.samples_per_prompt
        seeds = [self.train_seeds[i] for i in indices]
        groups = [position // G for position in range(len(seeds) * G)]
        rollout, batch, episodes = self.play(
            policy, [s for s in seeds for _ in range(G)], groups, greedy=False
        )
        rollout.episodes = episodes
        return rollout, batch, {f"episodes/{k}": v for k, v in episode_metrics(episodes).items()}

    @torch.no_grad()
    def evaluate(
        self, policy: TrainedPolicy, rewards: RewardStage, gallery: RunFolder | None, step: int
    ) -> dict[str, float]:
        """One greedy episode per held-out seed: success rate, return, length, invalid-action rate (the
        environment's, not `rewards`). With `gallery`, the first episodes' film strips for the report."""
        accelerator = policy.accelerator
        seeds = self.eval_seeds[accelerator.process_index :: accelerator.num_processes]
        if not self.eval_seeds:
            return {}
        totals: dict[str, float] = {}
        count = 0
        for start in range(0, len(seeds), EVAL_BATCH_SIZE):
            chunk = seeds[start : start + EVAL_BATCH_SIZE]
            _, _, episodes = self.play(policy, chunk, list(range(len(chunk))), greedy=True)
            if start == 0 and gallery is not None:
                save_eval_episodes(gallery, step, episodes[:FILM_STRIPS])
            for key, value in episode_metrics(episodes).items():
                totals[key] = totals.get(key, 0.0) + value * len(episodes)
            count += len(episodes)
        keys = sorted(episode_metrics([]).keys())
        values = torch.tensor(
            [totals.get(k, 0.0) for k in keys] + [count], dtype=torch.float64, device=accelerator.device
        )
        values = accelerator.reduce(values, reduction="sum")
        return {
            f"eval/{k}": v / max(values[-1].item(), 1)
            for k, v in zip(keys, values[:-1].tolist(), strict=True)
        }

    def write_samples(self, run: RunFolder, step: int, rollout: Rollout, batch: PromptBatch) -> None:
        """The step's episodes (replies, actions, rewards, success) into episodes.jsonl, and the
        first few as film strips (the frames side by side) under episodes/."""
        folder = run.episodes_dir
        folder.mkdir(exist_ok=True)
        with run.episodes_file.open("a") as f:
            for number, episode in enumerate(rollout.episodes):
                f.write(json.dumps({"step": step, "episode": number, **episode.record()}) + "\n")
        for number, episode in enumerate(rollout.episodes[:4]):
            film_strip(episode.frames).save(folder / f"step-{step:06d}-episode-{number}.png")


class AgentTrainer(RLTrainer):
    """`RLTrainer` with an `EpisodeRollouts` source: the agent recipe's trainer under one name. It
    only builds the source; every stage is `RLTrainer`'s over the episodes' turns."""

    def __init__(
        self,
        config: RLConfig,
        policy,
        processor: ProcessorMixin,
        reward: CombinedReward,
        make_env: Callable[[], TurnEnv],
        train_seeds: Sequence[int],
        eval_seeds: Sequence[int] = (),
        *,
        max_turns: int,
        context: AgentContext = AgentContext(),
        accelerator: Accelerator | None = None,
        value_head: torch.nn.Linear | None = None,
    ):
        episodes = EpisodeRollouts(make_env, train_seeds, eval_seeds, max_turns=max_turns, context=context)
        super().__init__(
            config,
            policy,
            processor,
            reward,
            None,
            accelerator=accelerator,
            value_head=value_head,
            rollouts=episodes,
        )

    @property
    def last_episodes(self) -> list[Episode]:
        """The episodes of the last training step."""
        return self.last_rollout.episodes if self.last_rollout is not None else []


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """Means over episodes: success rate, return, length (turns), invalid-action rate (per turn)."""
    n = max(len(episodes), 1)
    turns = sum(e.turns for e in episodes)
    return {
        "success_rate": sum(e.success for e in episodes) / n,
        "return": sum(e.episode_return for e in episodes) / n,
        "length": turns / n,
        "invalid_action_rate": sum(sum(e.invalid) for e in episodes) / max(turns, 1),
    }


def film_strip(frames: Sequence[Image.Image]) -> Image.Image:
    """Frames side by side, left to right (each at its own size, tops aligned)."""
    width = sum(f.width for f in frames) + 2 * max(len(frames) - 1, 0)
    strip = Image.new("RGB", (max(width, 1), max((f.height for f in frames), default=1)), (128, 128, 128))
    x = 0
    for frame in frames:
        strip.paste(frame, (x, 0))
        x += frame.width + 2
    return strip


def expert_dataset(
    env: TurnEnv,
    expert: Callable[[TurnEnv], str],
    seeds: Sequence[int],
    *,
    context: AgentContext = AgentContext(),
) -> datasets.Dataset:
    """Every turn of the expert's episodes on `seeds` as supervised examples (prompt, images, the
    expert's action word as `answer`), for the warm start (`vlm_rl.sft.supervised_warm_start`)."""
    rows = [
        {**example, "answer": result.action}
        for seed in seeds
        for example, result in episode_turns(env, seed, lambda env, turn: expert(env), context)
    ]
    return datasets.Dataset.from_list(rows)


# -- preference pairs of turns (vlm-rl agent-preferences) --------------------------------------
TurnPolicy = Callable[[TurnEnv, Turn], str]
"""(env, the current turn) -> the reply (an action word): a policy that plays episodes without a model."""


def episode_turns(
    env: TurnEnv, seed: int, policy: TurnPolicy, context: AgentContext = AgentContext()
) -> Iterator[tuple[dict, StepResult]]:
    """Play one episode of `seed` with `policy`: each turn's prompt example as the agent sees it
    (`turn_example` under `context`) and the result of its step, turn by turn."""
    turn = env.reset(seed=int(seed))
    frames: list[Image.Image] = []
    actions: list[str] = []
    while True:
        example = turn_example(turn, frames, actions, context)
        result = env.step(policy(env, turn))
        yield example, result
        frames.append(turn.image)
        actions.append(result.action)
        if result.done:
            return
        turn = result.turn


def expert_mix(expert: Callable[[TurnEnv], str], random_action_prob: float, rng: random.Random) -> TurnPolicy:
    """The expert's move, or with probability `random_action_prob` a uniformly random one."""
    return lambda env, turn: rng.choice(env.actions) if rng.random() < random_action_prob else expert(env)


def replay(env: TurnEnv, seed: int, history: Sequence[str]) -> TurnEnv:
    """`env` back in the state that `history` (the actions taken since `reset(seed=seed)`) reached:
    reset and replayed (any env that its seed makes reproducible, no copy of its internals)."""
    env.reset(seed=int(seed))
    for taken in history:
        env.step(taken)
    return env


def expert_outcome(
    env: TurnEnv, expert: Callable[[TurnEnv], str], seed: int, history: Sequence[str], action: str
) -> tuple[float, int]:
    """How good `action` is after `history` (the actions taken since `env.reset(seed=seed)`): replay
    them, step `action`, then follow `expert` to the episode's end. (return from `action` on, -turns
    if it won else 0): a higher return is better, and between wins the shorter one; equal outcomes
    are ties."""
    result = replay(env, seed, history).step(action)
    total, turns = result.reward, 1
    while not result.done:
        result = env.step(expert(env))
        total += result.reward
        turns += 1
    return total, -turns if env.success(result) else 0


def expert_pairs(
    make_env: Callable[[], TurnEnv],
    expert: Callable[[TurnEnv], str],
    seeds: Sequence[int],
    *,
    random_action_prob: float,
    rng: random.Random,
    context: AgentContext = AgentContext(),
) -> list[dict]:
    """Preference rows at the states a behaviour policy visits on `seeds`: the expert's action
    chosen over each action that does strictly worse there (`expert_outcome`; an action as good as
    the expert's, such as the other half of a tie between two shortest paths, gives no row).

    The behaviour policy is `expert_mix`, so states off the expert's path are covered too. A row is
    the turn's prompt exactly as the agent sees it (`turn_example` under `context`: prompt, images)
    plus `chosen`, `rejected`, `seed` and `turn`. `make_env` is called twice: one env plays, the
    other replays each state to try every action there.
    """
    env, trial = make_env(), make_env()
    behaviour = expert_mix(expert, random_action_prob, rng)
    rows = []
    for seed in seeds:
        history: list[str] = []
        for number, (example, result) in enumerate(episode_turns(env, seed, behaviour, context)):
            outcomes = {a: expert_outcome(trial, expert, seed, history, a) for a in env.actions}
            best = expert(replay(trial, seed, history))
            rows += [
                {**example, "chosen": best, "rejected": a, "seed": int(seed), "turn": number}
                for a in env.actions
                if outcomes[a] < outcomes[best]
            ]
            history.append(result.action)
    return rows


def return_pairs(
    env: TurnEnv,
    policy: TurnPolicy,
    seeds: Sequence[int],
    *,
    episodes_per_seed: int,
    context: AgentContext = AgentContext(),
) -> list[dict]:
    """Preference rows from returns, for any environment (no expert needed): `policy` plays
    `episodes_per_seed` episodes of each seed; where episodes of one seed show the same observation
    (`observation_key`: frames and prompt text) and took different actions there, the action whose
    episodes had the higher mean return from that turn on is chosen over the other (ties give no
    row). The return counts from the turn on, not from the episode's start: earlier rewards do not
    depend on the action (in a sparse task the two are the same)."""
    rows = []
    for seed in seeds:
        examples: dict[str, tuple[dict, int]] = {}  # observation key -> (its prompt example, turn)
        returns: dict[str, dict[str, list[float]]] = {}  # observation key -> action -> returns to go
        for _ in range(episodes_per_seed):
            visited, rewards = [], []
            for number, (example, result) in enumerate(episode_turns(env, seed, policy, context)):
                key = observation_key(example)
                examples.setdefault(key, (example, number))
                visited.append((key, result.action))
                rewards.append(result.reward)
            to_go = list(itertools.accumulate(reversed(rewards)))[::-1]
            for (key, action), value in zip(visited, to_go, strict=True):
                returns.setdefault(key, {}).setdefault(action, []).append(value)
        for key, by_action in returns.items():
            means = {action: sum(values) / len(values) for action, values in by_action.items()}
            example, turn_number = examples[key]
            for first, second in itertools.combinations(sorted(means), 2):
                if means[first] == means[second]:
                    continue
                chosen, rejected = (first, second) if means[first] > means[second] else (second, first)
                rows.append(
                    {
                        **example,
                        "chosen": chosen,
                        "rejected": rejected,
                        "seed": int(seed),
                        "turn": turn_number,
                    }
                )
    return rows


def write_pairs(rows: Sequence[dict], path: Path) -> Path:
    """`rows` as a JSONL preference dataset at `path` (the reward-model trainer's format, docs/data.md):
    each distinct frame saved once as a PNG (lossless: the trainer reads the pixels the agent saw)
    under images/ beside it, named by its content."""
    folder = path.parent
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for row in rows:
            names = []
            for image in row["images"]:
                name = f"images/{hashlib.sha1(image.tobytes()).hexdigest()[:16]}-{image.width}x{image.height}.png"
                if not (folder / name).is_file():
                    image.save(folder / name)
                names.append(name)
            out.write(json.dumps({**row, "images": names}) + "\n")
    return path
