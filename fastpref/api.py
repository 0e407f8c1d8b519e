"""The public log-prob functions: argument checks, reshaping, and the call into the ops.

Shapes: N tokens, B sequences, T positions, V vocab, H hidden. Labels are already aligned with
the logits (shift before calling). Positions whose label is `ignore_index` give log-prob 0 and no
gradient. Log-probs come back in float32 whatever the input dtype (float64 for float64 inputs).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Sequence
from typing import NamedTuple

import torch

from fastpref._checks import (
    check_choice,
    check_interval,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
)
from fastpref import losses
from fastpref.backends import backend_for, torch_chunked
from fastpref.losses import check_dpo_options, is_batch_coupled
from fastpref.ops.linear_dpo import DPOParams, linear_dpo
from fastpref.ops.linear_token_logps import linear_token_logps_op
from fastpref.ops.pair_sigmoid import pair_sigmoid_op
from fastpref.ops.token_logps import token_logps_op
from fastpref.params import ALL_STATS, STAT_NAMES, HeadParams, selected


class TokenStats(NamedTuple):
    """Per-token statistics of the (scaled, softcapped, tempered) distribution; TRL's names. Each has
    the labels' shape; 0 / False at ignored positions; None when it was not asked for (`return_stats`),
    and then it cost nothing. Only `entropy` carries a gradient (∂H/∂z = −p ⊙ (log p + H), for entropy
    bonuses); the others are detached."""

    entropy: torch.Tensor | None
    is_top1: torch.Tensor | None  # bool: the target is the argmax
    mean_logit: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None  # log Σ_v p_v² (WPO weighting)


def stats_selector(return_stats) -> int:
    """return_stats -> the ops' selector (fastpref.params): False / None none, True all four, else a
    TokenStats field name or a collection of them."""
    if return_stats is None or isinstance(return_stats, bool):
        return ALL_STATS if return_stats else 0
    names = (return_stats,) if isinstance(return_stats, str) else return_stats
    if not isinstance(names, Collection) or not all(isinstance(name, str) for name in names):
        raise TypeError(
            f"return_stats must be a bool, a statistic's name or a collection of names, got {return_stats!r}"
        )
    unknown = sorted(set(names) - set(STAT_NAMES))
    if unknown:
        raise ValueError(f"return_stats names unknown statistics {unknown}; choose among {list(STAT_NAMES)}")
    return sum(1 << i for i, name in enumerate(STAT_NAMES) if name in names)


def head_params(ignore_index, temperature, softcap, logit_scale=1.0) -> HeadParams:
    """Check the scalar head options and bundle them."""
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_positive("temperature", temperature)
    if softcap is not None:
        check_positive("softcap", softcap)
    check_positive("logit_scale", logit_scale)
    softcap = None if softcap is None else float(softcap)
    return HeadParams(int(ignore_index), float(temperature), softcap, None, float(logit_scale))


def check_labels(labels, shape, what: str) -> torch.Tensor:
    """labels: an integer tensor of `shape`, returned as int64 (any integer dtype is accepted). Their
    values ([0, V) or ignore_index) are checked where the valid rows are counted
    (`fastpref.backends.rows`), in that one host sync; not under CUDA-graph capture."""
    check_tensor("labels", labels, integer=True)
    check_shape("labels", labels, shape, what)
    return labels.long()


def shares_memory(t: torch.Tensor) -> bool:
    """Whether two elements of t may sit at one address (an expanded or overlapping view): with the
    dims ordered by stride, each stride must step past everything the smaller ones span."""
    span = 0  # the largest offset reachable with the dims seen so far
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    for stride, size in dims:
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def asks_stats(return_stats) -> bool:
    """Whether a call returns (result, TokenStats): anything but False / None, an empty selection too."""
    return return_stats is not False and return_stats is not None


def token_stats(stats: torch.Tensor, selector: int, wanted: int | None = None) -> TokenStats:
    """The ops' (k, ...) stats output of `selector` -> TokenStats of those `wanted` (default: all of
    them; None where not wanted)."""
    wanted = selector if wanted is None else wanted
    rows = {name: row for name, row in zip(selected(selector), stats) if name in selected(wanted)}
    entropy, is_top1, mean_logit, log_sum_sq = (rows.get(name) for name in STAT_NAMES)
    return TokenStats(
        entropy,
        None if is_top1 is None else is_top1.bool(),
        None if mean_logit is None else mean_logit.detach(),
        None if log_sum_sq is None else log_sum_sq.detach(),
    )


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool | str | Collection[str] = False,
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """log p(label) per position, never holding an fp32 copy of the logits.

    logits (..., V) float, labels (...) int -> (...) float32; with return_stats, (logps, TokenStats)
    from the same pass: True for all four statistics, or the names of those wanted (e.g. "entropy"):
    the others are None and cost no work. The logits become
    z = softcap·tanh(logit_scale·raw/softcap) / temperature (logit_scale: a family's multiplier
    applied before the softcap, e.g. Cohere's). inplace_backward=True writes the gradient into the
    logits' own storage (no memory beyond lse): only when nothing else reads those logits later,
    and only for logits whose elements do not share memory (not an expanded view).
    Labels are checked to lie in [0, V) or equal ignore_index, except inside a CUDA-graph capture.
    """
    check_tensor("logits", logits, floating=True)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocab) dim, got shape {tuple(logits.shape)}")
    labels = check_labels(labels, logits.shape[:-1], "logits.shape[:-1]")
    check_same_device(logits=logits, labels=labels)
    params = head_params(ignore_index, temperature, softcap, logit_scale)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if inplace_backward and shares_memory(logits):
        raise ValueError(
            "inplace_backward=True needs logits whose elements do not share memory, got an expanded or "
            f"overlapping view (shape {tuple(logits.shape)}, strides {logits.stride()}); pass inplace_backward=False"
        )
    selector = stats_selector(return_stats)
    logps, _lse, stats = token_logps_op(logits, labels, *dataclasses.astuple(params), selector, inplace_backward)
    return (logps, token_stats(stats, selector)) if asks_stats(return_stats) else logps


def _check_linear(hidden, weight, labels, bias, ignore_index, temperature, softcap, logit_scale):
    """Check the linear head's inputs; returns (HeadParams, labels as int64)."""
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, floating=True)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        transposed = hidden.dim() >= 1 and hidden.shape[-1] == weight.shape[0]
        raise ValueError(
            f"hidden's last dim must equal weight's H={weight.shape[1]}, got hidden shape {tuple(hidden.shape)}"
            + (f"; weight {tuple(weight.shape)} looks transposed: pass the (V, H) lm_head.weight, not its .T"
               if transposed else "")
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        check_shape("bias", bias, (weight.shape[0],), "(V,) of weight")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    labels = check_labels(labels, hidden.shape[:-1], "hidden.shape[:-1]")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    return head_params(ignore_index, temperature, softcap, logit_scale), labels


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool | str | Collection[str] = False,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """log p(label) per position from hidden states and the lm_head, without a (N, V) tensor.

    hidden (..., H), weight (V, H), labels (...), bias (V,) or None -> (...) float32 (with
    return_stats, (logps, TokenStats)). Gradients flow to hidden, weight and bias.
    Head options and return_stats as in `token_logps`.
    """
    params, labels = _check_linear(hidden, weight, labels, bias, ignore_index, temperature, softcap, logit_scale)
    selector = stats_selector(return_stats)
    logps, _lse, stats = linear_token_logps_op(hidden, weight, bias, labels, *dataclasses.astuple(params), selector)
    return (logps, token_stats(stats, selector)) if asks_stats(return_stats) else logps


def _check_values_mask(values, mask):
    check_tensor("values", values, floating=True)
    check_tensor("mask", mask)
    check_shape("mask", mask, values.shape, "values.shape")
    check_same_device(values=values, mask=mask)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t values·mask over the last dim: (B, T), (B, T) bool or float weights -> (B,).

    Masked-out values never reach the result, even when they are inf or NaN.
    """
    _check_values_mask(values, mask)
    dtype = torch.promote_types(values.dtype, torch.float32)
    weights = mask.to(dtype)
    return torch.where(weights != 0, values.to(dtype) * weights, 0.0).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_sum / Σ mask over the last dim (a weighted mean for float weights), 0 where Σ mask is 0:
    (B, T), (B, T) -> (B,)."""
    total = masked_sum(values, mask)
    count = mask.to(total.dtype).sum(-1)
    return total / torch.where(count == 0, 1.0, count)


def _reduce(per_token, labels, ignore_index, reduction):
    mask = labels != ignore_index
    return masked_sum(per_token, mask) if reduction == "sum" else masked_mean(per_token, mask)


def _reduce_with_stats(out, labels, ignore_index, reduction):
    """A token op's output (logps, or (logps, TokenStats)) with the log-probs reduced per sequence."""
    if isinstance(out, tuple):
        return _reduce(out[0], labels, ignore_index, reduction), out[1]
    return _reduce(out, labels, ignore_index, reduction)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "sum",
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    inplace_backward: bool = False,
    return_stats: bool | str | Collection[str] = False,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Sum (or mean) of token log-probs per sequence: (B, T, V), (B, T) -> (B,) float32.
    inplace_backward as in `token_logps`; return_stats too ((B,), TokenStats of the tokens (B, T))."""
    check_choice("reduction", reduction, ("sum", "mean"))
    check_tensor("logits", logits, floating=True)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    per_token = token_logps(
        logits,
        labels,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        inplace_backward=inplace_backward,
        return_stats=return_stats,
    )
    return _reduce_with_stats(per_token, labels, ignore_index, reduction)


def linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "sum",
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool | str | Collection[str] = False,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Sum (or mean) of token log-probs per sequence from hidden states and the lm_head:
    (B, T, H), (V, H), (B, T) -> (B,) float32, without a (N, V) tensor. return_stats as in
    `sequence_logps`."""
    check_choice("reduction", reduction, ("sum", "mean"))
    check_tensor("hidden", hidden, floating=True)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    per_token = linear_token_logps(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        return_stats=return_stats,
    )
    return _reduce_with_stats(per_token, labels, ignore_index, reduction)


DEFAULT_MEMORY_BUDGET = 512 << 20  # bytes of logits the fused DPO pass may hold at once


def _pair_indices(pairs, n_seqs: int, device):
    """(chosen_idx, rejected_idx) (B,) each: given, or the chosen-then-rejected halves."""
    if pairs is None:
        if n_seqs % 2:
            raise ValueError(
                f"hidden must hold chosen-then-rejected halves (an even number of sequences), got {n_seqs}; "
                "pass pairs=(chosen_idx, rejected_idx) otherwise"
            )
        half = n_seqs // 2
        return torch.arange(half, device=device), torch.arange(half, 2 * half, device=device)
    if not isinstance(pairs, (tuple, list)) or len(pairs) != 2:
        raise TypeError("pairs must be a tuple (chosen_idx, rejected_idx) of integer tensors")
    chosen_idx, rejected_idx = pairs
    for name, idx in (("pairs[0]", chosen_idx), ("pairs[1]", rejected_idx)):
        check_tensor(name, idx, integer=True)
        if idx.dim() != 1:
            raise ValueError(f"{name} must be 1-D (B,), got shape {tuple(idx.shape)}")
    check_shape("pairs[1]", rejected_idx, chosen_idx.shape, "pairs[0].shape")
    check_same_device(hidden=torch.empty(0, device=device), **{"pairs[0]": chosen_idx, "pairs[1]": rejected_idx})
    return chosen_idx, rejected_idx


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    memory_budget: int | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: float | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    return_stats: bool | str | Collection[str] = False,
) -> losses.PreferenceOutput | tuple[losses.PreferenceOutput, TokenStats]:
    """DPO-family loss from hidden states and the lm_head, logits never held whole.

    hidden (M, T, H), weight (V, H), labels (M, T); sequences are chosen-then-rejected halves
    (M = 2B) or `pairs=(chosen_idx, rejected_idx)` (B,) into M (the DPO paper's indexing).
    ref_*_logps (B,) or None for reference-free losses. Loss options as in `dpo_loss`;
    `ld_alpha` (LD-DPO) and `use_weighting` (WPO) as TRL's DPOConfig. `memory_budget` (bytes)
    bounds the logits held at once; below one pair's logits the two-pass mode runs.
    Returns PreferenceOutput(loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps);
    gradients flow to hidden, weight and bias. With return_stats (as in `token_logps`), (output,
    TokenStats) of the policy's tokens (M, T), from the loss's own pass over the logits, detached:
    TRL's `entropy`, `mean_token_accuracy` and `logits/*` metrics at no extra GEMM.
    """
    check_tensor("hidden", hidden, floating=True)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (M, T, H), got shape {tuple(hidden.shape)}")
    head, labels = _check_linear(hidden, weight, labels, bias, ignore_index, temperature, softcap, logit_scale)
    chosen_idx, rejected_idx = _pair_indices(pairs, hidden.shape[0], hidden.device)
    if chosen_idx.numel() == 0:
        raise ValueError(f"linear_dpo_loss needs at least one pair, got hidden of shape {tuple(hidden.shape)}")
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if ref is not None:
            check_tensor(name, ref, floating=True)
            check_shape(name, ref, chosen_idx.shape, "one per pair")
            check_same_device(hidden=hidden, **{name: ref})
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET
    elif not isinstance(memory_budget, int) or isinstance(memory_budget, bool) or memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    if ld_alpha is not None:
        check_interval("ld_alpha", ld_alpha, 0.0, 1.0, closed_high=True)
    if not isinstance(use_weighting, bool):
        raise TypeError(f"use_weighting must be a bool, got {type(use_weighting).__name__}")
    loss_options = dict(
        beta=beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau,
        bco_delta=bco_delta,
    )
    check_dpo_options(**loss_options)
    if use_weighting and is_batch_coupled(loss_type):
        raise ValueError("use_weighting cannot be combined with loss_type 'aot' / 'aot_unpaired', which sort pairs")
    selector = stats_selector(return_stats)
    params = DPOParams(head, memory_budget, loss_options, ld_alpha, use_weighting, selector)
    out, stats = linear_dpo(
        hidden, weight, bias, labels, ref_chosen_logps, ref_rejected_logps, chosen_idx, rejected_idx, params
    )
    return (out, token_stats(stats, params.pass_stats, wanted=selector)) if asks_stats(return_stats) else out


