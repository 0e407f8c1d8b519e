"""DPO-family loss straight from hidden states: hidden x lm_head -> sequence log-probs -> loss, as one
torch.library custom op (`fastpref::linear_dpo_loss`) with a fake implementation: torch.compile(fullgraph=True)
traces a step through it, and its planning (the host sync, the label and pair-index checks) happens inside
its kernel, where Dynamo does not look. Its non-tensor options pass through the schema as scalars and
strings (`op_options`).

The op computes the loss's gradients w.r.t. hidden, weight, bias and the reference log-probs in its forward,
and returns them as extra outputs; its backward only scales them by the loss's upstream gradient, in place
but for float64 (no second dW; a second backward through retain_graph=True raises), and is not
itself differentiable (create_graph=True raises). Without gradients (evaluation, `no_grad`,
`inference_mode`) it runs the two passes' forward alone: one GEMM.

Both passes also return the per-token statistics the caller asks for (TRL's metrics), from their own pass
over the logits.

Single pass, for losses that decompose over pairs (every loss_type but aot and aot_unpaired, and
sft under WPO weighting). Pairs are grouped into chunks whose logits fit `memory_budget` (on the
chunked backend about one linear tile's worth, at least one pair: as fast on a CPU, less memory). For a
chunk, one (rows, V) logits tile of its valid tokens is held: lse, token log-probs and the statistics
asked for (and WPO's log Σp²) -> the chunk's sequence log-probs -> each pair's loss (`fastpref.losses`,
the very code `dpo_loss` runs) -> its gradient w.r.t. every token log-prob -> dz in place -> dh, dW, db.
3 GEMMs, 6·n·H·V flops,
n the valid tokens. Memory (`single_pass_buffers`): one chunk's tile (≤ memory_budget), the chunk's
hidden rows and their dh (rows, H), and the gradients themselves: dh like hidden, dW (V, H) in the
weight's dtype on the Triton backend (each chunk's dzᵀ·h accumulates in fp32 inside the GEMM and is
added to dW once: one rounding per chunk, and chunks are as large as the budget allows), in fp32 on
the chunked backend.

Two passes, for batch-coupled losses, or when one pair's logits exceed memory_budget: the backend's
`linear_forward` (token log-probs; no second sync: the plan's count is passed on), the loss and its
gradient w.r.t. each token log-prob, then the backend's recomputing `linear_backward` at once, in tiles
of ≤ memory_budget bytes on the Triton backend, which holds nothing but the tile, its linear tile
(≤ memory_budget / 4) on the chunked one (8·n·H·V flops, working set ≈ the tile; dh and dW are held
from the forward on, as in the single pass).

Host syncs: one per call (`plan`), in the forward; none in the backward, none under CUDA-graph capture.
The loss's gradient w.r.t. the token log-probs is taken with autograd inside the op's kernel, which runs
below autograd: `_autograd_inside_op` lets autograd back in there, for detached leaves only.
"""

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor
from torch._C import DispatchKey

from fastpref.backends import backend_for, rows, torch_chunked, triton_backend
from fastpref.backends.torch_chunked import compute_dtype
from fastpref.losses import PreferenceOutput, dpo_pair_losses, is_batch_coupled, ld_token_weights, wpo_weights
from fastpref.params import LOG_SUM_SQ_PROBS, HeadParams, selected, stat_row

@dataclass(frozen=True)
class DPOParams:
    """Everything but the inputs: the head, the loss options (bco_delta may be a 0-dim tensor), and the
    memory budget in bytes."""

    head: HeadParams
    memory_budget: int
    loss_options: dict = field(default_factory=dict)  # keyword arguments of dpo_pair_losses
    ld_alpha: float | None = None
    use_weighting: bool = False
    stats: int = 0  # the per-token statistics the caller asked for (fastpref.params selector)

    @property
    def pass_stats(self) -> int:
        """The statistics the pass computes: the caller's, and log Σp² for WPO's weights."""
        return self.stats | (LOG_SUM_SQ_PROBS if self.use_weighting else 0)


