"""fastpref's GRPO-family loss (`fastpref.losses.policy`) checked against TRL 1.16's own at run time: the same
rollouts (per-token log-probs of the policy, the old policy and the reference, entropies, mask, advantages) are fed
to `GRPOTrainer._compute_loss` (its log-prob pass replaced by one returning them) and to `policy_loss`: loss,
gradients w.r.t. the log-probs and the entropies, and the logged kl / entropy / clip ratios agree for every
loss_type TRL accepts and both importance_sampling_levels. The advantages are checked the same way against TRL's
group statistics (`nanstd`, scale_rewards)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import trl_runs
from trl.trainer.utils import nanstd

from fastpref.losses.policy import CLIPPED_LOSS_TYPES, POLICY_LOSS_TYPES, group_advantages, high_entropy_mask, \
    policy_loss

B, T, MAX_COMPLETION = 6, 7, 9


@pytest.fixture(scope="module")
def grpo_trainer():
    trainer = trl_runs.trainer("grpo")
    trainer.model.train()
    return trainer


def _rollouts(seed=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 4, 0, 6, 3])  # one empty completion (masked_truncated) among them
    mask = (torch.arange(T) < lengths[:, None]).long()
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64).float() * 3
    old = logps + torch.randn(B, T, generator=g) * 0.3  # ratios well outside 1 +- 0.2: the clips are hit
    ref = logps + torch.randn(B, T, generator=g) * 0.5
    entropies = torch.rand(B, T, generator=g) * 2
    advantages = torch.randn(B, generator=g)
    return mask, logps, old, ref, entropies, advantages


def _trl(trainer, options, accumulation):
    mask, logps, old, ref, entropies, advantages = _rollouts()
    logps.requires_grad_()
    entropies.requires_grad_()
    args = trainer.args
    trainer.loss_type = options["loss_type"]
    trainer.importance_sampling_level = options["importance_sampling_level"]
    trainer.beta = options["beta"]
    trainer.epsilon_low = options["epsilon"]
    trainer.epsilon_high = options.get("epsilon_high") or options["epsilon"]
    trainer.top_entropy_quantile = options.get("top_entropy_quantile", 1.0)
    trainer.entropy_coef = options.get("entropy_coef", 0.0)
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0
    trainer.max_completion_length = MAX_COMPLETION
    trainer.current_gradient_accumulation_steps = accumulation
    args.delta = options.get("delta")
    args.use_bias_correction_kl = options.get("use_bias_correction_kl", True)
    args.steps_per_generation = accumulation
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    trainer._metrics["train"].clear()
    inputs = {
        "prompt_ids": torch.full((B, 3), 5), "prompt_mask": torch.ones(B, 3, dtype=torch.long),
        "completion_ids": torch.full((B, T), 6), "completion_mask": mask, "advantages": advantages,
        "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(mask.sum() * 3)),  # a generation batch 3x this micro-batch
    }
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), logps.grad, entropies.grad, metrics


def _fastpref(options, accumulation):
    mask, logps, old, ref, entropies, advantages = _rollouts()
    logps.requires_grad_()
    entropies.requires_grad_()
    quantile = options.get("top_entropy_quantile", 1.0)
    entropy_mask = high_entropy_mask(entropies, mask, 1 - quantile) if quantile < 1.0 else None
    out = policy_loss(
        logps, old, advantages, mask, ref_logps=ref, entropies=entropies, entropy_mask=entropy_mask,
        max_completion_length=MAX_COMPLETION, num_items=mask.sum() * 3, accumulation=accumulation,
        **{k: v for k, v in options.items() if k != "top_entropy_quantile"},
    )
    out.loss.backward()
    return out, logps.grad, entropies.grad, mask


CASES = [{"loss_type": name, "importance_sampling_level": level} for name in POLICY_LOSS_TYPES
         for level in ("token", "sequence")] + [
    {"loss_type": "dapo", "beta": 0.0},
    {"loss_type": "grpo", "use_bias_correction_kl": False},
    {"loss_type": "dapo", "entropy_coef": 0.03, "top_entropy_quantile": 0.4},
    {"loss_type": "bnpo", "entropy_coef": -0.1, "epsilon_high": 0.28},
    {"loss_type": "dr_grpo", "delta": 1.3, "accumulation": 2},
    {"loss_type": "cispo", "epsilon_high": 1.1, "accumulation": 2},
    {"loss_type": "luspo", "importance_sampling_level": "sequence", "top_entropy_quantile": 0.2},
]


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.smoke
def test_grpo_loss_math_is_trls(grpo_trainer, case):
    options = {"beta": 0.04, "epsilon": 0.2, "importance_sampling_level": "token", **case}
    accumulation = options.pop("accumulation", 1)
    trl_loss, trl_grad, trl_entropy_grad, trl_metrics = _trl(grpo_trainer, options, accumulation)
    out, grad, entropy_grad, mask = _fastpref(options, accumulation)
    torch.testing.assert_close(out.loss.detach(), trl_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-7)
    if options.get("entropy_coef"):
        torch.testing.assert_close(entropy_grad, trl_entropy_grad, rtol=1e-6, atol=1e-7)
    m = mask.float()
    if options["beta"]:
        assert (out.kl * m).sum().item() / m.sum().item() == pytest.approx(trl_metrics["kl"], rel=1e-6)
    else:
        assert "kl" not in trl_metrics
    if options["loss_type"] in CLIPPED_LOSS_TYPES:
        advantages = _rollouts()[-1].unsqueeze(1)
        low = ((out.ratio < 1 - options["epsilon"]) & (advantages < 0)).float()
        if low.shape[1] == 1:
            value = low.sum().item() / low.shape[0]
        else:
            value = (low * m).sum().item() / m.sum().item()
        assert value == pytest.approx(trl_metrics["clip_ratio/low_mean"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_are_trls(scale_rewards):
    rewards = torch.tensor([1.0, 2.0, 4.0, 3.0, 3.0, 3.0, 0.5, float("nan"), -1.0, 2.0, 7.0, 1.0])
    k = 3
    out = group_advantages(rewards, k, scale_rewards)
    # TRL 1.16 GRPOTrainer._generate_and_score_completions, sum_then_normalize
    mean = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k)
    expected = rewards - mean
    if scale_rewards != "none":
        expected = expected / (std + 1e-4)
    torch.testing.assert_close(out.advantages, torch.nan_to_num(expected, nan=0.0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.zero_std, torch.isclose(std, torch.zeros_like(std)))
    if scale_rewards != "batch":  # the group of equal rewards has zero spread
        assert out.zero_std[3:6].all() and not out.zero_std[:3].any()


def test_rollout_logps_and_entropy_are_trls_at_temperature(grpo_trainer):
    """The per-token log-probs and entropies the RL loop trains on (`fastpref.train.rl.token_logps`: the fused head
    on the completion positions, logits / temperature) equal TRL's own (`_get_per_token_logps_and_entropies`, its
    fused head made with the trainer's temperature, 0.7 here), prompts left-padded and completions right-padded."""
    from fastpref.train.rl import token_logps

    trainer = grpo_trainer
    assert trainer.temperature == 0.7
    model = trainer.model
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(11)
    prompt_ids = torch.randint(3, vocab, (4, 5), generator=g)
    prompt_mask = (torch.arange(5) >= torch.tensor([0, 2, 1, 4])[:, None]).long()  # left padding
    completion_ids = torch.randint(3, vocab, (4, 6), generator=g)
    mask = (torch.arange(6) < torch.tensor([6, 3, 1, 5])[:, None]).long()
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, mask], 1)
    with torch.no_grad():
        theirs, their_entropy, _ = type(trainer)._get_per_token_logps_and_entropies(
            trainer, model, input_ids, attention, completion_ids.shape[1], compute_entropy=True)
        ours, entropy = token_logps(model, prompt_ids, prompt_mask, completion_ids, mask, 0.7, True)
    m = mask.bool()
    torch.testing.assert_close(ours[m], theirs[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[m], their_entropy[m], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        at_one, _ = token_logps(model, prompt_ids, prompt_mask, completion_ids, mask, 1.0, False)
    assert (at_one[m] - theirs[m]).abs().max() > 1e-3  # the temperature matters: the check can fail


@pytest.fixture(scope="module")
def rloo_trainer():
    trainer = trl_runs.trainer("rloo")
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_rloo_loss_math_is_trls(rloo_trainer, epsilon_high):
    """RLOO's sequence-level clipped surrogate equals TRL 1.16 RLOOTrainer._compute_loss: loss and gradients."""
    from fastpref.losses.policy import rloo_loss

    trainer = rloo_trainer
    trainer.epsilon_low, trainer.epsilon_high = 0.2, epsilon_high or 0.2
    mask, logps, old, _, entropies, advantages = _rollouts(7)
    old_seq = (old * mask).sum(1) + torch.tensor([0.1, -0.3, 0.0, 0.2, -0.05, 0.4])  # ratios on both sides
    theirs = logps.clone().requires_grad_()
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (theirs, entropies, None)
    inputs = {"prompt_ids": torch.full((B, 3), 5), "prompt_mask": torch.ones(B, 3, dtype=torch.long),
              "completion_ids": torch.full((B, T), 6), "completion_mask": mask, "advantages": advantages,
              "old_logps": old_seq}
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()
    ours = logps.clone().requires_grad_()
    loss, ratio = rloo_loss(ours, old_seq, advantages, mask.float(), epsilon=0.2, epsilon_high=epsilon_high)
    loss.backward()
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
    low = ((ratio < 0.8) & (advantages < 0)).float().mean().item()
    assert low == pytest.approx(trainer._metrics["train"]["clip_ratio/low_mean"][-1], abs=1e-7)


@pytest.mark.parametrize("normalize", [False, True])
def test_leave_one_out_advantages_are_trls(normalize):
    from fastpref.losses.policy import leave_one_out_advantages

    rewards = torch.tensor([1.0, 2.0, 4.0, 3.0, 3.0, 3.0, 0.5, float("nan"), -1.0, 2.0, 7.0, 1.0])
    k = 3
    # TRL 1.16 RLOOTrainer._generate_and_score_completions
    grouped = rewards.view(-1, k)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    expected = rewards - baselines
    if normalize:
        expected = (expected - torch.nanmean(expected)) / (nanstd(expected) + 1e-4)
    torch.testing.assert_close(leave_one_out_advantages(rewards, k, normalize),
                               torch.nan_to_num(expected, nan=0.0), rtol=1e-6, atol=1e-7)