def _sigmoid_kernel_serves(tensor: torch.Tensor, *refs) -> bool:
    """The pairwise sigmoid kernel runs on the Triton backend, for fp16/bf16/fp32 inputs and
    constant references (its backward gives no gradient to them)."""
    return (
        isinstance(tensor, torch.Tensor)  # anything else goes to the torch losses, whose checks name the argument
        and backend_for(tensor) is not torch_chunked
        and tensor.dtype != torch.float64
        and not any(r is not None and r.requires_grad for r in refs)
    )


@functools.wraps(losses.dpo_loss)
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **options):
    loss_type = options.get("loss_type", "sigmoid")
    single_sigmoid = loss_type == "sigmoid" or (isinstance(loss_type, (list, tuple)) and list(loss_type) == ["sigmoid"])
    plain = all(options.get(name) is None for name in ("loss_weights", "pair_weights"))
    if not (single_sigmoid and plain and _sigmoid_kernel_serves(policy_chosen_logps, ref_chosen_logps, ref_rejected_logps)):
        return losses.dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **options)
    losses.check_dpo_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **options)
    beta = options.get("beta", 0.1)
    per_pair, _, _ = pair_sigmoid_op(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        None,
        float(beta),
        options.get("f_divergence_type", "reverse_kl"),
        float(options.get("f_alpha_divergence_coef", 0.5)),
        0.0,
    )
    chosen_ratio = policy_chosen_logps if ref_chosen_logps is None else policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps if ref_rejected_logps is None else policy_rejected_logps - ref_rejected_logps
    loss = per_pair.mean().to(policy_chosen_logps.dtype)  # the dtype the torch backend returns
    return losses.PreferenceOutput(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


@functools.wraps(losses.bt_loss)
def bt_loss(chosen_rewards, rejected_rewards, *, margin=None, center_rewards_coefficient=None):
    if not _sigmoid_kernel_serves(chosen_rewards, margin if isinstance(margin, torch.Tensor) else None):
        return losses.bt_loss(
            chosen_rewards, rejected_rewards, margin=margin, center_rewards_coefficient=center_rewards_coefficient
        )
    losses.check_bt_inputs(chosen_rewards, rejected_rewards, margin, center_rewards_coefficient)
    if margin is not None and not isinstance(margin, torch.Tensor):
        margin = torch.full_like(chosen_rewards, float(margin))
    per_pair, _, _ = pair_sigmoid_op(
        chosen_rewards, rejected_rewards, None, None, margin, 1.0, "reverse_kl", 0.5, float(center_rewards_coefficient or 0.0)
    )
    return per_pair.mean().to(chosen_rewards.dtype)
