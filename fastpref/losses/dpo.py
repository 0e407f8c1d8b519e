"""DPO-family pairwise losses on per-sequence log-probs, as TRL's DPOTrainer computes them.

Source: TRL 1.16.0, `DPOTrainer.__init__` (option checks) and `DPOTrainer._compute_loss`, with the defaults
of `DPOConfig`. Every loss maps (B,) per-sequence log-probs to (B,) per-pair losses; the batch loss is
their mean. Each `loss_type` is one small function over `_PairBatch`, looked up in `LOSS_TYPES`; the fused
path calls `dpo_pair_losses` on a chunk of pairs, passing the batch totals that 'sft' needs.

Two options that TRL 1.16 does not have are kept: `reference_free` (the reference log-probs are taken
as 0, TRL v0.28's meaning) and the BCO reward shift `bco_delta` (TRL v0.28 shifted by a running mean;
TRL 1.16 has no shift, which is the default `bco_delta=None`).
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
    check_count,
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
    chosen_lengths: Tensor | None  # completion token counts, as given
    rejected_lengths: Tensor | None
    beta: float
    label_smoothing: float
    discopop_tau: float
    bco_delta: Tensor | float  # 0.0 when not given
    batch_chosen_tokens: Tensor | int | None  # sft's totals over the whole batch; None: this call's
    batch_pairs: int | None

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
        # TRL divides by float32 counts (`mask.sum(1).clamp(min=1.0)`): exact up to 2^24 tokens, and a
        # float16 / bfloat16 score comes out float32, as there.
        chosen_average = self.chosen_scores / _counts(self.chosen_lengths, self.chosen_scores)
        return chosen_average - self.rejected_scores / _counts(self.rejected_lengths, self.rejected_scores)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or the dtype itself when wider: where TRL computes in float32."""
    return torch.promote_types(dtype, torch.float32)


def _counts(lengths: Tensor, like: Tensor) -> Tensor:
    """Token counts in float32 (or `like`'s wider dtype), clamped to >= 1."""
    return lengths.to(_wide(like.dtype)).clamp(min=1)


# --- f-divergences: log-ratio u -> score f'(exp u), TRL's chosen_scores / rejected_scores (f-DPO, Wang et al. 2023) ---


def _reverse_kl(logratios: Tensor, alpha: float) -> Tensor:
    return logratios  # f'(t) = log t


def _forward_kl(logratios: Tensor, alpha: float) -> Tensor:
    return 1 - torch.exp(-logratios)  # f'(t) = 1 - 1/t


def _js_divergence(logratios: Tensor, alpha: float) -> Tensor:
    return math.log(2) + F.logsigmoid(logratios)  # f'(t) = log(2t / (1 + t))


def _alpha_divergence(logratios: Tensor, alpha: float) -> Tensor:
    """f'(t) = (t^(alpha-1) - 1) / (alpha - 1); |alpha - 1| < 1e-6 is reverse KL, as TRL."""
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    exponent = (alpha - 1.0) * logratios
    # As TRL: the exponent clamped in float32 (at 11 for float16, 80 otherwise) so that exp() stays
    # representable after the cast back, and the result scaled by 1 / (alpha - 1) in the input dtype.
    # (TRL has no float64 entry in its clamp table; float64 is clamped at 80 and computed in float64 here.)
    clamp_max = 11.0 if exponent.dtype == torch.float16 else 80.0
    wide = exponent.to(_wide(exponent.dtype)).clamp(max=clamp_max)
    return (torch.exp(wide) - 1.0).to(exponent.dtype) * (1.0 / (alpha - 1.0))


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
    logits = p.beta * p.delta_score
    # TRL takes log(1 - e) and log(e) of a float32 0-dim tensor (kept at float64 for float64 inputs).
    # torch.full, not torch.tensor: a fill on the device, no host-to-device copy (none is allowed under capture)
    eps = torch.full((), p.label_smoothing, dtype=_wide(logits.dtype), device=logits.device)
    chosen_term = torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps))
    rejected_term = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(eps))
    return chosen_term + rejected_term


