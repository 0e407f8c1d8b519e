"""Per-token log-probs from logits, as torch.library custom ops with an autograd formula:
forward keeps lse, backward recomputes the softmax from it. Custom ops with fake (meta)
implementations let torch.compile(fullgraph=True) trace a step that calls them."""

from typing import Optional

import torch
from torch import Tensor

from fastpref.backends import backend_for
from fastpref.params import HeadParams


def _params(ignore_index: int, temperature: float, softcap: Optional[float], tile_bytes: Optional[int]) -> HeadParams:
    return HeadParams(ignore_index, temperature, softcap, tile_bytes)


@torch.library.custom_op("fastpref::token_logps", mutates_args=())
def token_logps_op(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    tile_bytes: Optional[int],
    with_stats: bool,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(..., V), (...) -> logps (...), lse (2, ...), stats (4, ...) or (0,); fp32 (fp64 for fp64).
    With inplace_backward, the backward writes the gradient into the logits' storage."""
    params = _params(ignore_index, temperature, softcap, tile_bytes)
    logps, lse, stats = backend_for(logits).logits_forward(logits, labels, params, with_stats)
    return logps, lse, logps.new_empty(0) if stats is None else stats


@token_logps_op.register_fake
def _(logits, labels, ignore_index, temperature, softcap, tile_bytes, with_stats, inplace_backward):
    dtype = torch.promote_types(logits.dtype, torch.float32)
    stats_shape = (4, *labels.shape) if with_stats else (0,)
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
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    tile_bytes: Optional[int],
) -> Tensor:
    """Gradient w.r.t. logits of Σ grad_logps·logps: (..., V) in the logits' dtype."""
    params = _params(ignore_index, temperature, softcap, tile_bytes)
    return backend_for(logits).logits_backward(logits, labels, lse, grad_logps, params)


@token_logps_backward_op.register_fake
def _(logits, labels, lse, grad_logps, ignore_index, temperature, softcap, tile_bytes):
    return torch.empty_like(logits)


@torch.library.custom_op("fastpref::token_logps_backward_", mutates_args=("logits",))
def token_logps_backward_inplace_op(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    grad_logps: Tensor,
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    tile_bytes: Optional[int],
) -> None:
    """As token_logps_backward, written into the logits' own storage."""
    params = _params(ignore_index, temperature, softcap, tile_bytes)
    backend_for(logits).logits_backward(logits, labels, lse, grad_logps, params, True)


@token_logps_backward_inplace_op.register_fake
def _(logits, labels, lse, grad_logps, ignore_index, temperature, softcap, tile_bytes):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, *options, _with_stats, inplace_backward = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.options, ctx.inplace_backward = options, inplace_backward
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_logps, _grad_lse, _grad_stats):
    if grad_logps is None or not ctx.needs_input_grad[0]:
        return (None,) * 8
    logits, labels, lse = ctx.saved_tensors
    if ctx.inplace_backward:
        token_logps_backward_inplace_op(logits, labels, lse, grad_logps, *ctx.options)
        return (logits,) + (None,) * 7
    return (token_logps_backward_op(logits, labels, lse, grad_logps, *ctx.options),) + (None,) * 7


torch.library.register_autograd("fastpref::token_logps", _backward, setup_context=_setup_context)
