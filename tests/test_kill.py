"""Kill tests, small: benchmarks/kill_test.py's machinery on a few cases. Real recipes in real
processes are SIGKILLed (every rank) at a random moment and inside a checkpoint write, resumed with
`--resume_from_checkpoint latest`, and must end with the uninterrupted run's weights bit for bit.
The full matrix (every recipe, 1 and 2 processes, 5 trials each) is `python benchmarks/kill_test.py`."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kill_test():
    spec = importlib.util.spec_from_file_location("kill_test", REPO / "benchmarks" / "kill_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_test"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("kill_test", None)


@pytest.fixture(scope="module")
def work(kill_test, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("kill")
    env, extra = kill_test.prepare(folder, ["grpo_vqa", "train_reward_model"])
    assert extra == []  # no reward model to train for these recipes
    return folder, env


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "processes", "trials"),
    [("train_reward_model", 1, 2), ("grpo_vqa", 1, 1), ("train_reward_model", 2, 1)],
)
def test_killed_runs_resume_to_bit_identical_weights(
    kill_test, work, recipe: str, processes: int, trials: int
):
    folder, env = work
    random.seed(0)
    # Trial 1 (with 2 trials): a random moment after the first checkpoint; the last trial: inside a
    # checkpoint write, on a checkpoint after the first, so that run always resumes from a checkpoint.
    in_write = [False, True][-trials:]
    reference, results = kill_test.run_case(recipe, processes, trials, 1, folder, env, [], in_write)
    for trial in results:
        assert trial.kills == 1
        assert trial.identical, f"weights differ after a kill and resume: {trial.mismatched[:3]}"
    # the kill inside a write came after the first checkpoint: that run really resumed
    assert (
        results[-1].resumed_from[0] is not None
        and results[-1].resumed_from[0] >= reference.checkpoint_steps[0]
    )
    assert len(reference.digests) > 10  # adapter (+ reward head) tensors compared