def pair_losses(tok_c, tok_r, lss_c, lss_r, lab_c, lab_r, ref_c, ref_r, params: DPOParams, batch_totals=(None, None)):
    """Per-pair losses from dense per-token log-probs.

    tok_* (b, T) token log-probs (0 at ignored positions), lss_* (b, T) log Σp² (None unless
    params.use_weighting),
    lab_* (b, T) labels, ref_* (b,) or None; batch_totals = (chosen tokens, pairs) of the whole
    batch when these b pairs are a chunk of it (sft's token mean) -> (losses, chosen_rewards,
    rejected_rewards, chosen_logps, rejected_logps), each (b,).
    """
    ignore = params.head.ignore_index
    mask_c, mask_r = lab_c != ignore, lab_r != ignore
    if params.ld_alpha is None:
        weights_c, weights_r = mask_c.to(tok_c.dtype), mask_r.to(tok_r.dtype)
    else:
        weights = ld_token_weights(torch.cat([lab_c, lab_r]), params.ld_alpha, ignore_index=ignore, dtype=tok_c.dtype)
        weights_c, weights_r = weights.chunk(2)
    logps_c, logps_r = (tok_c * weights_c).sum(-1), (tok_r * weights_r).sum(-1)
    pair_weights = None
    if params.use_weighting:
        pair_weights = wpo_weights(
            torch.cat([tok_c, tok_r]), torch.cat([lss_c, lss_r]), torch.cat([mask_c, mask_r])
        )
    losses, rewards_c, rewards_r = dpo_pair_losses(
        logps_c,
        logps_r,
        ref_c,
        ref_r,
        chosen_lengths=mask_c.sum(-1),
        rejected_lengths=mask_r.sum(-1),
        pair_weights=pair_weights,
        batch_chosen_tokens=batch_totals[0],
        batch_pairs=batch_totals[1],
        **params.loss_options,
    )
    return losses, rewards_c, rewards_r, logps_c.detach(), logps_r.detach()


def _names(loss_type) -> tuple[str, ...]:
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def _slice(t, p0, p1):
    return None if t is None else t[p0:p1]


def _pair_chunks(rows_per_pair: list[int], max_rows: int):
    """Greedy spans of consecutive pairs whose rows add up to at most max_rows."""
    start, rows = 0, 0
    for i, r in enumerate(rows_per_pair):
        if rows + r > max_rows and i > start:
            yield start, i
            start, rows = i, 0
        rows += r
    if start < len(rows_per_pair):
        yield start, len(rows_per_pair)


def fused_rows_budget(hidden: torch.Tensor, n_vocab: int, memory_budget: int) -> int:
    """How many token rows of (rows, V) logits the single pass may hold within memory_budget, as the
    backend that runs holds them."""
    return memory_budget // (n_vocab * backend_for(hidden).fused_bytes_per_logit(hidden.dtype))


ROW_BYTES = 96  # per row of a chunk: its indices, label, log-prob, lse, statistics and upstream gradient
POSITION_BYTES = 64  # per position of a chunk's sequences: labels, the sort behind the positions, dense log-probs


def single_pass_buffers(
    hidden_shape: tuple[int, ...], n_vocab: int, dtype: torch.dtype, rows_per_pair: list[int], memory_budget: int,
    has_bias: bool = False,
) -> dict[str, int]:  # fmt: skip
    """Bytes each buffer of the single pass holds beyond its inputs, on the Triton backend, at its peak
    (inside the largest pair chunk; the backward scales them in place and adds nothing):
    hidden_shape (M, T, H), dtype the inputs' (and weight's), rows_per_pair the valid rows of each pair."""
    *lead, n_hidden = hidden_shape
    n_positions, itemsize = lead[-1], torch.finfo(dtype).bits // 8
    max_rows = memory_budget // (n_vocab * triton_backend.fused_bytes_per_logit(dtype))
    chunks = list(_pair_chunks(rows_per_pair, max_rows))
    rows = max(sum(rows_per_pair[p0:p1]) for p0, p1 in chunks)
    pairs = max(p1 - p0 for p0, p1 in chunks)
    buffers = {
        "dh (like hidden)": math.prod(hidden_shape) * itemsize,
        "dW (V, H), the weight's dtype": n_vocab * n_hidden * itemsize,
        "db (V,), fp32": 4 * n_vocab if has_bias else 0,
        "logits tile (rows, V padded), turned into dz in place": (
            rows * triton_backend.padded_width(n_vocab, has_bias) * itemsize
        ),
        "the chunk's hidden rows (rows, H)": rows * n_hidden * itemsize,
        "the chunk's dh rows (rows, H)": rows * n_hidden * itemsize,
        "per-row and per-position vectors": rows * ROW_BYTES + 2 * pairs * n_positions * POSITION_BYTES,
        "per-pair outputs and reference gradients": 7 * 4 * len(rows_per_pair),
    }
    return buffers


