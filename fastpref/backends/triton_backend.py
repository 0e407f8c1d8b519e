"""Triton backend.

Logits path: the row kernels of `fastpref.kernels.token_logps`.
Linear path (hidden x lm_head): valid rows only (`rows.valid_rows`: one host sync per call, none
under CUDA-graph capture). Forward: per chunk of rows one GEMM (cuBLAS) makes the (rows, V) logits
in the inputs' dtype, the row kernels fold them into lse and log-probs. Backward: vocab slices
outermost, each as wide as the tile budget allows with every row in one block, so that each slice
of dW = dzᵀ·h is one GEMM over all rows, written once in the weight's dtype (no fp32 dW buffer, no
read-modify-write of it per row chunk); the row kernels turn each logits slice *in place* into dz
using the forward's lse; dh = dz·W accumulates over slices in fp32 (n, H).
Logits buffers have rows padded to a multiple of 16 elements, so that an odd vocabulary (GPT-2's
50,257) keeps every row's loads aligned. No fp32 copy of a tile is made.
float64 inputs (gradcheck, references) run the chunked PyTorch code: the kernels are fp32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from fastpref.backends import rows, torch_chunked
from fastpref.backends.torch_chunked import accumulate_matmul_, scatter_outputs, spans
from fastpref.kernels import token_logps as kernels
from fastpref.params import HeadParams

ROW_ALIGN = 16  # elements: logits rows padded to this, so 2-byte loads stay 32-byte aligned
MIN_SLICE_COLS = 4096  # the backward's vocab slices are at least this wide (GEMM efficiency)


def _backend(t: torch.Tensor):
    return torch_chunked if t.dtype == torch.float64 else kernels


def _entropy(entropy, grad_entropy, r0: int = 0, r1: int | None = None) -> dict:
    """The entropy keyword arguments of a backward (rows r0:r1), passed only when the entropy is differentiated."""
    return {} if grad_entropy is None else {"entropy": entropy[r0:r1], "grad_entropy": grad_entropy[r0:r1]}


def logits_forward(logits, labels, params: HeadParams, with_stats: bool):
    if logits.dtype == torch.float64:
        return torch_chunked.logits_forward(logits, labels, params, with_stats)
    rows.check_labels(labels, params.ignore_index, logits.shape[-1])
    return kernels.logits_forward(logits, labels, params, with_stats)


def logits_backward(
    logits, labels, lse, grad_logps, params: HeadParams, in_place=False, entropy=None, grad_entropy=None
):
    backend = _backend(logits)
    return backend.logits_backward(logits, labels, lse, grad_logps, params, in_place, **_entropy(entropy, grad_entropy))


def fused_bytes_per_logit(dtype: torch.dtype) -> int:
    """Bytes the single pass holds per logit: the GEMM output, turned into dz in place."""
    if dtype == torch.float64:
        return torch_chunked.fused_bytes_per_logit(dtype)
    return torch.finfo(dtype).bits // 8


def _tile_bytes(params: HeadParams) -> int:
    return torch_chunked.TILE_BYTES if params.tile_bytes is None else params.tile_bytes


def _logits(h_rows, weight, bias, c0: int = 0, c1: int | None = None):
    """(r, c) logits of r rows over vocab columns [c0, c1) in the inputs' dtype: one GEMM, written
    into rows padded to ROW_ALIGN elements."""
    w = weight[c0:c1]
    n_cols = w.shape[0]
    padded = -(-n_cols // ROW_ALIGN) * ROW_ALIGN
    out = h_rows.new_empty(h_rows.shape[0], padded)[:, :n_cols]
    if bias is None:
        return torch.mm(h_rows, w.T, out=out)
    return torch.addmm(bias[c0:c1], h_rows, w.T, out=out)


def linear_forward(hidden, weight, bias, labels, params: HeadParams, with_stats: bool):
    """(..., H), (V, H), (V,) or None, (...) -> logps (...), lse (2, ...), stats (4, ...) or None."""
    if hidden.dtype == torch.float64:
        return torch_chunked.linear_forward(hidden, weight, bias, labels, params, with_stats)
    n_vocab = weight.shape[0]
    pos = rows.valid_rows(labels, params.ignore_index, n_vocab)
    y, h = labels[pos], hidden[pos]
    n = y.numel()
    logps = h.new_empty(n, dtype=torch.float32)
    lse = h.new_empty(2, n, dtype=torch.float32)
    stats = h.new_empty(4, n, dtype=torch.float32) if with_stats else None
    rows_per_chunk = max(1, _tile_bytes(params) // (n_vocab * hidden.element_size()))
    for r0, r1 in spans(n, rows_per_chunk):
        chunk = kernels.logits_forward(_logits(h[r0:r1], weight, bias), y[r0:r1], params, with_stats)
        logps[r0:r1], lse[:, r0:r1] = chunk[0], chunk[1]
        if with_stats:
            stats[:, r0:r1] = chunk[2]
    return scatter_outputs(labels, pos, logps, lse, stats)


def backward_tiles(n_rows: int, n_vocab: int, itemsize: int, budget: int) -> tuple[int, int]:
    """(rows per block, columns per vocab slice) of the backward: slices as wide as the budget allows
    with all rows in one block (at least MIN_SLICE_COLS), then as many rows as fit."""
    cols = min(n_vocab, max(MIN_SLICE_COLS, budget // max(1, n_rows * itemsize)))
    return max(1, min(n_rows, budget // (cols * itemsize))), cols


def linear_backward(
    hidden, weight, bias, labels, lse, grad_logps, params: HeadParams, needs, entropy=None, grad_entropy=None
):
    """Gradients of Σ grad_logps·logps (+ Σ grad_entropy·entropy when given) w.r.t. (hidden, weight,
    bias); None where needs[i] is False."""
    if hidden.dtype == torch.float64:
        return torch_chunked.linear_backward(
            hidden, weight, bias, labels, lse, grad_logps, params, needs, entropy, grad_entropy
        )
    need_h, need_w, need_b = needs
    (n_vocab, n_hidden), dt = weight.shape, hidden.dtype
    pos = rows.valid_rows(labels, params.ignore_index, n_vocab)
    y, h, lse, g = labels[pos], hidden[pos], lse[(slice(None), *pos)].contiguous(), grad_logps[pos].float()
    if grad_entropy is not None:
        entropy, grad_entropy = entropy[pos].float(), grad_entropy[pos].float()
    n = y.numel()
    block, width = backward_tiles(n, n_vocab, hidden.element_size(), _tile_bytes(params))
    dh_acc = h.new_zeros(n, n_hidden, dtype=torch.float32) if need_h else None
    dw = (torch.empty_like if n else torch.zeros_like)(weight) if need_w else None
    db_acc = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
    # Each slice's targets as local columns; a target elsewhere is column `width` of the slice (never
    # a column), an ignored row (present under graph capture only) is -1, the slice's ignore_index.
    slice_params = dataclasses.replace(params, ignore_index=-1)
    ignored = y == params.ignore_index
    for c0, c1 in spans(n_vocab, width):
        y_local = torch.where(ignored, -1, torch.where((y >= c0) & (y < c1), y - c0, c1 - c0))
        dw_slice = h.new_zeros(c1 - c0, n_hidden, dtype=torch.float32) if need_w and block < n else None
        for r0, r1 in spans(n, block):
            z = _logits(h[r0:r1], weight, bias, c0, c1)
            ent = _entropy(entropy, grad_entropy, r0, r1)
            dz = kernels.logits_backward(z, y_local[r0:r1], lse[:, r0:r1], g[r0:r1], slice_params, True, **ent)
            if need_h:
                accumulate_matmul_(dh_acc[r0:r1], dz, weight[c0:c1])  # dh += dz · W[slice]
            if need_w and dw_slice is None:
                torch.mm(dz.T, h, out=dw[c0:c1])  # dW[slice] = dzᵀ · h: one GEMM over every row
            elif need_w:
                accumulate_matmul_(dw_slice, dz.T, h[r0:r1])
            if need_b:
                db_acc[c0:c1] += dz.sum(0, dtype=torch.float32)  # db = Σ_rows dz
        if dw_slice is not None:
            dw[c0:c1] = dw_slice
    dh = None
    if need_h:
        dh = torch.zeros_like(hidden)
        dh[pos] = dh_acc.to(dt)
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return dh, dw, db


def _carry_(dz, h_rows, weight, dw_acc, db_acc):
    """dW += dzᵀ·h and db += Σ dz into fp32 accumulators; returns dh = dz·W (r, H)."""
    if dw_acc is not None:
        accumulate_matmul_(dw_acc, dz.T, h_rows)
    if db_acc is not None:
        db_acc += dz.sum(0, dtype=torch.float32)
    return dz @ weight


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
