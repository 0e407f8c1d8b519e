"""torch.compile(fullgraph=True) traces a training step through the custom ops, on both backends:
no graph break, and the same loss and gradients as eager; linear_dpo_loss is one op in the graph, and a
whole DPO step of a Hugging Face Llama (forward, fused loss, backward) compiles into one graph."""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import fastpref
from assertions import assert_close
from llama_step import assert_compiled_step_matches_eager, dpo_batch, tiny_llama


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


def dpo_loss_outputs(hidden, weight, labels, ref_chosen, ref_rejected, loss_type):
    return fastpref.linear_dpo_loss(hidden, weight, labels, ref_chosen, ref_rejected, beta=0.1, loss_type=loss_type)


def dpo_inputs(pairs, positions, generator):
    hidden = torch.randn(2 * pairs, positions, 16, generator=generator, requires_grad=True)
    weight = torch.randn(97, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 97, (2 * pairs, positions), generator=generator)
    labels[:, :2] = -100
    labels[0, -2:] = -100
    refs = [(-30 * torch.rand(pairs, generator=generator)).requires_grad_() for _ in range(2)]
    return hidden, weight, labels, *refs


@pytest.mark.parametrize("loss_type", ["sigmoid", "aot"], ids=["single_pass", "two_pass"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_dpo_loss_is_one_op_in_one_graph(monkeypatch, backend, loss_type):
    """linear_dpo_loss under Dynamo: one graph, no break, the head and loss one call of the custom op (its planning
    inside); compiled with fullgraph=True, eager's loss, rewards, log-probs and gradients (upstream 1.7) w.r.t.
    hidden, weight and the reference log-probs, on a batch and on one of another shape (recompiled dynamic)."""
    monkeypatch.setenv("FASTPREF_BACKEND", backend)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    inputs = dpo_inputs(3, 6, g)
    explained = torch._dynamo.explain(dpo_loss_outputs)(*inputs, loss_type)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert explained.graphs[0].code.count("torch.ops.fastpref.linear_dpo_loss") == 1
    compiled = torch.compile(dpo_loss_outputs, fullgraph=True, backend="aot_eager")
    for batch in (inputs, dpo_inputs(2, 9, g)):
        leaves = [batch[i] for i in (0, 1, 3, 4)]
        upstream = torch.tensor(1.7)
        results = []
        for fn in (compiled, dpo_loss_outputs):
            out = fn(*batch, loss_type)
            results.append([*out, *torch.autograd.grad(out.loss, leaves, upstream)])
        names = [*fastpref.PreferenceOutput._fields, *(f"grad {name}" for name in ("hidden", "weight", "refs", "refs"))]
        for name, got, want in zip(names, *results):
            assert_close(got, want, rtol=1e-6, atol=1e-7, name=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_compiled_backward_of_linear_dpo_loss_only_scales_its_gradients(monkeypatch, backend):
    """AOTAutograd's graphs of a compiled linear_dpo_loss: the forward calls the op once (its host sync inside),
    the backward is elementwise products (the stored gradients times the upstream one): no op, no host read."""
    monkeypatch.setenv("FASTPREF_BACKEND", backend)
    torch._dynamo.reset()
    graphs = {}

    def keep(name):
        def compiler(graph_module, example_inputs):
            graphs[name] = [str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"]
            return make_boxed_func(graph_module.forward)

        return compiler

    compiled = torch.compile(dpo_loss_outputs, fullgraph=True, backend=aot_autograd(fw_compiler=keep("forward"),
                                                                                   bw_compiler=keep("backward")))
    hidden, weight, labels, *refs = dpo_inputs(2, 5, torch.Generator().manual_seed(0))
    compiled(hidden, weight, labels, *refs, "sigmoid").loss.backward()
    assert [op for op in graphs["forward"] if op.startswith("fastpref.")] == ["fastpref.linear_dpo_loss.default"]
    assert graphs["backward"] and set(graphs["backward"]) == {"aten.mul.Tensor"}, graphs["backward"]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_whole_dpo_step_of_a_llama_compiles_into_one_graph(backend):
    """torch.compile(fullgraph=True) of a DPO step of a tiny HF Llama: its forward, linear_dpo_loss and the
    backward, one graph with aot_eager and with inductor (C++ on the CPU), eager's loss and gradients (fp32)."""
    torch.manual_seed(0)
    model = tiny_llama(vocab=97)
    batches = [dpo_batch(seed, pairs=2, positions=8, vocab=97) for seed in (0, 1)]
    assert_compiled_step_matches_eager(model, batches, backend, "sigmoid", rtol=1e-5, atol=1e-6)