@dataclass(frozen=True)
class Plan:
    """What the passes need from the host: valid rows per pair (B ints) and in all, or None under
    CUDA-graph capture, where every position of a pair counts (2·T rows) and is computed."""

    rows_per_pair: list[int] | None
    n_valid: int | None = None

    def rows(self, n_pairs: int, n_positions: int) -> list[int]:
        return [2 * n_positions] * n_pairs if self.rows_per_pair is None else self.rows_per_pair


def plan(labels, chosen_idx, rejected_idx, n_vocab: int, ignore_index: int) -> Plan:
    """One device-to-host copy: valid tokens per sequence, the number of out-of-range labels and the
    pair indices, each checked (ValueError) before any index is used on the device."""
    if rows.capturing(labels):
        return Plan(None)
    n_seqs, n_pairs = labels.shape[0], chosen_idx.numel()
    n_bad = rows.out_of_range(labels, ignore_index, n_vocab).sum()
    values = torch.cat([(labels != ignore_index).sum(-1), n_bad[None], chosen_idx.long(), rejected_idx.long()]).tolist()
    valid_counts, n_bad = values[:n_seqs], values[n_seqs]
    chosen, rejected = values[n_seqs + 1 : n_seqs + 1 + n_pairs], values[n_seqs + 1 + n_pairs :]
    for name, idx in (("pairs[0]", chosen), ("pairs[1]", rejected)):
        if any(i < 0 or i >= n_seqs for i in idx):
            raise ValueError(f"{name} must index the {n_seqs} sequences of hidden, got values outside [0, {n_seqs})")
    if n_bad:
        rows.raise_out_of_range(labels, ignore_index, n_vocab)
    return Plan([valid_counts[i] + valid_counts[j] for i, j in zip(chosen, rejected)], sum(valid_counts))


