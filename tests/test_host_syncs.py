"""Host syncs per call, counted on CPU by `host_reads.HostReads` (what would block a GPU stream or
break a CUDA-graph capture): at most one per call, none in a backward, none under capture."""

import pytest
import torch
from transformers.utils import import_utils

import fastpref
from fastpref.backends import rows
from assertions import assert_close
from host_reads import HostReads
from llama_step import dpo_batch, llama_dpo_step, tiny_llama

VOCAB, HIDDEN = 300, 16


def _batch(dtype=torch.float32, pairs=3, positions=7):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, positions, HIDDEN, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g, dtype=dtype) / 4).requires_grad_()
    labels = torch.randint(0, VOCAB, (2 * pairs, positions), generator=g)
    labels[:, :2] = -100
    labels[1, 4] = -100
    refs = (-50 * torch.rand(pairs, generator=g), -50 * torch.rand(pairs, generator=g))
    return hidden, weight, labels, refs


def _logits_call(hidden, weight, labels, refs):
    logits = (hidden @ weight.T).detach().requires_grad_()
    return fastpref.token_logps(logits, labels), logits


def _linear_call(hidden, weight, labels, refs):
    return fastpref.linear_token_logps(hidden, weight, labels), hidden


def _linear_stats_call(hidden, weight, labels, refs):
    logps, stats = fastpref.linear_token_logps(hidden, weight, labels, return_stats=True, softcap=30.0)
    return logps + stats.entropy, hidden


def _sequence_call(hidden, weight, labels, refs):
    return fastpref.linear_sequence_logps(hidden, weight, labels), hidden


def _dpo(**options):
    def call(hidden, weight, labels, refs):
        return fastpref.linear_dpo_loss(hidden, weight, labels, *refs, **options).loss, hidden

    return call


CALLS = {
    "token_logps": _logits_call,
    "linear_token_logps": _linear_call,
    "linear_token_logps_stats": _linear_stats_call,
    "linear_sequence_logps": _sequence_call,
    "linear_dpo_loss": _dpo(),
    "linear_dpo_loss_chunked": _dpo(memory_budget=VOCAB * 4 * 20),  # one pair per chunk
    "linear_dpo_loss_exo_pair": _dpo(loss_type="exo_pair", label_smoothing=0.1),
    "linear_dpo_loss_weighted": _dpo(use_weighting=True),
    "linear_dpo_loss_two_pass": _dpo(loss_type="aot"),
}


def _run(call, backend, monkeypatch, results=None):
    """(host reads of the forward, of the backward); their outputs and gradients appended to results."""
    monkeypatch.setenv("FASTPREF_BACKEND", backend)
    hidden, weight, labels, refs = _batch()
    with HostReads() as forward:
        out, wrt = call(hidden, weight, labels, refs)
    upstream = torch.linspace(-1.0, 2.0, out.numel()).reshape(out.shape)
    with HostReads() as backward:
        grads = torch.autograd.grad(out, (wrt, weight), upstream, allow_unused=True, materialize_grads=True)
    if results is not None:
        results += [out.detach(), *grads]
    return forward.reads, backward.reads


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(CALLS))
def test_one_host_read_per_call_none_in_the_backward(monkeypatch, backend, name):
    forward, backward = _run(CALLS[name], backend, monkeypatch)
    assert len(forward) <= 1, f"forward: {forward}"
    assert backward == [], f"backward: {backward}"


@pytest.mark.parametrize("name", list(CALLS))
def test_no_host_read_under_capture(monkeypatch, name):
    """The Triton backend (CUDA's) as under CUDA-graph capture (`rows.capturing` answers True): every
    position computed, nothing read on the host."""
    eager, captured = [], []
    _run(CALLS[name], "triton", monkeypatch, eager)
    monkeypatch.setattr(rows, "capturing", lambda t: True)
    forward, backward = _run(CALLS[name], "triton", monkeypatch, captured)
    assert forward == [] and backward == [], f"forward: {forward}, backward: {backward}"
    for got, want in zip(captured, eager):  # ignored positions computed, but worth 0 and no gradient
        assert_close(got, want, rtol=1e-5, atol=1e-6, name=name)


def test_the_counter_sees_what_syncs():
    """The proxy itself can fail: each kind of host read is counted."""
    t = torch.arange(6.0)
    with HostReads() as reads:
        t.sum().item()
        t.tolist()
        t[t > 2]
        torch.nonzero(t)
        torch.unravel_index(torch.tensor(3), (2, 3))
    assert reads.reads == [
        "aten._local_scalar_dense", "Tensor.tolist", "aten.index with a boolean mask", "aten.nonzero",
        "torch.tensor(..., device=...)", "torch.tensor(..., device=...)",
    ]  # fmt: skip



def test_the_counter_sees_inside_a_custom_op(monkeypatch):
    """A read inside an op's kernel (the logits path's label check, `if mask.any()`) is counted."""
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    logits, labels = torch.randn(2, 3, 50), torch.randint(0, 50, (2, 3))
    with HostReads() as reads:
        fastpref.token_logps(logits, labels)
    assert reads.reads == ["aten.is_nonzero"]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", [name for name in CALLS if name.startswith("linear_dpo_loss")])
def test_linear_dpo_loss_reads_the_host_once_inside_its_op(monkeypatch, backend, name):
    """linear_dpo_loss plans inside its custom op (opaque to torch.compile): the counter sees that one read there,
    the copy of the valid counts and pair indices, in every path."""
    forward, _ = _run(CALLS[name], backend, monkeypatch)
    assert forward == ["Tensor.tolist"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "aot"], ids=["single_pass", "two_pass"])
def test_a_whole_llama_dpo_step_reads_nothing_as_under_capture(monkeypatch, loss_type):
    """The CPU proxy of tests/test_gpu.py's capture of a whole step: a tiny Llama's forward, linear_dpo_loss, the
    backward and an SGD step read nothing on the host as under CUDA-graph capture (ours: `rows.capturing`;
    transformers': its capture check, which skips its packed-sequence test); eagerly they read (the proxy can fail)."""
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    torch.manual_seed(0)
    model = tiny_llama(vocab=97)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = dpo_batch(0, pairs=2, positions=8, vocab=97)

    def step():
        optimizer.zero_grad(set_to_none=True)
        llama_dpo_step(model, *batch, loss_type=loss_type)
        optimizer.step()

    with HostReads() as eager:
        step()
    assert "Tensor.tolist" in eager.reads, eager.reads
    monkeypatch.setattr(rows, "capturing", lambda t: True)
    monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
    with HostReads() as captured:
        step()
    assert captured.reads == []
