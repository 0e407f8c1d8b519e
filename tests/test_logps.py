"""Parity of the log-prob functions with the float64 reference: values and gradients, with random
non-uniform upstream gradients, on awkward shapes and tile edges."""

import pytest
import torch

import fastpref
import reference as ref
from assertions import assert_close, assert_selected_stats
from fastpref.backends import torch_chunked, triton_backend
from fastpref.ops.token_logps import token_logps_op
from tolerances import VS_FP64

DTYPES = [torch.float64, torch.float32, torch.float16]
HEADS = [
    {},
    {"temperature": 0.7},
    {"softcap": 5.0},
    {"softcap": 30.0, "temperature": 1.3},
    {"logit_scale": 0.0625, "softcap": 5.0, "temperature": 0.8},  # a scale before the softcap (Cohere, Granite)
    {"logit_scale": 1.25},
]


def _small_tiles(monkeypatch):
    monkeypatch.setattr(torch_chunked, "VOCAB_CHUNK", 256)
    monkeypatch.setattr(torch_chunked, "TILE_BYTES", 3 * 256 * 8)  # 3 rows of fp64, 6 of fp32
    monkeypatch.setattr(triton_backend, "SLICE_QUANTUM", 256)  # the Triton backward's vocab slices
    monkeypatch.setattr(triton_backend, "MAX_SLICE_COLS", 512)


@pytest.fixture(params=["torch", "torch_small_tiles", "triton", "triton_small_tiles"])
def tiles(request, monkeypatch):
    """Each backend with default tile sizes, and with tiles patched small so that rows (and, on the
    torch backend, vocab) cross chunk edges."""
    monkeypatch.setenv("FASTPREF_BACKEND", request.param.split("_")[0])
    if request.param.endswith("small_tiles"):
        _small_tiles(monkeypatch)
    return request.param


@pytest.fixture(params=["torch", "torch_small_tiles", "triton"])
def backend(request, monkeypatch):
    """The logits path on each backend: chunked torch (default and small tiles), and the Triton
    kernels (on CPU under TRITON_INTERPRET=1, set in conftest)."""
    monkeypatch.setenv("FASTPREF_BACKEND", request.param.split("_")[0])
    if request.param == "torch_small_tiles":
        _small_tiles(monkeypatch)
    return request.param


def skip_if_torch_path(backend, dtype):
    """float64 runs the torch code on every backend: test it once."""
    if backend.startswith("triton") and dtype == torch.float64:
        pytest.skip("float64 runs the chunked torch code on the triton backend too")


def make_labels(shape, vocab, ignore_index=-100, ignored_fraction=0.3):
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignored_fraction] = ignore_index
    return labels


def grad_of(outputs, inputs, upstream):
    """Gradients of Σ upstream·outputs w.r.t. inputs (None for an input outside the graph)."""
    return torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)


def check_parity(actual, expected, inputs, dtype, name):
    """Values and gradients (under one random upstream gradient) of actual vs the fp64 expected."""
    rtol, atol = VS_FP64[dtype]
    assert actual.dtype == torch.promote_types(dtype, torch.float32)
    assert_close(actual, expected, rtol=rtol, atol=atol, name=f"{name} values")
    upstream = torch.randn_like(expected)
    got = grad_of(actual, inputs, upstream.to(actual.dtype))
    want = grad_of(expected, inputs, upstream)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g is not None and g.dtype == inputs[i].dtype
        assert_close(g, w, rtol=rtol, atol=atol, name=f"{name} grad of input {i}")


def logits_like(shape, dtype, shift=0.0, scale=3.0):
    values = torch.randn(shape, dtype=torch.float64) * scale + shift
    return values.to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("shape", [(3, 5, 2053), (1, 1, 7), (2, 4, 97)])
def test_token_logps(backend, dtype, head, shape):
    skip_if_torch_path(backend, dtype)
    logits = logits_like(shape, dtype)
    labels = make_labels(shape[:-1], shape[-1])
    actual = fastpref.token_logps(logits, labels, **head)
    expected = ref.token_logps(logits, labels, **head)
    check_parity(actual, expected, (logits,), dtype, "token_logps")


