"""DPO-family loss straight from hidden states: hidden x lm_head -> sequence log-probs -> loss.

Single pass, for losses that decompose over pairs (every loss_type but aot and aot_unpaired, and
sft under WPO weighting). Pairs are grouped into chunks whose logits fit `memory_budget`. For a
chunk, one (rows, V) logits tile of its valid tokens is held: lse and token log-probs -> the
chunk's sequence log-probs -> each pair's loss (`fastpref.losses`, the very code `dpo_loss` runs)
-> its gradient w.r.t. every token log-prob -> dz in place -> dh, dW, db. 3 GEMMs, 6·n·H·V flops,
n the valid tokens; working set one chunk's tile (≤ memory_budget) plus the gradients.
Backward only scales the stored gradients by the loss's upstream gradient.

Two passes, for batch-coupled losses, or when one pair's logits exceed memory_budget:
the same loss over `linear_token_logps_op`, whose backward recomputes tiles of ≤ memory_budget / 4
bytes (8·n·H·V flops, working set ≈ the tile).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from fastpref.backends import backend_for
from fastpref.backends.torch_chunked import compute_dtype
from fastpref.losses import PreferenceOutput, dpo_pair_losses, is_batch_coupled, ld_token_weights, wpo_weights
from fastpref.ops.linear_token_logps import linear_token_logps_op
from fastpref.params import HeadParams

# Bytes held per logit of a chunk on the single pass: the GEMM output in the input dtype plus
# three compute-dtype tiles (z, and logsumexp's and the softmax's temporaries).
_TEMPORARY_TILES = 3


@dataclass(frozen=True)
class DPOParams:
    """Everything but tensors: the head, the loss options, and the memory budget in bytes."""

    head: HeadParams
    memory_budget: int
    loss_options: dict = field(default_factory=dict)  # keyword arguments of dpo_pair_losses
    ld_alpha: float | None = None
    use_weighting: bool = False


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
    """How many token rows of (rows, V) logits the single pass may hold within memory_budget."""
    per_logit = hidden.element_size() + _TEMPORARY_TILES * torch.finfo(compute_dtype(hidden.dtype)).bits // 8
    return memory_budget // (n_vocab * per_logit)


class LinearDPO(torch.autograd.Function):
    """Single-pass fused loss. Inputs: hidden (M, T, H), weight (V, H), bias (V,) or None,
    labels (M, T), ref_chosen / ref_rejected (B,) or None, chosen_idx / rejected_idx (B,) into M,
    params, and from the planning in `linear_dpo`: valid_counts (M,) and rows_per_pair (B ints). Outputs: loss (), and, not differentiable, chosen/rejected rewards and log-probs (B,)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, ref_c, ref_r, chosen_idx, rejected_idx, params: DPOParams, valid_counts,
        rows_per_pair: list[int],
    ):  # fmt: skip
        backend = backend_for(hidden)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdt, head = compute_dtype(hidden.dtype), params.head
        n_pairs = chosen_idx.numel()
        max_rows = fused_rows_budget(hidden, weight.shape[0], params.memory_budget)
        batch_totals = (valid_counts[chosen_idx].sum(), n_pairs)

        dh = torch.zeros_like(hidden) if need_h else None
        dw_acc = torch.zeros_like(weight, dtype=cdt) if need_w else None
        db_acc = torch.zeros_like(bias, dtype=cdt) if need_b else None
        outputs = [hidden.new_empty(n_pairs, dtype=cdt) for _ in range(5)]  # loss, rewards, logps

        for p0, p1 in _pair_chunks(rows_per_pair, max_rows):
            seqs = torch.cat([chosen_idx[p0:p1], rejected_idx[p0:p1]])
            lab = labels[seqs]
            i, t = (lab != head.ignore_index).nonzero(as_tuple=True)

            def token_grads(logps, log_sum_sq, p0=p0, p1=p1, lab=lab, i=i, t=t):
                with torch.enable_grad():
                    leaf = logps.detach().requires_grad_()
                    dense = leaf.new_zeros(lab.shape).index_put((i, t), leaf)
                    b = p1 - p0
                    lss_c = lss_r = None
                    if params.use_weighting:
                        dense_lss = log_sum_sq.new_zeros(lab.shape).index_put((i, t), log_sum_sq)
                        lss_c, lss_r = dense_lss[:b], dense_lss[b:]
                    chunk = pair_losses(
                        dense[:b], dense[b:], lss_c, lss_r, lab[:b], lab[b:],
                        _slice(ref_c, p0, p1), _slice(ref_r, p0, p1), params, batch_totals,
                    )  # fmt: skip
                    (grad,) = torch.autograd.grad(chunk[0].sum() / n_pairs, leaf, materialize_grads=True)
                for out, value in zip(outputs, chunk):
                    out[p0:p1] = value.detach()
                return grad

            dh_rows = backend.linear_rows_fused(
                hidden[seqs[i], t], weight, bias, lab[i, t], head, token_grads, dw_acc, db_acc, params.use_weighting
            )
            if need_h:
                dh.index_put_((seqs[i], t), dh_rows.to(hidden.dtype), accumulate=True)

        ctx.save_for_backward(
            dh,
            None if dw_acc is None else dw_acc.to(weight.dtype),
            None if db_acc is None else db_acc.to(bias.dtype),
        )
        losses, *metrics = outputs
        ctx.mark_non_differentiable(*metrics)
        return (losses.sum() / n_pairs).to(torch.promote_types(hidden.dtype, torch.float32)), *metrics

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = tuple(None if g is None else grad_loss.to(g.dtype) * g for g in ctx.saved_tensors)
        return *grads, None, None, None, None, None, None, None, None


