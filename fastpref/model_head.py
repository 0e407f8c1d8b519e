"""The model head boundary, shared by `fastpref.train`, `fastpref.integrations` and `fastpref.icdpo`.

The model's decoder (`get_decoder()`, else `base_model`) gives hidden states, the LM head's weight and
bias come from `get_output_embeddings()`, positions are shifted here (hidden[:, :-1] scores
labels[:, 1:]), and fastpref turns them into log-probs: the (tokens x vocab) logits are never
materialised. The family's logit settings are read from `config.get_text_config()` (a vision-language
model keeps its text part's): `final_logit_softcapping` becomes `softcap`, and the families' logit
scales one `logit_scale`, the multiplier of the raw logits applied before the softcap,
z = softcap * tanh(logit_scale * raw / softcap), as the models (and TRL 1.16's fused head) apply them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Config attributes that scale the raw logits, in the order TRL 1.16's fused head reads them (the first one set
# wins): (attribute, True when the family multiplies by it, False when it divides).
_LOGIT_SCALES = (
    ("logit_scale", True),  # Cohere, Cohere2 (MPT's is not applied by its transformers model: skipped below)
    ("output_multiplier", True),  # Muse Glimmer, Muse Spark (before their softcap)
    ("lm_head_multiplier", True),  # Falcon-H1
    ("logits_scaling", False),  # Granite, MiniCPM3 (its hidden states, the same for a bias-free head)
)
_MULTIPLIES_LOGITS_SCALING = {"hyperclovax"}  # HyperCLOVA X multiplies by its `logits_scaling`
_UNAPPLIED = {("mpt", "logit_scale")}


@dataclass(frozen=True)
class Head:
    """The LM head as fastpref needs it: weight (V, H), bias (V,) or None, and the family's logit settings."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    logit_scale: float


def logit_settings(config) -> tuple[float | None, float]:
    """(softcap, logit_scale) of a model family, from its text config: z = softcap·tanh(logit_scale·raw / softcap)."""
    text = config.get_text_config()
    softcap = getattr(text, "final_logit_softcapping", None)
    return (float(softcap) if softcap else None), _logit_scale(text)


def _logit_scale(text_config) -> float:
    family = getattr(text_config, "model_type", None)
    for name, multiplies in _LOGIT_SCALES:
        value = getattr(text_config, name, None)
        if value is None or (family, name) in _UNAPPLIED:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(
                f"{type(text_config).__name__}.{name} must be a positive number to scale the logits, got {value!r}"
            )
        return float(value) if multiplies or family in _MULTIPLIES_LOGITS_SCALING else 1.0 / float(value)
    return 1.0


def _carries_adapter(module: nn.Module) -> bool:
    """A PEFT tuner layer (LoRA, IA3, ...): its `.weight` is the base layer's alone, without the adapter."""
    return any(cls.__name__ == "BaseTunerLayer" and cls.__module__.startswith("peft.") for cls in type(module).__mro__)


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
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or len(getattr(weight, "ds_shape", weight.shape)) != 2:  # ZeRO-3: ds_shape
        raise ValueError(
            f"{type(model).__name__} has no linear LM head (get_output_embeddings() gave {type(head).__name__}); "
            "fastpref needs a causal LM whose head is a (vocab, hidden) matrix"
        )
    if _carries_adapter(head):
        raise ValueError(
            f"{type(model).__name__}'s LM head carries a PEFT adapter ({type(head).__name__}): fastpref reads the "
            "head's weight, which would silently leave the adapter out. Keep lm_head out of the adapter's "
            "target_modules (modules_to_save=['lm_head'] trains the head in full)"
        )
    softcap, logit_scale = logit_settings(model.config)
    return Head(head.weight, getattr(head, "bias", None), softcap, logit_scale)


def hidden_states(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """(M, T, H) last hidden states, shifted: position t predicts token t+1, so (M, T-1, H)."""
    out = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, :-1]