@pytest.mark.parametrize("shift", [-20.0, 20.0, -1e4, 1e4])
def test_token_logps_shifted_logits_stay_finite(backend, shift):
    logits = logits_like((2, 6, 2053), torch.float32, shift=shift)
    labels = make_labels((2, 6), 2053)
    check_parity(fastpref.token_logps(logits, labels), ref.token_logps(logits, labels), (logits,), torch.float32, "shifted")


def test_token_logps_large_vocab_and_ignore_index(backend):
    logits = logits_like((2, 3, 50257), torch.float32)
    labels = make_labels((2, 3), 50257, ignore_index=0)
    actual = fastpref.token_logps(logits, labels, ignore_index=0)
    check_parity(actual, ref.token_logps(logits, labels, ignore_index=0), (logits,), torch.float32, "V=50257")


def test_token_logps_non_contiguous_views(backend):
    base = logits_like((4, 7, 301), torch.float32)
    shifted = base[:, :-1]  # the usual shift: a view that cannot be flattened without a copy
    transposed = base.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    labels = make_labels((4, 7), 301)
    for name, logits, lab in (("shifted", shifted, labels[:, 1:]), ("transposed", transposed, labels)):
        assert not logits.is_contiguous()
        inputs = (base,) if name == "shifted" else (logits,)
        check_parity(fastpref.token_logps(logits, lab), ref.token_logps(logits, lab), inputs, torch.float32, name)


