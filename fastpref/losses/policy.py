"""Critic-free policy-gradient losses on sampled completions (GRPO and its variants, RLOO), written once and
table-driven by `loss_type`, with TRL 1.16's formulas (GRPOTrainer._compute_loss, RLOOTrainer).

Shapes: B completions, T completion positions. Inputs are per-token log-probs (B, T) of the policy (with grad),
of the policy that sampled (`old_logps`, no grad) and of the reference (`ref_logps`, for the KL term), a mask
(B, T) of the tokens that count, and one advantage per completion (B,) or per token (B, T).

With log w = logps - old_logps per token ("token") or its masked mean per sequence ("sequence"), r = exp(log w):
    clipped (grpo, bnpo, dr_grpo, dapo, luspo):  -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    cispo:  -sg(min(r, eps_high)) A logps          sapo:  -sigmoid(tau (r - 1)) 4 / tau A,  tau by sign of A
    vespo:  -sg(phi(w_seq)) A logps,  phi the gamma weight e^lambda w^k e^(-lambda w) of the sequence ratio
then + beta * KL_k3(ref || policy) per token (times r: TRL's bias correction), and a reduction per loss_type:
    grpo, sapo: mean over sequences of each one's token mean;  bnpo: token mean;
    dr_grpo: token sum / (B * max_completion_length);  luspo: mean over sequences of each one's token sum;
    dapo, cispo, vespo: token sum / num_items (the tokens of the whole generation batch, per process).
The mean-type reductions are divided by the gradient-accumulation steps, as TRL's; the entropy bonus
(entropy_coef) is the mean entropy of the tokens the loss acts on, divided by them too.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from fastpref._checks import check_choice
from fastpref.losses.kl import kl_penalty

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")


class PolicyOutput(NamedTuple):
    """loss (scalar, with grad); policy_loss: the loss before the entropy bonus (detached); kl (B, T) per-token
    KL or None; ratio (B, T) or (B, 1): the importance ratio r (detached); phi (B, 1) VESPO's weights or None."""

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor | None
    ratio: Tensor
    phi: Tensor | None


class _Options(NamedTuple):
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    sapo_temperature_pos: float
    sapo_temperature_neg: float
    vespo: tuple[float, float, float, float]  # k_pos, lambda_pos, k_neg, lambda_neg


def _clipped(ratio, advantages, logps, o: _Options):
    clipped = torch.clamp(ratio, 1 - o.epsilon_low, 1 + o.epsilon_high)
    if o.delta is not None:  # two-sided clipping: the unclipped term is capped too
        ratio = torch.clamp(ratio, max=o.delta)
    return -torch.min(ratio * advantages, clipped * advantages)


def _cispo(ratio, advantages, logps, o: _Options):
    return -torch.clamp(ratio, max=o.epsilon_high).detach() * advantages * logps


def _sapo(ratio, advantages, logps, o: _Options):
    tau = torch.where(advantages > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages


@torch.no_grad()
def vespo_weights(advantages: Tensor, log_ratio: Tensor, mask: Tensor, k_pos=2.0, lambda_pos=3.0, k_neg=3.0,
                  lambda_neg=2.0) -> Tensor:
    """(B, 1) gamma weights phi(w) = exp(lambda + k log w - lambda w) of the sequence ratio w = exp(sum log r),
    k and lambda by the advantage's sign; log w clamped to [log 1e-8, 20]."""
    low = math.log(1e-8)
    seq_log_ratio = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
    log_w = torch.clamp(seq_log_ratio, low, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


# loss_type -> (per-token loss, reduction); the reduction gets (per_token_loss * mask, mask, context)
_SEQ_MEAN = "sequence mean"
_TOKEN_MEAN = "token mean"
_CONSTANT = "constant"
_SEQ_SUM = "sequence sum"
_NUM_ITEMS = "num_items"
POLICY_LOSS_TYPES: dict[str, tuple[Callable | None, str]] = {
    "grpo": (_clipped, _SEQ_MEAN),
    "bnpo": (_clipped, _TOKEN_MEAN),
    "dr_grpo": (_clipped, _CONSTANT),
    "dapo": (_clipped, _NUM_ITEMS),
    "luspo": (_clipped, _SEQ_SUM),
    "cispo": (_cispo, _NUM_ITEMS),
    "sapo": (_sapo, _SEQ_MEAN),
    "vespo": (None, _NUM_ITEMS),  # its weights need the sequence log-ratio: computed in policy_loss
}
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _reduce(masked: Tensor, mask: Tensor, reduction: str, max_completion_length, num_items, accumulation):
    if reduction == _SEQ_MEAN:
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if reduction == _TOKEN_MEAN:
        return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
    if reduction == _CONSTANT:
        return masked.sum() / (masked.shape[0] * max_completion_length) / accumulation
    if reduction == _SEQ_SUM:
        return masked.sum(-1).mean() / accumulation
    normalizer = mask.sum() if num_items is None else torch.as_tensor(num_items, device=mask.device)
    return masked.sum() / normalizer.clamp(min=1.0)


def policy_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    use_bias_correction_kl: bool = True,
    entropies: Tensor | None = None,
    entropy_mask: Tensor | None = None,
    entropy_coef: float = 0.0,
    max_completion_length: int | None = None,
    num_items: Tensor | float | None = None,
    accumulation: int = 1,
) -> PolicyOutput:
    """The GRPO-family loss of one micro-batch: (B, T) log-probs and mask, (B,) or (B, T) advantages -> PolicyOutput.

    old_logps None: the sampling policy is this one (r = 1, gradient of r A = A grad logps). entropy_mask (B, T)
    bool: the high-entropy tokens the loss acts on (`high_entropy_mask`), or None for all. num_items: the masked
    tokens of the whole generation batch on this process (dapo / cispo / vespo); None: this micro-batch's.
    """
    check_choice("loss_type", loss_type, POLICY_LOSS_TYPES)
    check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length (its constant normalizer)")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the reference's per-token log-probs)")
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_logps = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_weights)
    kl = None
    if beta != 0.0:
        kl = kl_penalty(logps, ref_logps, "k3")
        if use_bias_correction_kl:
            kl = kl * ratio
    options = _Options(epsilon, epsilon if epsilon_high is None else epsilon_high, delta, sapo_temperature_pos,
                       sapo_temperature_neg, (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg))
    per_token, reduction = POLICY_LOSS_TYPES[loss_type]
    phi = None
    if loss_type == "vespo":
        phi = vespo_weights(advantages, log_ratio, mask, *options.vespo)
        per_token_loss = -phi * advantages * logps
    else:
        per_token_loss = per_token(ratio, advantages, logps, options)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if kl is not None:
        per_token_loss = per_token_loss + beta * kl
    loss = _reduce(per_token_loss * mask, mask, reduction, max_completion_length, num_items, accumulation)
    policy = loss.detach()
    if entropy_coef:
        if entropies is None:
            raise ValueError("entropy_coef != 0 needs entropies")
        acting = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - entropy_coef * (entropies * acting).sum() / acting.sum().clamp(min=1.0) / accumulation
    return PolicyOutput(loss, policy, kl, ratio.detach(), phi)


