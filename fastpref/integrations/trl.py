"""`patch(trainer)`: a TRL 1.16 `DPOTrainer` takes its log-probs and per-token statistics from fastpref.

    trainer = DPOTrainer(model=model, args=DPOConfig(...), train_dataset=..., processing_class=tok)
    fastpref.integrations.trl.patch(trainer)   # the only added line
    trainer.train()

What is replaced, and why there. TRL 1.16's DPOTrainer gives the policy and the reference model a
fused LM head (`trl.trainer.utils.add_fused_lm_head`) and calls them as
`model(**inputs, labels=labels, fused_lm_head=True)`; `_compute_loss` then reads `log_probs`,
`entropy`, `mean_logits`, `is_top1` (and `log_sum_sq_probs` for WPO) from the output, sums them per
sequence, and computes every loss type and metric from those (B,) tensors. The cost of the step is
in that head (tokens × vocab); the loss code after it is a few (B,)-sized ops. So `patch` swaps the
fused head's forward for one built on `fastpref.linear_token_logps(..., return_stats=True)`, on the
policy and on the reference model, and leaves `_compute_loss` alone: losses, metrics, their logged
names, LD-DPO, WPO, precomputed references, PEFT and gradient accumulation stay exactly TRL's,
with no second copy of the loss math to drift from it. (`linear_dpo_loss`'s single pass would save
one of the four GEMMs, but it would mean re-implementing `_compute_loss` and its metrics.)

`RewardTrainer` is not patched: a reward model scores with a (hidden × 1) head, there are no vocab
logits to fuse, and its Bradley-Terry loss is already a few (B,) ops.
"""

from __future__ import annotations

import functools
import types

import torch

import fastpref
from fastpref.train.modeling import head_of

try:
    from trl import DPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"fastpref.integrations.trl needs TRL 1.16 ({e}): pip install 'fastpref[trl]'") from e


def _fastpref_head_forward(
    self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
):
    """TRL's fused-head contract (`FusedCausalLMOutput`, zeros where the label is -100) from fastpref.
    Without `fused_lm_head=True` it is the model's own forward (generation is unchanged)."""
    if not fused_lm_head:
        extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
        kwargs.update({k: v for k, v in extra.items() if v is not None})
        return type(self).forward(self, *args, **kwargs)
    if kwargs.get("output_router_logits"):
        raise ValueError("fastpref's TRL head does not compute the MoE router auxiliary loss; unpatch for MoE models")
    kwargs["use_cache"] = False
    backbone_outputs = self.base_model(*args, **kwargs)
    if shift_labels is None:
        hidden, labels = backbone_outputs.last_hidden_state[:, :-1], labels[:, 1:]
    else:
        hidden, labels = backbone_outputs.last_hidden_state, shift_labels
    head = head_of(self)
    hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # the head's GEMMs in the autocast dtype, as TRL's run under autocast
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
    weight = head.weight.to(hidden.dtype)
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    log_probs, stats = fastpref.linear_token_logps(
        hidden, weight, labels, bias=bias, softcap=head.softcap, temperature=head.temperature, return_stats=True
    )
    mask = labels != -100
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(
        loss=loss,
        log_probs=log_probs,
        entropy=stats.entropy,
        log_sum_sq_probs=stats.log_sum_sq_probs,
        mean_logits=stats.mean_logit,
        is_top1=stats.is_top1,
        label_mask=mask,
    )


def _patch_model(model, accelerator) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the wrapped model
    text_config = base.config.get_text_config()
    if getattr(text_config, "output_router_logits", False):
        raise ValueError(
            f"{type(base).__name__} asks for MoE router logits; fastpref's TRL head does not compute the router "
            "auxiliary loss, so it is not patched"
        )
    head_of(base)  # a clear error now rather than at the first step when there is no linear LM head
    forward = types.MethodType(_fastpref_head_forward, base)
    if hasattr(base, "_original_forward"):
        # accelerate's `prepare_model` already wrapped this forward in its mixed-precision autocast (DPOTrainer
        # prepares the reference model in __init__): keep that wrapping around the new forward
        forward = _under(accelerator.autocast, forward)
    base.forward = forward


def _under(context, forward):
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with context():
            return forward(*args, **kwargs)

    return wrapped


def patch(trainer) -> None:
    """Make `trainer` (a TRL 1.16 `DPOTrainer`, after construction) compute its per-token log-probs,
    entropy, mean logits, top-1 hits and WPO's log Σp² with fastpref, for the policy and the reference
    model. Losses, metrics and logged names are TRL's own. Call before `trainer.train()`."""
    if not isinstance(trainer, DPOTrainer):
        raise TypeError(
            f"trainer must be a trl.DPOTrainer, got {type(trainer).__name__} (RewardTrainer has no vocab head to fuse)"
        )
    _patch_model(trainer.model, trainer.accelerator)
    if trainer.ref_model is not None:
        _patch_model(trainer.ref_model, trainer.accelerator)


__all__ = ["patch"]
