"""linear_dpo_loss against the float64 reference (logits -> log_softmax -> sums -> TRL's loss), in
each of its modes: one pair chunk, several pair chunks (single pass), and the two-pass mode."""

import pytest
import torch

import fastpref
import reference as ref
from assertions import assert_close, assert_selected_stats
from fastpref.backends import torch_chunked
from fastpref.losses import LOSS_TYPES
from fastpref.ops import linear_dpo as linear_dpo_module
from tolerances import VS_FP64

PAIRS, POSITIONS, HIDDEN, VOCAB = 3, 7, 12, 2053
NEEDS_SMOOTHING = {"exo_pair": 0.05, "robust": 0.1}


def row_bytes(dtype):
    """Bytes the single pass holds per token row (mirrors fused_rows_budget)."""
    itemsize = torch.finfo(dtype).bits // 8
    return VOCAB * (itemsize + 3 * max(itemsize, 4))


# memory budgets: everything at once / about one pair per chunk / less than one pair (two passes)
MODES = {"one_chunk": lambda dt: 1 << 30, "pair_chunks": lambda dt: 12 * row_bytes(dt), "two_pass": lambda dt: 3 * row_bytes(dt)}


@pytest.fixture
def path_log(monkeypatch):
    """Counts the single-pass chunks and the two-pass runs that linear_dpo_loss takes."""
    log = {"chunks": 0, "two_pass": 0}
    fused, two_pass = torch_chunked.linear_rows_fused, linear_dpo_module.two_pass_dpo

    def counting_fused(*args, **kwargs):
        log["chunks"] += 1
        return fused(*args, **kwargs)

    def counting_two_pass(*args, **kwargs):
        log["two_pass"] += 1
        return two_pass(*args, **kwargs)

    monkeypatch.setattr(torch_chunked, "linear_rows_fused", counting_fused)
    monkeypatch.setattr(linear_dpo_module, "two_pass_dpo", counting_two_pass)
    return log


