"""The demo-task registry: dataset names, rule-reward names and the tiny vocabulary reach the task
module through `vlm_rl.tasks`, the generic layers import no task, and the old import paths still work."""

from __future__ import annotations

import ast
import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_rl import tasks
from vlm_rl.data import load_task_dataset
from vlm_rl.rewards.compose import CombinedReward
from vlm_rl.rewards.rules import RULE_REWARDS
from vlm_rl.tasks import easy_vqa

SRC = Path(__file__).resolve().parent.parent / "src" / "vlm_rl"


def test_doctests() -> None:
    for module in (tasks, easy_vqa):
        result = doctest.testmod(module, raise_on_error=False)
        assert result.attempted >= 1 and result.failed == 0, module.__name__


def test_task_names_reach_the_task_loader_with_their_options() -> None:
    loaded = load_task_dataset("easy-vqa:caption", "test", num_samples=4, seed=3, crop=False)
    direct = easy_vqa.caption_dataset("test", num_samples=4, seed=3, crop=False)
    assert loaded["image_id"] == direct["image_id"] and loaded["answer"] == direct["answer"]
    assert loaded[0]["images"][0].size == (64, 64)  # crop=False reached the loader
    pairs = load_task_dataset("easy-vqa:caption_preference", "train", kind="preference", num_samples=3)
    assert pairs.column_names[-2:] == ["chosen", "rejected"] and len(pairs) == 3
    with pytest.raises(ValueError, match=r"unknown easy-vqa task 'ocr'.*caption.*vqa"):
        load_task_dataset("easy-vqa:ocr", "train")


def test_other_names_go_to_the_generic_loader(tmp_path: Path) -> None:
    rows = [{"prompt": f"question {i}?", "answer": str(i)} for i in range(5)]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = load_task_dataset(str(path), "train", num_samples=3, seed=0)
    assert len(dataset) == 3 and set(dataset["answer"]) <= {"0", "1", "2", "3", "4"}
    assert not tasks.is_task_dataset(str(path))
    with pytest.raises(ValueError, match="not a task dataset"):
        tasks.load_task(str(path), "train")


def test_task_rule_rewards_are_found_by_name() -> None:
    assert RULE_REWARDS["caption_match"] is easy_vqa.caption_match
    assert "caption_match" in RULE_REWARDS and "no_such_reward" not in RULE_REWARDS
    assert tasks.rule_rewards() == {"caption_match": easy_vqa.caption_match}
    with pytest.raises(KeyError, match="no_such_reward"):
        RULE_REWARDS["no_such_reward"]
    reward = CombinedReward([RULE_REWARDS["caption_match"], RULE_REWARDS["format_caption"]])
    result = reward(["Q"] * 2, ["red circle", "red"], color=["red", "red"], shape=["circle", "circle"])
    assert result.total.tolist() == [2.0, 0.5]  # 1.0 + 1.0; 0.5 + 0.0


def test_held_out_metrics_by_hand() -> None:
    columns = {"color": ["red", "blue", "green", "gray"], "shape": ["circle"] * 4}
    completions = ["Red circle.", "blue circle", "a green circle", "gray"]
    assert easy_vqa.caption_metrics(completions, columns) == {"caption_accuracy": 0.5}
    assert easy_vqa.caption_metrics(completions, {"answer": ["x"] * 4}) == {}
    answers = {"answer": ["red", "Circle", "yes", "no"]}
    assert easy_vqa.vqa_metrics(["Red.", "circle", "no", "no"], answers) == {"accuracy": 0.75}
    assert easy_vqa.vqa_metrics(["red"], {"color": ["red"]}) == {}


def test_vocabulary_holds_the_prompts_questions_and_answers() -> None:
    words = {word for text in tasks.vocabulary() for word in text.lower().replace("?", " ?").split()}
    assert {*easy_vqa.COLORS, *easy_vqa.SHAPES, "describe", "yes", "no"} <= words
    assert "what" in words and "?" in words


def _imported_modules(code: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_generic_layers_import_no_task() -> None:
    modules = _imported_modules(
        "import vlm_rl.rewards.rules, vlm_rl.rewards.build, vlm_rl.data.loaders, vlm_rl.models\n"
        "from vlm_rl.rewards.rules import RULE_REWARDS\n"
        "RULE_REWARDS['exact_match']"
    )
    assert "vlm_rl.tasks" in modules  # the registry itself is light
    assert not [m for m in modules if "easy_vqa" in m]


def test_tiny_models_do_not_import_the_loader() -> None:
    # models.tiny is imported by models.loading; the reverse would be a cycle.
    tree = ast.parse((SRC / "models" / "tiny.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "vlm_rl.models.loading" not in imported
    for first in ("vlm_rl.models.tiny", "vlm_rl.models.loading", "vlm_rl.tasks.easy_vqa"):
        assert first in _imported_modules(f"import {first}")


def test_easy_vqa_lives_only_in_its_task_module() -> None:
    import importlib.util

    from vlm_rl.models import ImageOnlyQwen2_5_VLProcessor, loading, processors
    from vlm_rl.rewards import rules

    assert importlib.util.find_spec("vlm_rl.data.easy_vqa") is None
    assert not hasattr(rules, "caption_match") and not hasattr(rules, "caption_accuracy")
    assert rules.RULE_REWARDS["caption_match"] is easy_vqa.caption_match  # found by name through the registry
    assert loading.load_image_only_processor is processors.load_image_only_processor
    assert ImageOnlyQwen2_5_VLProcessor is processors.ImageOnlyQwen2_5_VLProcessor
