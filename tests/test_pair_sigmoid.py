"""The pairwise sigmoid kernel behind dpo_loss (loss_type="sigmoid") and bt_loss on the Triton
backend (CPU under TRITON_INTERPRET=1): values and gradients against the float64 reference."""

import pytest
import torch

import fastpref
import reference as ref
from assertions import assert_close
from fastpref.ops import pair_sigmoid

B = 37


@pytest.fixture
def kernel_calls(monkeypatch):
    """Runs on the Triton backend and counts the kernel's launches (so a silent torch fallback fails)."""
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    calls = []
    op = pair_sigmoid.pair_sigmoid_op
    monkeypatch.setattr(fastpref.api, "pair_sigmoid_op", lambda *a: calls.append(a) or op(*a))
    return calls


def pair_inputs(dtype=torch.float32):
    policy = [(-torch.rand(B, dtype=torch.float64) * 40).to(dtype).requires_grad_() for _ in range(2)]
    refs = [(p.detach().double() + torch.randn(B, dtype=torch.float64) * 3).to(dtype) for p in policy]  # log-ratios ~ ±3
    return policy, refs


@pytest.mark.parametrize("f_divergence_type", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("reference_free", [False, True])
def test_dpo_sigmoid(kernel_calls, f_divergence_type, reference_free):
    (pc, pr), (rc, rr) = pair_inputs()
    if reference_free:
        rc = rr = None
    options = {"beta": 0.05, "f_divergence_type": f_divergence_type, "f_alpha_divergence_coef": 0.7}
    out = fastpref.dpo_loss(pc, pr, rc, rr, reference_free=reference_free, **options)
    zeros = torch.zeros(B, dtype=torch.float64)
    want_losses, want_c, want_r = ref.dpo_pair_losses(
        pc, pr, zeros if rc is None else rc, zeros if rr is None else rr,
        beta=0.05, f_divergence_type=f_divergence_type, alpha=0.7,
    )  # fmt: skip
    assert len(kernel_calls) == 1
    assert_close(out.loss, want_losses.mean(), rtol=1e-5, atol=1e-6, name="loss")
    assert_close(out.chosen_rewards, want_c, rtol=1e-5, atol=1e-6, name="chosen_rewards")
    assert_close(out.rejected_rewards, want_r, rtol=1e-5, atol=1e-6, name="rejected_rewards")
    got = torch.autograd.grad(out.loss, (pc, pr), torch.tensor(1.3))
    want = torch.autograd.grad(want_losses.mean(), (pc, pr), torch.tensor(1.3, dtype=torch.float64))
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert_close(g, w, rtol=1e-5, atol=1e-7, name="grad")


@pytest.mark.parametrize("margin", [None, 0.3, "tensor"])
@pytest.mark.parametrize("center", [None, 0.01])
def test_bt(kernel_calls, margin, center):
    (rc, rr), _ = pair_inputs(torch.float16)
    margin = torch.rand(B, dtype=torch.float16) if margin == "tensor" else margin
    loss = fastpref.bt_loss(rc, rr, margin=margin, center_rewards_coefficient=center)
    want = ref.bt_loss(rc, rr, margin=margin, center_rewards_coefficient=center)
    assert len(kernel_calls) == 1
    assert loss.dtype == torch.float16  # as the torch backend returns it
    assert_close(loss, want, rtol=1e-3, atol=1e-4, name="bt loss")
    got = torch.autograd.grad(loss, (rc, rr), torch.tensor(0.7))
    expected = torch.autograd.grad(want, (rc, rr), torch.tensor(0.7, dtype=torch.float64))
    for g, w in zip(got, expected):
        assert g.dtype == torch.float16
        assert_close(g, w, rtol=2e-3, atol=1e-4, name="bt grad")


def test_other_losses_and_bad_input_stay_on_the_torch_path(kernel_calls):
    (pc, pr), (rc, rr) = pair_inputs()
    fastpref.dpo_loss(pc, pr, rc, rr, loss_type="hinge")
    fastpref.dpo_loss(pc, pr, rc, rr, pair_weights=torch.rand(B))
    assert kernel_calls == []
    with pytest.raises(ValueError, match="beta"):
        fastpref.dpo_loss(pc, pr, rc, rr, beta=-1.0)
    with pytest.raises(ValueError, match="margin"):
        fastpref.bt_loss(pc, pr, margin=torch.ones(3))
    assert kernel_calls == []


def test_backends_agree_on_dtype_and_margin_gradient(kernel_calls, monkeypatch):
    """The kernel path returns the dtype the torch path returns, and a margin that requires grad gets it."""
    (pc, pr), (rc, rr) = pair_inputs(torch.float16)
    margin = torch.rand(B, dtype=torch.float16, requires_grad=True)
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("FASTPREF_BACKEND", backend)
        dpo = fastpref.dpo_loss(pc, pr, rc, rr).loss
        bt = fastpref.bt_loss(pc, pr, margin=margin)
        (margin_grad,) = torch.autograd.grad(bt, margin)
        results[backend] = (dpo, bt, margin_grad)
    for ours, theirs in zip(results["triton"], results["torch"]):
        assert ours.dtype == theirs.dtype == torch.float16
        assert_close(ours, theirs, rtol=2e-3, atol=1e-4, name="triton vs torch")
    assert len(kernel_calls) == 1  # the dpo loss; bt with a differentiable margin stays on the torch path
