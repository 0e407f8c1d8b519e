"""`patch(trainer)`: a TRL 1.16 trainer takes its LM head (per-token log-probs and statistics) from fastpref.

    trainer = GRPOTrainer(model=..., args=GRPOConfig(...), reward_funcs=..., train_dataset=...)
    fastpref.integrations.trl.patch(trainer)   # the only added line
    trainer.train()

What is replaced, and why there. TRL 1.16 gives five trainers a fused LM head
(`trl.trainer.utils.add_fused_lm_head`): SFT, DPO, KTO, GRPO and RLOO call their policy and reference
models as `model(**inputs, labels=labels, fused_lm_head=True)` and read per-token fields from the
`FusedCausalLMOutput`; every loss and metric is then computed from those by the trainer. The cost of
the step is in that head (tokens x vocab); the code after it is a few (B, T)-sized ops. So `patch`
swaps the fused head's forward for one built on `fastpref.linear_token_logps`, on the policy and on the
reference model, and leaves the trainer's loss code alone: losses, metrics, their logged names,
precomputed references, PEFT and gradient accumulation stay exactly TRL's, with no second copy of
the loss math to drift from it.

Each trainer's contract is the one its `__init__` gives `add_fused_lm_head` (`HeadContract`, read from
TRL 1.16's source): which statistics the trainer reads (nothing but log-probs on reference models),
the sampling temperature (GRPO, RLOO) and whether the head runs in float32 outside autocast (GRPO's
`cast_lm_head_to_fp32`). The logit settings of the model family (softcap, logit scales) come from
`fastpref.model_head`, as `fastpref train` uses them. The model's forward signature is kept (generation
inspects it for `logits_to_keep`), an FSDP2-sharded head is unsharded and a DeepSpeed ZeRO-3 partition
gathered for the head's forward and backward, and MoE models get the router's load-balancing loss when
asked, as TRL's head does. A LoRA adapter on the LM head is refused: the head's weight alone would
silently leave it out.

`RewardTrainer` is not patched: a reward model scores with a (hidden x 1) head, there are no vocab
logits to fuse, and its Bradley-Terry loss is already a few (B,) ops.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
import warnings
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import fastpref
from fastpref.model_head import head_of

try:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RewardTrainer, RLOOTrainer, SFTTrainer
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"fastpref.integrations.trl needs TRL 1.16 ({e}): pip install 'fastpref[trl]'") from e

log = logging.getLogger("fastpref")

# FusedCausalLMOutput's statistic fields -> fastpref.TokenStats' fields
_STAT_FIELDS = {
    "entropy": "entropy", "is_top1": "is_top1", "mean_logits": "mean_logit", "log_sum_sq_probs": "log_sum_sq_probs"
}


@dataclass(frozen=True)
class HeadContract:
    """What a trainer reads from one model's fused head: the arguments its `__init__` gives `add_fused_lm_head`.

    outputs: the `FusedCausalLMOutput` statistics read besides `log_probs` (the others stay None);
    temperature: the logits' divisor after the softcap; cast_lm_head_to_fp32: the head in float32, outside autocast.
    """

    outputs: tuple[str, ...] = ()
    temperature: float = 1.0
    cast_lm_head_to_fp32: bool = False


def _dpo(trainer) -> HeadContract:
    weighting = ("log_sum_sq_probs",) if trainer.use_weighting else ()  # WPO's weights
    return HeadContract(("entropy", "mean_logits", "is_top1") + weighting)


def _grpo(trainer, outputs=()) -> HeadContract:
    return HeadContract(outputs, trainer.temperature, trainer.args.cast_lm_head_to_fp32)


# trainer class -> (policy contract, reference contract) of TRL 1.16
_CONTRACTS = {
    SFTTrainer: (lambda t: HeadContract(("entropy", "is_top1")), lambda t: HeadContract()),
    DPOTrainer: (_dpo, lambda t: HeadContract()),
    KTOTrainer: (lambda t: HeadContract(("entropy", "mean_logits")), lambda t: HeadContract()),
    GRPOTrainer: (lambda t: _grpo(t, ("entropy",)), _grpo),
    RLOOTrainer: (lambda t: HeadContract(("entropy",), t.temperature), lambda t: HeadContract((), t.temperature)),
}


def contracts(trainer) -> tuple[HeadContract, HeadContract]:
    """(policy, reference) head contracts of a TRL 1.16 SFT / DPO / KTO / GRPO / RLOO trainer."""
    for cls, (policy, reference) in _CONTRACTS.items():
        if isinstance(trainer, cls):
            return policy(trainer), reference(trainer)
    names = ", ".join(cls.__name__ for cls in _CONTRACTS)
    why = " (a reward model scores with a (hidden x 1) head: no vocab to fuse)"
    why = why if isinstance(trainer, RewardTrainer) else ""
    raise TypeError(f"patch() takes a TRL trainer with a fused LM head ({names}), got {type(trainer).__name__}{why}")


def _router_aux_loss(model, text_config, router_logits, attention_mask) -> torch.Tensor:
    """The MoE load-balancing loss the model's own forward adds (Mixtral's, which every MoE family uses)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or model.num_experts
    top_k = getattr(text_config, "num_experts_per_tok", None) or model.num_experts_per_tok
    return load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)