@contextlib.contextmanager
def _autograd_inside_op():
    """Autograd on inside a custom op's kernel, which runs with autograd's dispatch keys excluded (no
    graph is recorded there, even under enable_grad): the loss's gradient w.r.t. the token log-probs is
    taken with autograd, from detached leaves only."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (DispatchKey.AutogradFunctionality, DispatchKey.AutogradOther, DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def single_pass_dpo(
    hidden, weight, bias, labels, ref_c, ref_r, chosen_idx, rejected_idx, params: DPOParams, host: Plan, needs
):  # fmt: skip
    """The single pass: ((loss, chosen/rejected rewards and log-probs, the statistics of params.pass_stats
    (k, M, T)), gradients of the loss w.r.t. (hidden, weight, bias, ref_c, ref_r), None where needs[i] is
    False)."""
    backend = backend_for(hidden)
    need_h, need_w, need_b, need_ref_c, need_ref_r = needs
    cdt, head = compute_dtype(hidden.dtype), params.head
    n_pairs = chosen_idx.numel()
    rows_per_pair = host.rows(n_pairs, labels.shape[1])
    budget_rows = fused_rows_budget(hidden, weight.shape[0], params.memory_budget)
    max_rows = backend.fused_chunk_rows(weight.shape[0], budget_rows)
    batch_totals = ((labels[chosen_idx] != head.ignore_index).sum(), n_pairs)

    dh = torch.zeros_like(hidden) if need_h else None
    dw_acc = backend.fused_dw_accumulator(weight) if need_w else None
    db_acc = torch.zeros_like(bias, dtype=cdt) if need_b else None
    d_ref = [torch.zeros_like(ref) if need else None for ref, need in ((ref_c, need_ref_c), (ref_r, need_ref_r))]
    outputs = [hidden.new_empty(n_pairs, dtype=cdt) for _ in range(5)]  # loss, rewards, logps
    token_stats = hidden.new_zeros((len(selected(params.pass_stats)), *labels.shape), dtype=cdt)

    for p0, p1 in _pair_chunks(rows_per_pair, max_rows):
        seqs = torch.cat([chosen_idx[p0:p1], rejected_idx[p0:p1]])
        lab = labels[seqs]
        if host.rows_per_pair is None:
            i, t = rows.all_positions(lab.shape, lab.device)
        else:
            i, t = rows.positions(lab != head.ignore_index, sum(rows_per_pair[p0:p1]))
        refs = [_slice(ref, p0, p1) for ref in (ref_c, ref_r)]

        def token_grads(logps, stats, p0=p0, p1=p1, lab=lab, i=i, t=t, refs=refs):
            with _autograd_inside_op():
                leaf = logps.detach().requires_grad_()
                ref_leaves = [None if d is None else ref.detach().requires_grad_() for ref, d in zip(refs, d_ref)]
                dense = leaf.new_zeros(lab.shape).index_put((i, t), leaf)
                b = p1 - p0
                lss_c = lss_r = None
                if params.use_weighting:
                    log_sum_sq = stats[stat_row(params.pass_stats, LOG_SUM_SQ_PROBS)]
                    dense_lss = log_sum_sq.new_zeros(lab.shape).index_put((i, t), log_sum_sq)
                    lss_c, lss_r = dense_lss[:b], dense_lss[b:]
                ref_values = [_detach(ref) if leaf_ is None else leaf_ for ref, leaf_ in zip(refs, ref_leaves)]
                chunk = pair_losses(
                    dense[:b], dense[b:], lss_c, lss_r, lab[:b], lab[b:], *ref_values, params, batch_totals,
                )  # fmt: skip
                wrt = [leaf] + [r for r in ref_leaves if r is not None]
                grads = torch.autograd.grad(chunk[0].sum() / n_pairs, wrt, materialize_grads=True)
            for d, g in zip([d for d in d_ref if d is not None], grads[1:]):
                d[p0:p1] = g
            for out, value in zip(outputs, chunk):
                out[p0:p1] = value.detach()
            return grads[0]

        dh_rows, chunk_stats = backend.linear_rows_fused(
            hidden[seqs[i], t], weight, bias, lab[i, t], head, token_grads, dw_acc, db_acc, params.pass_stats
        )
        if chunk_stats is not None:
            token_stats[:, seqs[i], t] = chunk_stats
        if need_h:
            dh.index_put_((seqs[i], t), dh_rows.to(hidden.dtype), accumulate=True)

    losses, *metrics = outputs
    loss = (losses.sum() / n_pairs).to(torch.promote_types(hidden.dtype, torch.float32))
    dw = None if dw_acc is None else dw_acc.to(weight.dtype)  # (no copy where it has the weight's dtype)
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return (loss, *metrics, token_stats), (dh, dw, db, *d_ref)


def _detach(t):
    return None if t is None else t.detach()


def two_pass_tile_bytes(hidden: torch.Tensor, memory_budget: int) -> int:
    """The two passes' tile: the whole budget on the Triton backend, which holds nothing but the tile;
    on the chunked one its own linear tile (which a CPU's cache holds; a larger one is slower: 10% in the
    backward at V = 128,256), or a quarter of a smaller budget (its fp32 tile and three temporaries)."""
    if backend_for(hidden) is triton_backend and hidden.dtype != torch.float64:
        return memory_budget
    return min(memory_budget // 4, torch_chunked.LINEAR_TILE_BYTES)


def two_pass_dpo(
    hidden, weight, bias, labels, ref_c, ref_r, chosen_idx, rejected_idx, params: DPOParams, host: Plan, needs
):  # fmt: skip
    """The same loss in two passes, as single_pass_dpo returns it: token log-probs (and the statistics),
    the loss and its gradient w.r.t. each of them, then the recomputing backward. Without gradients, the
    forward alone: one GEMM."""
    backend = backend_for(hidden)
    head = dataclasses.replace(params.head, tile_bytes=two_pass_tile_bytes(hidden, params.memory_budget))
    pos = rows.valid_rows(labels, head.ignore_index, weight.shape[0], host.n_valid)
    tok, lse, stats = backend.linear_forward(hidden, weight, bias, labels, head, params.pass_stats, pos=pos)
    need_head, need_refs = needs[:3], needs[3:]
    with _autograd_inside_op():
        leaf = tok.detach().requires_grad_(any(need_head))
        ref_leaves = [_detach(ref) for ref in (ref_c, ref_r)]
        ref_leaves = [ref.requires_grad_() if need else ref for ref, need in zip(ref_leaves, need_refs)]
        lss_c = lss_r = None
        if params.use_weighting:
            log_sum_sq = stats[stat_row(params.pass_stats, LOG_SUM_SQ_PROBS)]
            lss_c, lss_r = log_sum_sq[chosen_idx], log_sum_sq[rejected_idx]
        losses, *metrics = pair_losses(
            leaf[chosen_idx], leaf[rejected_idx], lss_c, lss_r,
            labels[chosen_idx], labels[rejected_idx], *ref_leaves, params,
        )  # fmt: skip
        loss = losses.mean()
        wrt = [leaf] * any(need_head) + [r for r, need in zip(ref_leaves, need_refs) if need]
        grads = list(torch.autograd.grad(loss, wrt, materialize_grads=True)) if wrt else []
    dh = dw = db = None
    if any(need_head):
        dh, dw, db = backend.linear_backward(hidden, weight, bias, labels, lse, grads.pop(0), head, need_head, pos=pos)
    d_ref = [grads.pop(0) if need else None for need in need_refs]
    cdt = compute_dtype(hidden.dtype)
    token_stats = hidden.new_zeros((0, *labels.shape), dtype=cdt) if stats is None else stats
    outputs = (loss.detach().to(torch.promote_types(hidden.dtype, torch.float32)), *(m.to(cdt) for m in metrics))
    return (*outputs, token_stats), (dh, dw, db, *d_ref)


def _single_pass_serves(hidden, weight, labels, chosen_idx, params: DPOParams, host: Plan, needs) -> bool:
    """The single pass where gradients are wanted, the loss decomposes over pairs and one pair fits the
    budget; otherwise the two passes (the forward alone without gradients)."""
    loss_type = params.loss_options["loss_type"]
    # sft's WPO weighting takes the batch's mean weight (TRL), which a pair chunk does not know
    batch_coupled = is_batch_coupled(loss_type) or (params.use_weighting and "sft" in _names(loss_type))
    max_rows = max(host.rows(chosen_idx.numel(), labels.shape[1]), default=0)
    fits = max_rows <= fused_rows_budget(hidden, weight.shape[0], params.memory_budget)
    return any(needs) and fits and not batch_coupled


# The op's outputs: these (PreferenceOutput's, then the per-token statistics of the pass (k, M, T)), then the
# gradients w.r.t. DIFFERENTIABLE ((0,) where not wanted).
OUTPUTS = ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps", "token_stats")
DIFFERENTIABLE = ("hidden", "weight", "bias", "ref_chosen", "ref_rejected")


@torch.library.custom_op("fastpref::linear_dpo_loss", mutates_args=())
def linear_dpo_loss_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ref_chosen: Optional[Tensor],
    ref_rejected: Optional[Tensor],
    chosen_idx: Tensor,
    rejected_idx: Tensor,
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    tile_bytes: Optional[int],
    logit_scale: float,
    beta: float,
    loss_type: str,
    loss_weights: Optional[list[float]],
    label_smoothing: float,
    reference_free: bool,
    f_divergence_type: str,
    f_alpha_divergence_coef: float,
    discopop_tau: float,
    bco_delta: Optional[Tensor],
    ld_alpha: Optional[float],
    use_weighting: bool,
    memory_budget: int,
    stats: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(M, T, H), (V, H), (V,) or None, (M, T), (B,) or None twice, (B,) twice, then the options
    (`op_options`; loss_type: names joined by commas) and needs: which of DIFFERENTIABLE want a gradient
    -> loss (), chosen/rejected rewards and log-probs (B,) in the compute dtype, the per-token statistics
    of the selector `stats` (and WPO's log Σp²) (k, M, T), then the gradients of
    the loss w.r.t. DIFFERENTIABLE, each like its input, or (0,) where needs[i] is False."""
    head = HeadParams(ignore_index, temperature, softcap, tile_bytes, logit_scale)
    names = tuple(loss_type.split(","))
    loss_options = dict(
        beta=beta,
        loss_type=names[0] if len(names) == 1 else names,
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau,
        bco_delta=bco_delta,
    )
    params = DPOParams(head, memory_budget, loss_options, ld_alpha, use_weighting, stats)
    host = plan(labels, chosen_idx, rejected_idx, weight.shape[0], ignore_index)
    inputs = (hidden, weight, bias, labels, ref_chosen, ref_rejected, chosen_idx, rejected_idx, params, host, needs)
    single = _single_pass_serves(hidden, weight, labels, chosen_idx, params, host, needs)
    outputs, grads = (single_pass_dpo if single else two_pass_dpo)(*inputs)
    return *outputs, *(hidden.new_empty(0) if g is None else g for g in grads)