def test_all_ignored_and_empty_rows_give_zero_and_no_grad(backend):
    logits = logits_like((3, 4, 53), torch.float32, shift=1e4)
    labels = make_labels((3, 4), 53)
    labels[1] = -100
    out = fastpref.sequence_logps(logits, labels)
    mean = fastpref.sequence_logps(logits, labels, reduction="mean")
    assert out[1] == 0 and mean[1] == 0
    (grad,) = torch.autograd.grad(out.sum() + mean.sum(), logits)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()
    empty = logits_like((2, 0, 53), torch.float32)
    out = fastpref.sequence_logps(empty, torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (2,) and (out == 0).all()


@pytest.mark.parametrize("head", HEADS)
def test_token_stats(backend, head):
    logits = logits_like((3, 5, 2053), torch.float32)
    labels = make_labels((3, 5), 2053)
    labels[0, 0] = logits[0, 0].argmax()  # one target that is the top-1
    logps, stats = fastpref.token_logps(logits, labels, return_stats=True, **head)
    want = ref.token_stats(logits, labels, **head)
    assert_close(logps, ref.token_logps(logits, labels, **head), rtol=1e-5, atol=1e-6)
    for name in fastpref.TokenStats._fields:
        got = getattr(stats, name)
        assert got.requires_grad == (name == "entropy")  # only the entropy is differentiated
        if name == "is_top1":
            assert got.dtype == torch.bool and torch.equal(got, want[name]) and got[0, 0]
        else:
            assert_close(got, want[name], rtol=1e-5, atol=1e-5, name=name)


def test_statistics_and_fp32_gradients_stay_fp32_inside_a_callers_autocast(monkeypatch):
    """Inside torch.autocast (TRL's default), the logits tile of fp32 inputs comes from a bf16 GEMM as any
    F.linear's would; the statistics and the gradient's products after it stay fp32 (the torch backend's row dot
    products and dh product are matmuls, which autocast would otherwise run in bf16)."""
    monkeypatch.setenv("FASTPREF_BACKEND", "torch")
    hidden, weight, _, labels = linear_inputs(3, 7, 64, 3001, torch.float32, with_bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, stats = fastpref.linear_token_logps(hidden, weight, labels, return_stats=True)
        grads = torch.autograd.grad(logps.sum(), (hidden, weight))
    logits = (hidden.detach().bfloat16() @ weight.detach().bfloat16().T).double()  # the bf16 GEMM's output
    want = ref.token_stats(logits, labels)
    for name in ("entropy", "log_sum_sq_probs"):
        assert_close(getattr(stats, name), want[name], rtol=1e-5, atol=1e-5, name=name)
    expected = torch.autograd.grad(fastpref.linear_token_logps(hidden, weight, labels).sum(), (hidden, weight))
    for got, exact in zip(grads, expected, strict=True):
        assert (got - exact).norm() <= 0.05 * exact.norm()  # the forward's bf16 logits only, not a bf16 dh


def test_is_top1_is_the_first_maximum_across_vocab_chunks(backend):
    """Tied maxima in two vocab chunks (columns 10 and 300: chunks of 256 with small tiles): the target is the
    top-1 only at the first, as torch.argmax; a target in a later chunk below a tie is not."""
    logits = logits_like((4, 1, 600), torch.float32).detach()
    logits[:, :, [10, 300]] = 50.0
    logits[3, :, 500] = 60.0  # a later chunk's strictly greater maximum
    labels = torch.tensor([[10], [300], [20], [500]])
    _, stats = fastpref.token_logps(logits, labels, return_stats=True)
    assert stats.is_top1.squeeze(1).tolist() == [True, False, False, True]
    assert torch.equal(stats.is_top1, logits.argmax(-1) == labels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logps(backend, dtype, reduction):
    skip_if_torch_path(backend, dtype)
    logits = logits_like((4, 9, 2053), dtype)
    labels = make_labels((4, 9), 2053)
    labels[2] = -100
    actual = fastpref.sequence_logps(logits, labels, reduction=reduction, softcap=30.0)
    expected = ref.sequence_logps(logits, labels, reduction=reduction, softcap=30.0)
    check_parity(actual, expected, (logits,), dtype, "sequence_logps")


def linear_inputs(n_seqs, n_pos, hidden_size, vocab, dtype, with_bias=True):
    hidden = (torch.randn(n_seqs, n_pos, hidden_size, dtype=torch.float64)).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, dtype=torch.float64) / hidden_size**0.5).to(dtype).requires_grad_()
    bias = torch.randn(vocab, dtype=torch.float64).to(dtype).requires_grad_() if with_bias else None
    return hidden, weight, bias, make_labels((n_seqs, n_pos), vocab)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_token_logps(tiles, dtype, head, with_bias):
    skip_if_torch_path(tiles, dtype)
    hidden, weight, bias, labels = linear_inputs(3, 5, 24, 2053, dtype, with_bias)
    actual = fastpref.linear_token_logps(hidden, weight, labels, bias=bias, **head)
    expected = ref.token_logps(ref.linear_logits(hidden, weight, bias), labels, **head)
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    check_parity(actual, expected, inputs, dtype, "linear_token_logps")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_linear_sequence_logps(tiles, reduction):
    hidden, weight, bias, labels = linear_inputs(5, 7, 33, 997, torch.float32)
    labels[1] = -100
    actual = fastpref.linear_sequence_logps(hidden, weight, labels, bias=bias, reduction=reduction, softcap=10.0)
    expected = ref.sequence_logps(ref.linear_logits(hidden, weight, bias), labels, reduction=reduction, softcap=10.0)
    check_parity(actual, expected, (hidden, weight, bias), torch.float32, "linear_sequence_logps")


def test_linear_stats_and_non_contiguous_hidden(tiles):
    hidden, weight, _, labels = linear_inputs(3, 6, 16, 401, torch.float32, with_bias=False)
    view = hidden[:, 1:]
    logps, stats = fastpref.linear_token_logps(view, weight, labels[:, 1:], return_stats=True, temperature=0.9)
    logits = ref.linear_logits(view, weight)
    check_parity(logps, ref.token_logps(logits, labels[:, 1:], temperature=0.9), (hidden, weight), torch.float32, "view")
    want = ref.token_stats(logits, labels[:, 1:], temperature=0.9)
    for name in ("entropy", "mean_logit", "log_sum_sq_probs"):
        assert_close(getattr(stats, name), want[name], rtol=1e-5, atol=1e-5, name=name)


def test_frozen_head_gets_no_weight_grad():
    hidden, weight, bias, labels = linear_inputs(2, 5, 8, 101, torch.float32)
    weight.requires_grad_(False)
    out = fastpref.linear_sequence_logps(hidden, weight, labels, bias=bias)
    out.backward(torch.randn(2))
    assert weight.grad is None and hidden.grad is not None and bias.grad is not None


def test_gradcheck_float64():
    logits = logits_like((2, 3, 11), torch.float64)
    labels = make_labels((2, 3), 11)
    assert torch.autograd.gradcheck(lambda z: fastpref.token_logps(z, labels, softcap=4.0, temperature=0.8), (logits,))
    hidden, weight, bias, labels = linear_inputs(2, 3, 5, 13, torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w, b: fastpref.linear_sequence_logps(h, w, labels, bias=b, reduction="mean", softcap=3.0),
        (hidden, weight, bias),
    )


def test_masked_sum_and_mean():
    values = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 6) < 0.6
    mask[3] = False
    weights = torch.rand(4, 6, dtype=torch.float64)
    for mask_ in (mask, weights):
        check_parity(fastpref.masked_sum(values, mask_), ref.masked_sum(values, mask_), (values,), torch.float64, "sum")
        check_parity(fastpref.masked_mean(values, mask_), ref.masked_mean(values, mask_), (values,), torch.float64, "mean")
    poisoned = values.detach().clone()
    poisoned[~mask] = float("nan")
    assert torch.isfinite(fastpref.masked_sum(poisoned, mask)).all()
    assert fastpref.masked_mean(values, mask)[3] == 0
    # float weights below 1 in all: a weighted mean, not a sum divided by max(Σw, 1)
    twos = torch.full((1, 3), 2.0)
    assert fastpref.masked_mean(twos, torch.tensor([[0.25, 0.25, 0.0]])).item() == 2.0