def _nca_pair(p: _PairBatch) -> Tensor:
    """NCA (Chen et al. 2024): -log s(r_c) - 0.5 log s(-r_c) - 0.5 log s(-r_r), r = beta * log-ratio."""
    chosen, rejected = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(p: _PairBatch) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): ((1-e)(-log s(z)) - e(-log s(-z))) / (1 - 2e)."""
    logits, eps = p.beta * p.delta_score, p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


def _bco_pair(p: _PairBatch) -> Tensor:
    """BCO (Jung et al. 2024): -log s(r_c - delta) - log s(-(r_r - delta)), r = beta * log-ratio.

    delta = bco_delta, 0 when not given: TRL 1.16's bco_pair, which has no reward shift."""
    chosen, rejected = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(chosen - p.bco_delta) - F.logsigmoid(-(rejected - p.bco_delta))


def _sppo_hard(p: _PairBatch) -> Tensor:
    """SPPO with hard labels (Wu et al. 2024, Eq. 4.7, P = 1 / 0): (u_c - 1/(2 beta))^2 + (u_r + 1/(2 beta))^2."""
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


def _aot(p: _PairBatch) -> Tensor:
    """AOT paired (Melnyk et al. 2024): smoothed sigmoid of beta * (sort(policy margins) - sort(ref margins))."""
    # Sorting pairs the i-th smallest policy margin with the i-th smallest reference one, across the batch.
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
    """APO-down (Eq. 8): s(beta u_c) + 1 - s(beta (u_c - u_r)), u = raw log-ratios."""
    margin = p.chosen_logratios - p.rejected_logratios
    return torch.sigmoid(p.beta * p.chosen_logratios) + 1 - torch.sigmoid(p.beta * margin)


def _discopop(p: _PairBatch) -> Tensor:
    """DiscoPOP / LRML (Chris Lu et al. 2024, Eq. 5): mix of -log s(z) and exp(-z) by s(z / tau), z = beta * delta."""
    logits = p.beta * p.delta_score
    mix = torch.sigmoid(logits / p.discopop_tau)
    return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix


def _sft(p: _PairBatch) -> Tensor:
    """NLL of the chosen completions, pair i's share of TRL's token mean: -l_c[i] * P / N.

    N = batch_chosen_tokens and P = batch_pairs, the whole batch's chosen completion tokens and pairs
    (this call's sum(chosen_lengths) and B when not given), so that the mean over the whole batch of the
    per-pair values is TRL's -mean(chosen token log-probs), while each pair's value reads only that pair.
    """
    # N is clamped to 1 where TRL would return NaN for a batch without completion tokens. TRL takes the plain
    # token log-probs here: with ld_alpha weighting, chosen_logps are not them.
    tokens = p.chosen_lengths.sum() if p.batch_chosen_tokens is None else p.batch_chosen_tokens
    pairs = p.chosen_logps.shape[0] if p.batch_pairs is None else p.batch_pairs
    wide = _wide(p.chosen_logps.dtype)
    if isinstance(tokens, Tensor):
        scale = pairs / tokens.to(device=p.chosen_logps.device, dtype=wide).clamp(min=1)
    else:
        scale = torch.tensor(pairs / max(tokens, 1), dtype=wide, device=p.chosen_logps.device)
    return -p.chosen_logps * scale


def _sigmoid_norm(p: _PairBatch) -> Tensor:
    """DPO on per-token average scores: -log s(beta * (s_c / n_c - s_r / n_r))."""
    return -F.logsigmoid(p.beta * p.length_normalised_delta)


class _LossSpec(NamedTuple):
    """One loss_type: its function and what it needs besides the policy log-probs."""

    fn: Callable[[_PairBatch], Tensor]
    needs_reference: bool = True
    lengths: tuple[str, ...] = ()  # names of the length arguments it reads
    batch_coupled: bool = False  # a pair's loss depends on the other pairs' log-probs
    f_divergence: bool = False  # TRL 1.16 accepts a non-default f_divergence_type with it


_BOTH_LENGTHS = ("chosen_lengths", "rejected_lengths")

