"""DPO-family pairwise losses on per-sequence log-probs, as TRL's DPOTrainer computes them.

Source: TRL main at 1.10.0.dev0 (commit f2cd577, the newest release line; there is no 1.16),
`DPOTrainer._compute_loss`. Every loss maps (B,) per-sequence log-probs to (B,) per-pair losses;
the batch loss is their mean. Each `loss_type` is one small function over `_PairBatch`, looked up
in `LOSS_TYPES`; the fused path calls `dpo_pair_losses` on a chunk of pairs.

Two options TRL dropped in its v0.29 rewrite are kept, with TRL v0.28's meaning:
`reference_free` (the reference log-probs are taken as 0) and the BCO reward shift `bco_delta`
(TRL v0.28 kept a running mean; TRL main uses no shift, which is `bco_delta=0.0`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

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


class PreferenceOutput(NamedTuple):
    """What a preference loss returns: `loss` 0-dim; rewards (B,), detached, as TRL logs them.

    `chosen_logps` / `rejected_logps` (B,) are filled by the fused paths, which compute the policy's
    log-probs themselves; functions that take log-probs as input leave them None.
    """

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_logps: Tensor | None = None
    rejected_logps: Tensor | None = None


@dataclass(frozen=True)
class _PairBatch:
    """Everything a loss_type reads, per pair: tensors are (B,), the rest scalar options."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor  # zeros when there is no reference
    ref_rejected_logps: Tensor
    chosen_scores: Tensor  # f-divergence transform of the log-ratios (the log-ratios for reverse_kl)
    rejected_scores: Tensor
    chosen_lengths: Tensor | None  # completion token counts, in the log-probs' dtype
    rejected_lengths: Tensor | None
    beta: float
    label_smoothing: float
    discopop_tau: float
    bco_delta: Tensor | float | None

    @property
    def chosen_logratios(self) -> Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def delta_score(self) -> Tensor:
        return self.chosen_scores - self.rejected_scores

    @property
    def length_normalised_delta(self) -> Tensor:
        """s_c / n_c - s_r / n_r, each count clamped to >= 1 as TRL does."""
        chosen_average = self.chosen_scores / self.chosen_lengths.clamp(min=1)
        return chosen_average - self.rejected_scores / self.rejected_lengths.clamp(min=1)


# --- f-divergences: log-ratio u -> score f'(exp u), constants dropped (f-DPO, Wang et al. 2023) ---


def _reverse_kl(logratios: Tensor, alpha: float) -> Tensor:
    return logratios


def _forward_kl(logratios: Tensor, alpha: float) -> Tensor:
    return -torch.exp(-logratios)  # f'(t) = 1 - 1/t


def _js_divergence(logratios: Tensor, alpha: float) -> Tensor:
    return F.logsigmoid(logratios)  # f'(t) = log(2t / (1 + t)), log 2 dropped


def _alpha_divergence(logratios: Tensor, alpha: float) -> Tensor:
    """f'(t) = (t^(alpha-1) - 1) / (alpha - 1), -1 dropped; alpha = 1 is reverse KL (TRL's 1e-6 test)."""
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    exponent = (alpha - 1.0) * logratios
    # TRL clamps the exponent in fp32 (at 11 for fp16, 80 otherwise) so exp() stays representable.
    clamp_max = 11.0 if exponent.dtype == torch.float16 else 80.0
    wide = exponent.to(torch.promote_types(exponent.dtype, torch.float32))
    return torch.exp(wide.clamp(max=clamp_max)).to(exponent.dtype) / (alpha - 1.0)


F_DIVERGENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": _reverse_kl,
    "forward_kl": _forward_kl,
    "js_divergence": _js_divergence,
    "alpha_divergence": _alpha_divergence,
}


# --- loss types: _PairBatch -> (B,) per-pair loss ---


def _smoothed_sigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    """Conservative DPO: -(1 - e) log s(z) - e log s(-z)."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _sigmoid(p: _PairBatch) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): -log s(beta * delta). TRL ignores label_smoothing here."""
    return -F.logsigmoid(p.beta * p.delta_score)


def _hinge(p: _PairBatch) -> Tensor:
    """SLiC (Zhao et al. 2023): max(0, 1 - beta * delta)."""
    return torch.relu(1 - p.beta * p.delta_score)