def test_inplace_backward_writes_the_gradient_into_the_logits(backend):
    base = torch.randn(3, 5, 301) * 3
    labels = make_labels((3, 5), 301)
    expected_logits = base.clone().requires_grad_()
    upstream = torch.randn(3)
    fastpref.sequence_logps(expected_logits, labels).backward(upstream)
    leaf = base.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as a model's output is
    fastpref.sequence_logps(logits, labels, inplace_backward=True).backward(upstream)
    assert_close(leaf.grad, expected_logits.grad, rtol=1e-5, atol=1e-7, name="grad")
    assert_close(logits.detach(), expected_logits.grad, rtol=1e-5, atol=1e-7, name="logits' storage")


ENTROPY_HEADS = [{}, {"softcap": 5.0, "temperature": 0.7}, {"logit_scale": 0.25, "softcap": 3.0, "temperature": 1.3}]


@pytest.mark.parametrize("head", ENTROPY_HEADS)
def test_entropy_carries_a_gradient(backend, head):
    """An entropy bonus (GRPO's entropy_coef) differentiates H: ∂H/∂z = −p ⊙ (log p + H), alone and
    together with the log-probs, under non-uniform upstream gradients."""
    logits = logits_like((3, 5, 2053), torch.float32)
    labels = make_labels((3, 5), 2053)
    logps, stats = fastpref.token_logps(logits, labels, return_stats=True, **head)
    want = ref.token_stats(logits, labels, **head)["entropy"]
    want_logps = ref.token_logps(logits, labels, **head)
    g_logps, g_entropy = torch.randn(3, 5), torch.randn(3, 5)
    (got,) = torch.autograd.grad(stats.entropy, logits, g_entropy, retain_graph=True)
    (expected,) = torch.autograd.grad(want, logits, g_entropy.double(), retain_graph=True)
    assert_close(got, expected, rtol=1e-4, atol=1e-6, name="entropy alone")
    (got,) = torch.autograd.grad((logps, stats.entropy), logits, (g_logps, g_entropy))
    (expected,) = torch.autograd.grad((want_logps, want), logits, (g_logps.double(), g_entropy.double()))
    assert_close(got, expected, rtol=1e-4, atol=1e-6, name="log-probs and entropy")


