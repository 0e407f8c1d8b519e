"""On a CUDA GPU, the compiled Triton kernels: in bf16, judged by the comparative rule (STYLE.md):
fastpref's error vs the float64 truth may be no larger than the textbook bf16 path's own error,
times COMPARATIVE_FACTOR, plus COMPARATIVE_FLOOR; in fp32 against float64 (gradients through
leading dims no view can merge); a training step of every linear op captured in a CUDA graph and
replayed; a training step compiled by inductor; a whole DPO step of a tiny Llama (forward, fused loss,
backward) captured and replayed, and compiled by inductor; host syncs under torch.cuda.set_sync_debug_mode (at
most one per forward, none in a backward); a head on a second GPU; the peak memory of llama3-8b's
fused DPO pass against its planner and the +1.7 GB goal. Skipped without CUDA, and under the Triton
interpreter (tests/conftest.py turns it on by default; `make gpu-check` runs this file with TRITON_INTERPRET=0)."""

import copy
import os
import warnings

import pytest
import torch

import fastpref
import reference as ref
from assertions import assert_close
from llama_step import assert_compiled_step_matches_eager, dpo_batch, llama_dpo_step, tiny_llama
from tolerances import COMPARATIVE_FACTOR, COMPARATIVE_FLOOR, VS_FP64

DEVICE = "cuda"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET is on: the kernels would be interpreted, not compiled"),
]


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


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "in_place"])
def test_logits_grad_through_unmergeable_leading_dims(monkeypatch, inplace):
    """4-D logits after transpose(0, 1): no view merges their leading dims (a reshape copies). The
    gradient w.r.t. the untransposed leaf is the float64 reference's, out of place and in place."""
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    vocab = 2053
    base = (torch.randn(5, 3, 7, vocab, device=DEVICE) * 4).requires_grad_()
    logits = base.transpose(0, 1)  # (3, 5, 7, V), strides (7V, 21V, V, 1)
    labels = torch.randint(0, vocab, logits.shape[:-1], device=DEVICE)
    labels[..., :2] = -100
    upstream = torch.randn(labels.shape, device=DEVICE)
    base64 = base.detach().double().requires_grad_()
    truth = ref.token_logps(base64.transpose(0, 1), labels)
    (truth_grad,) = torch.autograd.grad(truth, base64, upstream.double())
    ours = fastpref.token_logps(logits, labels, inplace_backward=inplace)
    (ours_grad,) = torch.autograd.grad(ours, base, upstream)
    rtol, atol = VS_FP64[torch.float32]
    assert_close(ours, truth, rtol=rtol, atol=atol, name="logps")
    assert_close(ours_grad, truth_grad, rtol=rtol, atol=atol, name="grad")


