"""Triton backend.

Logits path: the row kernels of `fastpref.kernels.token_logps`.
Linear path (hidden x lm_head): valid rows only (`rows.valid_rows`: one host sync per call, in the
forward, none under CUDA-graph capture; the backward reuses the forward's positions).
Forward: per chunk of rows one GEMM (cuBLAS) makes the (rows, V) logits in the inputs' dtype, the
row kernels fold them into lse and log-probs; a chunk holds as many rows as TILE_BYTES allows
(512 MiB: 2,093 rows at V = 128,256 in bf16, so llama3-8b's ~5,200 valid rows read the weight 3
times, not 20). Backward: vocab slices outermost, SLICE_QUANTUM-multiples wide (as wide as the tile
allows, at most MAX_SLICE_COLS, and never so wide that a slice's fp32 dW would exceed the tile), the
last one taking the columns left over; the backward kernels get each slice in its padded rows (a
width divisible by 16), so for V ≥ 4,096 they compile one variant per dtype and flags whatever the
row count (a capture, which computes every position, meets none new). With every row in one block (up
to 16,384 bf16 rows in 512 MiB) each slice of dW = dzᵀ·h is one GEMM over all rows, written once
in the weight's dtype (no fp32 dW buffer, no read-modify-write of it per row chunk); the row
kernels turn each logits slice *in place* into dz using the forward's lse; dh = dz·W accumulates
over slices in fp32 (n, H).
Logits buffers without a bias have rows padded to a multiple of 16 elements, so that an odd
vocabulary (GPT-2's 50,257) keeps every row's loads aligned; with a bias the buffer is contiguous,
so that cuBLASLt adds the bias in the GEMM's epilogue (a padded output makes `addmm` first copy the
bias over the whole tile). No fp32 copy of a tile is made.
Memory (linear path, n valid rows, bf16): the tile (≤ TILE_BYTES), the compact hidden rows (n, H),
in the backward an fp32 dh accumulator (n, H) and dW itself in the weight's dtype.
float64 inputs (gradcheck, references) run the chunked PyTorch code: the kernels are fp32; so do
logits whose column offsets pass int32 (a vocab-strided view spanning 2^31 elements).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from fastpref.backends import rows, torch_chunked
from fastpref.backends.torch_chunked import accumulate_matmul_, scatter_outputs, spans
from fastpref.kernels import token_logps as kernels
from fastpref.params import HeadParams, selected

ROW_ALIGN = 16  # elements: logits rows padded to this, so 2-byte loads stay 32-byte aligned
TILE_BYTES = 512 << 20  # bytes of one (rows, cols) logits tile in the inputs' dtype (HeadParams.tile_bytes: None)
SLICE_QUANTUM = 4096  # the backward's vocab slices are multiples of this (the kernels' BLOCK_V): one variant
MAX_SLICE_COLS = 16384  # ... and at most this wide, but for the left-over columns the last slice takes


def _backend(logits: torch.Tensor):
    """The kernels, or the chunked code for float64 (the kernels are fp32) and for a vocab-strided
    view whose column offsets pass int32."""
    return torch_chunked if logits.dtype == torch.float64 or not kernels.columns_fit_int32(logits) else kernels


def _entropy(entropy, grad_entropy, r0: int = 0, r1: int | None = None) -> dict:
    """The entropy keyword arguments of a backward (rows r0:r1), passed only when the entropy is differentiated."""
    return {} if grad_entropy is None else {"entropy": entropy[r0:r1], "grad_entropy": grad_entropy[r0:r1]}


def logits_forward(logits, labels, params: HeadParams, stats: int):
    if _backend(logits) is torch_chunked:
        return torch_chunked.logits_forward(logits, labels, params, stats)
    rows.check_labels(labels, params.ignore_index, logits.shape[-1])
    return kernels.logits_forward(logits, labels, params, stats)


def logits_backward(
    logits, labels, lse, grad_logps, params: HeadParams, in_place=False, entropy=None, grad_entropy=None, pos=None
):
    """The kernels compute every row (ignored ones get zeros): no positions, no sync."""
    ent = _entropy(entropy, grad_entropy)
    if _backend(logits) is torch_chunked:
        return torch_chunked.logits_backward(logits, labels, lse, grad_logps, params, in_place, **ent, pos=pos)
    return kernels.logits_backward(logits, labels, lse, grad_logps, params, in_place, **ent)


def fused_bytes_per_logit(dtype: torch.dtype) -> int:
    """Bytes the single pass holds per logit: the GEMM output, turned into dz in place."""
    if dtype == torch.float64:
        return torch_chunked.fused_bytes_per_logit(dtype)
    return torch.finfo(dtype).bits // 8


def fused_chunk_rows(n_vocab: int, max_rows: int) -> int:
    """Rows of one pair chunk of the single pass: as many as the budget allows (fewer, larger GEMMs)."""
    return max_rows


def fused_dw_accumulator(weight: torch.Tensor) -> torch.Tensor:
    """Zeros that the single pass accumulates dW into: the weight's own dtype (fp32 for fp64 weights,
    run by the chunked code). Each pair chunk adds dzᵀ·h with one GEMM that accumulates in fp32 and
    rounds once (`addmm_`, beta = 1): one rounding per chunk, where an fp32 dW would cost twice the
    weight's size (2 GB at llama3-8b's head) plus a copy of it in the weight's dtype."""
    if weight.dtype == torch.float64:
        return torch_chunked.fused_dw_accumulator(weight)
    return torch.zeros_like(weight)


