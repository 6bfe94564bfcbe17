"""Algorithms that differ from GRPO by their policy loss, one module each (each registers itself):

    gspo    Group Sequence Policy Optimization (Zheng et al. 2025): one importance ratio per
            sequence, the geometric mean of its tokens' ratios, clipped
    cispo   Clipped IS-weight Policy Optimization (MiniMax-M1, 2025): REINFORCE on every token,
            weighted by its importance ratio truncated from above and detached
    sapo    Soft Adaptive Policy Optimization (Gao et al., Qwen 2025): a smooth sigmoid gate on the
            ratio instead of a hard clip

A new loss is a module here: a `core.PolicyLoss` (the per-token loss and its statistics, with the
paper's equation in its docstring), `register_algorithm(GroupBaseline(name, estimator, loss=...,
reads=...))`, its import below, and its test (tests/test_policy_losses.py: hand-computed values
and, where TRL has the loss, parity with TRL's `GRPOTrainer._compute_loss`).
"""

from vlm_rl.rl.losses import cispo, gspo, sapo

__all__ = ["cispo", "gspo", "sapo"]
