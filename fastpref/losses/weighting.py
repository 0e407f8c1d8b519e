"""Token and pair weightings of TRL 1.16.0's DPOTrainer: LD-DPO's `ld_alpha` and WPO's
`use_weighting`. Rows are chosen-then-rejected: row i and row B + i are the two sides of pair i."""

from __future__ import annotations

import torch
from torch import Tensor

from fastpref._checks import check_interval, check_shape, check_tensor


def _check_paired_rows(name: str, value: Tensor) -> int:
    """Raise unless `value` is (2B, T) with B >= 1; return B."""
    if value.dim() != 2 or value.shape[0] == 0 or value.shape[0] % 2:
        raise ValueError(f"{name} must have shape (2B, T), chosen rows then rejected, got {tuple(value.shape)}")
    return value.shape[0] // 2


def ld_token_weights(
    labels: Tensor, ld_alpha: float, *, ignore_index: int = -100, dtype: torch.dtype = torch.float32
) -> Tensor:
    """LD-DPO token weights (Liu et al. 2024, "Length Desensitization"): (2B, T) labels -> (2B, T) `dtype`.

    A completion token weighs 1 up to the shared length min(n_chosen, n_rejected) of its pair, counted in
    completion tokens (labels != ignore_index) from the left, and ld_alpha beyond; ignored positions
    weigh 0. So `(token_logps * weights).sum(-1)` is TRL's `shared_logps + ld_alpha * tail_logps`; pass the
    token log-probs' dtype as `dtype` when it is wider than float32 (ld_alpha rounded to float32 is off by ~1e-8).
    """
    check_tensor("labels", labels, integer=True)
    pairs = _check_paired_rows("labels", labels)
    check_interval("ld_alpha", ld_alpha, 0.0, 1.0, closed_high=True)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    completion = labels != ignore_index
    position = completion.cumsum(dim=1)  # 1 at a row's first completion token
    chosen_count, rejected_count = completion.sum(dim=1).split(pairs)
    shared = torch.minimum(chosen_count, rejected_count).repeat(2).unsqueeze(1)
    weights = torch.full(labels.shape, ld_alpha, dtype=dtype, device=labels.device).masked_fill(position <= shared, 1.0)
    return weights * completion


def wpo_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, mask: Tensor) -> Tensor:
    """WPO pair weights (Zhou et al. 2024, Eq. 2), as TRL's `use_weighting`: (2B, T) x3 -> (B,), detached.

    Per sequence w = exp(mean over completion tokens of log p(y_t) - log sum_v p(v)^2), the policy's
    probability of the sequence aligned to its own sampling, length-normalised; a pair weighs
    w_chosen * w_rejected. `log_sum_sq_probs` is logsumexp(2 log p) over the vocabulary per token;
    `mask` marks completion tokens (counts clamped to >= 1).
    """
    check_tensor("token_logps", token_logps, floating=True)
    pairs = _check_paired_rows("token_logps", token_logps)
    check_tensor("log_sum_sq_probs", log_sum_sq_probs, floating=True)
    check_shape("log_sum_sq_probs", log_sum_sq_probs, token_logps.shape, "as token_logps")
    check_tensor("mask", mask)
    check_shape("mask", mask, token_logps.shape, "as token_logps")
    with torch.no_grad():
        dtype = torch.promote_types(token_logps.dtype, torch.float32)
        completion = mask.bool()
        aligned = torch.where(completion, token_logps.to(dtype) - log_sum_sq_probs.to(dtype), 0.0)
        sequence_weights = torch.exp(aligned.sum(dim=1) / completion.sum(dim=1).clamp(min=1))
        chosen, rejected = sequence_weights.split(pairs)
        return chosen * rejected
