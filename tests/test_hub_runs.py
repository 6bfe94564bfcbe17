"""vlm_rl.hub.push_run: run folders (RL and reward model) pushed to LocalHub with cards built from the run.

The run folders are synthetic but written the way the trainers write them: run_config.json from the
real config dataclasses (`save_config`), metrics through `MetricsLogger`, and the files of final/,
best/ and checkpoints/ named as `RLTrainer` and `RewardModel.save_pretrained` name them. The
network isolation (`loopback_only`, autouse) comes from test_hub.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import LocalHub
from test_hub import (
    TOKEN,
    digest,
    front_matter,
    loopback_only,  # noqa: F401 (autouse: loopback only, isolated hub cache and login)
)

from vlm_rl.hub import HubError, push_run
from vlm_rl.rl.config import RLConfig
from vlm_rl.run_folder import MetricsLogger, save_config

REPO = "tester/ppo-caption"
ADAPTER_BYTES = b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"w":{"dtype":"F32"}}' + bytes(range(256)) * 8


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    with LocalHub(token=TOKEN) as local_hub:
        monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
        yield local_hub


def write_files(folder: Path, files: dict[str, bytes | str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def adapter_files(seed: int) -> dict[str, bytes | str]:
    """What `save_pretrained` of a LoRA policy and its processor leave (weights made distinct by `seed`)."""
    return {
        "adapter_model.safetensors": ADAPTER_BYTES + bytes([seed]) * 16,
        "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}),
        "tokenizer.json": '{"version": "1.0", "model": {"type": "WordLevel"}}',
        "processor_config.json": '{"processor_class": "LlavaProcessor"}',
        "README.md": "---\nlibrary_name: peft\n---\n\n# Model Card for Model ID\n",  # peft's template
    }


def rl_run_folder(root: Path, name: str = "ppo_caption") -> Path:
    """A finished 3-step PPO run: evaluations at steps 0, 2 and 3, a checkpoint at step 2, final/."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = RLConfig(
        algorithm="ppo",
        dataset="easy-vqa:caption",
        reward_model_path="/home/someone/vlm_rl/reward_models/caption_preference/final",
        reward_model_weight=1.0,
        reward_funcs=["format_caption"],
        reward_weights=[0.5],
        learning_rate=3e-5,
        prompts_per_step=4,
        samples_per_prompt=2,
        ppo_epochs=2,
        clip_range=0.1,
        kl_coef=0.05,
        total_steps=3,
        output_dir=str(run_dir),
    )
    save_config(config, run_dir / "run_config.json")
    metrics_log = MetricsLogger(run_dir, tensorboard=False)
    metrics_log.log({"eval/caption_accuracy": 0.125, "eval/reward": -0.4}, step=0)
    for step, reward in ((1, 0.1), (2, 0.3), (3, 0.6)):
        metrics_log.log({"reward/mean": reward, "loss/policy": -0.01 * step, "kl/mean": 0.001}, step=step)
        if step >= 2:
            metrics_log.log({"eval/caption_accuracy": 0.25 * step, "eval/reward": 0.2 * step}, step=step)
    metrics_log.close()
    (run_dir / "samples.jsonl").write_text('{"step": 1, "completion": "red circle"}\n')

    checkpoint = run_dir / "checkpoints" / "step-000002"
    write_files(checkpoint, {"model.safetensors": b"accelerate state", "trainer_state.json": '{"step": 2}'})
    write_files(checkpoint / "adapter", {**adapter_files(seed=2), "value_head.safetensors": b"value head 2"})
    final_metrics = {"eval/caption_accuracy": 0.75, "eval/reward": 0.6}
    write_files(
        run_dir / "final",
        {
            **adapter_files(seed=3),
            "value_head.safetensors": b"value head 3",
            "vlm_rl_run.json": json.dumps(
                {"algorithm": "ppo", "step": 3, "base_model": "tiny-llava", "metrics": final_metrics}
            ),
        },
    )
    return run_dir