GRAPH_SHAPE = {"pairs": 2, "positions": 64, "hidden_size": 128, "vocab": 1000}
# Tolerance between a replayed graph and eager, both fp32 on the GPU: the same kernels, maybe other GEMM algorithms.
REPLAY_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def linear_batch(seed, pairs, positions, hidden_size, vocab):
    """hidden (2P, T, H), labels (2P, T) with a prompt prefix masked (lengths differ per sequence and per
    seed), ref_chosen and ref_rejected log-probs (P,): one batch of a DPO step, same shapes for every seed."""
    rng = torch.Generator(DEVICE).manual_seed(seed)
    hidden = torch.randn(2 * pairs, positions, hidden_size, device=DEVICE, generator=rng)
    labels = torch.randint(0, vocab, (2 * pairs, positions), device=DEVICE, generator=rng)
    prompt = torch.randint(1, positions // 2, (2 * pairs, 1), device=DEVICE, generator=rng)
    labels = labels.masked_fill(torch.arange(positions, device=DEVICE) < prompt, -100)
    ref_chosen, ref_rejected = -100 * torch.rand(2, pairs, device=DEVICE, generator=rng)
    return hidden, labels, ref_chosen, ref_rejected


def sequence_logps_step(hidden, weight, labels, ref_chosen, ref_rejected):
    """A loss over linear_sequence_logps with a different weight per sequence (non-uniform upstream)."""
    seq = fastpref.linear_sequence_logps(hidden, weight, labels)
    return (seq * torch.linspace(-1.0, 2.0, seq.shape[0], device=seq.device)).sum()


def token_logps_step(hidden, weight, labels, ref_chosen, ref_rejected):
    """linear_token_logps with its statistics: log-probs and an entropy bonus, non-uniform weights."""
    logps, stats = fastpref.linear_token_logps(hidden, weight, labels, return_stats=True, softcap=30.0)
    weights = torch.linspace(-1.0, 2.0, logps.numel(), device=logps.device).reshape(logps.shape)
    return (logps * weights).sum() + 0.1 * stats.entropy.sum()


def dpo_step(hidden, weight, labels, ref_chosen, ref_rejected):
    return fastpref.linear_dpo_loss(hidden, weight, labels, ref_chosen, ref_rejected, beta=0.1).loss


def exo_dpo_step(hidden, weight, labels, ref_chosen, ref_rejected):
    """The single pass with a loss that builds a constant on the device (exo_pair's label smoothing)."""
    return fastpref.linear_dpo_loss(
        hidden, weight, labels, ref_chosen, ref_rejected, loss_type="exo_pair", label_smoothing=0.1
    ).loss


def chunked_dpo_step(hidden, weight, labels, ref_chosen, ref_rejected):
    """The single pass over several pair chunks (a budget of one pair's positions)."""
    budget = 2 * GRAPH_SHAPE["positions"] * GRAPH_SHAPE["vocab"] * 4
    return fastpref.linear_dpo_loss(hidden, weight, labels, ref_chosen, ref_rejected, memory_budget=budget).loss


def two_pass_dpo_step(hidden, weight, labels, ref_chosen, ref_rejected):
    """The two passes (aot sorts across the batch): linear_token_logps' forward and recomputing backward."""
    return fastpref.linear_dpo_loss(hidden, weight, labels, ref_chosen, ref_rejected, loss_type="aot").loss


LINEAR_STEPS = {
    "linear_token_logps": token_logps_step,
    "linear_sequence_logps": sequence_logps_step,
    "linear_dpo_loss": dpo_step,
    "linear_dpo_loss_exo_pair": exo_dpo_step,
    "linear_dpo_loss_chunked": chunked_dpo_step,
    "linear_dpo_loss_two_pass": two_pass_dpo_step,
}


@pytest.mark.parametrize("step", list(LINEAR_STEPS.values()), ids=list(LINEAR_STEPS))
def test_cuda_graph_replays_a_training_step(monkeypatch, step):
    """Forward and backward of a step captured in one CUDA graph (static shapes; a host sync would
    fail the capture), replayed on two new batches with other masks: eager's loss and gradients."""
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    weight = torch.randn(GRAPH_SHAPE["vocab"], GRAPH_SHAPE["hidden_size"], device=DEVICE)
    weight = (weight / GRAPH_SHAPE["hidden_size"] ** 0.5).requires_grad_()
    hidden, labels, ref_chosen, ref_rejected = linear_batch(0, **GRAPH_SHAPE)
    hidden.requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernels, warms cuBLAS and the caching allocator
        for _ in range(3):
            hidden.grad = weight.grad = None
            step(hidden, weight, labels, ref_chosen, ref_rejected).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    hidden.grad = weight.grad = None  # the captured backward allocates them in the graph's pool
    with torch.cuda.graph(graph):
        loss = step(hidden, weight, labels, ref_chosen, ref_rejected)
        loss.backward()
    for seed in (1, 2):
        batch = linear_batch(seed, **GRAPH_SHAPE)
        with torch.no_grad():
            for static, new in zip((hidden, labels, ref_chosen, ref_rejected), batch):
                static.copy_(new)
        graph.replay()
        eager_hidden = batch[0].clone().requires_grad_()
        eager_weight = weight.detach().clone().requires_grad_()
        eager = step(eager_hidden, eager_weight, *batch[1:])
        eager.backward()
        assert_close(loss, eager, **REPLAY_TOLERANCE, name=f"loss, batch {seed}")
        assert_close(hidden.grad, eager_hidden.grad, **REPLAY_TOLERANCE, name=f"grad hidden, batch {seed}")
        assert_close(weight.grad, eager_weight.grad, **REPLAY_TOLERANCE, name=f"grad weight, batch {seed}")


def logits_and_linear_step(hidden, weight, labels, ref_chosen, ref_rejected):
    """The logits path (softcapped), the linear path and the DPO loss on its log-probs: custom ops only."""
    seq = fastpref.sequence_logps(hidden @ weight.T, labels, softcap=30.0)
    chosen, rejected = seq.chunk(2)
    loss = fastpref.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1).loss
    return loss + fastpref.linear_sequence_logps(hidden, weight, labels, reduction="mean").square().mean()