def make_batch(dtype, n_seqs=2 * PAIRS, with_bias=True):
    hidden = torch.randn(n_seqs, POSITIONS, HIDDEN, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, dtype=torch.float64) / 2).to(dtype).requires_grad_()
    bias = torch.randn(VOCAB, dtype=torch.float64).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, VOCAB, (n_seqs, POSITIONS))
    labels[:, :2] = -100  # the prompt
    labels[0, 5:] = -100  # pairs of different lengths
    labels[n_seqs - 1, 3:] = -100
    refs = (-torch.rand(n_seqs // 2, dtype=torch.float64) * 60).to(dtype)
    return hidden, weight, bias, labels, refs, (refs - 3).to(dtype)


def reference_loss(hidden, weight, bias, labels, ref_c, ref_r, chosen_idx, rejected_idx, *, ld_alpha=None,
                   use_weighting=False, head=None, **options):  # fmt: skip
    """TRL's DPO loss on the fp64 reference log-probs: returns (loss, chosen_rewards, rejected_rewards)."""
    head = head or {}
    logits = ref.linear_logits(hidden, weight, bias)
    tok = ref.token_logps(logits, labels, **head)
    pair_labels = torch.cat([labels[chosen_idx], labels[rejected_idx]])
    pair_tok = torch.cat([tok[chosen_idx], tok[rejected_idx]])
    if ld_alpha is None:
        seq = pair_tok.sum(-1)
    else:
        seq = ref.ld_sequence_logps(pair_tok, pair_labels, ld_alpha)
    pc, pr = seq.chunk(2)
    lengths = (pair_labels != -100).sum(-1)
    pair_weights = None
    if use_weighting:
        pair_logits = torch.cat([logits[chosen_idx], logits[rejected_idx]])
        pair_weights = ref.wpo_weights_from_logits(ref.transform_logits(pair_logits, **head), pair_labels)
    alpha = options.pop("f_alpha_divergence_coef", 1.0)
    losses, rewards_c, rewards_r = ref.dpo_pair_losses(
        pc, pr, ref_c, ref_r, chosen_lengths=lengths[: len(pc)], rejected_lengths=lengths[len(pc):],
        pair_weights=pair_weights, alpha=alpha, **options,
    )  # fmt: skip
    return losses.mean(), rewards_c, rewards_r, pc, pr


def check_against_reference(dtype, batch, chosen_idx, rejected_idx, kwargs, name):
    hidden, weight, bias, labels, ref_c, ref_r = batch
    pairs = None if kwargs.pop("explicit_pairs", False) is False else (chosen_idx, rejected_idx)
    out = fastpref.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, pairs=pairs, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("memory_budget", "softcap", "temperature")}
    head = {k: kwargs[k] for k in ("softcap", "temperature") if k in kwargs}
    want = reference_loss(hidden, weight, bias, labels, ref_c, ref_r, chosen_idx, rejected_idx, head=head, **ref_kwargs)
    rtol, atol = VS_FP64[dtype]
    for field, got, expected in zip(("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"), out, want):
        assert_close(got, expected, rtol=rtol, atol=atol, name=f"{name} {field}")
    assert out.loss.dtype == torch.promote_types(dtype, torch.float32)
    inputs = (hidden, weight, bias)
    upstream = 1.7  # the loss is a scalar: its upstream gradient is any number but 1
    got = torch.autograd.grad(out.loss, inputs, torch.tensor(upstream, dtype=out.loss.dtype))
    expected = torch.autograd.grad(want[0], inputs, torch.tensor(upstream, dtype=torch.float64))
    for input_name, g, w in zip(("hidden", "weight", "bias"), got, expected):
        assert g.dtype == dtype
        assert_close(g, w, rtol=rtol, atol=atol, name=f"{name} grad {input_name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_every_loss_type_in_every_mode(path_log, mode, loss_type):
    dtype = torch.float64
    batch = make_batch(dtype)
    kwargs = {"loss_type": loss_type, "beta": 0.3, "memory_budget": MODES[mode](dtype)}
    if loss_type in NEEDS_SMOOTHING:
        kwargs["label_smoothing"] = NEEDS_SMOOTHING[loss_type]
    chosen, rejected = torch.arange(PAIRS), torch.arange(PAIRS, 2 * PAIRS)
    check_against_reference(dtype, batch, chosen, rejected, kwargs, loss_type)
    batch_coupled = loss_type in ("aot", "aot_unpaired")
    if mode == "two_pass" or batch_coupled:
        assert path_log == {"chunks": 0, "two_pass": 1}
    else:
        assert path_log["two_pass"] == 0
        assert path_log["chunks"] == (1 if mode == "one_chunk" else PAIRS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_options_together(monkeypatch, path_log, mode, dtype, backend):
    """Several loss types with weights, ld_alpha, WPO weighting, softcap and temperature at once."""
    monkeypatch.setenv("FASTPREF_BACKEND", backend)
    batch = make_batch(dtype)
    kwargs = {
        "loss_type": ["sigmoid", "ipo", "sft", "bco_pair"],
        "loss_weights": [0.8, 0.3, 0.2, 1.1],
        "ld_alpha": 0.4,
        "use_weighting": True,
        "softcap": 8.0,
        "temperature": 0.9,
        "memory_budget": MODES[mode](dtype),
    }
    check_against_reference(dtype, batch, torch.arange(PAIRS), torch.arange(PAIRS, 2 * PAIRS), kwargs, "mixed")


@pytest.mark.parametrize("mode", ["one_chunk", "two_pass"])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
def test_bco_delta_as_a_float_or_a_tensor(path_log, mode, as_tensor):
    """bco_delta reaches the op as a 0-dim tensor (its schema's type); a float acts as it does in dpo_loss."""
    dtype = torch.float64
    delta = torch.tensor(0.37, dtype=dtype) if as_tensor else 0.37
    kwargs = {"loss_type": "bco_pair", "bco_delta": delta, "memory_budget": MODES[mode](dtype)}
    chosen, rejected = torch.arange(PAIRS), torch.arange(PAIRS, 2 * PAIRS)
    check_against_reference(dtype, make_batch(dtype), chosen, rejected, kwargs, "bco_delta")
    assert path_log["two_pass" if mode == "two_pass" else "chunks"] >= 1


@pytest.mark.parametrize("mode", MODES)
def test_pairs_index_sequences_in_any_order(path_log, mode):
    """The DPO paper's indexing: one sequence may sit in several pairs, on either side."""
    dtype = torch.float64
    hidden, weight, bias, labels, _, _ = make_batch(dtype, n_seqs=5)
    chosen, rejected = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4])
    refs = -torch.rand(4, dtype=dtype) * 50
    batch = (hidden, weight, bias, labels, refs, refs - 2)
    kwargs = {"explicit_pairs": True, "memory_budget": MODES[mode](dtype), "f_divergence_type": "js_divergence"}
    check_against_reference(dtype, batch, chosen, rejected, kwargs, "pairs")


def test_frozen_head_and_reference_free():
    hidden, weight, _, labels, _, _ = make_batch(torch.float32, with_bias=False)
    weight.requires_grad_(False)
    out = fastpref.linear_dpo_loss(hidden, weight, labels, None, None, loss_type="sigmoid", reference_free=True)
    out.loss.backward()
    assert weight.grad is None and hidden.grad is not None and torch.isfinite(hidden.grad).all()
    torch.testing.assert_close(out.chosen_rewards, 0.1 * out.chosen_logps)


def test_all_masked_completion_gives_finite_loss_and_zero_grad_rows():
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(torch.float32)
    labels[1] = -100
    out = fastpref.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, loss_type="sigmoid_norm")
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.chosen_logps[1] == 0
    assert (hidden.grad[1] == 0).all() and torch.isfinite(weight.grad).all()


