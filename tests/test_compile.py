"""torch.compile(fullgraph=True) traces a training step through the custom ops, on both backends:
no graph break, and the same loss and gradients as eager."""

import pytest
import torch

import fastpref
from assertions import assert_close


def dpo_step(hidden, weight, labels, ref_chosen, ref_rejected):
    """Logits path and fused linear path in one step: the two losses share nothing but inputs."""
    logits = hidden @ weight.T
    seq = fastpref.sequence_logps(logits, labels, softcap=20.0)
    chosen, rejected = seq.chunk(2)
    logits_loss = fastpref.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1).loss
    linear_seq = fastpref.linear_sequence_logps(hidden, weight, labels, reduction="mean")
    return logits_loss + linear_seq.square().mean()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile_matches_eager(monkeypatch, backend):
    monkeypatch.setenv("FASTPREF_BACKEND", backend)
    torch._dynamo.reset()
    hidden = torch.randn(4, 6, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    labels = torch.randint(0, 97, (4, 6))
    labels[:, :2] = -100
    refs = (-torch.rand(2) * 30, -torch.rand(2) * 30)
    eager = dpo_step(hidden, weight, labels, *refs)
    eager_grads = torch.autograd.grad(eager, (hidden, weight))
    compiled = torch.compile(dpo_step, fullgraph=True, backend="aot_eager")(hidden, weight, labels, *refs)
    compiled_grads = torch.autograd.grad(compiled, (hidden, weight))
    assert_close(compiled, eager, rtol=1e-5, atol=1e-6, name="loss")
    for got, want in zip(compiled_grads, eager_grads):
        assert_close(got, want, rtol=1e-5, atol=1e-6, name="grad")
