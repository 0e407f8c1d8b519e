"""A short tour of the API on a llama-shaped head, on any machine (`python -m fastpref.demo`).

Computes a DPO loss from hidden states with `linear_dpo_loss` and with the textbook path
(logits -> fp32 log_softmax -> gather -> sums -> loss), checks that losses and gradients agree, and
prints the time and the largest tensor each path allocated.
"""

from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastpref

PAIRS, POSITIONS, HIDDEN, VOCAB = 4, 256, 256, 32000


class LargestTensor(TorchDispatchMode):
    """Remembers the largest tensor (in bytes) any op returned."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def textbook_dpo(hidden, weight, labels, ref_chosen, ref_rejected, beta):
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    mask = labels != -100
    per_token = logp.gather(-1, torch.where(mask, labels, 0)[..., None]).squeeze(-1) * mask
    chosen, rejected = per_token.sum(-1).chunk(2)
    return -torch.nn.functional.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def main() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2 * PAIRS, POSITIONS, HIDDEN, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5).requires_grad_()
    labels = torch.randint(0, VOCAB, (2 * PAIRS, POSITIONS))
    labels[:, : POSITIONS // 3] = -100  # the prompt
    ref_chosen, ref_rejected = -torch.rand(PAIRS) * 100, -torch.rand(PAIRS) * 100
    print(f"{PAIRS} pairs x {POSITIONS} positions, hidden {HIDDEN}, vocab {VOCAB}, a third of each sequence masked")
    results = {}
    for name, run in (
        ("textbook", lambda: textbook_dpo(hidden, weight, labels, ref_chosen, ref_rejected, 0.1)),
        ("fastpref", lambda: fastpref.linear_dpo_loss(hidden, weight, labels, ref_chosen, ref_rejected, beta=0.1).loss),
    ):
        hidden.grad = weight.grad = None
        with LargestTensor() as largest:
            start = time.perf_counter()
            loss = run()
            loss.backward()
            seconds = time.perf_counter() - start
        results[name] = (loss.item(), hidden.grad.clone(), weight.grad.clone())
        print(f"  {name:9s} loss {loss.item():.6f}  {seconds:6.2f} s  largest tensor {largest.bytes / 2**20:7.1f} MB")
    (loss_a, dh_a, dw_a), (loss_b, dh_b, dw_b) = results["textbook"], results["fastpref"]
    print(
        f"  |loss diff| {abs(loss_a - loss_b):.2e}, max |dh diff| {(dh_a - dh_b).abs().max():.2e}, "
        f"max |dW diff| {(dw_a - dw_b).abs().max():.2e}"
    )


if __name__ == "__main__":
    main()
