"""Reference-free pairwise losses: CPO / SimPO / AlphaPO (TRL's CPOTrainer) and ORPO (TRL's ORPOTrainer),
as in TRL 1.16.0, where both live in `trl.experimental` (`trl/experimental/cpo/cpo_trainer.py`,
`trl/experimental/orpo/orpo_trainer.py`, with their configs `CPOConfig` / `ORPOConfig` there).

Inputs are per-sequence *summed* completion log-probs (B,) and completion token counts (B,); the
functions average them where TRL's trainers ask `get_batch_logps(average_log_prob=True)`.
Counts are clamped to >= 1 where TRL would divide by 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref._checks import (
    check_batch_vector,
    check_choice,
    check_interval,
    check_leading_batch,
    check_number,
    check_positive,
    check_same_device,
)
from fastpref.losses.dpo import PreferenceOutput, _smoothed_sigmoid

# CPO loss types: (margin m = r_c - r_r, beta, label_smoothing, simpo_gamma) -> (B,)
_CPO_LOSS_TYPES: dict[str, Callable[[Tensor, float, float, float], Tensor]] = {
    # CPO (Xu et al. 2024, Eq. 3), conservative with label_smoothing
    "sigmoid": lambda m, beta, eps, gamma: _smoothed_sigmoid(beta * m, eps),
    # SimPO (Meng et al. 2024, Eq. 6): target margin gamma, on average log-probs
    "simpo": lambda m, beta, eps, gamma: _smoothed_sigmoid(beta * (m - gamma / beta), eps),
    # SLiC hinge; TRL ignores label_smoothing (with a warning)
    "hinge": lambda m, beta, eps, gamma: torch.relu(1 - beta * m),
    # IPO (Azar et al. 2023, Eq. 17) on average log-probs; label_smoothing ignored
    "ipo": lambda m, beta, eps, gamma: (m - 1 / (2 * beta)) ** 2,
}
_AVERAGING_LOSS_TYPES = ("ipo", "simpo")


def _check_pair_inputs(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths) -> None:
    """(B,) floating log-probs; (B,) real lengths or None; one device."""
    batch = check_leading_batch("policy_chosen_logps", chosen_logps)
    check_batch_vector("policy_rejected_logps", rejected_logps, batch)
    for name, lengths in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if lengths is not None:
            check_batch_vector(name, lengths, batch, floating=False)
    check_same_device(
        policy_chosen_logps=chosen_logps,
        policy_rejected_logps=rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )


def _require(name: str, value: Tensor | None, why: str) -> Tensor:
    if value is None:
        raise ValueError(f"{name} (completion token counts) is required {why}")
    return value


def _average(logps: Tensor, lengths: Tensor) -> Tensor:
    """Per-token average log-prob: (B,), (B,) -> (B,)."""
    return logps / lengths.to(logps.dtype).clamp(min=1)


def _completion_nll(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Token-mean NLL over all chosen completion tokens of the batch (nn.CrossEntropyLoss's mean): 0-dim."""
    # The count is summed exactly and divided in float32 or wider, as CrossEntropyLoss counts its tokens.
    count = chosen_lengths.sum().to(torch.promote_types(chosen_logps.dtype, torch.float32))
    return -chosen_logps.sum() / count.clamp(min=1)


