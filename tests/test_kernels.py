"""The row kernels of fastpref.kernels.token_logps through their launchers (under the interpreter)
against the float64 reference: block configs patched small (full blocks, a masked tail, several rows
per program), the logit scale, the entropy's gradient, vocab slices, logits whose leading dims no
view can merge, −inf logits, and the error a kernel that cannot compile raises."""

import dataclasses

import pytest
import torch
import triton
import triton.language as tl

import reference as ref
from assertions import assert_close
from fastpref.kernels import config
from fastpref.kernels import token_logps as kernels
from fastpref.kernels.launch import KernelLaunchError, launch
from fastpref.params import ALL_STATS, ENTROPY, HeadParams, selected
from tolerances import VS_FP64

HEADS = [
    HeadParams(),
    HeadParams(temperature=0.7, logit_scale=1.25),
    HeadParams(temperature=1.3, softcap=4.0, logit_scale=2.0),
]


def reference(logits, labels, params: HeadParams):
    """(log-probs, entropy) in float64, differentiable w.r.t. logits; the logit scale applied first."""
    z = ref.transform_logits(logits.double() * params.logit_scale, params.temperature, params.softcap)
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != params.ignore_index
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    entropy = torch.special.entr(logp.exp()).sum(-1)  # −Σ p log p, 0 where p = 0
    zeros = torch.zeros_like(picked)
    return torch.where(valid, picked, zeros), torch.where(valid, entropy, zeros)


def make_labels(shape, vocab):
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < 0.3] = -100
    return labels


def check_backward(logits, labels, params, dtype, with_entropy, in_place):
    """The launchers' forward and backward vs the reference's values and gradient under random
    upstream gradients of the log-probs (and of the entropy)."""
    rtol, atol = VS_FP64[dtype]
    logps, lse, stats = kernels.logits_forward(logits, labels, params, ENTROPY if with_entropy else 0)
    want_logps, want_entropy = reference(logits.detach().requires_grad_(), labels, params)
    assert_close(logps, want_logps, rtol=rtol, atol=atol, name="logps")
    g, g_entropy = torch.randn(labels.shape), torch.randn(labels.shape)
    source = logits.detach().requires_grad_()
    outputs, upstream = [reference(source, labels, params)[0]], [g.double()]
    entropy = {}
    if with_entropy:
        assert_close(stats[0], want_entropy, rtol=rtol, atol=atol, name="entropy")
        outputs.append(reference(source, labels, params)[1])
        upstream.append(g_entropy.double())
        entropy = {"entropy": stats[0], "grad_entropy": g_entropy}
    (want,) = torch.autograd.grad(outputs, source, upstream)
    target = logits.detach().clone()
    got = kernels.logits_backward(target, labels, lse, g, params, in_place, **entropy)
    assert got.dtype == dtype and got.shape == logits.shape
    assert_close(got, want, rtol=max(rtol, 1e-4 if with_entropy else 0), atol=atol, name="grad")
    if in_place:
        assert got.data_ptr() == target.data_ptr()
    assert (got[labels == params.ignore_index] == 0).all()


@pytest.mark.parametrize(
    "tile, vocab, params",
    [(16, 37, HEADS[0]), (64, 97, HEADS[1]), (256, 97, HEADS[2]), (256, 64, HEADS[1]), (64, 200, HEADS[2])],
)
@pytest.mark.smoke
def test_small_blocks(monkeypatch, tile, vocab, params):
    """Tiles patched small: (16, 37) two full blocks and a tail of five; (256, 97) two rows per
    program, tail only; (256, 64) four rows per program, full blocks only."""
    monkeypatch.setattr(config, "INTERPRETER_TILE", tile)
    logits = torch.randn(2, 3, vocab) * 3
    labels = make_labels((2, 3), vocab)
    labels[0, 0] = logits[0, 0].argmax()  # one target that is the top-1
    labels[1, 2] = -100
    logps, lse, stats = kernels.logits_forward(logits, labels, params, ALL_STATS)
    want = ref.token_stats(logits * params.logit_scale, labels, temperature=params.temperature, softcap=params.softcap)
    assert_close(logps, reference(logits, labels, params)[0], rtol=1e-5, atol=1e-6, name="logps")
    for i, name in enumerate(("entropy", "is_top1", "mean_logit", "log_sum_sq_probs")):
        assert_close(stats[i], want[name].double(), rtol=1e-5, atol=1e-5, name=name)
    assert stats[1, 0, 0] == 1
    check_backward(logits, labels, params, torch.float32, with_entropy=True, in_place=True)
    check_backward(logits.half(), labels, params, torch.float16, with_entropy=False, in_place=False)


