"""The policy losses an algorithm can declare (GSPO, CISPO, SAPO) and DAPO's overlong reward shaping,
against the papers' equations worked out by hand (torchtune style), and their TRL mapping.

Parity of each loss with TRL's `GRPOTrainer._compute_loss` (losses and gradients on a real batch) is
in tests/test_grpo_parity.py; here, the TRL reward function for the overlong punishment is compared
directly, and one real training step of each algorithm checks the trainer's use of them.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_flag_rules import DATA, STEPS, _run_recipe, _silent, field_reads  # noqa: F401  (a fixture)

from vlm_rl.rl import core
from vlm_rl.rl.algorithms import get_algorithm, objective_settings
from vlm_rl.rl.config import RLConfig
from vlm_rl.rl.losses.cispo import TruncatedISReinforce
from vlm_rl.rl.losses.gspo import SequenceClippedSurrogate
from vlm_rl.rl.losses.sapo import SoftGate

# Two sequences: sequence 0 has 2 tokens, sequence 1 one token (its second position is padding).
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


def objective(policy_loss, logprobs, old_logprobs, advantages, aggregation="sequence"):
    """`core.rl_objective` with only the policy term, as the trainer calls it."""
    settings = core.ObjectiveSettings(policy_loss=policy_loss, aggregation=aggregation)
    return core.rl_objective(logprobs, old_logprobs, advantages, MASK, settings)


# -- GSPO (Zheng et al. 2025, eq. 5-7) ---------------------------------------------------------------


def test_gspo_clips_whole_sequences_by_their_geometric_mean_ratio():
    # log ratios: sequence 0 (0.1, 0.3) -> mean 0.2 -> s_0 = e^0.2 = 1.221403;
    #             sequence 1 (-0.5) -> s_1 = e^-0.5 = 0.606531 (its padding's log ratio 9 never counts).
    old = torch.zeros(2, 2)
    logprobs = torch.tensor([[0.1, 0.3], [-0.5, 9.0]], requires_grad=True)
    advantages = torch.tensor([1.0, -1.0])
    loss, stats = objective(SequenceClippedSurrogate(0.3, 0.3), logprobs, old, advantages)
    # clip range [0.7, 1.3]: s_0 inside -> -A s_0 = -1.221403;
    # s_1 below 0.7 with A = -1: max(0.606531, 0.7) = 0.7 (clipped, no gradient).
    # sequence aggregation: (-1.221403 + 0.7) / 2 = -0.2607015
    assert loss.item() == pytest.approx((-math.exp(0.2) + 0.7) / 2, abs=1e-6)
    # half the tokens (sequence 1's one of 3) ... token share of clipped sequences: 1 of 3 tokens
    assert stats["policy/clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    # d/dlogp_{0,t} = 1/2 (mean over sequences) * -A s_0 / |y_0| = -1.221403 / 4 on both tokens
    expected = torch.tensor([[-math.exp(0.2) / 4, -math.exp(0.2) / 4], [0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_gspo_token_aggregation_weights_sequences_by_length():
    old = torch.zeros(2, 2)
    logprobs = torch.tensor([[0.1, 0.3], [-0.5, 9.0]])
    # clip 0.2 both sides: s_0 = 1.2214 -> 1.2 (A = 1: -1.2), s_1 = 0.6065 -> 0.8 (A = -1: 0.8)
    # token mean: (2 * -1.2 + 0.8) / 3 = -0.533333; every sequence clipped
    loss, stats = objective(SequenceClippedSurrogate(0.2), logprobs, old, torch.tensor([1.0, -1.0]), "token")
    assert loss.item() == pytest.approx(-1.6 / 3, abs=1e-6)
    assert stats["policy/clip_fraction"].item() == pytest.approx(1.0)


def test_gspo_on_policy_is_grpo():
    """ratio 1 everywhere: GSPO's and GRPO's losses and gradients agree (both -A per token)."""
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    advantages = torch.tensor([0.5, -2.0])
    gspo, _ = objective(SequenceClippedSurrogate(), logprobs, logprobs.detach(), advantages)
    (gspo_grad,) = torch.autograd.grad(gspo, logprobs)
    grpo, _ = objective(core.ClippedSurrogate(), logprobs, logprobs.detach(), advantages)
    (grpo_grad,) = torch.autograd.grad(grpo, logprobs)
    assert gspo.item() == pytest.approx(grpo.item())
    torch.testing.assert_close(gspo_grad, grpo_grad)


# -- CISPO (MiniMax-M1, eq. 4-5) ---------------------------------------------------------------------


def test_cispo_keeps_a_truncated_reinforce_gradient_on_every_token():
    # sequence 0: token ratios 1 and 2 (old log-prob lower by ln 2), sequence 1: ratio 0.5
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0 - math.log(2.0)], [-3.0 + math.log(2.0), 0.0]])
    advantages = torch.tensor([0.5, -1.0])
    loss, stats = objective(TruncatedISReinforce(clip_high=0.28), logprobs, old, advantages, "token")
    # weights sg(min(r, 1.28)): 1, 1.28 (truncated), 0.5 (no lower bound)
    # per token -w A logp: -(1 * 0.5 * -1) = 0.5; -(1.28 * 0.5 * -2) = 1.28; -(0.5 * -1 * -3) = -1.5
    # token mean over 3 tokens: (0.5 + 1.28 - 1.5) / 3 = 0.093333
    assert loss.item() == pytest.approx((0.5 + 1.28 - 1.5) / 3, abs=1e-6)
    assert stats["policy/clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    # gradient -w A / 3 on every token, the truncated one included (the clipped surrogate gives it 0)
    expected = torch.tensor([[-0.5 / 3, -1.28 * 0.5 / 3], [0.5 / 3, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)
    surrogate, _ = objective(core.ClippedSurrogate(0.2, 0.28), logprobs, old, advantages, "token")
    (surrogate_grad,) = torch.autograd.grad(surrogate, logprobs)
    assert surrogate_grad[0, 1] == 0 and logprobs.grad[0, 1] != 0


# -- SAPO (Gao et al. 2025, eq. 5-7) -----------------------------------------------------------------


def test_sapo_gates_softly_with_its_two_temperatures():
    # sequence 0: ratios 1 (on-policy) and e^0.5, A = 1 (tau_pos 1.0);
    # sequence 1: ratio e^0.5, A = -1 (tau_neg 1.05)
    logprobs = torch.tensor([[-1.0, -1.5], [-2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0], [-2.5, 0.0]])
    r = math.exp(0.5)

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    # f(r) = sigmoid(tau (r - 1)) * 4 / tau; loss per token -f(r) A
    token_00 = -sigmoid(0.0) * 4 / 1.0  # = -2
    token_01 = -sigmoid(1.0 * (r - 1)) * 4 / 1.0
    token_10 = sigmoid(1.05 * (r - 1)) * 4 / 1.05
    loss, stats = objective(SoftGate(1.0, 1.05), logprobs, old, torch.tensor([1.0, -1.0]))
    # sequence aggregation: ((token_00 + token_01) / 2 + token_10) / 2
    assert loss.item() == pytest.approx(((token_00 + token_01) / 2 + token_10) / 2, abs=1e-6)
    loss.backward()

    # d f / d logp = 4 sigmoid(tau (r - 1)) (1 - sigmoid(tau (r - 1))) * r, times -A and the means
    def weight(tau: float, ratio: float) -> float:
        gate = sigmoid(tau * (ratio - 1))
        return 4 * gate * (1 - gate) * ratio

    expected = torch.tensor([[-weight(1.0, 1.0) / 4, -weight(1.0, r) / 4], [weight(1.05, r) / 2, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)
    # on-policy the gate passes the plain policy gradient (weight 1: -A / 4 here)
    assert logprobs.grad[0, 0].item() == pytest.approx(-0.25)
    assert 0 < stats["policy/gate_weight"].item() < 1


# -- DAPO's overlong reward shaping (Yu et al. 2025, eq. 13) ------------------------------------------


def test_overlong_penalty_by_hand_and_as_trl_computes_it():
    from trl.rewards import get_soft_overlong_punishment

    # L_max = 10, L_cache = 4: no penalty up to 6 tokens, then (6 - |y|) / 4, -1 at 10 and beyond
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    expected = [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert core.overlong_penalty(lengths, max_length=10, buffer=4).tolist() == expected
    trl = get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)
    assert trl([[1] * n for n in lengths.tolist()]) == expected
    assert core.overlong_penalty(lengths, max_length=10, buffer=0).tolist() == [0.0] * 6


# -- selection and TRL mapping ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "fields", "loss"),
    [
        ("gspo", {"clip_range": 3e-4, "clip_range_high": 4e-4}, SequenceClippedSurrogate(3e-4, 4e-4)),
        ("cispo", {"clip_range_high": 4.0}, TruncatedISReinforce(4.0)),
        ("cispo", {"clip_range": 0.3}, TruncatedISReinforce(0.3)),
        ("sapo", {"sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0}, SoftGate(0.5, 2.0)),
        ("grpo", {"clip_range": 0.1, "clip_range_high": 0.3}, core.ClippedSurrogate(0.1, 0.3)),
    ],
)
def test_the_algorithm_declares_its_policy_loss(algorithm, fields, loss):
    config = RLConfig(algorithm=algorithm, **fields)
    settings = objective_settings(config, get_algorithm(algorithm), kl_coef=0.0)
    assert settings.policy_loss == loss


def test_each_loss_maps_to_trl_grpo_config(tmp_path):
    from vlm_rl.rl.trl_backend import grpo_config

    def mapped(**fields):
        config = RLConfig(trainer="trl", output_dir=str(tmp_path), samples_per_prompt=4, **fields)
        return grpo_config(config, num_processes=1, use_cpu=True)

    gspo = mapped(algorithm="gspo", loss_aggregation="sequence", clip_range=3e-4, clip_range_high=4e-4)
    assert (gspo.loss_type, gspo.importance_sampling_level) == ("grpo", "sequence")
    assert (gspo.epsilon, gspo.epsilon_high) == (3e-4, 4e-4)
    cispo = mapped(algorithm="cispo", clip_range_high=4.0)
    assert (cispo.loss_type, cispo.epsilon_high, cispo.importance_sampling_level) == ("cispo", 5.0, "token")
    sapo = mapped(algorithm="sapo", loss_aggregation="sequence", sapo_temperature_neg=1.2)
    assert (sapo.loss_type, sapo.sapo_temperature_pos, sapo.sapo_temperature_neg) == ("sapo", 1.0, 1.2)
    overlong = mapped(algorithm="grpo", max_new_tokens=8, overlong_buffer=3, overlong_penalty=0.5)
    assert overlong.reward_weights == [1.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="loss_type sapo aggregates as --loss_aggregation sequence"):
        mapped(algorithm="sapo")
    with pytest.raises(ValueError, match="loss_type cispo aggregates as --loss_aggregation token"):
        mapped(algorithm="cispo", loss_aggregation="fixed")
    with pytest.raises(ValueError, match="--kl_importance_weighted with --algorithm gspo"):
        mapped(algorithm="gspo", kl_coef=0.1, kl_importance_weighted=True)
    with pytest.raises(ValueError, match="needs --algorithm grpo, not ppo"):
        RLConfig(algorithm="ppo", trainer="trl")


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--algorithm", "sapo", "--clip_range_high", "0.3"], "--clip_range_high: --algorithm sapo's"),
        (
            ["--algorithm", "sapo", "--clip_range", "0.3"],
            "--clip_range: --algorithm sapo's policy loss has no clip",
        ),
        (["--algorithm", "cispo", "--clip_range", "0.1", "--clip_range_high", "4"], "clips only from above"),
        (
            ["--algorithm", "grpo", "--sapo_temperature_neg", "2"],
            "--sapo_temperature_neg: --algorithm grpo's",
        ),
        (["--overlong_penalty", "0.5"], "--overlong_penalty: only with --overlong_buffer > 0"),
        (["--algorithm", "rloo", "--scale_rewards", "false"], "--scale_rewards: GRPO's group std"),
    ],
)
def test_a_loss_flag_the_algorithm_does_not_read_is_an_error(argv, named):
    from vlm_rl.errors import ConfigError
    from vlm_rl.recipes import grpo_vqa, parse_config
    from vlm_rl.rl.config import WarmStartConfig

    with pytest.raises(ConfigError, match="would ignore") as error:
        parse_config((RLConfig, WarmStartConfig), argv, grpo_vqa.DEFAULT_CONFIG, recipe="grpo_vqa")
    assert named in str(error.value)


def test_gspo_scale_rewards_and_cispo_clip_range_are_read():
    from vlm_rl.recipes import grpo_vqa, parse_config
    from vlm_rl.rl.config import WarmStartConfig

    for argv in (
        ["--algorithm", "gspo", "--scale_rewards", "false"],
        ["--algorithm", "cispo", "--clip_range", "4"],
        ["--algorithm", "sapo", "--sapo_temperature_pos", "0.9"],
        ["--overlong_buffer", "2", "--overlong_penalty", "0.5", "--max_new_tokens", "4"],
    ):
        parse_config((RLConfig, WarmStartConfig), argv, grpo_vqa.DEFAULT_CONFIG, recipe="grpo_vqa")


# -- real runs ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [
        ("gspo", ["--loss_aggregation", "sequence"]),
        ("cispo", ["--overlong_buffer", "2"]),
        ("sapo", ["--loss_aggregation", "sequence", "--sapo_temperature_neg", "1.2"]),
    ],
)
def test_each_loss_trains_and_reads_only_the_flags_it_accepts(
    algorithm,
    extra,
    field_reads,  # noqa: F811 (test_flag_rules' fixture)
    tmp_path,
):
    """The recipe run of tests/test_flag_rules.py for the new algorithms: two real steps, the final
    adapter moved off its zero init, the loss's statistics logged, and every field the run never
    read has a rule saying why (`Algorithm.reads`)."""
    from safetensors.torch import load_file

    from vlm_rl.run_folder import RunFolder

    args = [*STEPS, *DATA, "--algorithm", algorithm, "--output_dir", str(tmp_path), *extra]
    args += ["--sample_log_steps", "1", "--learning_rate", "1e-3"]
    values = _run_recipe("grpo_vqa", args)
    assert _silent("grpo_vqa", values, field_reads) == []
    adapter = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name)
    rows = [row for row in RunFolder(tmp_path).read_metrics() if "loss/policy" in row]
    assert len(rows) == 2 and all(math.isfinite(row["loss/policy"]) for row in rows)
    statistic = {
        "gspo": "policy/sequence_ratio",
        "cispo": "policy/clip_fraction",
        "sapo": "policy/gate_weight",
    }
    assert all(statistic[algorithm] in row for row in rows)
    if "--overlong_buffer" in extra:
        assert all("reward/overlong_penalty/mean" in row for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [
        ("gspo", ["--loss_aggregation", "sequence", "--overlong_buffer", "2"]),
        ("cispo", ["--clip_range_high", "4"]),
        ("sapo", ["--loss_aggregation", "sequence"]),
    ],
)
def test_each_loss_runs_on_trls_grpo_trainer(
    algorithm,
    extra,
    field_reads,  # noqa: F811 (test_flag_rules' fixture)
    tmp_path,
):
    """`--trainer trl`: the loss's GRPOConfig fields and reward shaping are accepted by TRL's own
    GRPOTrainer, which trains; no flag goes unread without a rule."""
    from safetensors.torch import load_file

    from vlm_rl.run_folder import RunFolder

    args = [*STEPS, *DATA, "--trainer", "trl", "--algorithm", algorithm, "--output_dir", str(tmp_path)]
    values = _run_recipe("grpo_vqa", [*args, *extra, "--learning_rate", "1e-3"])
    assert _silent("grpo_vqa", values, field_reads) == []
    adapter = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name)
    logged = set().union(*RunFolder(tmp_path).read_metrics())
    assert ("rewards/soft_overlong_punishment_reward/mean" in logged) == ("--overlong_buffer" in extra)
