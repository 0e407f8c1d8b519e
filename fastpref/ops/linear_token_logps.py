"""Per-token log-probs straight from hidden states x lm_head: no (N, V) tensor, forward or back."""

from __future__ import annotations

import torch

from fastpref.backends import backend_for
from fastpref.params import HeadParams


class LinearTokenLogps(torch.autograd.Function):
    """(hidden (..., H), weight (V, H), bias (V,) or None, labels (...)) ->
    (logps (...), stats (4, ...) or (0,)); backward recomputes the logits tile by tile."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params: HeadParams, with_stats: bool):
        backend = backend_for(hidden)
        logps, lse, stats = backend.linear_forward(hidden, weight, bias, labels, params, with_stats)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.params, ctx.backend = params, backend
        ctx.set_materialize_grads(False)
        stats = logps.new_empty(0) if stats is None else stats
        ctx.mark_non_differentiable(stats)
        return logps, stats

    @staticmethod
    def backward(ctx, grad_logps, _grad_stats):
        needs = ctx.needs_input_grad[:3]
        if grad_logps is None or not any(needs):
            return None, None, None, None, None, None
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        needs = (needs[0], needs[1], bias is not None and needs[2])
        grads = ctx.backend.linear_backward(hidden, weight, bias, labels, lse, grad_logps, ctx.params, needs)
        return *grads, None, None, None