@pytest.mark.parametrize("selector", range(1, ALL_STATS + 1))
def test_each_selection_of_statistics_computes_exactly_those(monkeypatch, selector):
    """Every subset of the four statistics: (k, ...) rows in STAT_NAMES order, equal to the reference's;
    a multi-row program with a masked tail and a softcap."""
    monkeypatch.setattr(config, "INTERPRETER_TILE", 64)
    params = HEADS[2]
    logits = torch.randn(2, 3, 97) * 3
    labels = make_labels((2, 3), 97)
    labels[0, 0] = logits[0, 0].argmax()
    logps, _lse, stats = kernels.logits_forward(logits, labels, params, selector)
    want = ref.token_stats(logits * params.logit_scale, labels, temperature=params.temperature, softcap=params.softcap)
    assert stats.shape == (len(selected(selector)), 2, 3)
    for row, name in zip(stats, selected(selector)):
        assert_close(row, want[name].double(), rtol=1e-5, atol=1e-5, name=name)
    assert_close(logps, reference(logits, labels, params)[0], rtol=1e-5, atol=1e-6, name="logps")


@pytest.mark.smoke
def test_vocab_slices_of_the_backward(monkeypatch):
    """The linear path's backward runs on vocab slices with the whole row's lse: a label equal to the
    slice's width means the target lies in another slice (no onehot term here); -1 is ignored."""
    monkeypatch.setattr(config, "INTERPRETER_TILE", 64)
    logits = torch.randn(7, 300) * 3
    labels = make_labels((7,), 300)
    params = HeadParams(softcap=6.0)
    _, lse, _ = kernels.logits_forward(logits, labels, params, 0)
    g = torch.randn(7)
    full = kernels.logits_backward(logits, labels, lse, g, params)
    sliced = dataclasses.replace(params, ignore_index=-1)
    ignored = labels == -100
    for c0, c1 in ((0, 100), (100, 229), (229, 300)):
        local = torch.where(ignored, -1, torch.where((labels >= c0) & (labels < c1), labels - c0, c1 - c0))
        part = kernels.logits_backward(logits[:, c0:c1].clone(), local, lse, g, sliced, in_place=True)
        assert_close(part, full[:, c0:c1], rtol=1e-6, atol=1e-7, name=f"slice {c0}:{c1}")


@pytest.mark.parametrize("in_place", [False, True])
def test_backward_when_no_view_merges_the_leading_dims(in_place):
    """4-D logits after transpose(0, 1): their (B·A, T) rows are a copy, not a view. The gradient
    must still reach the caller (out of place) or the logits' own storage (in place)."""
    base = torch.randn(3, 2, 4, 37) * 3
    logits = base.transpose(0, 1)
    labels = make_labels((2, 3, 4), 37)
    params = HeadParams(temperature=0.9)
    _, lse, _ = kernels.logits_forward(logits, labels, params, 0)
    g = torch.randn(2, 3, 4)
    source = logits.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference(source, labels, params)[0], source, g.double())
    got = kernels.logits_backward(logits, labels, lse, g, params, in_place=in_place)
    assert_close(got, want, rtol=1e-5, atol=1e-6, name="grad")
    if in_place:
        assert got.data_ptr() == logits.data_ptr()
        assert_close(base.transpose(0, 1), want, rtol=1e-5, atol=1e-6, name="the logits' storage")


def test_minus_inf_columns(monkeypatch):
    """A constrained-decoding mask: −inf over whole blocks gives log_softmax's values and gradient,
    and an entropy whose value and gradient have no NaN (no gradient on the masked columns)."""
    monkeypatch.setattr(config, "INTERPRETER_TILE", 64)
    logits = torch.randn(4, 300) * 3
    logits[:, :130] = float("-inf")
    logits[1, 200:] = float("-inf")
    labels = torch.randint(130, 200, (4,))
    params = HeadParams()
    check_backward(logits, labels, params, torch.float32, with_entropy=False, in_place=False)
    logps, lse, stats = kernels.logits_forward(logits, labels, params, ALL_STATS)
    assert_close(stats[0], reference(logits, labels, params)[1], rtol=1e-5, atol=1e-6, name="entropy")
    g, g_entropy = torch.randn(4), torch.randn(4)
    grad = kernels.logits_backward(logits, labels, lse, g, params, entropy=stats[0], grad_entropy=g_entropy)
    assert torch.isfinite(grad).all() and (grad[logits == float("-inf")] == 0).all()


@triton.jit
def _broken_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), undefined_value)  # noqa: F821


def test_a_kernel_that_cannot_compile_names_itself_and_the_way_around():
    expected = r"kernel test_kernels\._broken_kernel failed.*\n.*FASTPREF_BACKEND=torch"
    with pytest.raises(KernelLaunchError, match=expected):
        launch(_broken_kernel, (1,), torch.zeros(4), num_warps=1, BLOCK=4)


def test_logit_scale_must_be_positive():
    with pytest.raises(ValueError, match="logit_scale"):
        kernels.logits_forward(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), HeadParams(logit_scale=-1.0), False)