def _alphapo_reward(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO (Gupta et al. 2025) reward shape r = (1 - p^-alpha) / alpha, p = exp(logps).

    TRL computes exp(logps).pow(-alpha), which is inf once exp(logps) underflows (logps < ~-104 in
    float32, easily reached by summed log-probs); exp(-alpha * logps) is the same number, finite there."""
    return (1 - torch.exp(-alpha * logps)) / alpha


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> PreferenceOutput:
    """TRL's CPOTrainer loss: (B,) summed log-probs -> PreferenceOutput(loss 0-dim, rewards (B,)).

    With l = the log-probs, averaged per token for loss_type 'ipo' / 'simpo', and r = l (alpha = 0) or
    the AlphaPO shape (1 - exp(-alpha l)) / alpha, m = r_c - r_r:
      sigmoid: -(1-e) log s(beta m) - e log s(-beta m)        (CPO, Xu et al. 2024)
      simpo:   the same with m - simpo_gamma / beta         (SimPO, Meng et al. 2024)
      hinge:   max(0, 1 - beta m);  ipo: (m - 1/(2 beta))^2  (label_smoothing ignored, as TRL)
      alphapo: 'simpo' with cpo_alpha = 0, whatever cpo_alpha is given (CPOConfig's shorthand)
    loss = mean over pairs + cpo_alpha * NLL, NLL the token mean over all chosen completion tokens
    (needs chosen_lengths unless cpo_alpha == 0). Rewards are beta * r, detached, as TRL logs them.
    Defaults are CPOConfig's; see `simpo_loss` for SimPO's.
    """
    check_choice("loss_type", loss_type, (*_CPO_LOSS_TYPES, "alphapo"))
    if loss_type == "alphapo":  # CPOConfig.__post_init__: loss_type 'simpo' and cpo_alpha 0.0
        loss_type, cpo_alpha = "simpo", 0.0
    check_positive("beta", beta)
    check_interval("label_smoothing", label_smoothing, 0.0, 0.5)
    for name, value in (("cpo_alpha", cpo_alpha), ("simpo_gamma", simpo_gamma), ("alpha", alpha)):
        check_number(name, value)
    _check_pair_inputs(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if loss_type in _AVERAGING_LOSS_TYPES:
        why = f"for loss_type {loss_type!r}, which averages log-probs per token"
        chosen = _average(chosen, _require("chosen_lengths", chosen_lengths, why))
        rejected = _average(rejected, _require("rejected_lengths", rejected_lengths, why))
    if alpha != 0.0:
        chosen, rejected = _alphapo_reward(chosen, alpha), _alphapo_reward(rejected, alpha)
    losses = _CPO_LOSS_TYPES[loss_type](chosen - rejected, beta, label_smoothing, simpo_gamma)
    loss = losses.mean()
    if cpo_alpha != 0.0:
        lengths = _require("chosen_lengths", chosen_lengths, "for the NLL term when cpo_alpha != 0")
        loss = loss + cpo_alpha * _completion_nll(policy_chosen_logps, lengths)
    return PreferenceOutput(loss, beta * chosen.detach(), beta * rejected.detach())


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
    alpha: float = 0.0,
) -> PreferenceOutput:
    """SimPO (Meng et al. 2024, Eq. 6): -log s(beta (l_c/n_c - l_r/n_r) - simpo_gamma), mean over pairs.

    `cpo_loss(loss_type="simpo")` with cpo_alpha = 0 (TRL's docs: pure SimPO; > 0 is CPO-SimPO) and
    alpha = 0 (non-zero: AlphaPO). beta and simpo_gamma default to CPOConfig's; the paper uses beta ~2-2.5.
    """
    return cpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        beta=beta,
        loss_type="simpo",
        label_smoothing=label_smoothing,
        cpo_alpha=cpo_alpha,
        simpo_gamma=simpo_gamma,
        alpha=alpha,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )


_MINUS_LN2 = -math.log(2.0)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, switching form at -ln 2 to avoid cancellation (Maechler 2012)."""
    return torch.where(x < _MINUS_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    nll_loss: Tensor | None = None,
) -> PreferenceOutput:
    """ORPO (Hong et al. 2024, Eqs. 4-7): NLL - beta * mean(log s(log odds(y_c) - log odds(y_r))).

    With l = per-token average log-probs, log odds(y) = l - log(1 - exp(l)); beta is the paper's lambda.
    TRL's NLL is the token mean over the chosen sequences' prompt *and* completion tokens, which
    per-completion log-probs cannot give: pass it as `nll_loss` (0-dim) to match TRL; None uses the
    chosen completion tokens only (the paper's L_SFT). Rewards are beta * l, detached, as TRL logs them.
    """
    check_positive("beta", beta)
    _check_pair_inputs(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    _require("chosen_lengths", chosen_lengths, "by orpo_loss")
    _require("rejected_lengths", rejected_lengths, "by orpo_loss")
    if nll_loss is not None and (not isinstance(nll_loss, Tensor) or nll_loss.dim() != 0):
        raise ValueError("nll_loss must be a 0-dim tensor or None")
    # TRL computes the odds ratio in float32 at least.
    wide = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    chosen = _average(policy_chosen_logps.to(wide), chosen_lengths)
    rejected = _average(policy_rejected_logps.to(wide), rejected_lengths)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    if nll_loss is None:
        nll_loss = _completion_nll(policy_chosen_logps.to(wide), chosen_lengths)
    loss = nll_loss - beta * F.logsigmoid(log_odds).mean()
    return PreferenceOutput(loss, beta * chosen.detach(), beta * rejected.detach())
