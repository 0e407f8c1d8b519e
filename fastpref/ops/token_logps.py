"""Per-token log-probs from logits, as torch.library custom ops with an autograd formula:
forward keeps lse, backward recomputes the softmax from it. Custom ops with fake (meta)
implementations let torch.compile(fullgraph=True) trace a step that calls them.
Host syncs: one in the forward (the label check, and on the chunked backend the valid rows, whose
positions ride on lse to the backward), none in the backward."""

from typing import Optional

import torch
from torch import Tensor

from fastpref.backends import backend_for
from fastpref.params import ENTROPY, HeadParams, selected


def _params(ignore_index, temperature, softcap, tile_bytes, logit_scale) -> HeadParams:
    return HeadParams(ignore_index, temperature, softcap, tile_bytes, logit_scale)


@torch.library.custom_op("fastpref::token_logps", mutates_args=())
def token_logps_op(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    tile_bytes: Optional[int],
    logit_scale: float,
    stats: int,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(..., V), (...) -> logps (...), lse (2, ...), the stats the selector `stats` selects (k, ...); fp32
    (fp64 for fp64).
    With inplace_backward, the backward writes the gradient into the logits' storage."""
    params = _params(ignore_index, temperature, softcap, tile_bytes, logit_scale)
    logps, lse, out_stats = backend_for(logits).logits_forward(logits, labels, params, stats)
    return logps, lse, logps.new_empty(0, *labels.shape) if out_stats is None else out_stats


@token_logps_op.register_fake
def _(logits, labels, ignore_index, temperature, softcap, tile_bytes, logit_scale, stats, inplace_backward):
    dtype = torch.promote_types(logits.dtype, torch.float32)
    stats_shape = (len(selected(stats)), *labels.shape)
    return (
        logits.new_empty(labels.shape, dtype=dtype),
        logits.new_empty((2, *labels.shape), dtype=dtype),
        logits.new_empty(stats_shape, dtype=dtype),
    )


@torch.library.custom_op("fastpref::token_logps_backward", mutates_args=())
def token_logps_backward_op(
    logits: Tensor,
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
    positions: list[Tensor],
) -> Tensor:
    """Gradient w.r.t. logits of Σ grad_logps·logps (+ Σ grad_entropy·entropy): (..., V) in the logits' dtype.
    positions: the forward's valid positions, where its backend used them (no sync), or []."""
    params = _params(ignore_index, temperature, softcap, tile_bytes, logit_scale)
    return backend_for(logits).logits_backward(
        logits, labels, lse, grad_logps, params, entropy=entropy, grad_entropy=grad_entropy, pos=_tuple(positions)
    )


def _tuple(positions):
    return tuple(positions) or None  # [] when the forward's backend kept none


@token_logps_backward_op.register_fake
def _(logits, labels, lse, grad_logps, entropy, grad_entropy, *options):
    return torch.empty_like(logits)


@torch.library.custom_op("fastpref::token_logps_backward_", mutates_args=("logits",))
def token_logps_backward_inplace_op(
    logits: Tensor,
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
    positions: list[Tensor],
) -> None:
    """As token_logps_backward, written into the logits' own storage."""
    params = _params(ignore_index, temperature, softcap, tile_bytes, logit_scale)
    backend_for(logits).logits_backward(
        logits, labels, lse, grad_logps, params, True, entropy=entropy, grad_entropy=grad_entropy, pos=_tuple(positions)
    )


@token_logps_backward_inplace_op.register_fake
def _(logits, labels, lse, grad_logps, entropy, grad_entropy, *options):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, *options, stats, inplace_backward = inputs
    ctx.save_for_backward(logits, labels, output[1], output[2])
    ctx.options, ctx.inplace_backward = options, inplace_backward
    positions = getattr(output[1], "valid_positions", None)  # absent on traced (fake) outputs
    ctx.positions = [] if positions is None else list(positions)
    ctx.with_entropy = bool(stats & ENTROPY)  # the only statistic with a gradient, stats[0] when selected
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])


def entropy_grad_terms(grad_logps, grad_stats, logps_like, stats):
    """(grad_logps, entropy, grad_entropy) for a backward: only the entropy (stats[0] when selected) carries
    a gradient among the statistics; grad_logps is zeros when only the entropy was differentiated.
    grad_stats: None unless the entropy was selected and differentiated."""
    if grad_stats is None:
        return grad_logps, None, None
    if grad_logps is None:
        grad_logps = torch.zeros_like(logps_like)
    return grad_logps, stats[0], grad_stats[0]


def _backward(ctx, grad_logps, _grad_lse, grad_stats):
    grad_stats = grad_stats if ctx.with_entropy else None
    no_grads = (None,) * 9
    if (grad_logps is None and grad_stats is None) or not ctx.needs_input_grad[0]:
        return no_grads
    logits, labels, lse, stats = ctx.saved_tensors
    grad_logps, entropy, grad_entropy = entropy_grad_terms(grad_logps, grad_stats, lse[0], stats)
    args = (logits, labels, lse, grad_logps, entropy, grad_entropy, *ctx.options, ctx.positions)
    if ctx.inplace_backward:
        token_logps_backward_inplace_op(*args)
        return (logits,) + no_grads[1:]
    return (token_logps_backward_op(*args),) + no_grads[1:]


torch.library.register_autograd("fastpref::token_logps", _backward, setup_context=_setup_context)