def _gather_in_backward(outputs, weight, bias) -> None:
    """DeepSpeed ZeRO-3 partitions the head weight again after the forward, and fastpref's backward recomputes the
    logits from it: gather it around the backward of the op that reads it (TRL's head gathers inside its own)."""
    pending, seen = [t.grad_fn for t in outputs if t is not None and t.grad_fn is not None], set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if any(getattr(child, "variable", None) is weight for child, _ in node.next_functions):
            _gather_around(node, weight, bias)
            return
        pending.extend(child for child, _ in node.next_functions if child is not None)


def _gather_around(node, weight, bias) -> None:
    gathered = contextlib.ExitStack()

    def gather(grad_outputs):
        gathered.enter_context(maybe_gather_lm_head_ctx(weight, bias))

    def release(grad_inputs, grad_outputs):
        gathered.close()

    node.register_prehook(gather)
    node.register_hook(release)


@contextlib.contextmanager
def _unsharded(head_module):
    """FSDP2: a head sharded on its own stays sharded (DTensors) through the model's forward, which never calls it.
    Unshard it: the head's GEMMs and its gradient use the full weight, and FSDP's end-of-backward callback
    reduce-scatters that gradient into the shards and reshards (without a backward, it is resharded here).
    A DTensor head outside FSDP2 is gathered with `full_tensor()`, as TRL's head does."""
    if not isinstance(getattr(head_module, "weight", None), DTensor):
        yield
        return
    if not isinstance(head_module, FSDPModule):
        yield "full_tensor"
        return
    head_module.unshard()
    try:
        yield
    finally:
        if not (torch.is_grad_enabled() and head_module.weight.requires_grad):
            head_module.reshard()


def head_log_probs(model, hidden, labels, contract: HeadContract):
    """Log-probs (...) and, when the contract reads any, `TokenStats` of the model's head on hidden (..., H)."""
    module = model.get_output_embeddings()
    with _unsharded(module) as gather, maybe_gather_lm_head_ctx(module.weight, getattr(module, "bias", None)):
        head = head_of(model)
        weight, bias = head.weight, head.bias
        if gather == "full_tensor":
            weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        device_type = hidden.device.type
        autocast = contextlib.nullcontext()
        if contract.cast_lm_head_to_fp32:
            dtype, autocast = torch.float32, torch.autocast(device_type, enabled=False)
        elif torch.is_autocast_enabled(device_type):  # the head's GEMMs in the autocast dtype, as TRL's
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = hidden.dtype
        with autocast:
            out = fastpref.linear_token_logps(
                hidden.to(dtype),
                weight.to(dtype),
                labels,
                bias=None if bias is None else bias.to(dtype),
                softcap=head.softcap,
                logit_scale=head.logit_scale,
                temperature=contract.temperature,
                return_stats=tuple(_STAT_FIELDS[name] for name in contract.outputs) or False,
            )
    log_probs, stats = out if contract.outputs else (out, None)
    if is_deepspeed_zero3_enabled() and torch.is_grad_enabled():
        _gather_in_backward((log_probs, None if stats is None else stats.entropy), weight, bias)
    return log_probs, stats


