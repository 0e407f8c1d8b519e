"""Numerics under TRL 1.16's defaults: its trainers train under bf16 autocast (on a CPU too). For one step of each
patched trainer (SFT, DPO, KTO, GRPO, RLOO; tiny Llama, same seed and data), the gradient the optimizer receives
under bf16 autocast with fastpref's head is no further from the fp32 gradient than stock TRL's bf16 gradient is,
within 1.25x (the distance: the L2 norm of the difference over all parameters)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import trl_runs
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fastpref.integrations import trl as fastpref_trl

KINDS = ["sft", "dpo", "kto", "grpo", "rloo"]
FACTOR = 1.25


def first_step_gradient(kind: str, patched: bool, bf16: bool) -> torch.Tensor:
    """The policy's gradient as its optimizer's first step receives it (unclipped), flattened in fp32."""
    run = trl_runs.trainer(kind, max_steps=1, max_grad_norm=0.0, bf16=bf16)
    if patched:
        fastpref_trl.patch(run)
    seen = []

    def snapshot(optimizer, *_):
        if not seen:
            params = [p for p in run.model.parameters() if p.requires_grad]
            seen.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten()
                                   for p in params]))

    handle = register_optimizer_step_pre_hook(snapshot)
    try:
        run.train()
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("kind", KINDS)
def test_patched_bf16_gradient_is_as_close_to_fp32_as_trls(kind):
    reference = first_step_gradient(kind, patched=False, bf16=False)
    stock = first_step_gradient(kind, patched=False, bf16=True)
    patched = first_step_gradient(kind, patched=True, bf16=True)
    trl_error = (stock - reference).norm().item()
    our_error = (patched - reference).norm().item()
    print(f"{kind}: |g| {reference.norm():.3e}, TRL bf16 {trl_error:.3e}, fastpref bf16 {our_error:.3e}, "
          f"ratio {our_error / trl_error:.2f}")
    assert reference.norm() > 0 and trl_error > 0  # a step with a gradient, and bf16 that changes it
    assert our_error <= FACTOR * trl_error, (our_error, trl_error)
