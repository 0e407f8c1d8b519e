"""Per-token log-probs from logits: forward keeps lse, backward recomputes softmax from it."""

from __future__ import annotations

import torch

from fastpref.backends import backend_for
from fastpref.params import HeadParams


class TokenLogps(torch.autograd.Function):
    """(logits (..., V), labels (...)) -> (logps (...), stats (4, ...) or (0,)); stats are not
    differentiated. With inplace_backward, the gradient overwrites the logits' storage."""

    @staticmethod
    def forward(ctx, logits, labels, params: HeadParams, with_stats: bool, inplace_backward: bool):
        backend = backend_for(logits)
        logps, lse, stats = backend.logits_forward(logits, labels, params, with_stats)
        ctx.save_for_backward(logits, labels, lse)
        ctx.params, ctx.backend, ctx.inplace_backward = params, backend, inplace_backward
        ctx.set_materialize_grads(False)
        stats = logps.new_empty(0) if stats is None else stats
        ctx.mark_non_differentiable(stats)
        return logps, stats

    @staticmethod
    def backward(ctx, grad_logps, _grad_stats):
        if grad_logps is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        logits, labels, lse = ctx.saved_tensors
        grad_logits = ctx.backend.logits_backward(logits, labels, lse, grad_logps, ctx.params, ctx.inplace_backward)
        return grad_logits, None, None, None, None