def two_pass_dpo(hidden, weight, bias, labels, ref_c, ref_r, chosen_idx, rejected_idx, params: DPOParams):
    """The same loss in two passes: token log-probs with a recomputing backward, then the loss."""
    head = dataclasses.replace(params.head, tile_bytes=params.memory_budget // 4)
    tok, _lse, stats = linear_token_logps_op(hidden, weight, bias, labels, *dataclasses.astuple(head), params.use_weighting)
    lss_c = lss_r = None
    if params.use_weighting:
        lss_c, lss_r = stats[3][chosen_idx], stats[3][rejected_idx]
    losses, *metrics = pair_losses(
        tok[chosen_idx], tok[rejected_idx], lss_c, lss_r,
        labels[chosen_idx], labels[rejected_idx], ref_c, ref_r, params,
    )  # fmt: skip
    return losses.mean(), *metrics


def linear_dpo(hidden, weight, bias, labels, ref_c, ref_r, chosen_idx, rejected_idx, params: DPOParams):
    """Choose the single pass where the loss decomposes over pairs and one pair fits the budget."""
    valid_counts = (labels != params.head.ignore_index).sum(-1)  # (M,) valid tokens per sequence
    rows_per_pair = (valid_counts[chosen_idx] + valid_counts[rejected_idx]).tolist()
    loss_type = params.loss_options["loss_type"]
    # sft's WPO weighting takes the batch's mean weight (TRL), which a pair chunk does not know
    batch_coupled = is_batch_coupled(loss_type) or (params.use_weighting and "sft" in _names(loss_type))
    fits = max(rows_per_pair, default=0) <= fused_rows_budget(hidden, weight.shape[0], params.memory_budget)
    inputs = (hidden, weight, bias, labels, ref_c, ref_r, chosen_idx, rejected_idx, params)
    if batch_coupled or not fits:
        loss, rewards_c, rewards_r, logps_c, logps_r = two_pass_dpo(*inputs)
    else:
        loss, rewards_c, rewards_r, logps_c, logps_r = LinearDPO.apply(*inputs, valid_counts, rows_per_pair)
    return PreferenceOutput(loss, rewards_c, rewards_r, logps_c, logps_r)
