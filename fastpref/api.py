"""The public log-prob functions: argument checks, reshaping, and the call into the ops.

Shapes: N tokens, B sequences, T positions, V vocab, H hidden. Labels are already aligned with
the logits (shift before calling). Positions whose label is `ignore_index` give log-prob 0 and no
gradient. Log-probs come back in float32 whatever the input dtype (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastpref._checks import check_choice, check_positive, check_same_device, check_shape, check_tensor
from fastpref.ops.linear_token_logps import LinearTokenLogps
from fastpref.ops.token_logps import TokenLogps
from fastpref.params import HeadParams


class TokenStats(NamedTuple):
    """Per-token statistics of the (softcapped, tempered) distribution, not differentiated; TRL's
    names. Each has the labels' shape; 0 / False at ignored positions."""

    entropy: torch.Tensor
    is_top1: torch.Tensor  # bool: the target is the argmax
    mean_logit: torch.Tensor
    log_sum_sq_probs: torch.Tensor  # log Σ_v p_v² (WPO weighting)


def head_params(ignore_index, temperature, softcap, tile_bytes=None) -> HeadParams:
    """Check the scalar head options and bundle them."""
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_positive("temperature", temperature)
    if softcap is not None:
        check_positive("softcap", softcap)
    return HeadParams(int(ignore_index), float(temperature), None if softcap is None else float(softcap), tile_bytes)


def check_labels(labels: torch.Tensor, shape, vocab_size: int, ignore_index: int, what: str) -> None:
    """labels: an integer tensor of `shape`, each value in [0, vocab_size) or ignore_index."""
    check_tensor("labels", labels, integer=True)
    check_shape("labels", labels, shape, what)
    if torch.compiler.is_compiling():  # a value check needs the values: not inside a traced graph
        return
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if out_of_range.any():
        bad = labels[out_of_range][0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}, found {bad}"
        )


def _stats(stats: torch.Tensor) -> TokenStats:
    return TokenStats(stats[0], stats[1].bool(), stats[2], stats[3])


def token_logps(logits, labels, *, ignore_index=-100, temperature=1.0, softcap=None, return_stats=False):
    """log p(label) per position, never holding an fp32 copy of the logits.

    logits (..., V) float, labels (...) int -> (...) float32; with return_stats=True,
    (logps, TokenStats) from the same pass.
    """
    check_tensor("logits", logits, floating=True)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocab) dim, got shape {tuple(logits.shape)}")
    check_same_device(logits=logits, labels=labels)
    params = head_params(ignore_index, temperature, softcap)
    check_labels(labels, logits.shape[:-1], logits.shape[-1], params.ignore_index, "logits.shape[:-1]")
    logps, stats = TokenLogps.apply(logits, labels, params, return_stats)
    return (logps, _stats(stats)) if return_stats else logps


def _check_linear(hidden, weight, labels, bias, ignore_index, temperature, softcap) -> HeadParams:
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, floating=True)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight's H={weight.shape[1]}, got hidden shape {tuple(hidden.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        check_shape("bias", bias, (weight.shape[0],), "(V,) of weight")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    params = head_params(ignore_index, temperature, softcap)
    check_labels(labels, hidden.shape[:-1], weight.shape[0], params.ignore_index, "hidden.shape[:-1]")
    return params


def linear_token_logps(
    hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None, return_stats=False
):
    """log p(label) per position from hidden states and the lm_head, without a (N, V) tensor.

    hidden (..., H), weight (V, H), labels (...), bias (V,) or None -> (...) float32 (with
    return_stats=True, (logps, TokenStats)). Gradients flow to hidden, weight and bias.
    """
    params = _check_linear(hidden, weight, labels, bias, ignore_index, temperature, softcap)
    logps, stats = LinearTokenLogps.apply(hidden, weight, bias, labels, params, return_stats)
    return (logps, _stats(stats)) if return_stats else logps


def _check_values_mask(values, mask):
    check_tensor("values", values, floating=True)
    check_tensor("mask", mask)
    check_shape("mask", mask, values.shape, "values.shape")
    check_same_device(values=values, mask=mask)


def masked_sum(values, mask):
    """Σ_t values·mask over the last dim: (B, T), (B, T) bool or float weights -> (B,).

    Masked-out values never reach the result, even when they are inf or NaN.
    """
    _check_values_mask(values, mask)
    dtype = torch.promote_types(values.dtype, torch.float32)
    weights = mask.to(dtype)
    return torch.where(weights != 0, values.to(dtype) * weights, 0.0).sum(-1)


def masked_mean(values, mask):
    """masked_sum / Σ mask over the last dim, 0 where the mask is empty: (B, T), (B, T) -> (B,)."""
    total = masked_sum(values, mask)
    return total / mask.to(total.dtype).sum(-1).clamp(min=1)


def _reduce(per_token, labels, ignore_index, reduction):
    mask = labels != ignore_index
    return masked_sum(per_token, mask) if reduction == "sum" else masked_mean(per_token, mask)


def sequence_logps(logits, labels, *, reduction="sum", ignore_index=-100, temperature=1.0, softcap=None):
    """Sum (or mean) of token log-probs per sequence: (B, T, V), (B, T) -> (B,) float32."""
    check_choice("reduction", reduction, ("sum", "mean"))
    check_tensor("logits", logits, floating=True)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    per_token = token_logps(
        logits, labels, ignore_index=ignore_index, temperature=temperature, softcap=softcap
    )
    return _reduce(per_token, labels, ignore_index, reduction)


def linear_sequence_logps(
    hidden, weight, labels, *, reduction="sum", bias=None, ignore_index=-100, temperature=1.0, softcap=None
):
    """Sum (or mean) of token log-probs per sequence from hidden states and the lm_head:
    (B, T, H), (V, H), (B, T) -> (B,) float32, without a (N, V) tensor."""
    check_choice("reduction", reduction, ("sum", "mean"))
    check_tensor("hidden", hidden, floating=True)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    per_token = linear_token_logps(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap
    )
    return _reduce(per_token, labels, ignore_index, reduction)