def reward_model_run_folder(root: Path, name: str = "caption_preference", *, legacy: bool = False) -> Path:
    """A finished 20-step reward-model run: best evaluation at step 10 (0.9), final at step 20 (0.85).

    legacy: metrics in run/metrics.jsonl, where reward-model runs kept them before sharing the RL layout.
    """
    from vlm_rl.rewards.trainer import RewardTrainingConfig

    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = RewardTrainingConfig(max_steps=20, center_rewards_coefficient=0.1, output_dir=str(run_dir))
    save_config(config, run_dir / "run_config.json")
    metrics_log = MetricsLogger(run_dir / "run" if legacy else run_dir, tensorboard=False)
    metrics_log.log({"eval/accuracy": 0.5, "eval/margin": 0.0, "eval/pairs": 40}, step=0)
    for step, accuracy in ((10, 0.9), (20, 0.85)):
        metrics_log.log({"train/loss": 0.7 - step / 100, "train/accuracy": accuracy - 0.05}, step=step)
        metrics_log.log({"eval/accuracy": accuracy, "eval/margin": step / 10, "eval/pairs": 40}, step=step)
    metrics_log.close()
    for folder, accuracy, seed in (("best", 0.9, 10), ("final", 0.85, 20)):
        reward_config = {
            "base_model": "tiny-llava",
            "lora_r": 16,
            "lora_alpha": 32,
            "train_projector": True,
            "hidden_size": 32,
            "dataset": "easy-vqa:caption_preference",
            "eval_accuracy": accuracy,
        }
        write_files(
            run_dir / folder,
            {
                **adapter_files(seed),
                "reward_head.safetensors": b"reward head %d" % seed,
                "reward_config.json": json.dumps(reward_config),
            },
        )
    return run_dir


