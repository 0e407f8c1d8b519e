"""fastpref on a plain transformers causal LM: the model's decoder gives hidden states, its
`get_output_embeddings()` gives the head, and fastpref turns them into log-probs and the DPO
family of losses without materialising the (tokens × vocab) logits.

The head boundary is `fastpref.model_head`'s (decoder lookup, head weight and bias, the text config's
`final_logit_softcapping` as `softcap` and the families' logit scales as `logit_scale`), so the training
loop, the TRL patch and these functions agree on every family (tested: Llama, Qwen2, Gemma-2, GPT-2,
Cohere, Granite, Falcon-H1, HyperCLOVA X, MiniCPM3, a vision-language model's text part).

Labels follow transformers' convention: aligned with `input_ids` (labels[:, t] is the token at t,
-100 where not scored); the shift (hidden[:, :-1] scores labels[:, 1:]) happens here.
"""

from __future__ import annotations

import torch

import fastpref
from fastpref._checks import check_choice, check_shape, check_tensor
from fastpref.model_head import head_of, hidden_states


def _head_inputs(model, input_ids, attention_mask, labels):
    """(hidden (M, T-1, H), weight (V, H), shifted labels (M, T-1), head kwargs)."""
    check_tensor("input_ids", input_ids, integer=True)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (M, T), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must hold at least 2 positions (one predicts the next), got {input_ids.shape[1]}")
    check_tensor("attention_mask", attention_mask)
    check_shape("attention_mask", attention_mask, input_ids.shape, "input_ids.shape")
    check_tensor("labels", labels, integer=True)
    check_shape("labels", labels, input_ids.shape, "input_ids.shape")
    head = head_of(model)
    hidden = hidden_states(model, input_ids, attention_mask)
    weight = head.weight.to(hidden.dtype)
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    kwargs = dict(bias=bias, softcap=head.softcap, logit_scale=head.logit_scale)
    return hidden, weight, labels[:, 1:], kwargs


def sequence_logps(model, input_ids, attention_mask, labels, *, reduction="sum") -> torch.Tensor:
    """Summed (or mean) log-probs of each sequence's labelled tokens.

    input_ids, attention_mask, labels (M, T), labels unshifted with -100 where not scored ->
    (M,) float32. Gradients flow into the model (decoder and head) as through its own logits.
    """
    check_choice("reduction", reduction, ("sum", "mean"))
    hidden, weight, shifted, kwargs = _head_inputs(model, input_ids, attention_mask, labels)
    return fastpref.linear_sequence_logps(hidden, weight, shifted, reduction=reduction, **kwargs)


def dpo_loss(model, input_ids, attention_mask, labels, ref_chosen_logps, ref_rejected_logps, **dpo_options):
    """The DPO-family loss of a batch of chosen-then-rejected halves, through `fastpref.linear_dpo_loss`.

    input_ids, attention_mask, labels (2B, T) (rows 0..B-1 chosen, B..2B-1 their rejected twins,
    labels unshifted, -100 on prompt and padding); ref_*_logps (B,) summed reference log-probs
    (e.g. `sequence_logps(ref_model, ...)` under `torch.no_grad()`), or None for reference-free
    losses. `dpo_options` are `linear_dpo_loss`'s (beta, loss_type, label_smoothing, ...).
    Returns `PreferenceOutput(loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)`.
    """
    for name in ("bias", "softcap", "logit_scale", "temperature"):
        if name in dpo_options:
            raise ValueError(f"{name} comes from the model (its head and config); do not pass it to dpo_loss")
    hidden, weight, shifted, kwargs = _head_inputs(model, input_ids, attention_mask, labels)
    return fastpref.linear_dpo_loss(
        hidden, weight, shifted, ref_chosen_logps, ref_rejected_logps, **kwargs, **dpo_options
    )