def test_gradcheck_float64():
    hidden = torch.randn(4, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(17, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(17, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 17, (4, 4))
    labels[:, 0] = -100
    ref_c, ref_r = -torch.rand(2, dtype=torch.float64) * 10, -torch.rand(2, dtype=torch.float64) * 10

    def loss(h, w, b):
        return fastpref.linear_dpo_loss(h, w, labels, ref_c, ref_r, bias=b, loss_type="ipo", softcap=5.0).loss

    assert torch.autograd.gradcheck(loss, (hidden, weight, bias))


BAD_INPUTS = [
    (lambda b: {"hidden": b["hidden"][:5], "labels": b["labels"][:5]}, ValueError, "chosen-then-rejected"),
    (
        lambda b: {"pairs": (torch.tensor([0, 9]), torch.tensor([1, 2])), "ref_chosen_logps": torch.zeros(2),
                   "ref_rejected_logps": torch.zeros(2)},
        ValueError,
        r"pairs\[0\]",
    ),  # fmt: skip
    (lambda b: {"pairs": (torch.tensor([0.0]), torch.tensor([1]))}, TypeError, r"pairs\[0\]"),
    (lambda b: {"pairs": torch.tensor([0, 1])}, TypeError, "pairs"),
    (lambda b: {"ref_chosen_logps": b["ref_chosen_logps"][:2]}, ValueError, "ref_chosen_logps"),
    (lambda b: {"memory_budget": 0}, ValueError, "memory_budget"),
    (lambda b: {"ld_alpha": 1.5}, ValueError, "ld_alpha"),
    (lambda b: {"use_weighting": 1}, TypeError, "use_weighting"),
    (lambda b: {"use_weighting": True, "loss_type": "aot"}, ValueError, "use_weighting"),
    (lambda b: {"loss_type": "dpo"}, ValueError, "loss_type"),
    (lambda b: {"beta": 0.0}, ValueError, "beta"),
    (lambda b: {"label_smoothing": 0.5}, ValueError, "label_smoothing"),
    (lambda b: {"weight": b["weight"][:, :5]}, ValueError, "weight's H"),
    (lambda b: {"weight": b["weight"].double()}, TypeError, "weight"),
    (lambda b: {"labels": b["labels"].float()}, TypeError, "labels"),
    (lambda b: {"labels": b["labels"] + VOCAB}, ValueError, "labels"),
    (lambda b: {"hidden": b["hidden"][0]}, ValueError, "hidden"),
]


@pytest.mark.parametrize("change, error, match", BAD_INPUTS)
def test_bad_input_names_the_argument(change, error, match):
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(torch.float32)
    args = {"hidden": hidden, "weight": weight, "labels": labels, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    args.update(change(args))
    with pytest.raises(error, match=match):
        fastpref.linear_dpo_loss(**args)


@pytest.mark.parametrize("mode", ["one_chunk", "two_pass"])
def test_reference_log_probs_that_require_grad_get_the_same_gradient_in_every_mode(path_log, mode):
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(torch.float32)
    ref_c, ref_r = ref_c.clone().requires_grad_(), ref_r.clone().requires_grad_()
    budget = MODES[mode](torch.float32)
    out = fastpref.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, memory_budget=budget)
    assert path_log["two_pass" if mode == "two_pass" else "chunks"] >= 1
    upstream = torch.tensor(0.7)
    got = torch.autograd.grad(out.loss, (ref_c, ref_r), upstream)
    half = torch.arange(PAIRS)
    want = reference_loss(hidden, weight, bias, labels, ref_c, ref_r, half, half + PAIRS)[0]
    expected = torch.autograd.grad(want, (ref_c, ref_r), upstream.double())
    for g, e in zip(got, expected):
        assert_close(g, e, rtol=1e-5, atol=1e-6, name="grad of a reference log-prob")


def test_double_backward_raises_instead_of_a_wrong_gradient_penalty():
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(torch.float32)
    out = fastpref.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(out.loss, hidden, create_graph=True)  # the first step of a gradient penalty


@pytest.mark.parametrize("loss_type", ["sigmoid", "aot"], ids=["single_pass", "two_pass"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_second_backward_raises_where_the_gradients_were_scaled_in_place(monkeypatch, backend, loss_type):
    """Both backends scale the stored gradients in place (no second dW): a second backward through
    retain_graph=True raises, saying why; float64 (gradcheck's) scales a copy, so a second backward adds the
    same gradient again."""
    monkeypatch.setenv("FASTPREF_BACKEND", backend)
    for dtype in (torch.float32, torch.float64):
        hidden, weight, bias, labels, ref_c, ref_r = make_batch(dtype)
        out = fastpref.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, loss_type=loss_type)
        out.loss.backward(retain_graph=True)
        first = hidden.grad.clone()
        if dtype == torch.float32:
            with pytest.raises(RuntimeError, match="backward runs once"):
                out.loss.backward()
        else:
            out.loss.backward()
            assert_close(hidden.grad, 2 * first, rtol=1e-6, atol=1e-7, name="two backwards")


def test_no_grad_and_inference_mode_run_the_forward_alone(monkeypatch):
    """Evaluation pays one GEMM per tile: neither the single pass nor any backward runs."""
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(torch.float32)
    want = fastpref.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias)

    def refuse(*args, **kwargs):
        raise AssertionError("a backward GEMM ran without gradients")

    monkeypatch.setattr(torch_chunked, "linear_rows_fused", refuse)
    monkeypatch.setattr(torch_chunked, "linear_backward", refuse)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = fastpref.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias)
        for got, expected in zip(out, want):
            assert_close(got, expected.detach(), rtol=1e-6, atol=1e-6, name=context.__name__)


def test_an_empty_batch_is_refused():
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(torch.float32)
    with pytest.raises(ValueError, match="at least one pair"):
        fastpref.linear_dpo_loss(hidden[:0], weight, labels[:0], ref_c[:0], ref_r[:0])


def test_single_pass_budget_comes_from_the_backend_that_runs(monkeypatch):
    """A llama3-8b pair (~1,290 valid rows at V = 128,256, bf16) fits the default 512 MiB on the Triton
    backend, which holds the GEMM's bf16 output and turns it into dz in place (2 bytes a logit); the
    chunked torch backend also holds three fp32 temporaries (14 bytes a logit)."""
    hidden = torch.empty(2, 1, 8, dtype=torch.bfloat16)
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    assert linear_dpo_module.fused_rows_budget(hidden, 128256, 512 << 20) == (512 << 20) // (128256 * 2) >= 1290
    monkeypatch.setenv("FASTPREF_BACKEND", "torch")
    assert linear_dpo_module.fused_rows_budget(hidden, 128256, 512 << 20) == (512 << 20) // (128256 * 14)


def test_triton_backward_makes_each_dw_slice_in_one_gemm():
    """llama3-8b's two-pass backward (5,200 valid rows, bf16, H = 4,096): every row in one block, so
    each vocab slice of dW is a single GEMM over all rows, never a read-modify-write per row chunk; the
    slices are multiples of 4,096 columns but the last, whose width depends on V alone, and a slice's
    fp32 dW (needed only when rows come in several blocks) fits the budget."""
    from fastpref.backends.triton_backend import backward_tiles

    for budget in (512 << 20, 64 << 20):
        rows, slices = backward_tiles(5200, 128256, 4096, 2, budget)
        widths = [c1 - c0 for c0, c1 in slices]
        assert rows == 5200 and max(widths) * rows * 2 <= budget
        assert slices[0][0] == 0 and slices[-1][1] == 128256 and all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        assert all(w % 4096 == 0 for w in widths[:-1]) and widths[-1] % 4096 == 128256 % 4096
        assert max(widths[:-1]) * 4096 * 4 <= budget
    rows, slices = backward_tiles(40000, 128256, 4096, 2, 64 << 20)  # too many rows: blocks of rows
    assert rows < 40000 and rows * max(c1 - c0 for c0, c1 in slices) * 2 <= 64 << 20
    assert backward_tiles(40000, 128256, 4096, 2, 64 << 20)[1] == backward_tiles(7, 128256, 4096, 2, 64 << 20)[1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "selection, use_weighting", [(True, False), (("entropy", "is_top1"), True), ("mean_logit", False)]
)
def test_statistics_come_from_the_loss_pass(monkeypatch, mode, backend, selection, use_weighting):
    """return_stats: the per-token statistics of every sequence (M, T), as the reference computes them from
    the logits, from the loss's own pass (the same chunks, no other head forward); the loss and its
    gradients are unchanged, the statistics not asked for are None (WPO's log Σp² too, which the pass uses)."""
    monkeypatch.setenv("FASTPREF_BACKEND", backend)
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(torch.float32)
    kwargs = {"memory_budget": MODES[mode](torch.float32), "softcap": 8.0, "use_weighting": use_weighting}
    out, stats = fastpref.linear_dpo_loss(
        hidden, weight, labels, ref_c, ref_r, bias=bias, return_stats=selection, **kwargs
    )
    plain = fastpref.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, **kwargs)
    assert_close(out.loss, plain.loss, rtol=1e-6, atol=1e-7, name="loss")
    got = torch.autograd.grad(out.loss, (hidden, weight, bias), torch.tensor(1.7))
    expected = torch.autograd.grad(plain.loss, (hidden, weight, bias), torch.tensor(1.7))
    for name, g, e in zip(("hidden", "weight", "bias"), got, expected):
        assert_close(g, e, rtol=1e-5, atol=1e-6, name=f"grad {name}")
    want = ref.token_stats(ref.linear_logits(hidden, weight, bias), labels, softcap=8.0)
    names = {selection} if isinstance(selection, str) else selection
    names = fastpref.TokenStats._fields if selection is True else names
    assert_selected_stats(stats, names, want)
    assert not any(value is not None and value.requires_grad for value in stats)