def _ipo(p: _PairBatch) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17): (delta - 1/(2 beta))^2 on per-token average scores."""
    # TRL divides each score by its completion length, which the paper does not state (TRL: confirmed by the authors).
    return (p.length_normalised_delta - 1 / (2 * p.beta)) ** 2


def _exo_pair(p: _PairBatch) -> Tensor:
    """EXO (Ji et al. 2024, Eq. 16): KL(softmax(beta * scores) || [1 - e, e]) over {chosen, rejected}."""
    logits, eps = p.beta * p.delta_score, p.label_smoothing
    chosen_term = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps))
    rejected_term = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(eps))
    return chosen_term + rejected_term


def _nca_pair(p: _PairBatch) -> Tensor:
    """NCA (Chen et al. 2024): -log s(r_c) - 0.5 log s(-r_c) - 0.5 log s(-r_r), r = beta * score."""
    chosen, rejected = p.beta * p.chosen_scores, p.beta * p.rejected_scores
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(p: _PairBatch) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): ((1-e)(-log s(z)) - e(-log s(-z))) / (1 - 2e)."""
    logits, eps = p.beta * p.delta_score, p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


def _bco_pair(p: _PairBatch) -> Tensor:
    """BCO (Jung et al. 2024): -log s(r_c - delta) - log s(-(r_r - delta)), r = beta * score."""
    chosen, rejected = p.beta * p.chosen_scores, p.beta * p.rejected_scores
    delta = p.bco_delta
    if delta is None:  # TRL v0.28's running mean after one step: this batch's mean reward (couples the batch)
        delta = torch.cat([chosen, rejected]).mean().detach()
    return -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))


def _sppo_hard(p: _PairBatch) -> Tensor:
    """SPPO with hard labels (Wu et al. 2024, Eq. 4.7, P = 1 / 0): (s_c - 1/(2 beta))^2 + (s_r + 1/(2 beta))^2."""
    return (p.chosen_scores - 0.5 / p.beta) ** 2 + (p.rejected_scores + 0.5 / p.beta) ** 2


def _aot(p: _PairBatch) -> Tensor:
    """AOT paired (Melnyk et al. 2024): smoothed sigmoid of beta * (sort(policy margins) - sort(ref margins))."""
    # Sorting pairs the i-th smallest policy margin with the i-th smallest reference one, across the batch;
    # TRL uses the raw log-probs here, not the f-divergence scores.
    policy_margins, _ = torch.sort(p.chosen_logps - p.rejected_logps)
    ref_margins, _ = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps)
    return _smoothed_sigmoid(p.beta * (policy_margins - ref_margins), p.label_smoothing)


def _aot_unpaired(p: _PairBatch) -> Tensor:
    """AOT unpaired: smoothed sigmoid of beta * (sort(chosen log-ratios) - sort(rejected log-ratios))."""
    chosen_sorted, _ = torch.sort(p.chosen_logratios)
    rejected_sorted, _ = torch.sort(p.rejected_logratios)
    return _smoothed_sigmoid(p.beta * (chosen_sorted - rejected_sorted), p.label_smoothing)


