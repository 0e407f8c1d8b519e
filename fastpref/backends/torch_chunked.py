"""Pure-PyTorch chunked log-prob head: any device, bounded memory.

Algorithm. Only valid positions (label != ignore_index) are touched; they are gathered into a
compact list of n rows. Rows x vocabulary is walked in tiles of (rows, cols): each tile of logits
is materialised in fp32 (read from the logits, or computed as hidden_rows @ weight_colsᵀ + bias on
the linear path), softcapped and tempered, folded into a running logsumexp, and dropped.
Forward keeps lse per token as the pair (max, log Σ exp(z − max)), never added up, so z − lse keeps
fp32 precision at logits of ±1e4 (and, when asked, the running sums behind entropy, mean logit
and log Σp²). Backward walks the same tiles again and turns each
into  dz = g · (onehot(y) − softmax(z)) · dz/draw,  which is written out (logits path) or
multiplied into dh = dz·W and dW = dzᵀ·h (linear path).

Memory: one fp32 tile of at most TILE_BYTES plus ~2 temporaries of its size on the logits path. The
linear path holds one tile of LINEAR_TILE_BYTES at a time (each is dropped before the next is
computed; without a softcap or an entropy gradient all its updates are in place) and its hidden rows;
the forward also the compact hidden rows (n, H); the backward, besides the gradients themselves, nothing else of note in fp32 (dh and dW are
accumulated in place), and for half dtypes an fp32 dh accumulator (n, H) and one vocab chunk's fp32
dW (cols, H). Nothing of size (N, V) except the logits gradient the logits path returns.
FLOPs (linear path): forward 2·n·H·V, backward 6·n·H·V, n counting valid tokens only.
The fused pass (`linear_rows_fused`) holds one (rows, V) tile and does 6·n·H·V in all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.torch_version import TorchVersion

from fastpref.backends.rows import valid_rows
from fastpref.params import ENTROPY, IS_TOP1, LOG_SUM_SQ_PROBS, MEAN_LOGIT, HeadParams, selected

TILE_BYTES = 64 << 20  # fp32 bytes of one logits tile
LINEAR_TILE_BYTES = 16 << 20  # the linear path's tile: its GEMMs run within 7% of a 64 MB tile's speed, in a CPU's L3
VOCAB_CHUNK = 8192  # columns of one tile: keeps the GEMM's packed weight chunk small


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are fp32, or fp64 for fp64 inputs (so gradcheck sees exact math)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_bytes_per_logit(dtype: torch.dtype) -> int:
    """Bytes the single pass may hold per logit, a bound: the GEMM output in the input dtype plus three
    compute-dtype tiles (z cast from a half dtype, a softcap's slope, the half copy of the gradient)."""
    return torch.finfo(dtype).bits // 8 + 3 * torch.finfo(compute_dtype(dtype)).bits // 8


def fused_chunk_rows(n_vocab: int, max_rows: int) -> int:
    """Rows of one pair chunk of the single pass, at most max_rows (the budget's): about a linear tile's
    worth; a pair larger than that is a chunk of its own. On a CPU one pair per chunk is as fast as three
    (a chunk's GEMMs are large enough either way) and holds a third of the memory."""
    return min(max_rows, max(1, LINEAR_TILE_BYTES // (4 * n_vocab)))


def fused_dw_accumulator(weight: torch.Tensor) -> torch.Tensor:
    """Zeros that the single pass accumulates dW into: the compute dtype here (rounding each pair
    chunk's product to bf16 would bias the gradient)."""
    return torch.zeros_like(weight, dtype=compute_dtype(weight.dtype))


def rows_per_tile(n_cols: int, dtype: torch.dtype, params: HeadParams, default_bytes: int | None = None) -> int:
    """How many rows of n_cols compute-dtype values fit in one tile (at least one): params.tile_bytes,
    else default_bytes, else TILE_BYTES."""
    itemsize = torch.finfo(compute_dtype(dtype)).bits // 8
    budget = params.tile_bytes if params.tile_bytes is not None else default_bytes or TILE_BYTES
    return max(1, budget // (n_cols * itemsize))


def spans(total: int, step: int):
    for start in range(0, total, step):
        yield start, min(start + step, total)


def _transform_(z: torch.Tensor, params: HeadParams) -> torch.Tensor:
    """z <- logit_scale·z, then softcap·tanh(z/softcap), then z/temperature; in place on a tile."""
    if params.softcap is not None:
        z.mul_(params.logit_scale / params.softcap).tanh_().mul_(params.softcap)
    elif params.logit_scale != 1.0:
        z.mul_(params.logit_scale)
    if params.temperature != 1.0:
        z.div_(params.temperature)
    return z


def _raw_slope(params: HeadParams) -> float:
    """dz'/draw without a softcap: logit_scale / temperature."""
    return params.logit_scale / params.temperature


def _softmax_grad_(z, y_local, lse, g, params: HeadParams, entropy=None, g_entropy=None) -> torch.Tensor:
    """Turn a transformed tile z (r, c) in place into d(Σ g·logp + Σ g_entropy·H)/d(raw logits).

    y_local (r,): target column within the tile (outside [0, c) when the target is elsewhere);
    lse (2, r): the rows' (max, log Σ exp(z − max)); entropy, g_entropy (r,) or None.
    """
    if params.softcap is not None:
        # d z'/d raw = scale·(1 − tanh²)/T, and tanh = z'·T/c is read back from the transformed tile.
        tanh = z * (params.temperature / params.softcap)
        slope = tanh.square_().neg_().add_(1.0).mul_(_raw_slope(params))
    log_p = z.sub_(lse[0][:, None]).sub_(lse[1][:, None])
    if g_entropy is None:
        # dz' = g · (onehot(y) − p)
        dz = log_p.exp_().mul_(-g[:, None])
    else:
        # dz' = g · (onehot(y) − p) − g_H · p ⊙ (log p + H)
        p = log_p.exp()
        dz = log_p.add_(entropy[:, None]).mul_(g_entropy[:, None]).add_(g[:, None]).mul_(p).neg_()
    hit = (y_local >= 0) & (y_local < z.shape[1])
    dz.scatter_add_(1, y_local.clamp(0, z.shape[1] - 1)[:, None], torch.where(hit, g, 0.0)[:, None])
    if params.softcap is not None:
        dz.mul_(slope)
    elif _raw_slope(params) != 1.0:
        dz.mul_(_raw_slope(params))
    return dz


def _share(log_part: torch.Tensor, log_total: torch.Tensor) -> torch.Tensor:
    """exp(log_part − log_total): a part's share of a sum, 0 while the sum is still empty (−inf)."""
    return torch.where(log_total > float("-inf"), torch.exp(log_part - log_total), 0.0)


def _exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in the operands' dtype, also when a caller's autocast region would cast it to half (the ops run
    inside the caller's autocast: the tiles' statistics and fp32 gradients must stay fp32)."""
    with torch.autocast(a.device.type, enabled=False):
        return a @ b


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(r, c), (r, c) -> (r,): Σ_j a_ij·b_ij as r batched GEMVs, without an (r, c) product."""
    return _exact_matmul(a[:, None, :], b[:, :, None]).view(-1)


EXP_BLOCK_BYTES = 1 << 20  # rows of a tile exponentiated at once when x is needed beside exp(x): stays in cache


def _exp_(x: torch.Tensor, with_x_dot: bool) -> torch.Tensor | None:
    """x (r, c) <- exp(x) in place. with_x_dot: also returns Σ_j exp(x_j)·x_j (r,) (the entropy's sum; a −inf x
    adds 0), made a block of rows at a time, so that the temporary holding exp beside x stays small (a fresh
    tile-sized one costs its page faults on every call)."""
    if not with_x_dot:
        x.exp_()
        return None
    x_dot = x.new_empty(x.shape[0])
    lowest = torch.finfo(x.dtype).min
    for r0, r1 in spans(x.shape[0], max(1, EXP_BLOCK_BYTES // (x.shape[1] * x.element_size()))):
        block = x[r0:r1]
        exp = block.exp()
        x_dot[r0:r1] = _row_dot(exp, block.clamp_(min=lowest))
        block.copy_(exp)
    return x_dot


def _max_and_sums(z: torch.Tensor, y: torch.Tensor, stats: int):
    """What a tile z (r, c) gives before it is shifted: its row max (r,), and where the selector `stats` asks,
    whether each row's first maximum (as torch.argmax) sits at column y (r,) bool, and Σ z (r,); else None."""
    if stats & IS_TOP1:
        row_max, argmax = z.max(1)
        return row_max, argmax == y, z.sum(1) if stats & MEAN_LOGIT else None
    return z.amax(1), None, z.sum(1) if stats & MEAN_LOGIT else None


class _RowFold:
    """Running log-sum-exp (and the statistics a selector asks for) of r rows seen one vocab chunk at a time.

    The log-sum-exp is kept as (max, log Σ exp(z − max)) and never added up, so that
    z − lse keeps fp32 precision for logits of ±1e4; the statistics are kept relative to max too.
    """

    def __init__(self, n_cols: int, stats: int):
        self.n_cols = n_cols
        self.stats_wanted = stats
        self.max = None  # (r,) running max; None before the first chunk

    def add(self, z: torch.Tensor, y_local: torch.Tensor) -> None:
        """Fold a transformed tile z (r, c), consumed in place, whose targets sit at y_local (r,)."""
        want = self.stats_wanted
        hit = (y_local >= 0) & (y_local < z.shape[1])
        picked = z.gather(1, y_local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
        # A chunk that is −inf throughout (a constrained-decoding mask) is empty: its max is clamped
        # to the lowest finite value, so that every shift below stays finite and its sum is 0.
        lowest = torch.finfo(z.dtype).min
        chunk_max, top_here, chunk_z_sum = _max_and_sums(z, y_local, want)
        chunk_max = chunk_max.clamp_(min=lowest)
        exp = z.sub_(chunk_max[:, None])
        p_dot_z = _exp_(exp, with_x_dot=bool(want & ENTROPY))  # Σ softmax·(z − max) · Σ exp, with the entropy
        chunk_sum = exp.sum(1)
        # row-wise dot products (batched GEMVs): no tile-sized temporary
        chunk_log_sum2 = _row_dot(exp, exp).log() if want & LOG_SUM_SQ_PROBS else None  # log Σ exp(2(z − max))
        chunk_p_dot_z = None
        if want & ENTROPY:  # an empty chunk (Σ exp = 0) adds 0
            chunk_p_dot_z = torch.where(chunk_sum > 0, p_dot_z / chunk_sum, 0.0)
        chunk_log_sum = chunk_sum.log()
        if self.max is None:
            self.max, self.log_sum = chunk_max, chunk_log_sum
            self.target = torch.where(hit, picked, 0.0)
            self.p_dot_z, self.log_sum2, self.z_sum = chunk_p_dot_z, chunk_log_sum2, chunk_z_sum
            if want & IS_TOP1:
                self.top_is_target = top_here
            return
        self.target = torch.where(hit, picked, self.target)
        new_max = torch.maximum(self.max, chunk_max)
        old_shift, chunk_shift = self.max - new_max, chunk_max - new_max
        old, chunk = self.log_sum + old_shift, chunk_log_sum + chunk_shift
        new_log_sum = torch.logaddexp(old, chunk)
        if want & ENTROPY:
            self.p_dot_z = _share(old, new_log_sum) * (self.p_dot_z + old_shift) + _share(chunk, new_log_sum) * (
                chunk_p_dot_z + chunk_shift
            )
        if want & LOG_SUM_SQ_PROBS:
            self.log_sum2 = torch.logaddexp(self.log_sum2 + 2 * old_shift, chunk_log_sum2 + 2 * chunk_shift)
        if want & MEAN_LOGIT:
            self.z_sum = self.z_sum + chunk_z_sum
        if want & IS_TOP1:
            # a later chunk's maximum is the first maximum only when strictly greater
            self.top_is_target = torch.where(chunk_max > self.max, top_here, self.top_is_target)
        self.max, self.log_sum = new_max, new_log_sum

    def logps(self) -> torch.Tensor:
        return (self.target - self.max) - self.log_sum

    def stats(self) -> torch.Tensor:
        """(k, r): the selected statistics in STAT_NAMES order: entropy, is_top1 (0/1: the first argmax
        is the target, as torch.argmax), mean logit, log Σp²."""
        want, rows = self.stats_wanted, []
        if want & ENTROPY:
            rows.append(self.log_sum - self.p_dot_z)
        if want & IS_TOP1:
            rows.append((self.top_is_target & (self.target >= self.max)).to(self.max.dtype))
        if want & MEAN_LOGIT:
            rows.append(self.z_sum / self.n_cols)
        if want & LOG_SUM_SQ_PROBS:
            rows.append(self.log_sum2 - 2 * self.log_sum)
        return torch.stack(rows)


def _fold_forward(tile: Callable, y, n_cols, like, params, stats: int, tile_bytes=None):
    """Walk rows x cols tiles given by tile(r0, r1, c0, c1) -> raw tile in the compute dtype, of
    tile_bytes (None: TILE_BYTES) unless params say; return compact logps (n,), lse (2, n) and the
    selected statistics (k, n) or None."""
    n = y.numel()
    cols = min(n_cols, VOCAB_CHUNK)
    logps, lse = like.new_empty(n), like.new_empty(2, n)
    out_stats = like.new_empty(len(selected(stats)), n) if stats else None
    for r0, r1 in spans(n, rows_per_tile(cols, like.dtype, params, tile_bytes)):
        fold = _RowFold(n_cols, stats)
        for c0, c1 in spans(n_cols, cols):
            fold.add(_transform_(tile(r0, r1, c0, c1), params), y[r0:r1] - c0)
        logps[r0:r1], lse[0, r0:r1], lse[1, r0:r1] = fold.logps(), fold.max, fold.log_sum
        if stats:
            out_stats[:, r0:r1] = fold.stats()
    return logps, lse, out_stats


def scatter_outputs(labels, pos, logps, lse, stats):
    """Compact results -> full-shape logps (...), lse (2, ...), stats (k, ...) or None; zeros elsewhere.
    The positions ride on lse (`lse.valid_positions`), so that the op's backward needs no sync."""
    full_logps = logps.new_zeros(labels.shape)
    full_logps[pos] = logps
    full_lse = lse.new_zeros((2, *labels.shape))
    full_lse[(slice(None), *pos)] = lse
    full_lse.valid_positions = pos
    full_stats = None
    if stats is not None:
        full_stats = stats.new_zeros((stats.shape[0], *labels.shape))
        full_stats[(slice(None), *pos)] = stats
    return full_logps, full_lse, full_stats


# ----------------------------------------------------------------------------- logits path


def logits_forward(logits, labels, params: HeadParams, stats: int, pos=None):
    """(..., V), (...) -> logps (...), lse (2, ...) as (max, log Σ exp(z − max)), the statistics the
    selector `stats` selects (k, ...) or None; fp32 (fp64 for fp64 inputs). pos: the valid positions
    (rows.valid_rows) when known."""
    pos = valid_rows(labels, params.ignore_index, logits.shape[-1]) if pos is None else pos
    y = labels[pos]
    cdt = compute_dtype(logits.dtype)
    like = logits.new_empty(0, dtype=cdt)

    def tile(r0, r1, c0, c1):
        return logits[(*(p[r0:r1] for p in pos), slice(c0, c1))].to(cdt)

    return scatter_outputs(labels, pos, *_fold_forward(tile, y, logits.shape[-1], like, params, stats))


def _entropy_terms(pos, entropy, grad_entropy, cdt):
    """The compact (n,) entropy and its upstream gradient, or (None, None) when H is not differentiated."""
    if grad_entropy is None:
        return None, None
    return entropy[pos].to(cdt), grad_entropy[pos].to(cdt)


def logits_backward(
    logits, labels, lse, grad_logps, params: HeadParams, in_place: bool = False, entropy=None, grad_entropy=None,
    pos=None,
) -> torch.Tensor:
    """Gradient of Σ grad_logps·logps (+ Σ grad_entropy·entropy when given) w.r.t. logits: (..., V) in
    the logits' dtype, zero rows at ignored positions; written into the logits' own storage when in_place.
    pos: the forward's valid positions (no sync), else counted again."""
    pos = valid_rows(labels, params.ignore_index, logits.shape[-1]) if pos is None else pos
    y, lse, g = labels[pos], lse[(slice(None), *pos)], grad_logps[pos]
    cdt = compute_dtype(logits.dtype)
    g = g.to(cdt)
    ent, g_ent = _entropy_terms(pos, entropy, grad_entropy, cdt)
    if in_place:
        grad = logits
        grad.masked_fill_((labels == params.ignore_index)[..., None], 0)  # (a boolean index would sync)
    else:
        grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    n, n_cols = y.numel(), logits.shape[-1]
    cols = min(n_cols, VOCAB_CHUNK)
    for r0, r1 in spans(n, rows_per_tile(cols, logits.dtype, params)):
        rows = tuple(p[r0:r1] for p in pos)
        for c0, c1 in spans(n_cols, cols):
            z = _transform_(logits[(*rows, slice(c0, c1))].to(cdt), params)
            dz = _softmax_grad_(z, y[r0:r1] - c0, lse[:, r0:r1], g[r0:r1], params, *_rows(ent, g_ent, r0, r1))
            grad[(*rows, slice(c0, c1))] = dz.to(logits.dtype)
    return grad


# ----------------------------------------------------------------------------- linear path


def _linear_tile(h_rows, weight, bias, c0, c1, cdt):
    """Raw logits tile h_rows @ weight[c0:c1]ᵀ (+ bias[c0:c1]) in the compute dtype: (r, c)."""
    w = weight[c0:c1]
    z = h_rows @ w.T if bias is None else torch.addmm(bias[c0:c1], h_rows, w.T)
    return z.to(cdt)


# torch >= 2.10 lets a CUDA GEMM of half-precision operands accumulate into an fp32 output
# (`addmm(..., out_dtype=torch.float32)`); older versions refuse an fp32 `self` with bf16 operands.
GEMM_OUT_DTYPE = TorchVersion(torch.__version__) >= "2.10"


def accumulate_matmul_(acc, a, b) -> None:
    """acc += a @ b in acc's (compute) dtype. Half-precision products are never rounded to half
    before the sum (rounding each chunk's product to bf16 biases the gradient: TRL saw entropy
    drift): on CUDA with torch >= 2.10 the GEMM writes fp32 directly; elsewhere the operands are
    upcast (an fp32 copy of both, the price of older torch)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and GEMM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def linear_forward(hidden, weight, bias, labels, params: HeadParams, stats: int, pos=None):
    """(..., H), (V, H), (V,) or None, (...) -> logps (...), lse (2, ...), selected stats (k, ...) or None."""
    pos = valid_rows(labels, params.ignore_index, weight.shape[0]) if pos is None else pos
    y, h = labels[pos], hidden[pos]
    cdt = compute_dtype(hidden.dtype)
    like = hidden.new_empty(0, dtype=cdt)

    def tile(r0, r1, c0, c1):
        return _linear_tile(h[r0:r1], weight, bias, c0, c1, cdt)

    folded = _fold_forward(tile, y, weight.shape[0], like, params, stats, LINEAR_TILE_BYTES)
    return scatter_outputs(labels, pos, *folded)


def _rows(entropy, grad_entropy, r0, r1):
    """Rows r0:r1 of the entropy terms (both None when H is not differentiated)."""
    return (None, None) if grad_entropy is None else (entropy[r0:r1], grad_entropy[r0:r1])


def linear_backward(
    hidden, weight, bias, labels, lse, grad_logps, params: HeadParams, needs, entropy=None, grad_entropy=None, pos=None
):
    """Gradients of Σ grad_logps·logps (+ Σ grad_entropy·entropy when given) w.r.t. (hidden, weight,
    bias); None where needs[i] is False. pos: the forward's valid positions (no sync), else counted again.

    Vocab chunks outermost, so one chunk's dW is accumulated in the compute dtype and written once.
    Each row tile's hidden rows are gathered when it is computed; in the compute dtype its dh is added
    straight into dh, in a half dtype into one compact compute-dtype accumulator (n, H) (rounding a
    chunk's partial dh to half would bias it). Each tile is dropped before the next one is computed:
    one tile alive at a time.
    """
    need_h, need_w, need_b = needs
    pos = valid_rows(labels, params.ignore_index, weight.shape[0]) if pos is None else pos
    y, lse = labels[pos], lse[(slice(None), *pos)]
    cdt, dt = compute_dtype(hidden.dtype), hidden.dtype
    g = grad_logps[pos].to(cdt)
    ent, g_ent = _entropy_terms(pos, entropy, grad_entropy, cdt)
    n, (n_vocab, n_hidden) = y.numel(), weight.shape
    cols = min(n_vocab, VOCAB_CHUNK)
    rows = rows_per_tile(cols, dt, params, LINEAR_TILE_BYTES)
    dh = torch.zeros_like(hidden) if need_h else None
    dh_acc = None
    if need_h and dt != cdt:
        dh_acc = hidden.new_zeros(n, n_hidden, dtype=cdt)
    dw = torch.zeros_like(weight) if need_w else None
    db = torch.zeros_like(bias) if need_b else None
    for c0, c1 in spans(n_vocab, cols):
        # one vocab chunk's dW, accumulated in the compute dtype (in dW itself when it has that dtype)
        dw_acc = (dw[c0:c1] if dw.dtype == cdt else weight.new_zeros(c1 - c0, n_hidden, dtype=cdt)) if need_w else None
        for r0, r1 in spans(n, rows):
            row_pos = tuple(p[r0:r1] for p in pos)
            h_rows = hidden[row_pos]
            z = _transform_(_linear_tile(h_rows, weight, bias, c0, c1, cdt), params)
            dz = _softmax_grad_(z, y[r0:r1] - c0, lse[:, r0:r1], g[r0:r1], params, *_rows(ent, g_ent, r0, r1))
            del z
            if need_h and dh_acc is None:
                dh.index_put_(row_pos, _exact_matmul(dz, weight[c0:c1]), accumulate=True)  # dh = dz · W
            elif need_h:
                accumulate_matmul_(dh_acc[r0:r1], dz.to(dt), weight[c0:c1])
            if need_w:
                accumulate_matmul_(dw_acc, dz.T.to(dt), h_rows)  # dW = dzᵀ · h
            if need_b:
                db[c0:c1] += dz.sum(0).to(db.dtype)  # db = Σ_rows dz
            del dz, h_rows
        if need_w and dw_acc.dtype != dw.dtype:
            dw[c0:c1] = dw_acc
    if dh_acc is not None:
        dh[pos] = dh_acc.to(dt)
    return dh, dw, db


def linear_rows_fused(h_rows, weight, bias, y, params: HeadParams, token_grads: Callable, dw_acc, db_acc, stats: int):
    """One pass over the logits of r rows, held whole as one (r, V) tile: 3 GEMMs.

    h_rows (r, H), y (r,) valid targets. token_grads(logps (r,), stats (k, r) or None) returns the
    upstream gradient g (r,) of each token's log-prob (the loss step of a pair chunk); stats are the
    statistics the selector `stats` asks for, from the same tile. Accumulates dW into dw_acc (V, H) and
    db into db_acc (V,) when they are not None; returns dh_rows (r, H) in the compute dtype and the stats.
    """
    cdt, dt = compute_dtype(h_rows.dtype), h_rows.dtype
    z = _transform_(_linear_tile(h_rows, weight, bias, 0, weight.shape[0], cdt), params)
    slope = None  # dz'/draw per logit under a softcap, read from the transformed tile before it is overwritten
    if params.softcap is not None:
        slope = (z * (params.temperature / params.softcap)).square_().neg_().add_(1.0).mul_(_raw_slope(params))
    row_max, top1, z_sum = _max_and_sums(z, y, stats)
    picked = z.gather(1, y[:, None]).squeeze(1) - row_max
    # the tile becomes exp(z − max) in place, then the gradient: no second tile (the softmax is exp / Σ exp)
    probs = z.sub_(row_max[:, None])
    p_dot_z = _exp_(probs, with_x_dot=bool(stats & ENTROPY))
    total = probs.sum(1)
    log_sum = total.log()
    logps = picked - log_sum
    rows = [log_sum - p_dot_z / total] if stats & ENTROPY else []
    rows += [] if top1 is None else [top1.to(z.dtype)]
    rows += [] if z_sum is None else [z_sum / z.shape[1]]
    if stats & LOG_SUM_SQ_PROBS:
        rows.append(_row_dot(probs, probs).log() - 2 * log_sum)
    out_stats = torch.stack(rows) if rows else None
    g = token_grads(logps, out_stats).to(cdt)
    dz = probs.mul_((-g / total)[:, None])  # dz' = g · (onehot(y) − p)
    dz.scatter_add_(1, y[:, None], g[:, None])
    if slope is not None:
        dz.mul_(slope)
    elif _raw_slope(params) != 1.0:
        dz.mul_(_raw_slope(params))
    dz = dz.to(dt)
    if dw_acc is not None:
        accumulate_matmul_(dw_acc, dz.T, h_rows)  # dW += dzᵀ · h
    if db_acc is not None:
        db_acc += dz.sum(0)  # db += Σ_rows dz
    return dz @ weight, out_stats  # dh = dz · W
