"""Listwise ranking losses on K responses per prompt, ranked best-first: RRHF and PRO.

Inputs are (B, K) per-response *summed* completion log-probs and completion token counts, column 0
the best response; both papers rank on per-token average log-probs (counts clamped to >= 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastpref._checks import check_leading_batch, check_number, check_same_device, check_shape, check_tensor


def _check_ranked(logps: Tensor, lengths: Tensor, **others: Tensor | None) -> None:
    """(B, K) floating log-probs with K >= 2; lengths and `others` (None skipped) of the same shape."""
    check_leading_batch("logps", logps, listwise=True)
    check_tensor("lengths", lengths)
    check_shape("lengths", lengths, logps.shape, "as logps")
    for name, value in others.items():
        if value is not None:
            check_tensor(name, value, floating=True)
            check_shape(name, value, logps.shape, "as logps")
    check_same_device(logps=logps, lengths=lengths, **others)


def _average(logps: Tensor, lengths: Tensor) -> Tensor:
    return logps / lengths.to(logps.dtype).clamp(min=1)


def rrhf_loss(logps: Tensor, lengths: Tensor, *, sft_weight: float = 1.0) -> Tensor:
    """RRHF (Yuan et al. 2023, Eqs. 1-4): (B, K), (B, K) -> 0-dim, the mean over prompts of

    L_rank + sft_weight * L_ft,  L_rank = sum_{i ranked above j} max(0, p_j - p_i),  p = logps / lengths,
    L_ft = -logps[:, 0], the summed NLL of the best response. The paper adds them (sft_weight = 1); its
    code weighs L_rank by 100 and averages L_ft over tokens instead: sft_weight is the one coefficient.
    """
    _check_ranked(logps, lengths)
    check_number("sft_weight", sft_weight)
    scores = _average(logps, lengths)
    worse_minus_better = scores.unsqueeze(1) - scores.unsqueeze(2)  # [b, i, j] = p_j - p_i
    better_first = torch.ones_like(worse_minus_better, dtype=torch.bool).triu(diagonal=1)  # j after i
    rank = torch.where(better_first, torch.relu(worse_minus_better), 0.0).sum(dim=(1, 2))
    return (rank - sft_weight * logps[:, 0]).mean()


def _pro_scales(reward_scores: Tensor | None, like: Tensor) -> Tensor:
    """PRO's inverse temperatures for steps k < K-1: [b, k, i] = r_k - r_i for i > k and
    max_{i>k}(r_k - r_i) at i = k; all 1 without reward scores (the paper's "PRO w/o T").
    (B, K) -> (B, K-1, K); entries i < k are unused."""
    batch, responses = like.shape
    if reward_scores is None:
        return torch.ones(batch, responses - 1, responses, dtype=like.dtype, device=like.device)
    rewards = reward_scores.detach().to(like.dtype)
    gaps = (rewards.unsqueeze(2) - rewards.unsqueeze(1))[:, :-1]  # [b, k, i] = r_k - r_i
    later = torch.ones_like(gaps, dtype=torch.bool).triu(diagonal=1)
    widest = torch.where(later, gaps, -torch.inf).amax(dim=2, keepdim=True)
    own = torch.eye(responses - 1, responses, dtype=torch.bool, device=like.device)
    return torch.where(own, widest, gaps)


def pro_loss(
    logps: Tensor,
    lengths: Tensor,
    *,
    reward_scores: Tensor | None = None,
    sft_weight: float | None = None,
) -> Tensor:
    """PRO (Song et al. 2023, Eqs. 7-10): (B, K), (B, K) -> 0-dim, the mean over prompts of

    L_PRO + sft_weight * L_SFT,  L_PRO = sum_{k < K-1} -log( exp(p_k T_k^k) / sum_{i >= k} exp(p_i T_k^i) ),
    p = logps / lengths, L_SFT = -logps[:, 0] (summed NLL of the best response). T = 1 without
    `reward_scores`; with them ((B, K), ranked like logps) T_k^i = r_k - r_i and T_k^k = max_{i>k} T_k^i,
    the paper's reward-scaled temperatures. sft_weight defaults to the paper's 0.05 * (K - 1)^2.
    """
    _check_ranked(logps, lengths, reward_scores=reward_scores)
    responses = logps.shape[1]
    if sft_weight is None:
        sft_weight = 0.05 * (responses - 1) ** 2
    check_number("sft_weight", sft_weight)
    scores = _average(logps, lengths)
    scaled = scores.unsqueeze(1) * _pro_scales(reward_scores, scores)  # [b, k, i] = p_i T_k^i, k < K-1
    from_k_on = torch.ones_like(scaled, dtype=torch.bool).triu()  # i >= k
    log_partition = torch.where(from_k_on, scaled, -torch.inf).logsumexp(dim=2)  # (B, K-1)
    steps = log_partition - scaled.diagonal(dim1=1, dim2=2)
    return (steps.sum(dim=1) - sft_weight * logps[:, 0]).mean()
