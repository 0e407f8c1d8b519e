"""The spec: short, obvious float64 PyTorch references for everything fastpref computes.

Each function materialises what fastpref never does (full logits, full log_softmax) and is
differentiable by autograd, so values *and* gradients of the fast paths are compared against it.
"""

from __future__ import annotations

import torch


def transform_logits(logits, temperature=1.0, softcap=None, logit_scale=1.0):
    """The family's scale first (z <- s*z), then the final-logit softcap (z <- c*tanh(z/c)), then
    temperature (z <- z/T): (..., V)."""
    z = logits.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def token_logps(logits, labels, ignore_index=-100, temperature=1.0, softcap=None, logit_scale=1.0):
    """log p(label) per position, 0 where label == ignore_index: (..., V), (...) -> (...) float64."""
    logp = torch.log_softmax(transform_logits(logits, temperature, softcap, logit_scale), dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def token_stats(logits, labels, ignore_index=-100, temperature=1.0, softcap=None, logit_scale=1.0):
    """Per-token statistics TRL logs, on the transformed logits; 0 / False at ignored positions.

    Returns dict of (...) tensors: entropy, is_top1, mean_logit, log_sum_sq_probs.
    """
    z = transform_logits(logits, temperature, softcap, logit_scale)
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    stats = {
        "entropy": torch.special.entr(logp.exp()).sum(-1),  # −Σ p log p, 0·log 0 = 0
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
    """Σ values·mask / Σ mask over the last dim (mask: bool or float weights), 0 for an empty mask: (B, T) -> (B,)."""
    count = mask.double().sum(-1)
    return masked_sum(values, mask) / torch.where(count == 0, 1.0, count)


def sequence_logps(logits, labels, reduction="sum", ignore_index=-100, temperature=1.0, softcap=None):
    """Per-sequence sum (or mean) of token log-probs: (B, T, V), (B, T) -> (B,)."""
    per_token = token_logps(logits, labels, ignore_index, temperature, softcap)
    reduce = masked_sum if reduction == "sum" else masked_mean
    return reduce(per_token, labels != ignore_index)


# --- losses ---
# Per-pair loops on float64 scalars, written from the TRL 1.16.0 and paper formulas.


def _log_sigmoid(x):
    return torch.nn.functional.logsigmoid(torch.as_tensor(x, dtype=torch.float64))


def _log(x):
    return torch.log(torch.as_tensor(x, dtype=torch.float64))


def f_divergence_score(logratio, f_divergence_type="reverse_kl", alpha=0.5):
    """f'(exp(u)) for one log-ratio u, constants kept (TRL's chosen_scores / rejected_scores)."""
    if f_divergence_type == "reverse_kl" or (f_divergence_type == "alpha_divergence" and abs(alpha - 1) < 1e-6):
        return logratio  # f'(t) = log t
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratio)  # f'(t) = 1 - 1/t
    if f_divergence_type == "js_divergence":
        return torch.log(2 * torch.exp(logratio) / (1 + torch.exp(logratio)))  # f'(t) = log(2t / (1 + t))
    if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(alpha-1) - 1) / (alpha - 1), exponent clamped at 80
        return (torch.exp(torch.clamp((alpha - 1) * logratio, max=80.0)) - 1) / (alpha - 1)
    raise ValueError(f_divergence_type)