def _tile_bytes(params: HeadParams) -> int:
    return TILE_BYTES if params.tile_bytes is None else params.tile_bytes


def padded_width(n_cols: int, has_bias: bool) -> int:
    """Elements of one row of a logits buffer of n_cols columns (padded to ROW_ALIGN without a bias)."""
    return n_cols if has_bias else -(-n_cols // ROW_ALIGN) * ROW_ALIGN


def _logits(h_rows, weight, bias, c0: int = 0, c1: int | None = None):
    """(r, c) logits of r rows over vocab columns [c0, c1) in the inputs' dtype: one GEMM, written
    into rows padded to ROW_ALIGN elements, or, with a bias, contiguous (the bias in the epilogue)."""
    w = weight[c0:c1]
    if bias is not None:
        return torch.addmm(bias[c0:c1], h_rows, w.T)
    out = h_rows.new_empty(h_rows.shape[0], padded_width(w.shape[0], False))[:, : w.shape[0]]
    return torch.mm(h_rows, w.T, out=out)


def _backward_in_place(z, y, lse, g, params: HeadParams, **entropy) -> torch.Tensor:
    """The row kernels' backward of a (r, c) logits tile, in place; returns dz (r, c). A tile in padded
    rows is handed over whole, its padding zeroed (p = 2^(0 − M)/s there, written and never read):
    the kernels then see a width divisible by 16, one variant with vector loads and stores (an odd
    width compiles a variant that spills on sm_80), whatever the vocabulary."""
    width = padded_width(z.shape[1], False)
    if width == z.shape[1] or z.stride(0) != width:
        return kernels.logits_backward(z, y, lse, g, params, True, **entropy)
    padded = z.as_strided((z.shape[0], width), z.stride())
    padded[:, z.shape[1] :].zero_()
    return kernels.logits_backward(padded, y, lse, g, params, True, **entropy)[:, : z.shape[1]]


def forward_rows(n_vocab: int, itemsize: int, tile_bytes: int, has_bias: bool = False) -> int:
    """Rows of one forward chunk: as many (padded) logits rows as the tile holds, at least one."""
    return max(1, tile_bytes // (padded_width(n_vocab, has_bias) * itemsize))


def linear_forward(hidden, weight, bias, labels, params: HeadParams, stats: int, pos=None):
    """(..., H), (V, H), (V,) or None, (...) -> logps (...), lse (2, ...), the selected stats (k, ...) or
    None. pos: the valid positions when the caller has them (no sync)."""
    if hidden.dtype == torch.float64:
        return torch_chunked.linear_forward(hidden, weight, bias, labels, params, stats, pos=pos)
    n_vocab = weight.shape[0]
    pos = rows.valid_rows(labels, params.ignore_index, n_vocab) if pos is None else pos
    y, h = labels[pos], hidden[pos]
    n = y.numel()
    logps = h.new_empty(n, dtype=torch.float32)
    lse = h.new_empty(2, n, dtype=torch.float32)
    out_stats = h.new_empty(len(selected(stats)), n, dtype=torch.float32) if stats else None
    rows_per_chunk = forward_rows(n_vocab, hidden.element_size(), _tile_bytes(params), bias is not None)
    for r0, r1 in spans(n, rows_per_chunk):
        chunk = kernels.logits_forward(_logits(h[r0:r1], weight, bias), y[r0:r1], params, stats)
        logps[r0:r1], lse[:, r0:r1] = chunk[0], chunk[1]
        if stats:
            out_stats[:, r0:r1] = chunk[2]
    return scatter_outputs(labels, pos, logps, lse, out_stats)


def slice_width(n_hidden: int, budget: int) -> int:
    """Columns of the backward's vocab slices (but the last): a multiple of SLICE_QUANTUM, at most
    MAX_SLICE_COLS, and one whose fp32 dW slice (cols, H) fits the budget. Independent of the row
    count, so that the kernels' variants are too."""
    return max(SLICE_QUANTUM, min(MAX_SLICE_COLS, budget // (4 * n_hidden)) // SLICE_QUANTUM * SLICE_QUANTUM)


def vocab_slices(n_vocab: int, width: int) -> list[tuple[int, int]]:
    """Spans of `width` columns; the last takes the columns short of a SLICE_QUANTUM left over, so
    every slice but the last is a multiple of SLICE_QUANTUM and the last is its own fixed width."""
    body = max(SLICE_QUANTUM, n_vocab - n_vocab % SLICE_QUANTUM)
    slices = [(c0, min(c0 + width, body)) for c0 in range(0, min(body, n_vocab), width)]
    slices[-1] = (slices[-1][0], n_vocab)
    return slices


def backward_tiles(n_rows: int, n_vocab: int, n_hidden: int, itemsize: int, budget: int) -> tuple[int, list]:
    """(rows per block, vocab slices) of the backward: every row in one block where the widest slice's
    (padded) logits fit the budget, else as many rows as fit."""
    slices = vocab_slices(n_vocab, slice_width(n_hidden, budget))
    widest = max(padded_width(c1 - c0, False) for c0, c1 in slices)
    return max(1, min(n_rows, budget // (widest * itemsize))), slices


def linear_backward(
    hidden, weight, bias, labels, lse, grad_logps, params: HeadParams, needs, entropy=None, grad_entropy=None, pos=None
):
    """Gradients of Σ grad_logps·logps (+ Σ grad_entropy·entropy when given) w.r.t. (hidden, weight,
    bias); None where needs[i] is False. pos: the forward's valid positions (no sync), else counted again."""
    if hidden.dtype == torch.float64:
        return torch_chunked.linear_backward(
            hidden, weight, bias, labels, lse, grad_logps, params, needs, entropy, grad_entropy, pos=pos
        )
    need_h, need_w, need_b = needs
    (n_vocab, n_hidden), dt = weight.shape, hidden.dtype
    pos = rows.valid_rows(labels, params.ignore_index, n_vocab) if pos is None else pos
    y, h, lse, g = labels[pos], hidden[pos], lse[(slice(None), *pos)].contiguous(), grad_logps[pos].float()
    if grad_entropy is not None:
        entropy, grad_entropy = entropy[pos].float(), grad_entropy[pos].float()
    n = y.numel()
    block, slices = backward_tiles(n, n_vocab, n_hidden, hidden.element_size(), _tile_bytes(params))
    dh_acc = h.new_zeros(n, n_hidden, dtype=torch.float32) if need_h else None
    dw = (torch.empty_like if n else torch.zeros_like)(weight) if need_w else None
    db_acc = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
    # Each slice's targets as local columns; a target elsewhere is a column past the slice's padded
    # width (never a column), an ignored row (present under graph capture only) is -1, the slice's
    # ignore_index.
    slice_params = dataclasses.replace(params, ignore_index=-1)
    ignored = y == params.ignore_index
    for c0, c1 in slices:
        elsewhere = padded_width(c1 - c0, False)
        y_local = torch.where(ignored, -1, torch.where((y >= c0) & (y < c1), y - c0, elsewhere))
        dw_slice = h.new_zeros(c1 - c0, n_hidden, dtype=torch.float32) if need_w and block < n else None
        for r0, r1 in spans(n, block):
            z = _logits(h[r0:r1], weight, bias, c0, c1)
            ent = _entropy(entropy, grad_entropy, r0, r1)
            dz = _backward_in_place(z, y_local[r0:r1], lse[:, r0:r1], g[r0:r1], slice_params, **ent)
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
    """dW += dzᵀ·h into dw_acc (one GEMM), db += Σ dz into fp32; returns dh = dz·W (r, H)."""
    if dw_acc is not None:
        accumulate_matmul_(dw_acc, dz.T, h_rows)
    if db_acc is not None:
        db_acc += dz.sum(0, dtype=torch.float32)
    return dz @ weight


def linear_rows_fused(h_rows, weight, bias, y, params: HeadParams, token_grads: Callable, dw_acc, db_acc, stats: int):
    """One pass over the (r, V) logits of r rows: GEMM, row kernels forward (with the selected
    statistics), the loss step (token_grads), row kernels backward in place, two GEMMs. As
    torch_chunked.linear_rows_fused: returns (dh_rows, stats (k, r) or None)."""
    if h_rows.dtype == torch.float64:
        return torch_chunked.linear_rows_fused(h_rows, weight, bias, y, params, token_grads, dw_acc, db_acc, stats)
    z = _logits(h_rows, weight, bias)
    logps, lse, out_stats = kernels.logits_forward(z, y, params, stats)
    g = token_grads(logps, out_stats)
    dz = _backward_in_place(z, y, lse, g.float(), params)
    return _carry_(dz, h_rows, weight, dw_acc, db_acc), out_stats
