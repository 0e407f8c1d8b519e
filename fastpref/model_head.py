"""The model head boundary, shared by `fastpref.train`, `fastpref.integrations` and `fastpref.icdpo`.

The model's decoder (`get_decoder()`, else `base_model`) gives hidden states, the LM head's weight and
bias come from `get_output_embeddings()`, positions are shifted here (hidden[:, :-1] scores
labels[:, 1:]), and fastpref turns them into log-probs: the (tokens x vocab) logits are never
materialised. Gemma-2's `final_logit_softcapping` becomes `softcap`; Cohere's `logit_scale` and
Granite's `logits_scaling` become a temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Head:
    """The LM head as fastpref needs it."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    temperature: float


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body that returns hidden states, robustly across Llama / Qwen2 / Gemma-2 / GPT-2."""
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        raise ValueError(f"cannot find the decoder of {type(model).__name__} (get_decoder() / base_model)")
    return decoder


def head_of(model: nn.Module) -> Head:
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise ValueError(
            f"{type(model).__name__} has no linear LM head (get_output_embeddings() gave {type(head).__name__}); "
            "fastpref needs a causal LM whose head is a (vocab, hidden) matrix"
        )
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    temperature = 1.0
    if getattr(config, "logit_scale", None):  # Cohere: z * scale
        temperature = 1.0 / float(config.logit_scale)
    if getattr(config, "logits_scaling", None):  # Granite: z / scaling
        temperature = float(config.logits_scaling)
    return Head(head.weight, getattr(head, "bias", None), float(softcap) if softcap else None, temperature)


def hidden_states(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """(M, T, H) last hidden states, shifted: position t predicts token t+1, so (M, T-1, H)."""
    out = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, :-1]
