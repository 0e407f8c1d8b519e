"""`fastpref.integrations.transformers`: sequence log-probs and the DPO loss straight from a model's
hidden states and head equal the model's own logits -> log_softmax path, values and gradients, on
tiny Llama, Qwen2, Gemma-2 (final-logit softcap) and GPT-2 models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import transformers
from test_train import tiny_config

import fastpref
from fastpref.integrations.transformers import dpo_loss, sequence_logps

FAMILIES = ["llama", "qwen2", "gemma2", "gpt2"]


def _model(family):
    torch.manual_seed(0)
    overrides = {"final_logit_softcapping": 5.0} if family == "gemma2" else {}
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).double().eval()  # no dropout


def _batch(vocab, m=4, t=12):
    """Right-padded rows, the first 4 positions a prompt: (M, T) input_ids, attention_mask, labels."""
    input_ids = torch.randint(3, vocab, (m, t))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[m // 2 :, 9:] = 0
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    labels[:, :4] = -100
    return input_ids, attention_mask, labels


def _textbook(model, input_ids, attention_mask, labels, reduction="sum"):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * mask
    total = logp.sum(-1)
    return total if reduction == "sum" else total / mask.sum(-1).clamp(min=1)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(ours, expected):
    assert ours.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logps_match_the_models_logits(family, reduction):
    model = _model(family)
    batch = _batch(model.config.vocab_size)
    upstream = torch.rand(batch[0].shape[0], dtype=torch.float64) + 0.5  # non-uniform upstream gradient
    expected = _textbook(model, *batch, reduction=reduction)
    (expected * upstream).sum().backward()
    expected_grads = _grads(model)
    model.zero_grad()
    ours = sequence_logps(model, *batch, reduction=reduction)
    (ours * upstream).sum().backward()
    torch.testing.assert_close(ours, expected.detach(), rtol=1e-9, atol=1e-9)
    _assert_grads_close(_grads(model), expected_grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_loss_matches_the_logits_path(family):
    model = _model(family)
    batch = _batch(model.config.vocab_size)
    ref_chosen, ref_rejected = -torch.rand(2, 2, dtype=torch.float64) * 30
    options = {"beta": 0.2, "loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.3]}
    lengths = (batch[2][:, 1:] != -100).sum(-1)
    chosen, rejected = _textbook(model, *batch).chunk(2)
    expected = fastpref.dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, chosen_lengths=lengths[:2], rejected_lengths=lengths[2:], **options
    )
    expected.loss.backward()
    expected_grads = _grads(model)
    model.zero_grad()
    out = dpo_loss(model, *batch, ref_chosen, ref_rejected, **options)
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.chosen_rewards, expected.chosen_rewards, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.rejected_rewards, expected.rejected_rewards, rtol=1e-9, atol=1e-9)
    _assert_grads_close(_grads(model), expected_grads)


def test_bad_input_names_the_argument():
    model = _model("llama")
    input_ids, attention_mask, labels = _batch(model.config.vocab_size)
    with pytest.raises(ValueError, match="reduction"):
        sequence_logps(model, input_ids, attention_mask, labels, reduction="max")
    with pytest.raises(ValueError, match="labels"):
        sequence_logps(model, input_ids, attention_mask, labels[:, :-1])
    with pytest.raises(ValueError, match="input_ids"):
        sequence_logps(model, input_ids[0], attention_mask[0], labels[0])
    with pytest.raises(ValueError, match="softcap"):
        dpo_loss(model, input_ids, attention_mask, labels, None, None, softcap=3.0)
