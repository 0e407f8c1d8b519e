"""On a CUDA GPU: the compiled Triton kernels in bf16, judged by the comparative rule (STYLE.md):
fastpref's error vs the float64 truth may be no larger than the textbook bf16 path's own error,
times COMPARATIVE_FACTOR, plus COMPARATIVE_FLOOR. Skipped without CUDA."""

import pytest
import torch

import fastpref
import reference as ref
from tolerances import COMPARATIVE_FACTOR, COMPARATIVE_FLOOR

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_error(got, want):
    """Normwise relative error of got vs the float64 want."""
    return ((got.double() - want).norm() / want.norm().clamp(min=1e-30)).item()


def assert_no_worse(name, ours, textbook, truth):
    err, base = rel_error(ours, truth), rel_error(textbook, truth)
    assert err <= COMPARATIVE_FACTOR * base + COMPARATIVE_FLOOR, f"{name}: ours {err:.3g} vs textbook {base:.3g}"


def textbook_token_logps(logits, labels, softcap=None):
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    mask = labels != -100
    return logp.gather(-1, torch.where(mask, labels, 0)[..., None]).squeeze(-1) * mask


@pytest.mark.parametrize("vocab", [2053, 50257, 128256])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_logits_path_bf16(monkeypatch, vocab, softcap):
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    logits = (torch.randn(4, 512, vocab, device="cuda") * 4).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (4, 512), device="cuda")
    labels[:, :100] = -100
    upstream = torch.randn(4, 512, device="cuda")
    truth = ref.token_logps(logits, labels, softcap=softcap)
    (truth_grad,) = torch.autograd.grad(truth, logits, upstream.double())
    ours = fastpref.token_logps(logits, labels, softcap=softcap)
    (ours_grad,) = torch.autograd.grad(ours, logits, upstream)
    textbook = textbook_token_logps(logits, labels, softcap)
    (textbook_grad,) = torch.autograd.grad(textbook, logits, upstream)
    assert ours_grad.dtype == torch.bfloat16
    assert_no_worse("logps", ours, textbook, truth)
    assert_no_worse("grad", ours_grad, textbook_grad, truth_grad)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot"])
def test_linear_dpo_bf16(monkeypatch, loss_type):
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    pairs, positions, hidden_size, vocab = 4, 256, 1024, 32000
    hidden = torch.randn(2 * pairs, positions, hidden_size, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device="cuda") / hidden_size**0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (2 * pairs, positions), device="cuda")
    labels[:, :64] = -100
    ref_c, ref_r = -torch.rand(pairs, device="cuda") * 500, -torch.rand(pairs, device="cuda") * 500

    def loss_from(seq):
        chosen, rejected = seq.chunk(2)
        return fastpref.dpo_loss(chosen, rejected, ref_c, ref_r, loss_type=loss_type, beta=0.1,
                                 chosen_lengths=(labels[:pairs] != -100).sum(-1),
                                 rejected_lengths=(labels[pairs:] != -100).sum(-1)).loss  # fmt: skip

    truth = loss_from(ref.token_logps(ref.linear_logits(hidden, weight), labels).sum(-1))
    truth_grads = torch.autograd.grad(truth, (hidden, weight))
    textbook = loss_from(textbook_token_logps(hidden @ weight.T, labels).sum(-1))
    textbook_grads = torch.autograd.grad(textbook, (hidden, weight))
    ours = fastpref.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, loss_type=loss_type, beta=0.1).loss
    ours_grads = torch.autograd.grad(ours, (hidden, weight))
    assert_no_worse("loss", ours, textbook, truth)
    for name, o, t, w in zip(("dh", "dW"), ours_grads, textbook_grads, truth_grads):
        assert o.dtype == torch.bfloat16
        assert_no_worse(name, o, t, w)


def test_compile_fullgraph_on_gpu(monkeypatch):
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    hidden = torch.randn(4, 64, 256, device="cuda", requires_grad=True)
    weight = torch.randn(4096, 256, device="cuda", requires_grad=True)
    labels = torch.randint(0, 4096, (4, 64), device="cuda")

    def step(h, w):
        return fastpref.sequence_logps(h @ w.T, labels).sum() + fastpref.linear_sequence_logps(h, w, labels).sum()

    eager = step(hidden, weight)
    compiled = torch.compile(step, fullgraph=True)(hidden, weight)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-3)