def _fused_forward(model, contract: HeadContract, unfused_forward):
    """A forward for `model` with TRL's fused-head contract, computed by fastpref; `unfused_forward` serves the
    calls without `fused_lm_head=True` (generation)."""
    text_config = model.config.get_text_config()
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"  # vision-language models before transformers 5

    @functools.wraps(type(model).forward)  # keeps the signature: generate() looks for `logits_to_keep` in it
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return unfused_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone = getattr(self, backbone_attr)(*args, **kwargs)
        if shift_labels is None:
            hidden, labels = backbone.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, labels = backbone.last_hidden_state, shift_labels
        log_probs, stats = head_log_probs(self, hidden, labels, contract)
        mask = labels.to(log_probs.device) != -100
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(self, text_config, backbone.router_logits, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        fields = {name: getattr(stats, _STAT_FIELDS[name]) for name in contract.outputs}
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, aux_loss=aux_loss, **fields)

    forward.fastpref_unfused = unfused_forward
    return forward


def _patch_model(model, contract: HeadContract, accelerator) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the wrapped model
    head_of(base)  # a clear error now (no linear head, a LoRA adapter on it) rather than at the first step
    unfused = getattr(base.forward, "fastpref_unfused", base.forward)  # patched twice: the first one's
    forward = types.MethodType(_fused_forward(base, contract, unfused), base)
    if hasattr(base, "_original_forward"):
        # accelerate's `prepare_model` already wrapped this forward in its mixed-precision autocast (the trainers
        # prepare the reference model in __init__): keep that wrapping around the new forward
        forward = _under(accelerator.autocast, forward)
    base.forward = forward


def _under(context, forward):
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with context():
            return forward(*args, **kwargs)

    wrapped.fastpref_unfused = forward.fastpref_unfused
    return wrapped


def _is_patched(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(base.forward, "fastpref_unfused")


def _describe(name: str, contract: HeadContract) -> str:
    fields = ", ".join(("log-probs", *contract.outputs))
    extra = (f", temperature {contract.temperature:g}" if contract.temperature != 1.0 else "") + (
        ", fp32 head" if contract.cast_lm_head_to_fp32 else "")
    return f"{name} ({fields}{extra})"


def patch(trainer: transformers.Trainer) -> transformers.Trainer:
    """Make `trainer` (a TRL 1.16 SFTTrainer, DPOTrainer, KTOTrainer, GRPOTrainer or RLOOTrainer, after
    construction) compute its LM head with fastpref, on the policy and the reference model: the per-token
    log-probs and exactly the statistics the trainer reads. Losses, metrics and logged names stay TRL's own.
    Call before `trainer.train()`. Returns `trainer`; logs (logger `fastpref`, INFO) the heads it patched, and
    warns when the trainer was patched already (patching again replaces the first patch, it does not stack)."""
    policy, reference = contracts(trainer)
    again = _is_patched(trainer.model)
    if again:
        warnings.warn(f"fastpref.integrations.trl.patch: this {type(trainer).__name__} was patched already; its "
                      "heads are patched again from the unpatched forward (nothing stacks)", stacklevel=2)
    _patch_model(trainer.model, policy, trainer.accelerator)
    heads = [_describe("policy", policy)]
    if getattr(trainer, "ref_model", None) is not None:
        _patch_model(trainer.ref_model, reference, trainer.accelerator)
        heads.append(_describe("reference", reference))
    log.info("fastpref: %s LM heads patched: %s", type(trainer).__name__, "; ".join(heads))
    return trainer


__all__ = ["HeadContract", "contracts", "head_log_probs", "patch"]