@pytest.mark.parametrize(
    "step",
    [logits_and_linear_step, dpo_step, two_pass_dpo_step],
    ids=["logits_and_linear", "linear_dpo_loss", "linear_dpo_loss_two_pass"],
)
def test_inductor_compiles_a_training_step(monkeypatch, step):
    """torch.compile(fullgraph=True) with inductor of a training step through the custom ops (linear_dpo_loss one
    of them, its planning inside): loss and gradients as eager's."""
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    torch._dynamo.reset()
    hidden, labels, ref_chosen, ref_rejected = linear_batch(0, **GRAPH_SHAPE)
    weight = torch.randn(GRAPH_SHAPE["vocab"], GRAPH_SHAPE["hidden_size"], device=DEVICE) / 8
    leaves = (hidden.requires_grad_(), weight.requires_grad_())
    eager = step(*leaves, labels, ref_chosen, ref_rejected)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled_step = torch.compile(step, backend="inductor", fullgraph=True)
    compiled = compiled_step(*leaves, labels, ref_chosen, ref_rejected)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    assert_close(compiled, eager, **REPLAY_TOLERANCE, name="loss")
    for name, got, want in zip(("hidden", "weight"), compiled_grads, eager_grads):
        assert_close(got, want, **REPLAY_TOLERANCE, name=f"grad {name}")


# A whole DPO step of a tiny Llama (tests/llama_step.py): its forward, linear_dpo_loss, the backward.
LLAMA_SHAPE = {"pairs": 2, "positions": 32, "vocab": 1000}
LOSS_PATHS = {"single_pass": "sigmoid", "two_pass": "aot"}  # aot sorts across the batch: the two passes