@linear_dpo_loss_op.register_fake
def _(hidden, weight, bias, labels, ref_chosen, ref_rejected, chosen_idx, rejected_idx, *options):
    cdt, (use_weighting, _budget, stats, needs) = compute_dtype(hidden.dtype), options[-4:]
    n_stats = len(selected(stats | (LOG_SUM_SQ_PROBS if use_weighting else 0)))
    outputs = [hidden.new_empty((), dtype=cdt)] + [hidden.new_empty(chosen_idx.shape, dtype=cdt) for _ in OUTPUTS[1:-1]]
    outputs.append(hidden.new_empty((n_stats, *labels.shape), dtype=cdt))
    like = (hidden, weight, bias, ref_chosen, ref_rejected)
    return *outputs, *(torch.empty_like(t) if need else hidden.new_empty(0) for t, need in zip(like, needs))


def _setup_context(ctx, inputs, output):
    hidden, needs = inputs[0], inputs[-1]
    ctx.save_for_backward(*output[len(OUTPUTS):])
    ctx.needs, ctx.n_inputs = needs, len(inputs)
    # each gradient is scaled in place: a second (V, H) dW would cost the weight's size again (1 GB at
    # llama3-8b's head; on a CPU its allocation and page faults, 1% of a step at V = 128,256); float64
    # (gradcheck, which runs several backwards) scales a copy
    ctx.in_place = hidden.dtype != torch.float64
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_):
    if torch.is_grad_enabled():  # create_graph=True: a second derivative is wanted
        raise RuntimeError(
            "linear_dpo_loss computes its gradients in the forward pass and cannot be differentiated twice "
            "(create_graph=True, e.g. a gradient penalty); use linear_sequence_logps with dpo_loss for that"
        )
    try:
        saved = ctx.saved_tensors
    except RuntimeError as error:  # the first backward scaled them in place
        raise RuntimeError(
            "linear_dpo_loss's backward runs once (it scales its stored gradients in place, so that dW is not "
            "held twice; float64 inputs excepted); compute the loss again instead of a second backward with "
            "retain_graph=True"
        ) from error

    def scale(g):
        return g.mul_(grad_loss.to(g.dtype)) if ctx.in_place else grad_loss.to(g.dtype) * g

    no_grads = [None] * ctx.n_inputs
    if grad_loss is None:
        return tuple(no_grads)
    dh, dw, db, d_ref_c, d_ref_r = (scale(g) if need else None for g, need in zip(saved, ctx.needs))
    no_grads[:6] = dh, dw, db, None, d_ref_c, d_ref_r  # (labels gets none)
    return tuple(no_grads)