LOSS_TYPES: dict[str, _LossSpec] = {
    "sigmoid": _LossSpec(_sigmoid, f_divergence=True),
    "hinge": _LossSpec(_hinge, f_divergence=True),
    "ipo": _LossSpec(_ipo, lengths=_BOTH_LENGTHS, f_divergence=True),
    "exo_pair": _LossSpec(_exo_pair, f_divergence=True),
    "nca_pair": _LossSpec(_nca_pair),
    "robust": _LossSpec(_robust, f_divergence=True),
    "bco_pair": _LossSpec(_bco_pair),
    "sppo_hard": _LossSpec(_sppo_hard),
    "aot": _LossSpec(_aot, batch_coupled=True),
    "aot_unpaired": _LossSpec(_aot_unpaired, batch_coupled=True),
    "apo_zero": _LossSpec(_apo_zero),
    "apo_down": _LossSpec(_apo_down),
    "discopop": _LossSpec(_discopop, f_divergence=True),
    "sft": _LossSpec(_sft, needs_reference=False, lengths=("chosen_lengths",), f_divergence=True),
    "sigmoid_norm": _LossSpec(_sigmoid_norm, lengths=_BOTH_LENGTHS, f_divergence=True),
}

_SORTING_LOSS_TYPES = ("aot", "aot_unpaired")
# TRL 1.16: the loss types built on the chosen - rejected score margin, the only ones a non-default
# f_divergence_type may be used with (the f-DPO reparameterization's beta log Z(x) cancels only there).
F_DIVERGENCE_LOSS_TYPES = tuple(name for name, spec in LOSS_TYPES.items() if spec.f_divergence)


# --- validation ---