def dpo_one_loss_type(
    loss_type, pc, pr, rc, rr, *, beta, label_smoothing=0.0, f_divergence_type="reverse_kl", alpha=0.5,
    discopop_tau=0.05, chosen_lengths=None, rejected_lengths=None, bco_delta=None, batch_chosen_tokens=None,
    batch_pairs=None,
):
    """Per-pair losses (list of B scalars) of one TRL DPO loss_type; pc/pr/rc/rr are (B,) float64.

    sft: pair i's share -pc[i] * P / N of TRL's batch token mean, N / P the whole batch's chosen tokens / pairs
    (batch_chosen_tokens / batch_pairs, else this batch's)."""
    n = len(pc)
    eps = label_smoothing
    u_c = [pc[i] - rc[i] for i in range(n)]
    u_r = [pr[i] - rr[i] for i in range(n)]
    s_c = [f_divergence_score(u, f_divergence_type, alpha) for u in u_c]
    s_r = [f_divergence_score(u, f_divergence_type, alpha) for u in u_r]
    margin = [s_c[i] - s_r[i] for i in range(n)]
    out = []
    for i in range(n):
        z = beta * margin[i]
        if loss_type == "sigmoid":
            loss = -_log_sigmoid(z)
        elif loss_type == "hinge":
            loss = torch.clamp(1 - z, min=0)
        elif loss_type in ("ipo", "sigmoid_norm"):
            avg_margin = s_c[i] / max(float(chosen_lengths[i]), 1.0) - s_r[i] / max(float(rejected_lengths[i]), 1.0)
            if loss_type == "ipo":
                loss = (avg_margin - 1 / (2 * beta)) ** 2
            else:
                loss = -_log_sigmoid(beta * avg_margin)
        elif loss_type == "exo_pair":
            q_w, q_l = torch.sigmoid(z), torch.sigmoid(-z)
            loss = q_w * (torch.log(q_w) - _log(1 - eps)) + q_l * (torch.log(q_l) - _log(eps))
        elif loss_type == "nca_pair":
            a, b = beta * u_c[i], beta * u_r[i]
            loss = -_log_sigmoid(a) - 0.5 * _log_sigmoid(-a) - 0.5 * _log_sigmoid(-b)
        elif loss_type == "robust":
            loss = ((1 - eps) * -_log_sigmoid(z) - eps * -_log_sigmoid(-z)) / (1 - 2 * eps)
        elif loss_type == "bco_pair":  # TRL 1.16: no shift; bco_delta is fastpref's optional one
            delta = 0.0 if bco_delta is None else float(bco_delta)
            loss = -_log_sigmoid(beta * u_c[i] - delta) - _log_sigmoid(delta - beta * u_r[i])
        elif loss_type == "sppo_hard":
            loss = (u_c[i] - 1 / (2 * beta)) ** 2 + (u_r[i] + 1 / (2 * beta)) ** 2
        elif loss_type in ("aot", "aot_unpaired"):
            if loss_type == "aot":
                first = sorted([pc[j] - pr[j] for j in range(n)], key=lambda t: t.detach().item())
                second = sorted([rc[j] - rr[j] for j in range(n)], key=lambda t: t.detach().item())
            else:
                first = sorted(u_c, key=lambda t: t.detach().item())
                second = sorted(u_r, key=lambda t: t.detach().item())
            d = beta * (first[i] - second[i])
            loss = -(1 - eps) * _log_sigmoid(d) - eps * _log_sigmoid(-d)
        elif loss_type == "apo_zero":
            loss = (1 - torch.sigmoid(beta * u_c[i])) + torch.sigmoid(beta * u_r[i])
        elif loss_type == "apo_down":
            loss = torch.sigmoid(beta * u_c[i]) + (1 - torch.sigmoid(beta * (u_c[i] - u_r[i])))
        elif loss_type == "discopop":
            mix = torch.sigmoid(z / discopop_tau)
            loss = (1 - mix) * -_log_sigmoid(z) + mix * torch.exp(-z)
        elif loss_type == "sft":
            tokens = sum(int(x) for x in chosen_lengths) if batch_chosen_tokens is None else int(batch_chosen_tokens)
            pairs = n if batch_pairs is None else batch_pairs
            loss = -pc[i] * pairs / max(tokens, 1)
        else:
            raise ValueError(loss_type)
        out.append(loss)
    return out


