"""Per-token log-probs from logits (..., V): forward and backward Triton kernels and launchers.

Math, in base 2 (2^x is one MUFU.EX2 instruction; log2(e) is folded into one scale constant A):
  u(r) = A·r,            A = logit_scale·log2(e)/T                                  (no softcap)
  u(r) = A·tanh(K·r),    A = softcap·log2(e)/T,  K = logit_scale/softcap            (softcap)
  so z = u·ln 2 is the model's final logit, softcap·tanh(logit_scale·r/softcap)/T, from the raw
  logit r. u increases with r: the running max is taken on the raw logits, M = u(max r), and each
  exponent x = u(r) − M is one fma, so z − lse keeps fp32 precision at logits of ±1e4.
- forward, one program per BLOCK_ROWS rows (one row for a large vocabulary): one read of each row,
  BLOCK_V columns per step, full blocks unmasked and one masked tail; per column lane the running
  Σ 2^x, rescaled by 2^(M_old − M) when the block max grows; the target logit by one clamped scalar
  load. logp = (u(r_y) − M − log2 s)·ln 2. lse is kept as (M, log2 s). Optional statistics from the
  same read, each selected by a constexpr bit and absent from the compiled code when not selected:
  entropy (a per-lane Σ 2^x·x), is-argmax (the max of the blocks before the target's), mean logit (Σ u),
  log Σp² (Σ 2^(2x)).
- backward, one program per BLOCK_ROWS rows: one read and one write of each row, p = 2^x/s (1/s
  folded into the row's constants), dz = dz'/dr·(g·(onehot(y) − p) − g_H·p·(log p + H)) (the
  entropy term only when its gradient is given); the onehot term is one scalar store per row after
  the loop. Ignored rows are written as zeros without being read (with several rows per program,
  read and zeroed). A label of V or more is a target in another vocab slice: no onehot term.
Offsets: rows in int64, columns in int32 (callers check `columns_fit_int32`).
Memory: lse (2N floats) besides the outputs; nothing of size N×V but the gradient.
Traffic: forward N·V·bytes read; backward N·V·bytes read + N·V·bytes written; ~6 instructions per
logit (one 2^x): bandwidth bound, so the measure is GB/s against a device copy (bench/), and the compile gate
counts the SASS instructions of each loop (bench/results/kernels_compile.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastpref.kernels import config
from fastpref.kernels.launch import launch
from fastpref.params import HeadParams, selected

NEG = tl.constexpr(-1e30)  # a finite "minus infinity": tl.where evaluates both branches, and -inf - -inf is NaN
LN2 = tl.constexpr(math.log(2.0))
LOG2E = math.log2(math.e)
_INTERPRETING = tl.constexpr(config.INTERPRETING)


@triton.jit
def _exp2(x):
    """2^x: one MUFU.EX2 on the GPU (flushing results below 2^-126 to 0, which no sum here notices);
    numpy in the interpreter, the argument capped where fp32 overflows so that numpy does not warn."""
    if _INTERPRETING:
        return tl.exp2(tl.minimum(x, 127.0))
    else:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], tl.float32, True, 1)


@triton.jit
def _reciprocal(x):
    """1/x: one MUFU.RCP on the GPU (1/inf = 0), where Triton's division adds a range check."""
    if _INTERPRETING:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], tl.float32, True, 1)


@triton.jit
def _tanh(r, tanh_scale):
    """tanh(K·r) with tanh_scale = 2·log2(e)·K: 1 − 2/(1 + e^(2Kr))."""
    return tl.fma(-2.0, _reciprocal(1.0 + _exp2(r * tanh_scale)), 1.0)


@triton.jit
def _f(r, tanh_scale, HAS_SOFTCAP: tl.constexpr):
    """u(r)/A: tanh(K·r) with a softcap, else r."""
    if HAS_SOFTCAP:
        return _tanh(r, tanh_scale)
    else:
        return r


