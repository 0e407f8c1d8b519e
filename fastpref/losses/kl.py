"""Per-token KL estimators between the policy and a reference (Schulman 2020, "Approximating KL
divergence"), as PPO / GRPO trainers use them on sampled tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from fastpref._checks import check_choice, check_same_device, check_shape, check_tensor


def _k1(log_ratio: Tensor) -> Tensor:
    return -log_ratio  # unbiased, high variance, can be negative


def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio**2  # biased, low variance, >= 0


def _k3(log_ratio: Tensor) -> Tensor:
    return torch.expm1(log_ratio) - log_ratio  # unbiased, low variance, >= 0 (TRL's GRPO)


KL_ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_penalty(logps: Tensor, ref_logps: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || ref) from tokens sampled from the policy: (...), (...) -> (...).

    With log r = ref_logps - logps: k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r.
    """
    check_tensor("logps", logps, floating=True)
    check_tensor("ref_logps", ref_logps, floating=True)
    check_shape("ref_logps", ref_logps, logps.shape, "as logps")
    check_same_device(logps=logps, ref_logps=ref_logps)
    check_choice("kind", kind, KL_ESTIMATORS)
    return KL_ESTIMATORS[kind](ref_logps - logps)