def _loss_type_names(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """loss_type as a non-empty tuple of known names; ValueError naming loss_type otherwise."""
    if not isinstance(loss_type, (str, list, tuple)):
        raise TypeError(f"loss_type must be a name or a list of names, got {type(loss_type).__name__}")
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
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: Tensor | float | None = None,
) -> None:
    """Validate the scalar options of `dpo_loss`; each error names the argument at fault.

    As TRL 1.16's DPOConfig / DPOTrainer: loss_weights one per loss_type; label_smoothing > 0 for exo_pair;
    a non-default f_divergence_type only with loss types in F_DIVERGENCE_LOSS_TYPES. Stricter than TRL:
    label_smoothing must lie in [0, 0.5) for every loss type (TRL only warns, for robust, which divides by 1 - 2e).
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
    if f_divergence_type != "reverse_kl" and not set(names) <= set(F_DIVERGENCE_LOSS_TYPES):
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is only supported for loss types "
            f"{sorted(F_DIVERGENCE_LOSS_TYPES)}, got loss_type {list(names)}; use f_divergence_type='reverse_kl' "
            "with these losses (as TRL: the other losses have no valid f-divergence generalization)"
        )
    check_number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    check_positive("discopop_tau", discopop_tau)
    if isinstance(bco_delta, Tensor):
        if bco_delta.dim() != 0 or not bco_delta.is_floating_point():
            raise ValueError(
                f"bco_delta must be a float or a 0-dim floating tensor, got shape {tuple(bco_delta.shape)}"
            )
    elif bco_delta is not None:
        check_number("bco_delta", bco_delta)


def _check_dpo_tensors(names, reference_free, policy, refs, lengths, pair_weights, bco_delta, batch_totals) -> None:
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
    tokens, pairs = batch_totals
    if (tokens is None) != (pairs is None):
        raise ValueError("batch_chosen_tokens and batch_pairs must be given together (or both left None)")
    if tokens is not None:
        check_count("batch_chosen_tokens", tokens, allow_tensor=True)
        check_count("batch_pairs", pairs, minimum=batch)
        if pair_weights is not None and "sft" in names and pairs != batch:
            raise ValueError(
                "pair_weights cannot be used with loss_type 'sft' on part of a batch (batch_pairs "
                f"{pairs} > {batch} pairs here): TRL scales the batch's SFT loss by the mean pair weight of the "
                "whole batch, so compute it on the whole batch"
            )
    delta_tensor = bco_delta if isinstance(bco_delta, Tensor) else None
    tokens_tensor = tokens if isinstance(tokens, Tensor) else None
    check_same_device(
        **policy,
        **refs,
        **lengths,
        pair_weights=pair_weights,
        bco_delta=delta_tensor,
        batch_chosen_tokens=tokens_tensor,
    )


# --- public functions ---


def is_batch_coupled(loss_type: str | Sequence[str]) -> bool:
    """True when one pair's loss depends on the other pairs' log-probs, so that a pair-chunked pass
    cannot compute it chunk by chunk: 'aot' / 'aot_unpaired', which sort across the batch.

    'sft' is not: a chunk gives the same per-pair values as the whole batch when it is passed the batch's
    `batch_chosen_tokens` and `batch_pairs` (but see `dpo_pair_losses` for sft with pair_weights)."""
    names = _loss_type_names(loss_type)
    return any(LOSS_TYPES[n].batch_coupled for n in names)


def check_dpo_inputs(
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
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    pair_weights: Tensor | None = None,
    bco_delta: Tensor | float | None = None,
    batch_chosen_tokens: int | Tensor | None = None,
    batch_pairs: int | None = None,
) -> None:
    """Validate every argument of `dpo_pair_losses` (the scalar options and the tensors); each error
    names the argument at fault. No host synchronisation."""
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
    _check_dpo_tensors(
        _loss_type_names(loss_type),
        reference_free,
        {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps},
        {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps},
        {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths},
        pair_weights,
        bco_delta,
        (batch_chosen_tokens, batch_pairs),
    )


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
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    pair_weights: Tensor | None = None,
    bco_delta: Tensor | float | None = None,
    batch_chosen_tokens: int | Tensor | None = None,
    batch_pairs: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO-family losses before the batch mean, as TRL 1.16's DPOTrainer: (B,)x4 -> (losses,
    chosen_rewards, rejected_rewards), each (B,).

    With u = policy - ref log-ratios and s = f'(exp u) their f-divergence scores (u itself for reverse_kl),
    `losses = sum_k loss_weights[k] * w_k * LOSS_TYPES[loss_type[k]](...)`, w_k = pair_weights (or 1), and for
    'sft' the mean of pair_weights, as TRL multiplies its batch-scalar SFT loss by each pair's weight before the
    mean. The formula of each loss_type is in its function's docstring; defaults are DPOConfig's. Rewards are
    beta * u, detached, as TRL logs them.

    ref_*_logps may be None when reference_free=True (then they are 0, TRL v0.28's meaning) or when every
    loss_type needs no reference (only 'sft'; the rewards then take the reference as 0 too).
    chosen_lengths / rejected_lengths are completion token counts, needed by 'ipo' and 'sigmoid_norm'
    (each clamped to >= 1); 'sft' needs chosen_lengths.
    pair_weights (B,) weigh the pairs (WPO: see `wpo_weights`; not with aot / aot_unpaired, as TRL).
    bco_delta shifts the bco_pair rewards; None (no shift) is TRL 1.16's bco_pair.
    batch_chosen_tokens (int or 0-dim tensor) and batch_pairs (int), given together, are the chosen completion
    tokens and pairs of the whole batch when this call covers only some of its pairs: 'sft' reads them (else
    this call's sum(chosen_lengths) and B). With them every loss_type but aot / aot_unpaired (see
    `is_batch_coupled`) gives each pair the value it has in the whole batch, except 'sft' with pair_weights,
    which needs the whole batch's weights and so raises when batch_pairs > B.
    """
    check_dpo_inputs(
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
        batch_chosen_tokens=batch_chosen_tokens,
        batch_pairs=batch_pairs,
    )
    names = _loss_type_names(loss_type)
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
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        bco_delta=0.0 if bco_delta is None else bco_delta.detach() if isinstance(bco_delta, Tensor) else bco_delta,
        batch_chosen_tokens=batch_chosen_tokens,
        batch_pairs=batch_pairs,
    )
    weights = _loss_weight_values(loss_weights, len(names))
    losses = 0
    for name, weight in zip(names, weights):
        per_pair = LOSS_TYPES[name].fn(pairs)
        if pair_weights is not None:
            # TRL: per_sequence_loss *= w, then the mean; sft's per_sequence_loss is one batch value.
            per_pair = per_pair * (pair_weights.mean() if name == "sft" else pair_weights)
        losses = losses + weight * per_pair
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
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    pair_weights: Tensor | None = None,
    bco_delta: Tensor | float | None = None,
    batch_chosen_tokens: int | Tensor | None = None,
    batch_pairs: int | None = None,
) -> PreferenceOutput:
    """The DPO-family loss of TRL 1.16's DPOTrainer: `dpo_pair_losses` averaged over the pairs.

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
        batch_chosen_tokens=batch_chosen_tokens,
        batch_pairs=batch_pairs,
    )
    return PreferenceOutput(losses.mean(), chosen_rewards, rejected_rewards)
