"""Per-token log-probs straight from hidden states x lm_head, as torch.library custom ops with an
autograd formula: no (N, V) tensor, forward or backward (the backward recomputes logits tiles).

Host syncs: the forward counts the valid rows (one copy, `rows.valid_rows`, none when the caller
passes n_valid or under CUDA-graph capture); its positions ride on its lse output to the backward,
which syncs not at all (under torch.compile the outputs are traced, and the backward counts again)."""

from typing import Optional

import torch
from torch import Tensor

from fastpref.backends import backend_for, rows
from fastpref.ops.token_logps import entropy_grad_terms
from fastpref.params import ENTROPY, HeadParams, selected


@torch.library.custom_op("fastpref::linear_token_logps", mutates_args=())
def linear_token_logps_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    tile_bytes: Optional[int],
    logit_scale: float,
    stats: int,
    n_valid: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(..., H), (V, H), (V,) or None, (...) -> logps (...), lse (2, ...), the stats the selector `stats`
    selects (k, ...).
    n_valid: the number of valid labels, when the caller has counted (and range-checked) them."""
    params = HeadParams(ignore_index, temperature, softcap, tile_bytes, logit_scale)
    pos = rows.valid_rows(labels, ignore_index, weight.shape[0], n_valid)
    logps, lse, out_stats = backend_for(hidden).linear_forward(hidden, weight, bias, labels, params, stats, pos=pos)
    lse.valid_positions = pos  # for the backward (setup_context): no second sync
    return logps, lse, logps.new_empty(0, *labels.shape) if out_stats is None else out_stats


@linear_token_logps_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, softcap, tile_bytes, logit_scale, stats,
      n_valid=None):  # fmt: skip
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    stats_shape = (len(selected(stats)), *labels.shape)
    return (
        hidden.new_empty(labels.shape, dtype=dtype),
        hidden.new_empty((2, *labels.shape), dtype=dtype),
        hidden.new_empty(stats_shape, dtype=dtype),
    )


@torch.library.custom_op("fastpref::linear_token_logps_backward", mutates_args=())
def linear_token_logps_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    grad_logps: Tensor,
    entropy: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    tile_bytes: Optional[int],
    logit_scale: float,
    needs: list[bool],
    positions: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (hidden, weight, bias) of Σ grad_logps·logps (+ Σ grad_entropy·entropy);
    an empty tensor where needs[i] is False. positions: the forward's valid positions (no sync), or []."""
    params = HeadParams(ignore_index, temperature, softcap, tile_bytes, logit_scale)
    pos = tuple(positions) or None  # [] when the forward's positions are unknown
    grads = backend_for(hidden).linear_backward(
        hidden, weight, bias, labels, lse, grad_logps, params, needs, entropy=entropy, grad_entropy=grad_entropy,
        pos=pos,
    )
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@linear_token_logps_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, grad_logps, entropy, grad_entropy, ignore_index, temperature, softcap,
      tile_bytes, logit_scale, needs, positions):  # fmt: skip
    like = (hidden, weight, bias)
    return tuple(torch.empty_like(t) if need else hidden.new_empty(0) for t, need in zip(like, needs))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, *options, stats, _n_valid = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1], output[2])
    ctx.options = options
    positions = getattr(output[1], "valid_positions", None)  # absent on traced (fake) outputs
    ctx.positions = [] if positions is None else list(positions)
    ctx.with_entropy = bool(stats & ENTROPY)  # the only statistic with a gradient, stats[0] when selected
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_logps, _grad_lse, grad_stats):
    grad_stats = grad_stats if ctx.with_entropy else None
    hidden, weight, bias, labels, lse, stats = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    no_grads = (None,) * (4 + len(ctx.options) + 2)  # one per input of linear_token_logps_op
    if (grad_logps is None and grad_stats is None) or not any(needs):
        return no_grads
    grad_logps, entropy, grad_entropy = entropy_grad_terms(grad_logps, grad_stats, lse[0], stats)
    grads = linear_token_logps_backward_op(
        hidden, weight, bias, labels, lse, grad_logps, entropy, grad_entropy, *ctx.options, needs, ctx.positions
    )
    return *(g if need else None for g, need in zip(grads, needs)), *no_grads[3:]


torch.library.register_autograd("fastpref::linear_token_logps", _backward, setup_context=_setup_context)
