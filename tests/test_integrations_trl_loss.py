"""fastpref's DPO-family loss math checked against TRL's own at run time: the same per-token log-probs are fed to
TRL 1.16's `DPOTrainer._compute_loss` (through a stub model that returns them as its fused head's output) and to
`fastpref.dpo_loss` (with `ld_token_weights` / `wpo_weights`): loss, gradient w.r.t. every token log-prob, and the
logged rewards agree for every loss_type, the f-divergences, LD-DPO's ld_alpha and WPO. Two copies of loss math
drift (Liger #1082); this catches it whenever TRL is installed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import trl_runs
from trl.trainer.utils import FusedCausalLMOutput

import fastpref
from fastpref.losses import LOSS_TYPES, ld_token_weights, wpo_weights

PAIRS, T = 4, 9


class _StubModel:
    """Stands in for the policy: its fused head returns the given per-token log-probs (and WPO's log Σp²)."""

    def __init__(self, token_logps, log_sum_sq_probs):
        self.token_logps, self.log_sum_sq_probs = token_logps, log_sum_sq_probs

    def __call__(self, *, labels, fused_lm_head, **_):
        assert fused_lm_head
        mask = labels[:, 1:] != -100
        zeros = torch.zeros_like(self.log_sum_sq_probs)
        return FusedCausalLMOutput(
            log_probs=self.token_logps * mask, entropy=zeros, mean_logits=zeros, is_top1=mask & False,
            log_sum_sq_probs=self.log_sum_sq_probs, label_mask=mask,
        )


@pytest.fixture(scope="module")
def dpo_trainer():
    trainer = trl_runs.trainer("dpo")
    trainer.model.train()
    trainer.precompute_ref_logps = True  # the reference log-probs come with the batch
    return trainer


def _batch():
    generator = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 1, 8, 3, 6, 2, 8, 4])  # completion tokens per sequence, chosen rows then rejected
    completion_mask = (torch.arange(T) >= T - lengths[:, None]).long()
    token_logps = -torch.rand(2 * PAIRS, T - 1, generator=generator) * 3
    log_sum_sq_probs = -torch.rand(2 * PAIRS, T - 1, generator=generator) * 2
    ref = -torch.rand(2, PAIRS, generator=generator) * 12
    return completion_mask, token_logps, log_sum_sq_probs, ref


def _trl(trainer, options):
    completion_mask, token_logps, log_sum_sq_probs, ref = _batch()
    token_logps.requires_grad_()
    trainer.loss_types = options.get("loss_type", ["sigmoid"])
    trainer.loss_weights = options.get("loss_weights") or [1.0] * len(trainer.loss_types)
    trainer.beta = options["beta"]
    trainer.label_smoothing = options["label_smoothing"]
    trainer.f_divergence_type = options.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = options.get("f_alpha_divergence_coef", 0.5)
    trainer.ld_alpha = options.get("ld_alpha")
    trainer.use_weighting = options.get("use_weighting", False)
    trainer._metrics["train"].clear()
    inputs = {
        "input_ids": torch.full((2 * PAIRS, T), 5), "attention_mask": torch.ones(2 * PAIRS, T, dtype=torch.long),
        "completion_mask": completion_mask, "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1],
    }
    loss = trainer._compute_loss(_StubModel(token_logps, log_sum_sq_probs), inputs, return_outputs=False)
    loss.backward()
    metrics = {k: trainer._metrics["train"][k][-1] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")}
    return loss.detach(), token_logps.grad, metrics


def _fastpref(options):
    completion_mask, token_logps, log_sum_sq_probs, ref = _batch()
    token_logps.requires_grad_()
    mask = completion_mask[:, 1:].bool()
    labels = torch.where(mask, 5, -100)
    weights = mask.float() if options.get("ld_alpha") is None else ld_token_weights(labels, options["ld_alpha"])
    chosen, rejected = (token_logps * weights).sum(-1).chunk(2)
    lengths = mask.sum(-1)
    pair_weights = wpo_weights(token_logps, log_sum_sq_probs, mask) if options.get("use_weighting") else None
    dpo_options = {k: v for k, v in options.items() if k not in ("ld_alpha", "use_weighting")}
    out = fastpref.dpo_loss(
        chosen, rejected, ref[0], ref[1], chosen_lengths=lengths[:PAIRS], rejected_lengths=lengths[PAIRS:],
        pair_weights=pair_weights, **dpo_options,
    )
    out.loss.backward()
    chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
    metrics = {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean().item()}
    return out.loss.detach(), token_logps.grad, metrics


CASES = [{"loss_type": [name]} for name in LOSS_TYPES] + [
    {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"loss_type": ["ipo"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["sigmoid"], "ld_alpha": 0.4},
    {"loss_type": ["ipo", "hinge"], "loss_weights": [0.7, 0.3], "ld_alpha": 0.0},
    {"loss_type": ["sigmoid"], "use_weighting": True},
    {"loss_type": ["apo_zero", "ipo"], "loss_weights": [1.0, 0.5], "use_weighting": True},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},  # MPO (TRL 1.16 raises for sft + use_weighting)
    {"loss_type": ["bco_pair", "sft"], "loss_weights": [0.8, 1.0]},
]


def _case_id(case):
    return "-".join(str(v if not isinstance(v, list) else "+".join(map(str, v))) for v in case.values())


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.smoke
def test_dpo_loss_math_is_trls(dpo_trainer, case):
    options = {"beta": 0.3, "label_smoothing": 0.1, **case}
    trl_loss, trl_grad, trl_metrics = _trl(dpo_trainer, options)
    options["loss_type"] = options["loss_type"] if len(options["loss_type"]) > 1 else options["loss_type"][0]
    loss, grad, metrics = _fastpref(options)
    torch.testing.assert_close(loss, trl_loss, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad, trl_grad, rtol=2e-5, atol=1e-7)
    assert metrics == pytest.approx(trl_metrics, rel=1e-6, abs=1e-7)