@pytest.mark.parametrize("head", ENTROPY_HEADS)
def test_linear_entropy_carries_a_gradient(tiles, head):
    hidden, weight, bias, labels = linear_inputs(3, 5, 24, 2053, torch.float32)
    logps, stats = fastpref.linear_token_logps(hidden, weight, labels, bias=bias, return_stats=True, **head)
    logits = ref.linear_logits(hidden, weight, bias)
    want, want_logps = ref.token_stats(logits, labels, **head)["entropy"], ref.token_logps(logits, labels, **head)
    g_logps, g_entropy = torch.randn(3, 5), torch.randn(3, 5)
    got = torch.autograd.grad((logps, stats.entropy), (hidden, weight, bias), (g_logps, g_entropy))
    expected = torch.autograd.grad((want_logps, want), (hidden, weight, bias), (g_logps.double(), g_entropy.double()))
    for name, g, e in zip(("hidden", "weight", "bias"), got, expected):
        assert_close(g, e, rtol=1e-4, atol=1e-5, name=f"grad of {name}")


def test_gradcheck_entropy_float64():
    logits = logits_like((2, 3, 11), torch.float64)
    labels = make_labels((2, 3), 11)

    def entropy(z):
        return fastpref.token_logps(z, labels, return_stats=True, softcap=4.0, logit_scale=0.5)[1].entropy

    assert torch.autograd.gradcheck(entropy, (logits,))


@pytest.mark.parametrize("masked_columns", [slice(0, 8192), slice(100, 9000), slice(8192, 16384)])
def test_a_vocab_chunk_that_is_minus_inf_throughout(backend, masked_columns, monkeypatch):
    """A constrained-decoding mask (−inf over whole vocab chunks) gives log_softmax's values: no NaN,
    in values, statistics and gradients, on the logits and the linear paths and in linear_dpo_loss."""
    vocab = 16500
    logits = logits_like((2, 3, vocab), torch.float32)
    mask = torch.zeros(vocab)
    mask[masked_columns] = float("-inf")
    allowed = (mask == 0).nonzero().squeeze(1)
    labels = allowed[torch.randint(0, allowed.numel(), (2, 3))]  # targets among the allowed columns
    masked = logits + mask
    actual, stats = fastpref.token_logps(masked, labels, return_stats=True)
    check_parity(actual, ref.token_logps(masked, labels), (logits,), torch.float32, "masked chunk")
    want = ref.token_stats(masked, labels)
    for name in ("entropy", "log_sum_sq_probs"):
        assert_close(getattr(stats, name), want[name], rtol=1e-5, atol=1e-5, name=name)
    hidden, weight, _, _ = linear_inputs(2, 3, 8, vocab, torch.float32, with_bias=False)
    bias = mask.clone().requires_grad_()
    linear = fastpref.linear_sequence_logps(hidden, weight, labels, bias=bias)
    expected = ref.sequence_logps(ref.linear_logits(hidden, weight, bias), labels)
    check_parity(linear, expected, (hidden, weight), torch.float32, "masked chunk, linear")
    for budget in (1 << 30, 4096):  # the single pass, and the two-pass mode
        out = fastpref.linear_dpo_loss(hidden, weight, labels, None, None, bias=bias.detach(), memory_budget=budget,
                                       reference_free=True)  # fmt: skip
        assert torch.isfinite(out.loss) and torch.isfinite(out.chosen_logps).all()
        (grad,) = torch.autograd.grad(out.loss, hidden)
        assert torch.isfinite(grad).all()


SELECTIONS = [("entropy",), ("is_top1", "mean_logit"), ("log_sum_sq_probs", "entropy"), "mean_logit", []]


