"""Per-token log-probs from logits (..., V): forward and backward Triton kernels and launchers.

Algorithm, one program per token row:
- forward: one read of the row in BLOCK_V chunks; z <- softcap·tanh(z/softcap), then z <- z/T;
  online max m and s = Σ exp(z − m), rescaled when m grows; the target logit z_y.
  logp = (z_y − m) − log s. lse is kept as the pair (m, log s): z − lse keeps fp32 precision at
  logits of ±1e4. Optional statistics from the same read (entropy, is-argmax, mean logit,
  log Σp²). Ignored rows (label == ignore_index) are not read.
- backward: one read and one write of the row: dz = g·(onehot(y) − exp(z − m − log s))·dz/draw,
  in the logits' dtype (or into the logits' own storage: in-place mode); ignored rows are written
  as zeros without being read.
Memory: lse (2N floats) besides the outputs; nothing of size N×V but the gradient.
Traffic: forward N·V·bytes read; backward N·V·bytes read + N·V·bytes written. ~10 flops per logit:
bandwidth bound, so the measure is GB/s against a device copy (bench/).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastpref.kernels.config import block_v_for
from fastpref.params import HeadParams

NEG = tl.constexpr(-1e30)  # a finite "minus infinity": tl.where evaluates both branches, and -inf - -inf is NaN


@triton.jit
def _tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _transform(raw, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """z <- softcap·tanh(z/softcap), then z <- z/T."""
    z = raw
    if HAS_SOFTCAP:
        z = softcap * _tanh(raw / softcap)
    return z * inv_temperature


@triton.jit
def _row_base(row, T, stride_b, stride_t):
    """Offset of row = b·T + t of a (B, T, V) view, in int64 (128k vocab × 16k tokens overflows int32)."""
    b = row // T
    t = row - b * T
    return b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t


@triton.jit
def _forward_kernel(
    logits_ptr, stride_b, stride_t, stride_v,
    labels_ptr, label_stride_b, label_stride_t,
    logps_ptr, lse_ptr, stats_ptr,
    n_rows, T, V, ignore_index, softcap, inv_temperature,
    HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # one program per token row
    row = tl.program_id(0)
    label = tl.load(labels_ptr + _row_base(row, T, label_stride_b, label_stride_t)).to(tl.int32)
    valid = label != ignore_index
    base = logits_ptr + _row_base(row, T, stride_b, stride_t)
    m = NEG
    s = 0.0
    target = 0.0
    p_dot_z = 0.0  # Σ exp(z − m)·(z − m)
    s2 = 0.0  # Σ exp(2(z − m))
    z_sum = 0.0
    max_before = NEG  # max over the columns before the target: is_top1 means argmax (first) == label
    if valid:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            raw = tl.load(base + cols.to(tl.int64) * stride_v, mask=in_row, other=0.0).to(tl.float32)
            z = tl.where(in_row, _transform(raw, softcap, inv_temperature, HAS_SOFTCAP), NEG)
            new_m = tl.maximum(m, tl.max(z, 0))
            rescale = tl.exp(m - new_m)
            e = tl.exp(z - new_m)
            if WITH_STATS:
                # old terms re-based on m': e^(m−m')·(Σ e^(z−m)(z−m) + (m − m')·Σ e^(z−m))
                p_dot_z = rescale * (p_dot_z + (m - new_m) * s) + tl.sum(e * (z - new_m), 0)
                s2 = s2 * rescale * rescale + tl.sum(e * e, 0)
                z_sum += tl.sum(tl.where(in_row, z, 0.0), 0)
                max_before = tl.maximum(max_before, tl.max(tl.where(cols < label, z, NEG), 0))
            s = s * rescale + tl.sum(e, 0)
            target += tl.sum(tl.where(cols == label, z, 0.0), 0)
            m = new_m
    log_s = tl.log(tl.where(valid, s, 1.0))
    tl.store(logps_ptr + row, tl.where(valid, (target - m) - log_s, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, m, 0.0))
    tl.store(lse_ptr + n_rows + row, log_s)
    if WITH_STATS:
        safe_s = tl.where(valid, s, 1.0)
        tl.store(stats_ptr + row, tl.where(valid, log_s - p_dot_z / safe_s, 0.0))
        tl.store(stats_ptr + n_rows + row, tl.where(valid & (target >= m) & (target > max_before), 1.0, 0.0))
        tl.store(stats_ptr + 2 * n_rows + row, tl.where(valid, z_sum / V, 0.0))
        tl.store(stats_ptr + 3 * n_rows + row, tl.where(valid, tl.log(tl.where(valid, s2, 1.0)) - 2 * log_s, 0.0))


@triton.jit
def _backward_kernel(
    logits_ptr, stride_b, stride_t, stride_v,
    grad_ptr, grad_stride_b, grad_stride_t, grad_stride_v,
    labels_ptr, label_stride_b, label_stride_t,
    lse_ptr, g_ptr,
    n_rows, T, V, ignore_index, softcap, inv_temperature,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # one program per token row; grad may alias logits (in-place mode): each element is read before written
    row = tl.program_id(0)
    label = tl.load(labels_ptr + _row_base(row, T, label_stride_b, label_stride_t)).to(tl.int32)
    valid = label != ignore_index
    base = logits_ptr + _row_base(row, T, stride_b, stride_t)
    out = grad_ptr + _row_base(row, T, grad_stride_b, grad_stride_t)
    g = tl.load(g_ptr + row).to(tl.float32)
    m = tl.load(lse_ptr + row)
    log_s = tl.load(lse_ptr + n_rows + row)
    read_limit = tl.where(valid, V, 0)  # an ignored row reads nothing
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        raw = tl.load(base + cols.to(tl.int64) * stride_v, mask=cols < read_limit, other=0.0).to(tl.float32)
        z = tl.where(cols < read_limit, _transform(raw, softcap, inv_temperature, HAS_SOFTCAP), NEG)
        # dz' = g·(onehot(y) − softmax(z'))
        dz = g * (tl.where(cols == label, 1.0, 0.0) - tl.exp(z - m - log_s))
        if HAS_SOFTCAP:
            # dz'/draw = (1 − tanh²(raw/c)) / T
            tanh = _tanh(raw / softcap)
            dz = dz * (1.0 - tanh * tanh) * inv_temperature
        else:
            dz = dz * inv_temperature
        dz = tl.where(valid, dz, 0.0)
        tl.store(out + cols.to(tl.int64) * grad_stride_v, dz.to(grad_ptr.dtype.element_ty), mask=in_row)


def _rows_view(t: torch.Tensor, n_lead: int) -> torch.Tensor:
    """t with its n_lead leading dims as exactly two (B, T); a view where the strides allow."""
    if n_lead == 0:
        return t.reshape(1, 1, *t.shape)
    if n_lead == 1:
        return t.unsqueeze(1)
    return t.reshape(math.prod(t.shape[: n_lead - 1]), *t.shape[n_lead - 1 :])


def _lead_strides(t3: torch.Tensor):
    return t3.stride(0), t3.stride(1)


def logits_forward(logits, labels, params: HeadParams, with_stats: bool):
    """(..., V), (...) -> logps (...), lse (2, ...) as (max, log Σ exp(z − max)), stats (4, ...) or None."""
    n_lead = labels.dim()
    logits3 = _rows_view(logits, n_lead)
    labels2 = _rows_view(labels.unsqueeze(-1), n_lead).squeeze(-1)
    n_rows, T, V = labels.numel(), logits3.shape[1], logits3.shape[2]
    logps = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    lse = torch.empty((2, *labels.shape), dtype=torch.float32, device=logits.device)
    stats = torch.empty((4, *labels.shape), dtype=torch.float32, device=logits.device) if with_stats else None
    if n_rows:
        _forward_kernel[(n_rows,)](
            logits3, *_lead_strides(logits3), logits3.stride(2),
            labels2, *_lead_strides(labels2),
            logps, lse, logps if stats is None else stats,
            n_rows, T, V, params.ignore_index, params.softcap or 1.0, 1.0 / params.temperature,
            HAS_SOFTCAP=params.softcap is not None, WITH_STATS=with_stats, BLOCK_V=block_v_for(V),
        )  # fmt: skip
    return logps, lse, stats


def logits_backward(logits, labels, lse, grad_logps, params: HeadParams, in_place: bool = False) -> torch.Tensor:
    """Gradient of Σ grad_logps·logps w.r.t. logits, (..., V) in the logits' dtype; written into
    the logits' own storage when in_place (the caller promises not to reuse them)."""
    n_lead = labels.dim()
    grad = logits if in_place else torch.empty_like(logits)
    logits3, grad3 = _rows_view(logits, n_lead), _rows_view(grad, n_lead)
    labels2 = _rows_view(labels.unsqueeze(-1), n_lead).squeeze(-1)
    n_rows, T, V = labels.numel(), logits3.shape[1], logits3.shape[2]
    if n_rows:
        _backward_kernel[(n_rows,)](
            logits3, *_lead_strides(logits3), logits3.stride(2),
            grad3, *_lead_strides(grad3), grad3.stride(2),
            labels2, *_lead_strides(labels2),
            lse.reshape(2, -1).contiguous(), grad_logps.reshape(-1).contiguous(),
            n_rows, T, V, params.ignore_index, params.softcap or 1.0, 1.0 / params.temperature,
            HAS_SOFTCAP=params.softcap is not None, BLOCK_V=block_v_for(V),
        )  # fmt: skip
    return grad
