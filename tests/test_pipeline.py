"""The RL pipeline's building blocks: the policy it starts from (`init_adapter`) and reward
functions named by import path."""

from __future__ import annotations

import textwrap

import pytest
import torch

from vlm_rl.models import load_model, wrap_with_lora
from vlm_rl.models.value import load_value_head, save_value_head
from vlm_rl.rewards.build import build_reward
from vlm_rl.rl.config import RLConfig
from vlm_rl.rl.pipeline import build_policy


def lora_state(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.named_parameters() if v.requires_grad}


def test_init_adapter_starts_rl_from_the_saved_adapter_and_value_head(tmp_path):
    torch.manual_seed(0)
    model, processor = load_model("tiny-llava")
    saved = wrap_with_lora(model, r=4, alpha=8, train_projector=True)
    with torch.no_grad():  # a trained-looking adapter: B != 0 changes the policy
        for name, param in saved.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    saved.save_pretrained(str(tmp_path / "adapter"))
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1)
    save_value_head(head, tmp_path / "adapter")

    config = RLConfig(algorithm="ppo", init_adapter=str(tmp_path / "adapter"), lora_r=16)
    fresh_model, _ = load_model("tiny-llava")
    policy, value_head = build_policy(config, fresh_model)
    expected, loaded = lora_state(saved), lora_state(policy)
    assert loaded.keys() == expected.keys() and loaded, "the adapter's parameters are not trainable"
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    assert any("multi_modal_projector" in name for name in loaded)  # train_projector's modules_to_save
    torch.testing.assert_close(value_head.weight, head.weight, rtol=0, atol=0)

    # Without init_adapter: a fresh adapter (B = 0), no value head.
    fresh, none = build_policy(RLConfig(algorithm="ppo"), load_model("tiny-llava")[0])
    assert none is None
    assert all(torch.count_nonzero(v) == 0 for k, v in lora_state(fresh).items() if "lora_B" in k)


def test_init_adapter_without_an_adapter_names_the_folder(tmp_path):
    config = RLConfig(init_adapter=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        build_policy(config, load_model("tiny-llava")[0])
    assert load_value_head(tmp_path) is None


def test_reward_funcs_by_name_and_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def always_one(prompts, completions, **columns):
                return [1.0] * len(completions)

            def says_yes(prompts, completions, **columns):
                return [1.0 if c == "yes" else 0.0 for c in completions]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward(
        reward_funcs=["my_rewards:always_one", "my_rewards.says_yes", "exact_match"],
        reward_weights=[1.0, 2.0, 4.0],
    )
    result = reward(prompts=["q", "q"], completions=["yes", "no"], answer=["no", "no"])
    assert result.total.tolist() == [1.0 + 2.0, 1.0 + 4.0]
    assert {"rewards/always_one/mean", "rewards/says_yes/mean", "rewards/exact_match/mean"} <= set(
        result.metrics()
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
        ("my_rewards:missing", "has no function 'missing'"),
        ("not_a_rule", "not a built-in rule reward"),
    ],
)
def test_bad_reward_function_names_the_spec(tmp_path, monkeypatch, spec, message):
    (tmp_path / "my_rewards.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=message):
        build_reward(reward_funcs=[spec])
