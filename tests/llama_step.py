"""A whole DPO step of a tiny random Hugging Face Llama (its forward to hidden states, `linear_dpo_loss`, the
backward), its batches, and the check that a torch.compile'd step gives eager's loss and gradients: shared by
tests/test_compile.py (CPU) and tests/test_gpu.py (CUDA)."""

from __future__ import annotations

import torch
import transformers
from torch._dynamo.testing import CompileCounterWithBackend

import fastpref
from assertions import assert_close


def tiny_llama(vocab: int, device="cpu") -> transformers.LlamaForCausalLM:
    """One layer, H = 16, fp32, random weights (seeded by the caller)."""
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(device)


def dpo_batch(seed: int, pairs: int, positions: int, vocab: int, device="cpu"):
    """input_ids (2P, T) (chosen rows, then rejected), labels (2P, T): the next token, with a prompt of a length
    that differs per sequence and per seed masked, and the last position; ref_chosen / ref_rejected (P,).
    Same shapes for every seed."""
    rng = torch.Generator(device).manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2 * pairs, positions), device=device, generator=rng)
    labels = input_ids.roll(-1, dims=1)
    prompt = torch.randint(1, positions // 2, (2 * pairs, 1), device=device, generator=rng)
    position = torch.arange(positions, device=device)
    labels = labels.masked_fill((position < prompt) | (position == positions - 1), -100)
    ref_chosen, ref_rejected = -20 * torch.rand(2, pairs, device=device, generator=rng)
    return input_ids, labels, ref_chosen, ref_rejected


def llama_dpo_step(model, input_ids, labels, ref_chosen, ref_rejected, loss_type="sigmoid"):
    """The model to hidden states, the fused head and loss with the statistics `fastpref train dpo` logs, the
    backward (into each parameter's .grad): -> the loss, and the chosen rewards with the per-token entropy,
    is-top-1 and mean logit, detached."""
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    out, stats = fastpref.linear_dpo_loss(
        hidden, model.lm_head.weight, labels, ref_chosen, ref_rejected, loss_type=loss_type,
        return_stats=("entropy", "is_top1", "mean_logit"),
    )
    out.loss.backward()
    token_stats = torch.stack([stats.entropy, stats.is_top1.float(), stats.mean_logit]).flatten()
    return out.loss.detach(), torch.cat([out.chosen_rewards, token_stats])


def step_results(step, model, batch, loss_type):
    """(loss, chosen rewards, every parameter's gradient) of one step from zeroed gradients."""
    model.zero_grad(set_to_none=True)
    loss, rewards = step(model, *batch, loss_type=loss_type)
    return [loss, rewards] + [p.grad.clone() for p in model.parameters()]


def assert_compiled_step_matches_eager(model, batches, backend: str, loss_type: str, rtol: float, atol: float):
    """torch.compile(fullgraph=True) of the whole step, backward included (Dynamo traces it:
    trace_autograd_ops), compiled once (one graph, no break) and run on each batch: eager's loss, rewards and
    gradients of every parameter."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(llama_dpo_step, backend=counter, fullgraph=True)
        for i, batch in enumerate(batches):
            got = step_results(compiled, model, batch, loss_type)
            want = step_results(llama_dpo_step, model, batch, loss_type)
            names = ["loss", "chosen_rewards"] + [f"grad {name}" for name, _ in model.named_parameters()]
            for name, g, w in zip(names, got, want):
                assert_close(g, w, rtol=rtol, atol=atol, name=f"{name}, batch {i}")
    assert counter.frame_count == 1, f"{counter.frame_count} graphs"