@pytest.mark.parametrize("loss_type", list(LOSS_PATHS.values()), ids=list(LOSS_PATHS))
def test_cuda_graph_replays_a_whole_llama_dpo_step(monkeypatch, loss_type):
    """A whole step (the model's forward, linear_dpo_loss, the backward, an SGD step) captured in one CUDA graph
    with static inputs, as torch's docs capture a network (warm-up on a side stream, grads None before the
    capture), replayed on two new batches with other masks: eager's loss, rewards, gradients and updated weights,
    from the same weights."""
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    torch.manual_seed(0)
    model = tiny_llama(LLAMA_SHAPE["vocab"], DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    static = dpo_batch(0, **LLAMA_SHAPE, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernels, warms cuBLAS and the caching allocator
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            llama_dpo_step(model, *static, loss_type=loss_type)
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the grads in the graph's pool
    eager_model = copy.deepcopy(model)  # capturing runs nothing: the weights the first replay starts from
    eager_optimizer = torch.optim.SGD(eager_model.parameters(), lr=0.1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_rewards = llama_dpo_step(model, *static, loss_type=loss_type)
        optimizer.step()
    for seed in (1, 2):
        batch = dpo_batch(seed, **LLAMA_SHAPE, device=DEVICE)
        with torch.no_grad():
            for static_input, new in zip(static, batch):
                static_input.copy_(new)
        graph.replay()
        eager_optimizer.zero_grad(set_to_none=True)
        loss, rewards = llama_dpo_step(eager_model, *batch, loss_type=loss_type)
        eager_optimizer.step()
        assert_close(static_loss, loss, **REPLAY_TOLERANCE, name=f"loss, batch {seed}")
        assert_close(static_rewards, rewards, **REPLAY_TOLERANCE, name=f"chosen rewards, batch {seed}")
        for (name, replayed), eager in zip(model.named_parameters(), eager_model.parameters()):
            assert_close(replayed.grad, eager.grad, **REPLAY_TOLERANCE, name=f"grad {name}, batch {seed}")
            assert_close(replayed, eager, **REPLAY_TOLERANCE, name=f"{name} after the step, batch {seed}")


@pytest.mark.parametrize("loss_type", list(LOSS_PATHS.values()), ids=list(LOSS_PATHS))
def test_inductor_compiles_a_whole_llama_dpo_step(monkeypatch, loss_type):
    """torch.compile(fullgraph=True, backend="inductor") of the whole step, backward included, one graph: eager's
    loss, rewards and every parameter's gradient on two batches."""
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    torch.manual_seed(0)
    model = tiny_llama(LLAMA_SHAPE["vocab"], DEVICE)
    batches = [dpo_batch(seed, **LLAMA_SHAPE, device=DEVICE) for seed in (0, 1)]
    assert_compiled_step_matches_eager(model, batches, "inductor", loss_type, **REPLAY_TOLERANCE)


@pytest.mark.parametrize("step", list(LINEAR_STEPS.values()), ids=list(LINEAR_STEPS))
def test_a_step_syncs_once_per_call_and_never_in_the_backward(monkeypatch, step):
    """torch.cuda.set_sync_debug_mode: the forward of each linear op syncs at most once (counting its
    valid rows), the backward not at all ("error" raises at the first sync)."""
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    hidden, labels, ref_chosen, ref_rejected = linear_batch(0, **GRAPH_SHAPE)
    weight = (torch.randn(GRAPH_SHAPE["vocab"], GRAPH_SHAPE["hidden_size"], device=DEVICE) / 8).requires_grad_()
    hidden.requires_grad_()
    step(hidden, weight, labels, ref_chosen, ref_rejected).backward()  # compiles, warms cuBLAS
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = step(hidden, weight, labels, ref_chosen, ref_rejected)
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= 1, syncs
        torch.cuda.set_sync_debug_mode("error")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_head_on_the_second_gpu(monkeypatch):
    """hidden and lm_head on cuda:1 while cuda:0 is current (device_map="auto"): the kernels run on
    cuda:1, ordered with its stream: cuda:0's values and gradients."""
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    hidden, labels, ref_chosen, ref_rejected = linear_batch(0, **GRAPH_SHAPE)
    weight = torch.randn(GRAPH_SHAPE["vocab"], GRAPH_SHAPE["hidden_size"], device=DEVICE) / 8
    results = []
    for device in ("cuda:0", "cuda:1"):
        leaves = [t.to(device).requires_grad_() for t in (hidden, weight)]
        inputs = [t.to(device) for t in (labels, ref_chosen, ref_rejected)]
        with torch.cuda.device(0):
            for step in (token_logps_step, dpo_step):
                loss = step(*leaves, *inputs)
                results.append([loss.detach().cpu(), *(g.cpu() for g in torch.autograd.grad(loss, leaves))])
    half = len(results) // 2
    for on_0, on_1 in zip(results[:half], results[half:]):
        for want, got in zip(on_0, on_1):
            assert_close(got, want, **REPLAY_TOLERANCE, name="cuda:1 vs cuda:0")


def test_llama3_8b_single_pass_peak_memory(monkeypatch):
    """The fused DPO pass at llama3-8b's head (4 pairs × 1,024 positions, 37% masked, bf16): its peak
    above the inputs (gradients included) is the planner's account, and ≤ +1.7 GB."""
    from fastpref.api import DEFAULT_MEMORY_BUDGET
    from fastpref.ops.linear_dpo import single_pass_buffers

    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    pairs, positions, hidden_size, vocab, valid = 4, 1024, 4096, 128256, round(1024 * 0.63)
    hidden = torch.randn(2 * pairs, positions, hidden_size, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=DEVICE) / 64).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (2 * pairs, positions), device=DEVICE)
    labels[:, : positions - valid] = -100
    refs = -100 * torch.rand(2, pairs, device=DEVICE)
    warm = hidden[:2, -64:].detach().requires_grad_()  # compiles the kernels, sets up cuBLAS's workspace
    fastpref.linear_dpo_loss(warm, weight.detach(), labels[:2, -64:], refs[0][:1], refs[1][:1]).loss.backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fastpref.linear_dpo_loss(hidden, weight, labels, *refs).loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    planned = sum(single_pass_buffers(tuple(hidden.shape), vocab, torch.bfloat16, [2 * valid] * pairs,
                                      DEFAULT_MEMORY_BUDGET).values())  # fmt: skip
    print(f"peak above inputs {peak / 1e9:.3f} GB, planned {planned / 1e9:.3f} GB")
    assert peak <= planned + (64 << 20), f"peak {peak / 1e9:.3f} GB vs planned {planned / 1e9:.3f} GB"
    assert peak <= 1.7e9


def test_rl_step_bf16_is_no_worse_than_the_textbook(monkeypatch):
    """`fastpref bench rl`'s GRPO step (old / reference / policy log-probs with entropy, dapo loss, backward) in bf16:
    fastpref's loss and head gradient no further from the float64 step than the textbook bf16 step's."""
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    from fastpref.bench import rl_step

    shape = rl_step.Shape(completions=4, length=128, hidden=256, vocab=32000)
    results = {}
    for name, dtype in (("truth", torch.float64), ("textbook", torch.bfloat16), ("fastpref", torch.bfloat16)):
        x = rl_step.setup(shape, torch.device(DEVICE), dtype)
        loss = rl_step.step("textbook" if name == "truth" else name, x)
        results[name] = (loss.double().reshape(1), x.weight.grad.double())
    for i, what in enumerate(("loss", "grad_weight")):
        assert_no_worse(what, results["fastpref"][i], results["textbook"][i], results["truth"][i])