def high_entropy_mask(entropies: Tensor, mask: Tensor, threshold: float, gathered: Tensor | None = None) -> Tensor:
    """(B, T) bool: masked tokens whose entropy is at least the `threshold` quantile (1 - top_entropy_quantile)
    of the masked entropies (of every process: pass them all as `gathered`)."""
    values = entropies[mask.bool()].float() if gathered is None else gathered
    if values.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    cut = torch.quantile(values, threshold)
    return ((entropies * mask.float()) >= cut) & mask.bool()


def nanstd(x: Tensor, dim=None, keepdim=False) -> Tensor:
    """Bessel-corrected standard deviation ignoring NaN; NaN below two values (TRL's nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    variance = variance * torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    if keepdim:
        return std
    return std.reshape(()) if dim is None else std.squeeze(dim)


class Advantages(NamedTuple):
    """advantages (G*K,), and the reward spread each was scaled by: std (G*K,), zero_std (G*K,) bool."""

    advantages: Tensor
    std: Tensor
    zero_std: Tensor


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group") -> Advantages:
    """GRPO's advantages of (G*K,) rewards, K = num_generations completions per prompt, consecutive:
    r - mean of its group, divided by (std + 1e-4) of its group ("group"), of the batch ("batch"), or not ("none").
    NaN rewards (unscorable) are left out of the statistics and get advantage 0 (TRL)."""
    check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be (G * num_generations,), got shape {tuple(rewards.shape)} with "
                         f"num_generations={num_generations}")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif num_generations > 1:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(advantages, nan=0.0), std, zero_std)


def leave_one_out_advantages(rewards: Tensor, num_generations: int, normalize: bool = False) -> Tensor:
    """RLOO's advantages of (G*K,) rewards (K = num_generations consecutive per prompt): r minus the mean reward of
    the other scorable completions of its prompt; optionally standardised over the batch; NaN -> 0 (TRL 1.16)."""
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be (G * num_generations,), got shape {tuple(rewards.shape)} with "
                         f"num_generations={num_generations}")
    if num_generations < 2:
        return torch.zeros_like(rewards)
    grouped = rewards.view(-1, num_generations)
    scorable = (~torch.isnan(grouped)).sum(1, keepdim=True)
    baselines = (torch.nansum(grouped, 1, keepdim=True) - grouped) / (scorable - 1)
    advantages = rewards - baselines.view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def rloo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, epsilon: float = 0.2,
              epsilon_high: float | None = None) -> tuple[Tensor, Tensor]:
    """RLOO's clipped surrogate on sequence log-probs: (B, T) per-token log-probs (with grad), (B,) old sequence
    log-probs and advantages, (B, T) mask -> (loss: the mean over sequences, ratio (B,) detached)."""
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp((logps * mask).sum(1) - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    return -torch.min(ratio * advantages, clipped * advantages).mean(), ratio.detach()