def _apo_zero(p: _PairBatch) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): 1 - s(beta u_c) + s(beta u_r), u = raw log-ratios."""
    return 1 - torch.sigmoid(p.beta * p.chosen_logratios) + torch.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: _PairBatch) -> Tensor:
    """APO-down (Eq. 8): s(beta u_c) + 1 - s(beta * delta)."""
    # TRL mixes the raw chosen log-ratio with the f-divergence score margin.
    return torch.sigmoid(p.beta * p.chosen_logratios) + 1 - torch.sigmoid(p.beta * p.delta_score)


def _discopop(p: _PairBatch) -> Tensor:
    """DiscoPOP / LRML (Chris Lu et al. 2024, Eq. 5): mix of -log s(z) and exp(-z) by s(z / tau), z = beta * delta."""
    logits = p.beta * p.delta_score
    mix = torch.sigmoid(logits / p.discopop_tau)
    return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix


def _sft(p: _PairBatch) -> Tensor:
    """NLL of the chosen completions: token mean over the whole batch, the same value for every pair."""
    # As TRL's cross_entropy over all chosen completion tokens, so it couples the batch; the token count is
    # clamped to 1 where TRL would return NaN for a batch without completion tokens. TRL takes the plain
    # token log-probs here: with ld_alpha weighting, chosen_logps are not them.
    total_tokens = p.chosen_lengths.sum().clamp(min=1)
    return (-p.chosen_logps.sum() / total_tokens).expand_as(p.chosen_logps)


def _sigmoid_norm(p: _PairBatch) -> Tensor:
    """DPO on per-token average scores: -log s(beta * (s_c / n_c - s_r / n_r))."""
    return -F.logsigmoid(p.beta * p.length_normalised_delta)


class _LossSpec(NamedTuple):
    """One loss_type: its function and what it needs besides the policy log-probs."""

    fn: Callable[[_PairBatch], Tensor]
    needs_reference: bool = True
    lengths: tuple[str, ...] = ()  # names of the length arguments it reads
    batch_coupled: bool = False  # a pair's loss depends on the other pairs' log-probs


_BOTH_LENGTHS = ("chosen_lengths", "rejected_lengths")

LOSS_TYPES: dict[str, _LossSpec] = {
    "sigmoid": _LossSpec(_sigmoid),
    "hinge": _LossSpec(_hinge),
    "ipo": _LossSpec(_ipo, lengths=_BOTH_LENGTHS),
    "exo_pair": _LossSpec(_exo_pair),
    "nca_pair": _LossSpec(_nca_pair),
    "robust": _LossSpec(_robust),
    "bco_pair": _LossSpec(_bco_pair),  # batch-coupled unless bco_delta is given: see is_batch_coupled
    "sppo_hard": _LossSpec(_sppo_hard),
    "aot": _LossSpec(_aot, batch_coupled=True),
    "aot_unpaired": _LossSpec(_aot_unpaired, batch_coupled=True),
    "apo_zero": _LossSpec(_apo_zero),
    "apo_down": _LossSpec(_apo_down),
    "discopop": _LossSpec(_discopop),
    "sft": _LossSpec(_sft, needs_reference=False, lengths=("chosen_lengths",), batch_coupled=True),
    "sigmoid_norm": _LossSpec(_sigmoid_norm, lengths=_BOTH_LENGTHS),
}

_SORTING_LOSS_TYPES = ("aot", "aot_unpaired")


# --- validation ---


def _loss_type_names(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """loss_type as a non-empty tuple of known names; ValueError naming loss_type otherwise."""
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not names:
        raise ValueError("loss_type must be a name or a non-empty list of names")
    for name in names:
        check_choice("loss_type", name, LOSS_TYPES)
    return names


def _loss_weight_values(loss_weights: Sequence[float] | None, count: int) -> tuple[float, ...]:
    """loss_weights as a tuple with one number per loss type (all 1.0 when None, as TRL)."""
    if loss_weights is None:
        return (1.0,) * count
    weights = tuple(loss_weights)
    if len(weights) != count:
        raise ValueError(f"loss_weights must have one weight per loss_type ({count}), got {len(weights)}")
    for weight in weights:
        check_number("loss_weights", weight)
    return weights


def check_dpo_options(
    loss_type: str | Sequence[str] = "sigmoid",
    *,
    beta: float = 0.1,
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
    discopop_tau: float = 0.05,
    bco_delta: Tensor | float | None = None,
) -> None:
    """Validate the scalar options of `dpo_loss`; each error names the argument at fault.

    label_smoothing must lie in [0, 0.5) (Robust DPO divides by 1 - 2e) and be > 0 for exo_pair (TRL).
    """
    names = _loss_type_names(loss_type)
    _loss_weight_values(loss_weights, len(names))
    check_positive("beta", beta)
    check_interval("label_smoothing", label_smoothing, 0.0, 0.5)
    if "exo_pair" in names and label_smoothing == 0.0:
        raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (the EXO paper suggests 1e-3)")
    if not isinstance(reference_free, bool):
        raise TypeError(f"reference_free must be a bool, got {type(reference_free).__name__}")
    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)
    check_number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    check_positive("discopop_tau", discopop_tau)
    if isinstance(bco_delta, Tensor):
        if bco_delta.dim() != 0 or not bco_delta.is_floating_point():
            raise ValueError(
                f"bco_delta must be a float or a 0-dim floating tensor, got shape {tuple(bco_delta.shape)}"
            )
    elif bco_delta is not None:
        check_number("bco_delta", bco_delta)


def _check_dpo_tensors(names, reference_free, policy, refs, lengths, pair_weights, bco_delta) -> None:
    """Validate the tensor arguments (dicts name -> value) against what the loss types in `names` need."""
    batch = check_leading_batch("policy_chosen_logps", policy["policy_chosen_logps"])
    for name, value in policy.items():
        check_batch_vector(name, value, batch)
    needs_reference = any(LOSS_TYPES[n].needs_reference for n in names)
    for name, value in refs.items():
        if value is None and needs_reference and not reference_free:
            raise ValueError(f"{name} is required for loss_type {list(names)} unless reference_free=True")
        if value is not None and reference_free:
            raise ValueError(f"{name} must be None when reference_free=True (the reference log-probs are 0)")
        if value is not None:
            check_batch_vector(name, value, batch)
    needed_lengths = {arg for n in names for arg in LOSS_TYPES[n].lengths}
    for name, value in lengths.items():
        if value is None and name in needed_lengths:
            users = [n for n in names if name in LOSS_TYPES[n].lengths]
            raise ValueError(f"{name} (completion token counts) is required for loss_type {users}")
        if value is not None:
            check_batch_vector(name, value, batch, floating=False)
    if pair_weights is not None:
        check_batch_vector("pair_weights", pair_weights, batch)
        if any(n in _SORTING_LOSS_TYPES for n in names):
            raise ValueError("pair_weights cannot be used with 'aot' / 'aot_unpaired', which sort pairs (as TRL)")
    delta_tensor = bco_delta if isinstance(bco_delta, Tensor) else None
    check_same_device(**policy, **refs, **lengths, pair_weights=pair_weights, bco_delta=delta_tensor)


# --- public functions ---


def is_batch_coupled(loss_type: str | Sequence[str], bco_delta: Tensor | float | None = None) -> bool:
    """True when one pair's loss depends on the other pairs of the batch, so that a pair-chunked
    pass cannot compute it chunk by chunk: aot / aot_unpaired (sort across the batch), sft (token mean
    over the batch) and bco_pair without a given `bco_delta` (shift by the batch's mean reward)."""
    names = _loss_type_names(loss_type)
    return any(LOSS_TYPES[n].batch_coupled for n in names) or ("bco_pair" in names and bco_delta is None)


def _lengths_as(lengths: Tensor | None, like: Tensor) -> Tensor | None:
    """Completion token counts in `like`'s dtype."""
    return None if lengths is None else lengths.to(like.dtype)


def dpo_pair_losses(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    pair_weights: Tensor | None = None,
    bco_delta: Tensor | float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO-family losses before the batch mean, as TRL's DPOTrainer: (B,)x4 -> (losses, chosen_rewards,
    rejected_rewards), each (B,).

    With u = policy - ref log-ratios and s = f'(exp u) their f-divergence scores (u itself for reverse_kl),
    `losses = pair_weights * sum_k loss_weights[k] * LOSS_TYPES[loss_type[k]](...)`; the formula of each
    loss_type is in its function's docstring. Rewards are beta * u, detached, as TRL logs them.

    ref_*_logps may be None when reference_free=True (then they are 0, TRL v0.28's meaning) or when every
    loss_type needs no reference (only 'sft'; the rewards then take the reference as 0 too).
    chosen_lengths / rejected_lengths are completion token counts, needed by 'ipo' and 'sigmoid_norm'
    (each clamped to >= 1); 'sft' needs chosen_lengths.
    pair_weights (B,) multiply each pair's loss (WPO: see `wpo_weights`; not with aot / aot_unpaired).
    bco_delta shifts the bco_pair rewards; None uses this batch's mean reward, detached (batch-coupled),
    and 0.0 is TRL main's bco_pair. See `is_batch_coupled` for the losses a pair chunk cannot compute alone.
    """
    check_dpo_options(
        loss_type,
        beta=beta,
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau,
        bco_delta=bco_delta,
    )
    names = _loss_type_names(loss_type)
    _check_dpo_tensors(
        names,
        reference_free,
        {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps},
        {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps},
        {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths},
        pair_weights,
        bco_delta,
    )
    ref_chosen = torch.zeros_like(policy_chosen_logps) if ref_chosen_logps is None else ref_chosen_logps
    ref_rejected = torch.zeros_like(policy_rejected_logps) if ref_rejected_logps is None else ref_rejected_logps
    to_score = F_DIVERGENCES[f_divergence_type]
    pairs = _PairBatch(
        chosen_logps=policy_chosen_logps,
        rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_scores=to_score(policy_chosen_logps - ref_chosen, f_alpha_divergence_coef),
        rejected_scores=to_score(policy_rejected_logps - ref_rejected, f_alpha_divergence_coef),
        chosen_lengths=_lengths_as(chosen_lengths, policy_chosen_logps),
        rejected_lengths=_lengths_as(rejected_lengths, policy_rejected_logps),
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        bco_delta=bco_delta.detach() if isinstance(bco_delta, Tensor) else bco_delta,
    )
    weights = _loss_weight_values(loss_weights, len(names))
    losses = sum(weight * LOSS_TYPES[name].fn(pairs) for name, weight in zip(names, weights))
    if pair_weights is not None:
        losses = losses * pair_weights
    chosen_rewards = beta * pairs.chosen_logratios.detach()
    rejected_rewards = beta * pairs.rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    pair_weights: Tensor | None = None,
    bco_delta: Tensor | float | None = None,
) -> PreferenceOutput:
    """The DPO-family loss of TRL's DPOTrainer: `dpo_pair_losses` averaged over the pairs.

    (B,)x4 -> PreferenceOutput(loss 0-dim, chosen_rewards (B,), rejected_rewards (B,)); arguments and
    formulas as `dpo_pair_losses`.
    """
    losses, chosen_rewards, rejected_rewards = dpo_pair_losses(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        pair_weights=pair_weights,
        bco_delta=bco_delta,
    )
    return PreferenceOutput(losses.mean(), chosen_rewards, rejected_rewards)