def pushed_files(local_hub: LocalHub, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    """The repo's files, less the card and the .gitattributes of the repo's initial commit."""
    files = local_hub.files(repo_id, revision)
    return {name: content for name, content in files.items() if name not in ("README.md", ".gitattributes")}


def folder_files(folder: Path) -> dict[str, bytes]:
    """The files of a saved folder that a push uploads as they are (its README.md becomes the card)."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file() and path.name != "README.md"
    }


# -- RL runs ----------------------------------------------------------------------------------
def test_push_run_of_an_rl_run_pushes_final_with_a_card_from_the_run(hub: LocalHub, tmp_path: Path):
    run_dir = rl_run_folder(tmp_path)
    before = digest(run_dir)

    commit_url = push_run(run_dir, REPO, token=TOKEN, private=True)

    assert pushed_files(hub, REPO) == folder_files(run_dir / "final")  # byte for byte, nothing else
    assert commit_url == f"{hub.endpoint}/{REPO}/commit/{hub.repo(REPO).branches['main']}"
    assert [(c.summary, c.branch) for c in hub.commits] == [("vlm_rl ppo run 'ppo_caption' step 3", "main")]
    assert hub.repo(REPO).private is True

    readme = hub.files(REPO)["README.md"].decode()
    meta = front_matter(readme)
    assert meta["library_name"] == "peft" and meta["datasets"] == ["easy-vqa:caption"]
    assert "ppo" in meta["tags"] and "base_model" not in meta  # "tiny-llava" is not a hub id
    assert "- Algorithm: **PPO**" in readme and "- Base model: `tiny-llava`" in readme
    for row in (
        # reward components: the rule rewards and the reward model (its folder without the user's path)
        "| `format_caption` | 0.5 |",
        "| `reward_model (caption_preference/final)` | 1 |",
        # key hyperparameters from run_config.json, and the step reached
        "| `learning_rate` | 3e-05 |",
        "| `prompts_per_step` | 4 |",
        "| `samples_per_prompt` | 2 |",
        "| `ppo_epochs` | 2 |",
        "| `clip_range` | 0.1 |",
        "| `kl_coef` | 0.05 |",
        "| `total_steps` | 3 |",
        "| `steps_trained` | 3 |",
        # final metrics from final/vlm_rl_run.json
        "| `eval/caption_accuracy` | 0.75 |",
        "| `eval/reward` | 0.6 |",
    ):
        assert row in readme, row
    assert "/home/someone" not in readme
    assert "Model Card for Model ID" not in readme  # the card replaced peft's template
    assert digest(run_dir) == before  # the card went into a temporary copy


def test_push_run_takes_the_run_report_along_and_links_it(hub: LocalHub, tmp_path: Path):
    from vlm_rl.report import write_report

    run_dir = rl_run_folder(tmp_path)
    report = write_report(run_dir)
    before = digest(run_dir)

    push_run(run_dir, REPO, token=TOKEN)

    files = hub.files(REPO)
    assert files["report.html"] == report.read_bytes()
    assert pushed_files(hub, REPO) == {**folder_files(run_dir / "final"), "report.html": files["report.html"]}
    assert "[report.html](report.html)" in files["README.md"].decode()
    assert digest(run_dir) == before
    report.unlink()
    push_run(run_dir, REPO, token=TOKEN)  # no report: no link
    assert "report.html" not in hub.files(REPO)["README.md"].decode()


@pytest.mark.parametrize("finished", [True, False], ids=["finished-run", "run-without-final"])
def test_push_run_of_a_checkpoint_pushes_its_adapter_with_the_metrics_of_its_step(
    hub: LocalHub, tmp_path: Path, finished: bool
):
    run_dir = rl_run_folder(tmp_path)
    if not finished:  # a run still training has checkpoints but no final/ yet
        shutil.rmtree(run_dir / "final")

    push_run(run_dir, REPO, token=TOKEN, checkpoint="step-000002", revision="step-2")

    adapter = run_dir / "checkpoints" / "step-000002" / "adapter"
    assert pushed_files(hub, REPO, "step-2") == folder_files(adapter)  # no accelerate state
    assert [(c.summary, c.branch) for c in hub.commits] == [("vlm_rl ppo run 'ppo_caption' step 2", "step-2")]
    readme = hub.files(REPO, "step-2")["README.md"].decode()
    # metrics.jsonl at step 2: the evaluation of step 2 and that step's training reward
    for row in (
        "| `eval/caption_accuracy` | 0.5 |",
        "| `eval/reward` | 0.4 |",
        "| `reward/mean` | 0.3 |",
        "| `steps_trained` | 2 |",
        "| `format_caption` | 0.5 |",
    ):
        assert row in readme, row


# -- reward-model runs ------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True], ids=["metrics.jsonl", "old-layout-run/metrics.jsonl"])
def test_push_run_of_a_reward_model_run_pushes_final_or_best(hub: LocalHub, tmp_path: Path, legacy: bool):
    run_dir = reward_model_run_folder(tmp_path, legacy=legacy)
    assert (run_dir / "run").is_dir() == legacy
    before = digest(run_dir)

    push_run(run_dir, "tester/rm", token=TOKEN)
    push_run(run_dir, "tester/rm", token=TOKEN, checkpoint="best", revision="best")

    assert pushed_files(hub, "tester/rm") == folder_files(run_dir / "final")
    assert pushed_files(hub, "tester/rm", "best") == folder_files(run_dir / "best")
    assert [c.summary for c in hub.commits] == [
        "vlm_rl reward model run 'caption_preference' step 20",
        "vlm_rl reward model run 'caption_preference' step 10 (best evaluation)",
    ]
    final_card = hub.files("tester/rm")["README.md"].decode()
    best_card = hub.files("tester/rm", "best")["README.md"].decode()
    meta = front_matter(final_card)
    assert meta["library_name"] == "vlm_rl" and "reward-model" in meta["tags"]
    assert meta["datasets"] == ["easy-vqa:caption_preference"]
    assert "multimodal reward model" in final_card and "- Base model: `tiny-llava`" in final_card
    assert 'RewardModel.from_pretrained("tester/rm")' in final_card
    for row in ("| `eval/accuracy` | 0.85 |", "| `eval/accuracy_before` | 0.5 |", "| `steps_trained` | 20 |"):
        assert row in final_card, row
    assert "| `center_rewards_coefficient` | 0.1 |" in final_card
    assert "### Reward components" not in final_card
    assert "| `eval/accuracy` | 0.9 |" in best_card and "| `steps_trained` | 10 |" in best_card
    assert digest(run_dir) == before


# -- the token --------------------------------------------------------------------------------
def test_push_run_sends_the_token_but_writes_it_nowhere(
    hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the way the CLI and the recipes pass it
    rl_run = rl_run_folder(tmp_path / "runs")
    reward_model_run = reward_model_run_folder(tmp_path / "runs")

    push_run(rl_run, REPO)
    push_run(reward_model_run, "tester/rm")

    assert hub.authorizations() == {f"Bearer {TOKEN}"}
    for repo_id in (REPO, "tester/rm"):
        for name, content in hub.files(repo_id).items():
            assert TOKEN.encode() not in content, f"token pushed in {repo_id}/{name}"
    for path in tmp_path.rglob("*"):  # the run folders and the hub cache/login folder
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"


# -- errors -----------------------------------------------------------------------------------
def test_a_run_without_final_says_what_to_push_and_sends_nothing(hub: LocalHub, tmp_path: Path):
    run_dir = rl_run_folder(tmp_path)
    shutil.rmtree(run_dir / "final")

    with pytest.raises(FileNotFoundError) as raised:
        push_run(run_dir, REPO, token=TOKEN)

    message = str(raised.value)
    assert f"{run_dir} has no final/ folder: it is not a finished vlm_rl run" in message
    assert "Its saved checkpoints: step-000002; push one with checkpoint='step-000002'" in message
    assert hub.requests == []


def test_unknown_checkpoints_and_foreign_folders_are_refused_before_any_request(
    hub: LocalHub, tmp_path: Path
):
    rl_run = rl_run_folder(tmp_path)
    reward_model_run = reward_model_run_folder(tmp_path)
    foreign = tmp_path / "foreign"
    write_files(foreign / "final", adapter_files(seed=0))

    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint 'step-000001' .*saved checkpoints: step-000002"
    ):
        push_run(rl_run, REPO, token=TOKEN, checkpoint="step-000001")
    with pytest.raises(
        FileNotFoundError, match=r"reward-model run: it has final/ .* and best/ .*'step-000002'"
    ):
        push_run(reward_model_run, REPO, token=TOKEN, checkpoint="step-000002")
    with pytest.raises(ValueError, match="a name such as 'step-000100', not a path"):
        push_run(rl_run, REPO, token=TOKEN, checkpoint="../../elsewhere")
    with pytest.raises(FileNotFoundError, match="has neither vlm_rl_run.json .* nor reward_config.json"):
        push_run(foreign, REPO, token=TOKEN)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        push_run(tmp_path / "missing", REPO, token=TOKEN)
    assert hub.requests == []


def test_a_hub_failure_names_the_pushed_folder_and_leaves_the_run_intact(tmp_path: Path):
    run_dir = rl_run_folder(tmp_path)
    before = digest(run_dir)

    with LocalHub(token=TOKEN) as local_hub, pytest.raises(HubError) as raised:
        endpoint = local_hub.endpoint
        push_run(run_dir, REPO, token="hf_wrongToken", endpoint=endpoint)

    message = str(raised.value)
    assert f"creating the repo '{REPO}' at {endpoint} failed: authentication failed (401" in message
    assert f"The local folder {run_dir / 'final'} was left intact." in message
    assert digest(run_dir) == before


def test_reward_model_round_trip_through_the_hub_gives_identical_scores(
    hub: LocalHub, tmp_path: Path, easy_vqa_images, monkeypatch: pytest.MonkeyPatch
):
    """Save a reward model, push it, load it back by repo id over HTTP: the same scores."""
    import torch

    from vlm_rl.hub import push_folder
    from vlm_rl.rewards import RewardModel

    local = RewardModel.from_base("tiny-llava", lora_r=4, lora_alpha=8)
    with torch.no_grad():  # a non-trivial model: perturb the adapter and the head
        for name, param in local.scorer.named_parameters():
            if "lora_B" in name or "head" in name:
                param.add_(torch.randn_like(param) * 0.1)
    folder = tmp_path / "rm"
    folder.mkdir()
    local.save_pretrained(folder)
    push_folder(folder, "tester/rm", token=TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the user's login, as `hf auth login` would provide it
    loaded = RewardModel.from_pretrained("tester/rm", endpoint=hub.endpoint)
    prompt = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the shape."}]}
    ]
    images = [[image] for image in easy_vqa_images]
    completions = ["red circle", "blue triangle", "gray", "teal rectangle"]
    expected = local.score(images, [prompt] * 4, completions)
    assert loaded.score(images, [prompt] * 4, completions) == pytest.approx(expected, abs=1e-6)
    assert len(set(round(s, 4) for s in expected)) > 1  # the scores really depend on the inputs


# -- pushing while training -----------------------------------------------------------------------
@pytest.mark.parametrize("hub_fails", [False, True], ids=["hub up", "hub 500"])
def test_training_pushes_each_checkpoint_and_survives_a_failing_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, hub_fails: bool
):
    """A real RLTrainer with --push_to_hub --hub_push_checkpoints: each checkpoint's adapter is
    pushed to the branch as it is saved; a failing hub is logged with the retry command and the
    run goes on with its checkpoints on disk."""
    from test_rl_trainer import make_trainer

    from vlm_rl.tasks.easy_vqa import caption_dataset

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    prompts = caption_dataset("train", num_samples=8, seed=0)
    with LocalHub(token=TOKEN, fail_with=500 if hub_fails else None) as local_hub:
        monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
        trainer = make_trainer(
            tmp_path,
            prompts,
            total_steps=4,
            save_steps=2,
            push_to_hub=True,
            hub_model_id=REPO,
            hub_revision="training",
            hub_push_checkpoints=True,
        )
        with caplog.at_level("INFO", logger="vlm_rl"):
            trainer.train()
        run_dir = tmp_path / "run"
        saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert saved == ["step-000002", "step-000004"]
        if hub_fails:
            assert local_hub.commits == []
            failures = [r.getMessage() for r in caplog.records if "push failed" in r.getMessage()]
            assert len(failures) == 2, failures
            assert "server error (500" in failures[0]
            assert (
                f"retry: vlm-rl push {run_dir} --repo-id {REPO} --revision training --checkpoint step-000002"
                in failures[0]
            )
        else:
            assert [(c.summary, c.branch) for c in local_hub.commits] == [
                ("vlm_rl ppo run 'run' step 2", "training"),
                ("vlm_rl ppo run 'run' step 4", "training"),
            ]
            pushed = pushed_files(local_hub, REPO, "training")
            adapter = folder_files(run_dir / "checkpoints" / "step-000004" / "adapter")
            assert pushed == adapter  # byte for byte, the newest checkpoint on top


def test_policy_round_trip_through_the_hub_gives_identical_outputs(
    hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A real RL run's final/ pushed with push_run, loaded back by `load_policy` from the repo id
    (base model from the adapter config) and from the folder: the same logits as the trained policy."""
    import torch
    from test_rl_trainer import make_trainer

    from vlm_rl.models import load_policy
    from vlm_rl.tasks.easy_vqa import caption_dataset

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    prompts = caption_dataset("train", num_samples=8, seed=0)
    trainer = make_trainer(tmp_path, prompts, total_steps=2, learning_rate=1e-2)
    trainer.train()
    final = trainer.save_final()
    push_run(tmp_path / "run", "tester/tiny-llava-ppo")

    batch = trainer._batch(prompts, [0, 1, 2])
    trained = trainer.unwrapped.policy.eval()
    with torch.no_grad():
        expected = trained(**batch.inputs).logits
        with trained.disable_adapter():
            base = trained(**batch.inputs).logits
    assert not torch.allclose(expected, base, atol=1e-4), "training changed nothing"
    for source in ("tester/tiny-llava-ppo", final):
        policy, processor = load_policy(source)
        inputs = trainer._batch(prompts, [0, 1, 2]).inputs  # collated with the original processor
        assert processor.tokenizer.get_vocab() == trainer.processor.tokenizer.get_vocab()
        with torch.no_grad():
            torch.testing.assert_close(policy(**inputs).logits, expected, rtol=0, atol=0)


def test_load_policy_of_a_folder_without_an_adapter_says_what_to_pass(tmp_path: Path):
    from vlm_rl.models import load_policy

    with pytest.raises(FileNotFoundError, match="no adapter_config.json.*final/"):
        load_policy(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub repo id"):
        load_policy(tmp_path / "runs" / "typo" / "final")
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "reward_config.json").write_text("{}")
    with pytest.raises(ValueError, match="RewardModel.from_pretrained"):
        load_policy(tmp_path / "rm")


def test_a_failed_push_says_how_to_retry_with_the_same_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from vlm_rl.hub import push_or_explain

    run_dir = rl_run_folder(tmp_path / "my runs")  # a space: the command must quote it
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with LocalHub(token=TOKEN, fail_with=500) as local_hub:
        monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
        message = push_or_explain(run_dir, REPO, private=True, revision="exp 1", checkpoint="step-000002")
        assert local_hub.commits == []
    assert message.startswith("push failed: ")
    assert message.endswith(
        f"retry: vlm-rl push '{run_dir}' --repo-id {REPO} --private --revision 'exp 1' --checkpoint step-000002"
    )


@pytest.mark.parametrize("hub_fails", [False, True], ids=["hub up", "hub 500"])
def test_push_checkpoint_through_the_checkpoint_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, hub_fails: bool
):
    """`CheckpointManager.upload(path, partial(push_checkpoint, config))`, as the RL trainer queues a
    checkpoint push: a slow hub, and a newer checkpoint saved meanwhile that would rotate the queued
    one away (save_total_limit=1). The queued checkpoint is pushed whole, then rotated; a failing hub
    is logged with the retry command."""
    from functools import partial

    from vlm_rl.hub import push_checkpoint
    from vlm_rl.run_folder import CheckpointManager, RunFolder

    run_dir = rl_run_folder(tmp_path)
    run = RunFolder(run_dir)
    queued = run.checkpoint_dir(2)
    expected = folder_files(queued / "adapter")
    config = RLConfig(output_dir=str(run_dir), push_to_hub=True, hub_model_id=REPO, hub_revision="training")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with LocalHub(token=TOKEN, delay_s=0.2, fail_with=500 if hub_fails else None) as local_hub:
        monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
        manager = CheckpointManager(run, save_total_limit=1)
        with caplog.at_level("INFO", logger="vlm_rl"):
            manager.upload(queued, partial(push_checkpoint, config))
            tmp = manager.begin(3)
            write_files(tmp, {"trainer_state.json": '{"step": 3}'})
            manager.commit(tmp, 3)
            assert queued.is_dir() and manager.pending == 1  # kept while its upload is on its way
            manager.wait_for_uploads()
        outcomes = [r for r in caplog.records if r.getMessage().startswith("checkpoint step-000002: ")]
        if hub_fails:
            assert local_hub.commits == []
            assert [r.levelname for r in outcomes] == ["WARNING"]
            assert "server error (500" in outcomes[0].getMessage()
            retry = (
                f"retry: vlm-rl push {run_dir} --repo-id {REPO} --revision training --checkpoint step-000002"
            )
            assert retry in outcomes[0].getMessage()
        else:
            assert [(c.summary, c.branch) for c in local_hub.commits] == [
                ("vlm_rl ppo run 'ppo_caption' step 2", "training")
            ]
            assert pushed_files(local_hub, REPO, "training") == expected
            assert [r.levelname for r in outcomes] == ["INFO"]
    assert [path.name for path in run.checkpoints()] == ["step-000003"]  # rotated once pushed


def test_checkpoint_uploads_run_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A slow hub (0.5 s per request) does not hold save_checkpoint; wait_for_uploads collects it."""
    from test_rl_trainer import make_trainer

    from vlm_rl.tasks.easy_vqa import caption_dataset

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    prompts = caption_dataset("train", num_samples=8, seed=0)
    with LocalHub(token=TOKEN, delay_s=0.5) as local_hub:
        monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
        trainer = make_trainer(
            tmp_path, prompts, save_steps=1, push_to_hub=True, hub_model_id=REPO, hub_push_checkpoints=True
        )
        save_config(trainer.config, tmp_path / "run" / "run_config.json")  # as train() does first
        trainer.step = 1
        trainer.save_checkpoint()
        assert local_hub.commits == []  # returned while the upload is still on its way
        trainer.wait_for_uploads()
        assert [c.summary for c in local_hub.commits] == ["vlm_rl ppo run 'run' step 1"]