torch.library.register_autograd("fastpref::linear_dpo_loss", _backward, setup_context=_setup_context)


def op_options(params: DPOParams, device: torch.device) -> tuple:
    """params as linear_dpo_loss_op takes them, in its schema's order: the head's fields, the loss's
    (loss_type's names joined by commas; bco_delta as a 0-dim fp64 tensor on device, as a Python float
    acts), ld_alpha, use_weighting, memory_budget, stats."""
    options = params.loss_options
    bco_delta = options["bco_delta"]
    if bco_delta is not None and not isinstance(bco_delta, torch.Tensor):
        bco_delta = torch.full((), bco_delta, dtype=torch.float64, device=device)
    loss_weights = options["loss_weights"]
    return (
        *dataclasses.astuple(params.head),
        options["beta"],
        ",".join(_names(options["loss_type"])),
        None if loss_weights is None else [float(w) for w in loss_weights],
        options["label_smoothing"],
        options["reference_free"],
        options["f_divergence_type"],
        options["f_alpha_divergence_coef"],
        options["discopop_tau"],
        bco_delta,
        params.ld_alpha,
        params.use_weighting,
        params.memory_budget,
        params.stats,
    )


def linear_dpo(hidden, weight, bias, labels, ref_c, ref_r, chosen_idx, rejected_idx, params: DPOParams):
    """The op on these inputs: a gradient is computed for each differentiable input that requires one.
    Returns the PreferenceOutput and the statistics of params.pass_stats (k, M, T), detached."""
    differentiable = (hidden, weight, bias, ref_c, ref_r)
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in differentiable]
    outputs = linear_dpo_loss_op(
        hidden, weight, bias, labels, ref_c, ref_r, chosen_idx, rejected_idx, *op_options(params, hidden.device), needs
    )
    *preference, stats = outputs[: len(OUTPUTS)]
    return PreferenceOutput(*preference), stats