@pytest.mark.parametrize("selection", SELECTIONS)
def test_selected_statistics_only(backend, selection):
    """return_stats names the statistics wanted: those equal the reference, the others are None (and the
    op's stats output holds only the selected rows); the entropy's gradient flows when selected with others."""
    logits = logits_like((3, 5, 2053), torch.float32)
    labels = make_labels((3, 5), 2053)
    head = {"softcap": 20.0, "temperature": 0.8}
    logps, stats = fastpref.token_logps(logits, labels, return_stats=selection, **head)
    names = {selection} if isinstance(selection, str) else set(selection)
    want = ref.token_stats(logits, labels, **head)
    assert_selected_stats(stats, names, want)
    selector = fastpref.api.stats_selector(selection)
    op_stats = token_logps_op(logits.detach(), labels, -100, 0.8, 20.0, None, 1.0, selector, False)[2]
    assert op_stats.shape == (len(names), 3, 5)
    if "entropy" in names:
        g_logps, g_entropy = torch.randn(3, 5), torch.randn(3, 5)
        (got,) = torch.autograd.grad((logps, stats.entropy), logits, (g_logps, g_entropy))
        want_logps = ref.token_logps(logits, labels, **head)
        (expected,) = torch.autograd.grad((want_logps, want["entropy"]), logits, (g_logps.double(), g_entropy.double()))
        assert_close(got, expected, rtol=1e-4, atol=1e-6, name="log-probs and entropy")


@pytest.mark.parametrize("selection", SELECTIONS[:3])
def test_linear_selected_statistics_only(tiles, selection):
    hidden, weight, bias, labels = linear_inputs(3, 5, 24, 2053, torch.float32)
    logps, stats = fastpref.linear_token_logps(hidden, weight, labels, bias=bias, return_stats=selection)
    logits = ref.linear_logits(hidden, weight, bias)
    assert_selected_stats(stats, selection, ref.token_stats(logits, labels))
    want = ref.token_stats(logits, labels)
    g_logps = torch.randn(3, 5)
    outputs, upstream = [logps], [g_logps]
    want_outputs, want_upstream = [ref.token_logps(logits, labels)], [g_logps.double()]
    if "entropy" in selection:
        g_entropy = torch.randn(3, 5)
        outputs, upstream = outputs + [stats.entropy], upstream + [g_entropy]
        want_outputs, want_upstream = want_outputs + [want["entropy"]], want_upstream + [g_entropy.double()]
    got = torch.autograd.grad(outputs, (hidden, weight, bias), upstream)
    expected = torch.autograd.grad(want_outputs, (hidden, weight, bias), want_upstream)
    for name, g, e in zip(("hidden", "weight", "bias"), got, expected):
        assert_close(g, e, rtol=1e-4, atol=1e-5, name=f"grad of {name}")


def test_return_stats_names_are_checked():
    logits, labels = torch.randn(2, 7), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="return_stats.*'top1'"):
        fastpref.token_logps(logits, labels, return_stats=["entropy", "top1"])
    with pytest.raises(TypeError, match="return_stats"):
        fastpref.linear_token_logps(torch.randn(2, 3), torch.randn(7, 3), labels, return_stats=1)


@pytest.mark.parametrize("linear", [False, True])
def test_sequence_logps_return_the_token_statistics(linear):
    hidden, weight, bias, labels = linear_inputs(3, 5, 24, 2053, torch.float32)
    logits = ref.linear_logits(hidden, weight, bias).float().detach().requires_grad_()
    if linear:
        seq, stats = fastpref.linear_sequence_logps(hidden, weight, labels, bias=bias, return_stats="entropy")
        inputs = (hidden, weight, bias)
    else:
        seq, stats = fastpref.sequence_logps(logits, labels, reduction="mean", return_stats="entropy")
        inputs = (logits,)
    source = ref.linear_logits(hidden, weight, bias) if linear else logits
    want = ref.sequence_logps(source, labels, reduction="sum" if linear else "mean")
    check_parity(seq, want, inputs, torch.float32, "sequence log-probs")
    assert_close(stats.entropy, ref.token_stats(logits, labels)["entropy"], rtol=1e-5, atol=1e-5, name="entropy")
    assert stats.is_top1 is None and stats.mean_logit is None