def dpo_pair_losses(pc, pr, rc, rr, *, beta=0.1, loss_type="sigmoid", loss_weights=None, pair_weights=None, **kw):
    """(losses, chosen_rewards, rejected_rewards), each (B,): sum over loss types of weight * per-pair loss *
    pair weight; for sft the mean pair weight (TRL multiplies its one batch SFT value by each pair's weight)."""
    pc, pr, rc, rr = (t.double() for t in (pc, pr, rc, rr))
    n = len(pc)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = loss_weights if loss_weights is not None else [1.0] * len(types)
    total = [0.0] * n
    for name, weight in zip(types, weights):
        per_pair = dpo_one_loss_type(name, pc, pr, rc, rr, beta=beta, **kw)
        if pair_weights is not None:
            w = [pair_weights[i].double() for i in range(n)]
            if name == "sft":
                w = [sum(w) / n] * n
            per_pair = [per_pair[i] * w[i] for i in range(n)]
        total = [total[i] + weight * per_pair[i] for i in range(n)]
    return torch.stack(total), (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def trl_dpo_loss(
    pc, pr, rc, rr, chosen_token_logps, *, beta=0.1, loss_type="sigmoid", loss_weights=None, pair_weights=None, **kw
):
    """TRL's batch loss, literally: sum_k weight_k * mean_i(per_sequence_loss_k[i] * w_i), with sft's
    per_sequence_loss the one value -mean(chosen_token_logps) (a flat tensor of every chosen completion
    token's log-prob) for every pair."""
    pc, pr, rc, rr = (t.double() for t in (pc, pr, rc, rr))
    n = len(pc)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = loss_weights if loss_weights is not None else [1.0] * len(types)
    loss = 0.0
    for name, weight in zip(types, weights):
        if name == "sft":
            per_pair = [-chosen_token_logps.double().mean()] * n
        else:
            per_pair = dpo_one_loss_type(name, pc, pr, rc, rr, beta=beta, **kw)
        if pair_weights is not None:
            per_pair = [per_pair[i] * pair_weights[i].double() for i in range(n)]
        loss = loss + torch.stack(per_pair).mean() * weight
    return loss


def ld_sequence_logps(token_logps, labels, ld_alpha, ignore_index=-100):
    """TRL's LD-DPO sequence log-probs, chosen rows then rejected: (2B, T) -> (2B,)."""
    rows = labels.shape[0]
    counts = [int((labels[r] != ignore_index).sum()) for r in range(rows)]
    out = []
    for r in range(rows):
        pair = r % (rows // 2)
        shared = min(counts[pair], counts[pair + rows // 2])
        seen, total = 0, 0.0
        for t in range(labels.shape[1]):
            if labels[r, t] != ignore_index:
                seen += 1
                total = total + token_logps[r, t].double() * (1.0 if seen <= shared else ld_alpha)
        out.append(torch.as_tensor(total, dtype=torch.float64))
    return torch.stack(out)


def wpo_weights_from_logits(logits, labels, ignore_index=-100):
    """TRL's use_weighting pair weights from (2B, T, V) logits: exp(mean(log p - (lse(2z) - 2 lse(z)))) per
    sequence, chosen weight times rejected weight, not differentiated (as TRL): -> (B,)."""
    z = logits.detach().double()
    logp = token_logps(z, labels, ignore_index)
    log_denom = torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1)
    mask = (labels != ignore_index).double()
    seq = torch.exp(((logp - log_denom) * mask).sum(-1) / mask.sum(-1).clamp(min=1))
    half = labels.shape[0] // 2
    return seq[:half] * seq[half:]


def bt_loss(rc, rr, margin=None, center_rewards_coefficient=None):
    """TRL RewardTrainer: mean -log s(r_c - r_r - margin) + coef * mean((r_c + r_r)^2)."""
    rc, rr = rc.double(), rr.double()
    m = torch.zeros_like(rc) if margin is None else torch.as_tensor(margin).double()
    loss = -_log_sigmoid(rc - rr - m).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((rc + rr) ** 2).mean()
    return loss


def cpo_loss(pc, pr, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, cpo_alpha=1.0, simpo_gamma=0.5,
             alpha=0.0, chosen_lengths=None, rejected_lengths=None):
    """TRL CPOTrainer: (loss, chosen_rewards, rejected_rewards); pc/pr summed completion log-probs."""
    if loss_type == "alphapo":  # CPOConfig.__post_init__
        loss_type, cpo_alpha = "simpo", 0.0
    pc, pr = pc.double(), pr.double()
    n = len(pc)
    eps = label_smoothing
    losses, rewards_c, rewards_r = [], [], []
    for i in range(n):
        lc, lr = pc[i], pr[i]
        if loss_type in ("ipo", "simpo"):
            lc = lc / max(float(chosen_lengths[i]), 1.0)
            lr = lr / max(float(rejected_lengths[i]), 1.0)
        if alpha != 0.0:
            lc = (1 - torch.exp(lc) ** (-alpha)) / alpha
            lr = (1 - torch.exp(lr) ** (-alpha)) / alpha
        m = lc - lr
        if loss_type == "simpo":
            m = m - simpo_gamma / beta
        if loss_type in ("sigmoid", "simpo"):
            loss = -(1 - eps) * _log_sigmoid(beta * m) - eps * _log_sigmoid(-beta * m)
        elif loss_type == "hinge":
            loss = torch.clamp(1 - beta * m, min=0)
        else:
            loss = (m - 1 / (2 * beta)) ** 2
        losses.append(loss)
        rewards_c.append(beta * lc.detach())
        rewards_r.append(beta * lr.detach())
    total = torch.stack(losses).mean()
    if cpo_alpha != 0.0:
        total = total + cpo_alpha * -pc.sum() / max(float(chosen_lengths.sum()), 1.0)
    return total, torch.stack(rewards_c), torch.stack(rewards_r)


def orpo_loss(pc, pr, chosen_lengths, rejected_lengths, *, beta=0.1, nll_loss=None):
    """TRL ORPOTrainer: nll - beta * mean log s(log odds_c - log odds_r) on average log-probs."""
    pc, pr = pc.double(), pr.double()
    n = len(pc)
    terms, rewards_c, rewards_r = [], [], []
    for i in range(n):
        ac = pc[i] / max(float(chosen_lengths[i]), 1.0)
        ar = pr[i] / max(float(rejected_lengths[i]), 1.0)
        odds_c = ac - torch.log(1 - torch.exp(ac))
        odds_r = ar - torch.log(1 - torch.exp(ar))
        terms.append(_log_sigmoid(odds_c - odds_r))
        rewards_c.append(beta * ac.detach())
        rewards_r.append(beta * ar.detach())
    if nll_loss is None:
        nll_loss = -pc.sum() / max(float(chosen_lengths.sum()), 1.0)
    return nll_loss - beta * torch.stack(terms).mean(), torch.stack(rewards_c), torch.stack(rewards_r)


def rrhf_loss(logps, lengths, sft_weight=1.0):
    """RRHF: mean over prompts of sum_{i better than j} max(0, p_j - p_i) - sft_weight * logps[0]."""
    logps = logps.double()
    per_prompt = []
    for b in range(logps.shape[0]):
        k = logps.shape[1]
        p = [logps[b, i] / max(float(lengths[b, i]), 1.0) for i in range(k)]
        rank = sum(torch.clamp(p[j] - p[i], min=0) for i in range(k) for j in range(i + 1, k))
        per_prompt.append(rank - sft_weight * logps[b, 0])
    return torch.stack(per_prompt).mean()


def pro_loss(logps, lengths, reward_scores=None, sft_weight=None):
    """PRO: mean over prompts of sum_k -log softmax_{i>=k}(p_i T_k^i)[k] - sft_weight * logps[0]."""
    logps = logps.double()
    k_total = logps.shape[1]
    if sft_weight is None:
        sft_weight = 0.05 * (k_total - 1) ** 2
    per_prompt = []
    for b in range(logps.shape[0]):
        p = [logps[b, i] / max(float(lengths[b, i]), 1.0) for i in range(k_total)]
        total = -sft_weight * logps[b, 0]
        for k in range(k_total - 1):
            if reward_scores is None:
                temps = {i: 1.0 for i in range(k, k_total)}
            else:
                r = [float(x) for x in reward_scores[b]]
                temps = {i: r[k] - r[i] for i in range(k + 1, k_total)}
                temps[k] = max(temps.values())
            logits = torch.stack([p[i] * temps[i] for i in range(k, k_total)])
            total = total - (logits[0] - torch.logsumexp(logits, dim=0))
        per_prompt.append(total)
    return torch.stack(per_prompt).mean()


def kl_penalty(logps, ref_logps, kind="k1"):
    """Schulman's estimators with r = pi_ref / pi: k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r."""
    log_r = ref_logps.double() - logps.double()
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    return torch.exp(log_r) - 1 - log_r