@triton.jit
def _rows(n_rows, BLOCK_ROWS: tl.constexpr):
    """This program's rows, clamped into range (a duplicate read is harmless), and which are real."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    return tl.minimum(rows, n_rows - 1), rows < n_rows


@triton.jit
def _row_offsets(rows, T, stride_b, stride_t):
    """Offsets of rows = b·T + t of a (B, T, ·) view, in int64 (128k vocab × 16k tokens overflows int32)."""
    b = rows // T
    t = rows - b * T
    return b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t


@triton.jit
def _fold(r, in_row, m, new_m, s, p_dot_x, s2, f_sum, scale, tanh_scale, HAS_SOFTCAP: tl.constexpr,
          STATS: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """One block of raw logits r (BLOCK_ROWS, BLOCK_V) into the per-lane sums, re-based from M = m
    to M = new_m; MASKED: only the in_row lanes count. STATS selects the statistics' sums (bits of
    fastpref.params: 1 entropy, 4 mean logit, 8 log Σp²; is-argmax needs none)."""
    f = _f(r, tanh_scale, HAS_SOFTCAP)
    x = tl.fma(f, scale, -new_m[:, None])
    e = _exp2(x)
    if MASKED:
        e = tl.where(in_row, e, 0.0)
    shift = (m - new_m)[:, None]  # ≤ 0
    rescale = _exp2(shift)
    if STATS & 1:
        # old terms re-based on M': Σ 2^(x+shift)·(x + shift) = rescale·(Σ 2^x·x + shift·Σ 2^x)
        # (x = −inf where r = −inf, a masked column: its 2^x·x is 0, not NaN)
        p_dot_x = tl.fma(tl.fma(shift, s, p_dot_x), rescale, e * tl.maximum(x, NEG))
    if STATS & 4:
        f_sum += f  # a masked lane loaded r = 0, and f(0) = 0
    if STATS & 8:
        s2 = tl.fma(s2, rescale * rescale, e * e)
    s = tl.fma(s, rescale, e)
    return s, p_dot_x, s2, f_sum


@triton.jit(do_not_specialize=["n_rows", "T", "label_stride_b", "label_stride_t"])
def _forward_kernel(
    logits_ptr, stride_b, stride_t, stride_v,
    labels_ptr, label_stride_b, label_stride_t,
    logps_ptr, lse_ptr, stats_ptr,
    n_rows, T, V, ignore_index, scale, tanh_scale,
    HAS_SOFTCAP: tl.constexpr, STATS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # one program per BLOCK_ROWS token rows; STATS: the selected statistics (fastpref.params bits)
    rows, real = _rows(n_rows, BLOCK_ROWS)
    label = tl.load(labels_ptr + _row_offsets(rows, T, label_stride_b, label_stride_t))
    valid = real & (label != ignore_index)
    target_col = tl.minimum(tl.maximum(label, 0), V - 1).to(tl.int32)
    row_ptr = logits_ptr + _row_offsets(rows, T, stride_b, stride_t)
    base = row_ptr[:, None]
    cols = tl.arange(0, BLOCK_V)[None, :]
    max_r = tl.full([BLOCK_ROWS], NEG, tl.float32)  # running max of the raw logits
    m = scale * _f(max_r, tanh_scale, HAS_SOFTCAP)  # M = u(max_r)
    s = tl.zeros([BLOCK_ROWS, BLOCK_V], tl.float32)  # per lane Σ 2^(u − M)
    p_dot_x = tl.zeros([BLOCK_ROWS, BLOCK_V], tl.float32)  # per lane Σ 2^x·x, x = u − M (entropy)
    s2 = tl.zeros([BLOCK_ROWS, BLOCK_V], tl.float32)  # per lane Σ 2^(2x) (log Σp²)
    f_sum = tl.zeros([BLOCK_ROWS, BLOCK_V], tl.float32)  # per lane Σ u/A (mean logit)
    max_before = tl.full([BLOCK_ROWS], NEG, tl.float32)  # max of the blocks before the target's
    target_block = (target_col // BLOCK_V) * BLOCK_V
    full_end = (V // BLOCK_V) * BLOCK_V
    if tl.max(valid.to(tl.int32), 0) > 0:  # a program of ignored rows reads nothing
        for start in range(0, full_end, BLOCK_V):
            r = tl.load(base + (start + cols) * stride_v).to(tl.float32)
            if STATS & 2:
                max_before = tl.where(target_block == start, max_r, max_before)
            new_max = tl.maximum(max_r, tl.max(r, 1))
            new_m = scale * _f(new_max, tanh_scale, HAS_SOFTCAP)
            s, p_dot_x, s2, f_sum = _fold(
                r, cols, m, new_m, s, p_dot_x, s2, f_sum, scale, tanh_scale, HAS_SOFTCAP, STATS, False
            )
            max_r, m = new_max, new_m
        if full_end < V:  # the masked tail
            in_row = full_end + cols < V
            r = tl.load(base + (full_end + cols) * stride_v, mask=in_row, other=0.0).to(tl.float32)
            if STATS & 2:
                max_before = tl.where(target_block == full_end, max_r, max_before)
            new_max = tl.maximum(max_r, tl.max(tl.where(in_row, r, NEG), 1))
            new_m = scale * _f(new_max, tanh_scale, HAS_SOFTCAP)
            s, p_dot_x, s2, f_sum = _fold(
                r, in_row, m, new_m, s, p_dot_x, s2, f_sum, scale, tanh_scale, HAS_SOFTCAP, STATS, True
            )
            max_r, m = new_max, new_m
    total = tl.sum(s, 1)
    log2_s = tl.log2(tl.where(total > 0, total, 1.0))
    r_target = tl.load(row_ptr + target_col * stride_v, mask=valid, other=0.0).to(tl.float32)
    x_target = tl.fma(_f(r_target, tanh_scale, HAS_SOFTCAP), scale, -m)
    rows_out = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    tl.store(logps_ptr + rows_out, tl.where(valid, (x_target - log2_s) * LN2, 0.0), mask=real)
    tl.store(lse_ptr + rows_out, m, mask=real)
    tl.store(lse_ptr + n_rows + rows_out, log2_s, mask=real)
    # the selected statistics, one row of stats each, in STAT_NAMES order
    out_ptr = stats_ptr + rows_out
    if STATS & 1:
        entropy = (log2_s - tl.sum(p_dot_x, 1) / tl.where(total > 0, total, 1.0)) * LN2
        tl.store(out_ptr, tl.where(valid, entropy, 0.0), mask=real)
        out_ptr += n_rows
    if STATS & 2:
        # the target is the first argmax: no larger column, and none as large before it
        prefix = target_block[:, None] + cols
        before = valid[:, None] & (prefix < target_col[:, None])
        r_prefix = tl.load(base + prefix * stride_v, mask=before, other=0.0).to(tl.float32)
        max_before = tl.maximum(max_before, tl.max(tl.where(before, r_prefix, NEG), 1))
        is_top1 = valid & (r_target >= max_r) & (r_target > max_before)
        tl.store(out_ptr, tl.where(is_top1, 1.0, 0.0), mask=real)
        out_ptr += n_rows
    if STATS & 4:
        mean_z = tl.sum(f_sum, 1) * (scale * LN2 / V)
        tl.store(out_ptr, tl.where(valid, mean_z, 0.0), mask=real)
        out_ptr += n_rows
    if STATS & 8:
        log_sum_sq = (tl.log2(tl.where(valid, tl.sum(s2, 1), 1.0)) - 2 * log2_s) * LN2
        tl.store(out_ptr, tl.where(valid, log_sum_sq, 0.0), mask=real)


@triton.jit
def _grad(r, m, k0, k1, scale, tanh_scale, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr):
    """dz of raw logits r, without the target's onehot term. With x = u(r) − M, p = 2^x/s:
    dz = 2^x·(k0 + k1·x)·f'(r), the row's k0, k1 holding g, g_H, H, 1/s and dz'/dr = logit_scale/T
    (f' = 1 − tanh² with a softcap, else 1)."""
    f = _f(r, tanh_scale, HAS_SOFTCAP)
    x = tl.fma(f, scale, -m)
    if HAS_ENTROPY_GRAD:
        # dH/dz'_j = −p_j·(log p_j + H)   (2^x·x is 0, not NaN, where r = −inf)
        dz = _exp2(x) * tl.fma(k1, tl.maximum(x, NEG), k0)
    else:
        # d log p_y/dz'_j = onehot − p_j
        dz = _exp2(x) * k0
    if HAS_SOFTCAP:
        # dz'/dr = (1 − tanh²(K·r))·logit_scale/T
        dz = dz * tl.fma(-f, f, 1.0)
    return dz


@triton.jit(do_not_specialize=["n_rows", "T", "label_stride_b", "label_stride_t"])
def _backward_kernel(
    logits_ptr, stride_b, stride_t, stride_v,
    grad_ptr, grad_stride_b, grad_stride_t, grad_stride_v,
    labels_ptr, label_stride_b, label_stride_t,
    lse_ptr, grad_logps_ptr, entropy_ptr, grad_entropy_ptr,
    n_rows, T, V, ignore_index, scale, tanh_scale, dz_scale,
    HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # one program per BLOCK_ROWS token rows; grad may alias logits (in-place mode): each element is
    # read before it is written, the target's logit before the loop
    rows, real = _rows(n_rows, BLOCK_ROWS)
    label = tl.load(labels_ptr + _row_offsets(rows, T, label_stride_b, label_stride_t))
    valid = real & (label != ignore_index)
    target_col = tl.minimum(tl.maximum(label, 0), V - 1).to(tl.int32)
    row_ptr = logits_ptr + _row_offsets(rows, T, stride_b, stride_t)
    out_ptr = grad_ptr + _row_offsets(rows, T, grad_stride_b, grad_stride_t)
    rows_out = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_V)[None, :]
    full_end = (V // BLOCK_V) * BLOCK_V
    if tl.max(valid.to(tl.int32), 0) > 0:
        m = tl.load(lse_ptr + rows_out, mask=real, other=0.0)[:, None]
        log2_s = tl.load(lse_ptr + n_rows + rows_out, mask=real, other=0.0)
        g = tl.load(grad_logps_ptr + rows_out, mask=valid, other=0.0)
        # dz'_j = −p_j·(g + g_H·(H + ln p_j)) (+ g at the target), ln p_j = (x_j − log2 s)·ln 2
        k0 = -g
        k1 = tl.zeros_like(g)
        if HAS_ENTROPY_GRAD:
            g_h = tl.load(grad_entropy_ptr + rows_out, mask=valid, other=0.0)
            k0 -= g_h * (tl.load(entropy_ptr + rows_out, mask=valid, other=0.0) - log2_s * LN2)
            k1 = -g_h * LN2
        row_factor = dz_scale * _exp2(-log2_s)  # dz'/dr / s
        k0 = (k0 * row_factor)[:, None]
        k1 = (k1 * row_factor)[:, None]
        r_target = tl.load(row_ptr + target_col * stride_v, mask=valid, other=0.0).to(tl.float32)
        for start in range(0, full_end, BLOCK_V):
            r = tl.load(row_ptr[:, None] + (start + cols) * stride_v).to(tl.float32)
            dz = _grad(r, m, k0, k1, scale, tanh_scale, HAS_SOFTCAP, HAS_ENTROPY_GRAD)
            if BLOCK_ROWS > 1:  # ignored rows were read, their gradient is 0; rows past the end are not written
                dz = tl.where(valid[:, None], dz, 0.0)
                tl.store(out_ptr[:, None] + (start + cols) * grad_stride_v, dz.to(grad_ptr.dtype.element_ty),
                         mask=real[:, None])  # fmt: skip
            else:
                tl.store(out_ptr[:, None] + (start + cols) * grad_stride_v, dz.to(grad_ptr.dtype.element_ty))
        if full_end < V:
            in_row = real[:, None] & (full_end + cols < V)
            r = tl.load(row_ptr[:, None] + (full_end + cols) * stride_v, mask=in_row, other=0.0).to(tl.float32)
            r = tl.where(in_row, r, NEG)  # p = 0 past the row's end
            dz = _grad(r, m, k0, k1, scale, tanh_scale, HAS_SOFTCAP, HAS_ENTROPY_GRAD)
            dz = tl.where(valid[:, None], dz, 0.0)
            tl.store(out_ptr[:, None] + (full_end + cols) * grad_stride_v, dz.to(grad_ptr.dtype.element_ty),
                     mask=in_row)  # fmt: skip
        # the onehot term: the target column gets g·dz'/dr more
        dz_target = _grad(r_target[:, None], m, k0, k1, scale, tanh_scale, HAS_SOFTCAP, HAS_ENTROPY_GRAD)
        f_target = _f(r_target, tanh_scale, HAS_SOFTCAP)
        if HAS_SOFTCAP:
            onehot = g * dz_scale * tl.fma(-f_target, f_target, 1.0)
        else:
            onehot = g * dz_scale
        tl.debug_barrier()  # every thread's store of the target column lands before this one
        dz_target = tl.reshape(dz_target, [BLOCK_ROWS]) + onehot
        # (a label past the last column is a target in another vocab slice: the linear backward's slices)
        has_target = valid & (label >= 0) & (label < V)
        tl.store(out_ptr + target_col * grad_stride_v, dz_target.to(grad_ptr.dtype.element_ty), mask=has_target)
    else:  # only ignored rows: zeros, nothing read
        for start in range(0, V, BLOCK_V):
            in_row = real[:, None] & (start + cols < V)
            zeros = tl.zeros([BLOCK_ROWS, BLOCK_V], grad_ptr.dtype.element_ty)
            tl.store(out_ptr[:, None] + (start + cols) * grad_stride_v, zeros, mask=in_row)


def _rows_view(t: torch.Tensor, n_lead: int) -> torch.Tensor:
    """t with its n_lead leading dims as exactly two (B, T); a view where the strides allow, else a copy.
    One leading dim becomes (1, N) with both strides the rows' own: Triton then sees the row stride's
    divisibility (16 for the linear path's padded rows: vector loads), not the row width's."""
    if n_lead == 0:
        return t.reshape(1, 1, *t.shape)
    if n_lead == 1:
        return t.as_strided((1, *t.shape), (t.stride(0), *t.stride()))
    return t.reshape(math.prod(t.shape[: n_lead - 1]), *t.shape[n_lead - 1 :])


def columns_fit_int32(t: torch.Tensor) -> bool:
    """Whether the column offsets of t's rows, (V − 1)·stride_v, fit int32, as the kernels compute them
    (int32 keeps the inner loops short; rows are offset in int64). A vocab-strided view spanning 2^31
    elements or more does not: the backend runs the chunked PyTorch code on it."""
    return (t.shape[-1] - 1) * abs(t.stride(-1)) < 2**31


def _shares_memory(view: torch.Tensor, t: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()


def _scales(params: HeadParams) -> tuple[float, float, float]:
    """(A, 2·log2(e)·K, dz'/dr without the tanh factor) of the module docstring."""
    scale, temperature, softcap = params.logit_scale, params.temperature, params.softcap
    if scale <= 0:
        raise ValueError(f"logit_scale must be > 0 (the kernels take the max of the raw logits), got {scale}")
    if softcap is None:
        return scale * LOG2E / temperature, 1.0, scale / temperature
    return softcap * LOG2E / temperature, 2 * LOG2E * scale / softcap, scale / temperature


def logits_forward(logits, labels, params: HeadParams, stats: int):
    """(..., V), (...) -> logps (...), lse (2, ...) as (M, log2 Σ 2^(u − M)) in the kernels' base-2
    units, and the statistics the selector `stats` selects (k, ...) in STAT_NAMES order, or None."""
    n_lead = labels.dim()
    logits3 = _rows_view(logits, n_lead)
    labels2 = _rows_view(labels.unsqueeze(-1), n_lead).squeeze(-1)
    n_rows, T, V = labels.numel(), logits3.shape[1], logits3.shape[2]
    logps = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    lse = torch.empty((2, *labels.shape), dtype=torch.float32, device=logits.device)
    n_stats = len(selected(stats))
    out_stats = torch.empty((n_stats, *labels.shape), dtype=torch.float32, device=logits.device) if stats else None
    if n_rows:
        cfg = config.row_config(V, stats != 0)
        scale, tanh_scale, _ = _scales(params)
        launch(
            _forward_kernel, (triton.cdiv(n_rows, cfg.block_rows),),
            logits3, logits3.stride(0), logits3.stride(1), logits3.stride(2),
            labels2, labels2.stride(0), labels2.stride(1),
            logps, lse, logps if out_stats is None else out_stats,
            n_rows, T, V, params.ignore_index, scale, tanh_scale,
            num_warps=cfg.num_warps, HAS_SOFTCAP=params.softcap is not None, STATS=stats,
            BLOCK_ROWS=cfg.block_rows, BLOCK_V=cfg.block_v,
        )  # fmt: skip
    return logps, lse, out_stats


def logits_backward(
    logits, labels, lse, grad_logps, params: HeadParams, in_place: bool = False, entropy=None, grad_entropy=None
) -> torch.Tensor:
    """Gradient of Σ grad_logps·logps (+ Σ grad_entropy·entropy, given the forward's entropy) w.r.t.
    the logits: (..., V) in the logits' dtype; written into the logits' own storage when in_place
    (the caller promises not to reuse them). lse as logits_forward returns it; entropy, grad_entropy (...)."""
    if (entropy is None) != (grad_entropy is None):
        raise ValueError("entropy and grad_entropy must be given together")
    n_lead = labels.dim()
    logits3 = _rows_view(logits, n_lead)
    grad = logits if in_place else torch.empty_like(logits)
    if not _shares_memory(logits3, logits):
        # leading dims no view can merge: the reshape made a copy, which is ours to turn into the
        # gradient in place; it goes to its destination after
        grad3 = logits3
    else:
        grad3 = _rows_view(grad, n_lead)
        if not _shares_memory(grad3, grad):
            grad3 = torch.empty(grad3.shape, dtype=grad.dtype, device=grad.device)
    labels2 = _rows_view(labels.unsqueeze(-1), n_lead).squeeze(-1)
    n_rows, T, V = labels.numel(), logits3.shape[1], logits3.shape[2]
    if n_rows:
        cfg = config.row_config(V)
        scale, tanh_scale, dz_scale = _scales(params)
        g = grad_logps.reshape(-1).float().contiguous()
        has_entropy = grad_entropy is not None
        launch(
            _backward_kernel, (triton.cdiv(n_rows, cfg.block_rows),),
            logits3, logits3.stride(0), logits3.stride(1), logits3.stride(2),
            grad3, grad3.stride(0), grad3.stride(1), grad3.stride(2),
            labels2, labels2.stride(0), labels2.stride(1),
            lse.reshape(2, -1).contiguous(), g,
            entropy.reshape(-1).float().contiguous() if has_entropy else g,
            grad_entropy.reshape(-1).float().contiguous() if has_entropy else g,
            n_rows, T, V, params.ignore_index, scale, tanh_scale, dz_scale,
            num_warps=cfg.num_warps, HAS_SOFTCAP=params.softcap is not None, HAS_ENTROPY_GRAD=has_entropy,
            BLOCK_ROWS=cfg.block_rows, BLOCK_V=cfg.block_v,
        )  # fmt: skip
    if not _shares_memory(grad3, grad):
        grad.copy_(grad3.reshape(grad.shape))
    return grad
