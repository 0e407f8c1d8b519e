"""The spec: short, obvious float64 PyTorch references for everything fastpref computes.

Each function materialises what fastpref never does (full logits, full log_softmax) and is
differentiable by autograd, so values *and* gradients of the fast paths are compared against it.
"""

from __future__ import annotations

import torch


def transform_logits(logits, temperature=1.0, softcap=None):
    """Final-logit softcap first (z <- c*tanh(z/c)), then temperature (z <- z/T): (..., V)."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def token_logps(logits, labels, ignore_index=-100, temperature=1.0, softcap=None):
    """log p(label) per position, 0 where label == ignore_index: (..., V), (...) -> (...) float64."""
    logp = torch.log_softmax(transform_logits(logits, temperature, softcap), dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def token_stats(logits, labels, ignore_index=-100, temperature=1.0, softcap=None):
    """Per-token statistics TRL logs, on the transformed logits; 0 / False at ignored positions.

    Returns dict of (...) tensors: entropy, is_top1, mean_logit, log_sum_sq_probs.
    """
    z = transform_logits(logits, temperature, softcap)
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    stats = {
        "entropy": -(logp.exp() * logp).sum(-1),
        "is_top1": z.argmax(-1) == safe,
        "mean_logit": z.mean(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * logp, dim=-1),
    }
    return {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in stats.items()}


def linear_logits(hidden, weight, bias=None):
    """hidden @ weight.T (+ bias) in float64: (..., H), (V, H) -> (..., V)."""
    logits = hidden.double() @ weight.double().T
    return logits if bias is None else logits + bias.double()


def masked_sum(values, mask):
    """Sum over the last dim of values where mask: (B, T) -> (B,)."""
    return (values.double() * mask.double()).sum(-1)


def masked_mean(values, mask):
    """Mean over the last dim where mask, 0 for an empty mask: (B, T) -> (B,)."""
    count = mask.double().sum(-1)
    return masked_sum(values, mask) / count.clamp(min=1)


def sequence_logps(logits, labels, reduction="sum", ignore_index=-100, temperature=1.0, softcap=None):
    """Per-sequence sum (or mean) of token log-probs: (B, T, V), (B, T) -> (B,)."""
    per_token = token_logps(logits, labels, ignore_index, temperature, softcap)
    reduce = masked_sum if reduction == "sum" else masked_mean
    return reduce(per_token, labels != ignore_index)
