"""Triton backend.

Logits path: the row kernels of `fastpref.kernels.token_logps`.
Linear path (hidden x lm_head): valid rows only, in chunks of tokens whose (rows, V) logits fit
the tile budget; per chunk one GEMM (cuBLAS) makes the logits in the inputs' dtype, the row
kernels fold them into lse and log-probs, and in backward turn them *in place* into dz, which two
GEMMs carry into dh = dz·W and dW = dzᵀ·h (fp32 accumulation). No fp32 copy of a tile is made.
float64 inputs (gradcheck, references) run the chunked PyTorch code: the kernels are fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastpref.backends import torch_chunked
from fastpref.backends.torch_chunked import accumulate_matmul_, scatter_outputs, spans, valid_positions
from fastpref.kernels import token_logps as kernels
from fastpref.params import HeadParams


def _backend(t: torch.Tensor):
    return torch_chunked if t.dtype == torch.float64 else kernels


def logits_forward(logits, labels, params: HeadParams, with_stats: bool):
    return _backend(logits).logits_forward(logits, labels, params, with_stats)


def logits_backward(logits, labels, lse, grad_logps, params: HeadParams, in_place=False, entropy=None, grad_entropy=None):
    return _backend(logits).logits_backward(logits, labels, lse, grad_logps, params, in_place, **_entropy(entropy, grad_entropy))


def _entropy(entropy, grad_entropy) -> dict:
    """The entropy keyword arguments of a backward, passed only when the entropy is differentiated."""
    return {} if grad_entropy is None else {"entropy": entropy, "grad_entropy": grad_entropy}


def _rows_per_chunk(n_vocab: int, dtype: torch.dtype, params: HeadParams) -> int:
    """Token rows whose (rows, V) logits, in the inputs' dtype, fit the tile budget."""
    budget = torch_chunked.TILE_BYTES if params.tile_bytes is None else params.tile_bytes
    return max(1, budget // (n_vocab * torch.finfo(dtype).bits // 8))


def _logits(h_rows, weight, bias):
    """(r, V) logits of r rows in the inputs' dtype: one GEMM."""
    return h_rows @ weight.T if bias is None else torch.addmm(bias, h_rows, weight.T)


def linear_forward(hidden, weight, bias, labels, params: HeadParams, with_stats: bool):
    """(..., H), (V, H), (V,) or None, (...) -> logps (...), lse (2, ...), stats (4, ...) or None."""
    if hidden.dtype == torch.float64:
        return torch_chunked.linear_forward(hidden, weight, bias, labels, params, with_stats)
    pos = valid_positions(labels, params.ignore_index)
    y, h = labels[pos], hidden[pos]
    n = y.numel()
    logps = h.new_empty(n, dtype=torch.float32)
    lse = h.new_empty(2, n, dtype=torch.float32)
    stats = h.new_empty(4, n, dtype=torch.float32) if with_stats else None
    for r0, r1 in spans(n, _rows_per_chunk(weight.shape[0], hidden.dtype, params)):
        chunk = kernels.logits_forward(_logits(h[r0:r1], weight, bias), y[r0:r1], params, with_stats)
        logps[r0:r1], lse[:, r0:r1] = chunk[0], chunk[1]
        if with_stats:
            stats[:, r0:r1] = chunk[2]
    return scatter_outputs(labels, pos, logps, lse, stats)


def _carry_(dz, h_rows, weight, dw_acc, db_acc):
    """dW += dzᵀ·h and db += Σ dz into fp32 accumulators; returns dh = dz·W (r, H)."""
    if dw_acc is not None:
        accumulate_matmul_(dw_acc, dz.T, h_rows)
    if db_acc is not None:
        db_acc += dz.sum(0, dtype=torch.float32)
    return dz @ weight


def linear_backward(hidden, weight, bias, labels, lse, grad_logps, params: HeadParams, needs, entropy=None, grad_entropy=None):
    """Gradients of Σ grad_logps·logps (+ Σ grad_entropy·entropy when given) w.r.t. (hidden, weight,
    bias); None where needs[i] is False."""
    if hidden.dtype == torch.float64:
        return torch_chunked.linear_backward(
            hidden, weight, bias, labels, lse, grad_logps, params, needs, entropy, grad_entropy
        )
    need_h, need_w, need_b = needs
    pos = valid_positions(labels, params.ignore_index)
    y, h, lse, g = labels[pos], hidden[pos], lse[(slice(None), *pos)], grad_logps[pos]
    if grad_entropy is not None:
        entropy, grad_entropy = entropy[pos], grad_entropy[pos].float()
    dh = torch.zeros_like(hidden) if need_h else None
    dw_acc = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
    db_acc = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
    for r0, r1 in spans(y.numel(), _rows_per_chunk(weight.shape[0], hidden.dtype, params)):
        z = _logits(h[r0:r1], weight, bias)
        ent = {} if grad_entropy is None else _entropy(entropy[r0:r1], grad_entropy[r0:r1])
        dz = kernels.logits_backward(z, y[r0:r1], lse[:, r0:r1].contiguous(), g[r0:r1], params, in_place=True, **ent)
        dh_rows = _carry_(dz, h[r0:r1], weight, dw_acc, db_acc)
        if need_h:
            dh[tuple(p[r0:r1] for p in pos)] = dh_rows
    dw = None if dw_acc is None else dw_acc.to(weight.dtype)
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return dh, dw, db


def linear_rows_fused(
    h_rows, weight, bias, y, params: HeadParams, token_grads: Callable, dw_acc, db_acc, with_log_sum_sq: bool
):
    """One pass over the (r, V) logits of r rows: GEMM, row kernels forward, the loss step
    (token_grads), row kernels backward in place, two GEMMs. As torch_chunked.linear_rows_fused."""
    if h_rows.dtype == torch.float64:
        return torch_chunked.linear_rows_fused(
            h_rows, weight, bias, y, params, token_grads, dw_acc, db_acc, with_log_sum_sq
        )
    z = _logits(h_rows, weight, bias)
    logps, lse, stats = kernels.logits_forward(z, y, params, with_log_sum_sq)
    g = token_grads(logps, stats[3] if with_log_sum_sq else None)
    dz = kernels.logits_backward(z, y, lse, g.float(), params, in_place=True)
    return _carry_(dz, h_rows, weight, dw_acc, db_acc)
