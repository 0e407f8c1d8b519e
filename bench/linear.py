"""Op `linear`: from hidden states and the lm_head, never given the logits. Two workloads:

- `linear_sequence_logps`: (B, T, H), (V, H), (B, T) -> (B,) sequence log-prob sums; fwd / bwd /
  fwd+bwd, gradients w.r.t. hidden and weight.
- `linear_dpo_loss`: the policy side of a DPO step (sigmoid loss, beta 0.1, the reference
  log-probs given): hidden -> loss -> gradients of hidden and weight, in one fwd+bwd.

Work: the three GEMMs over the valid (unmasked) tokens, 2·n·H·V flops each (forward z = h·Wᵀ;
backward dh = dz·W and dW = dzᵀ·h); their time alone is each mode's floor.
Methods: the textbook head (h·Wᵀ -> fp32 log_softmax -> gather -> masked sum), fastpref on each
backend, TRL's `ChunkedLogProbFunction` (valid tokens only, as its trainers call it on a GPU),
PyTorch's chunked `F.linear_cross_entropy` (torch >= 2.13), Cut Cross-Entropy's
`linear_cross_entropy` (CUDA only), and for the DPO step Liger's `LigerFusedLinearDPOLoss`.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastpref
from fastpref.bench import peers
from fastpref.bench.configs import IGNORE_INDEX, LOGIT_STD, BenchConfig, input_dtype, make_labels, reference_dtype
from fastpref.bench.logits import masked_sequence_logps
from fastpref.bench.workload import Method, Reference, Workload, cuda_only, first_reason

BETA = 0.1
REF_LOGPS_SPREAD = 5.0  # std of reference minus policy log-probs: DPO margins of O(1) at beta 0.1
GEMMS = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


@dataclass(frozen=True)
class LinearInputs:
    hidden: torch.Tensor  # (B, T, H) bf16 on a GPU, fp32 on a CPU; requires grad
    weight: torch.Tensor  # (V, H), same dtype; requires grad
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX where masked
    softcap: float | None
    upstream: torch.Tensor  # the gradient fed to the output: (B,) for log-probs, () for a loss
    ref_chosen_logps: torch.Tensor | None = None  # (B/2,) fp32, DPO only
    ref_rejected_logps: torch.Tensor | None = None

    @property
    def leaves(self) -> dict[str, torch.Tensor]:
        return {"hidden": self.hidden, "weight": self.weight}

    def copy(self) -> LinearInputs:
        fresh = {name: t.detach().clone().requires_grad_() for name, t in self.leaves.items()}
        return dataclasses.replace(self, **fresh)

    @property
    def valid_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def setup_logps(config: BenchConfig, device: torch.device) -> LinearInputs:
    """hidden ~ N(0, 1), weight ~ N(0, LOGIT_STD²/H): logits of spread LOGIT_STD; same values on every call."""
    labels_rng = torch.Generator().manual_seed(0)
    rng = torch.Generator(device).manual_seed(0)
    dtype = input_dtype(device)
    hidden = torch.randn(config.seqs, config.seq_len, config.hidden, generator=rng, device=device, dtype=dtype)
    weight = torch.randn(config.vocab, config.hidden, generator=rng, device=device, dtype=dtype)
    weight.mul_(LOGIT_STD / config.hidden**0.5)
    return LinearInputs(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        labels=make_labels(config, labels_rng, device),
        softcap=config.softcap,
        upstream=torch.randn(config.seqs, generator=labels_rng).to(device),
    )


def setup_dpo(config: BenchConfig, device: torch.device) -> LinearInputs:
    """As setup_logps, with reference log-probs: the policy's own at this first step (the reference
    model is the policy) plus N(0, REF_LOGPS_SPREAD²), so the pairs' losses are not saturated."""
    x = setup_logps(config, device)
    rng = torch.Generator().manual_seed(1)
    ref = reference_sequence_logps(x, reference_dtype(device)).float()
    ref += REF_LOGPS_SPREAD * torch.randn(ref.shape, generator=rng).to(device)
    chosen, rejected = ref.chunk(2)
    return dataclasses.replace(
        x, upstream=torch.ones((), device=device), ref_chosen_logps=chosen, ref_rejected_logps=rejected
    )


def dpo_sigmoid_loss(logps: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """(2B,) chosen-then-rejected log-probs, (B,), (B,) -> mean over pairs of -log σ(β·margin)."""
    chosen, rejected = logps.chunk(2)
    return -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def textbook_logps(x: LinearInputs) -> torch.Tensor:
    return masked_sequence_logps((x.hidden @ x.weight.T).float(), x.labels, x.softcap)


def fastpref_logps(x: LinearInputs) -> torch.Tensor:
    return fastpref.linear_sequence_logps(x.hidden, x.weight, x.labels, softcap=x.softcap)


def trl_chunked_logps(x: LinearInputs) -> torch.Tensor:
    """TRL 1.16's fused head as `add_fused_lm_head` calls it on a GPU (its default outputs, log-probs
    only): the valid positions alone, in 32768-wide vocab tiles, scattered back into (B, T). On
    a CPU the same call runs its torch fold (TRL's trainer would score every position there)."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    mask = x.labels != IGNORE_INDEX
    logps = ChunkedLogProbFunction.apply(
        x.hidden[mask], x.weight, None, x.labels[mask], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, x.softcap, 1.0, ("log_probs",)
    )[0]
    return logps.new_zeros(mask.shape).masked_scatter(mask, logps).sum(-1)


def torch_lce_logps(x: LinearInputs) -> torch.Tensor:
    """PyTorch's own `F.linear_cross_entropy` (torch >= 2.13), its chunked path with default options,
    per token, called as on any (B, T) batch: every position, masked ones by ignore_index."""
    B, T, H = x.hidden.shape
    nll = F.linear_cross_entropy(
        x.hidden.reshape(B * T, H),
        x.weight,
        x.labels.reshape(B * T),
        reduction="none",
        ignore_index=IGNORE_INDEX,
        options=torch.nn.LinearCrossEntropyOptions(),
    )
    return -nll.view(B, T).sum(-1, dtype=torch.float32)


def cce_logps(x: LinearInputs) -> torch.Tensor:
    """Cut Cross-Entropy 25.1.1 (its Triton kernels, default gradient filter), per token, masked tokens skipped."""
    from cut_cross_entropy import linear_cross_entropy

    nll = linear_cross_entropy(
        x.hidden, x.weight, x.labels, ignore_index=IGNORE_INDEX, softcap=x.softcap, reduction="none"
    )
    return -nll.sum(-1, dtype=torch.float32)


def via_logps(logps_fn):
    """The DPO step of a method that gives sequence log-probs: its log-probs -> dpo_sigmoid_loss."""
    return lambda x: dpo_sigmoid_loss(logps_fn(x), x.ref_chosen_logps, x.ref_rejected_logps)


def fastpref_dpo(x: LinearInputs) -> torch.Tensor:
    out = fastpref.linear_dpo_loss(
        x.hidden, x.weight, x.labels, x.ref_chosen_logps, x.ref_rejected_logps, beta=BETA, softcap=x.softcap
    )
    return out.loss


def liger_dpo(x: LinearInputs) -> torch.Tensor:
    """Liger 0.8.5's fused linear DPO loss, one pair per chunk, torch.compile'd on CUDA only (its
    compile takes ~30 s on a CPU). Its API takes no precomputed reference log-probs (it would
    recompute them from a reference head), so it runs reference-free: the same policy-side work."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss = LigerFusedLinearDPOLoss(
        ignore_index=IGNORE_INDEX, beta=BETA, compiled=x.hidden.is_cuda, use_ref_model=False, average_log_prob=False
    )
    return loss(x.weight, x.hidden, x.labels)[0]


def no_softcap(config: BenchConfig, device: torch.device) -> str | None:
    return None if config.softcap is None else "takes no logit softcap"


def torch_lce_missing(config: BenchConfig, device: torch.device) -> str | None:
    if hasattr(F, "linear_cross_entropy"):
        return None
    return f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)"


FASTPREF_TORCH = {"FASTPREF_BACKEND": "torch"}
FASTPREF_TRITON = {"FASTPREF_BACKEND": "triton"}
TRITON_CUDA = cuda_only("Triton kernels; a CPU only interprets them")
TRL = peers.needs("trl.trainer.utils")
CCE = first_reason(peers.needs("cut_cross_entropy"), cuda_only("CCE's kernels are Triton"))
TORCH_LCE = first_reason(torch_lce_missing, no_softcap)

LOGPS_METHODS = (
    Method("textbook", textbook_logps),
    Method("fastpref-torch", fastpref_logps, env=FASTPREF_TORCH),
    Method("fastpref-triton", fastpref_logps, unavailable=TRITON_CUDA, env=FASTPREF_TRITON),
    Method("trl", trl_chunked_logps, unavailable=TRL),
    Method("cce", cce_logps, unavailable=CCE),
    Method("torch-lce", torch_lce_logps, unavailable=TORCH_LCE),
)
DPO_METHODS = (
    Method("textbook", via_logps(textbook_logps)),
    Method("fastpref-torch", fastpref_dpo, env=FASTPREF_TORCH),
    Method("fastpref-triton", fastpref_dpo, unavailable=TRITON_CUDA, env=FASTPREF_TRITON),
    Method("trl", via_logps(trl_chunked_logps), unavailable=TRL),
    Method(
        "liger",
        liger_dpo,
        unavailable=first_reason(peers.needs("liger_kernel.chunked_loss"), no_softcap),
        uses_ref_logps=False,
    ),
    Method("cce", via_logps(cce_logps), unavailable=CCE),
    Method("torch-lce", via_logps(torch_lce_logps), unavailable=TORCH_LCE),
)


@contextmanager
def full_precision_matmul():
    """fp32 GEMMs without TF32 for the duration (a peer may have switched TF32 on)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap) -> torch.Tensor:
    """One sequence, textbook: (T, H), (V, H), (T,) -> ()."""
    return masked_sequence_logps(hidden @ weight.T, labels, softcap)


def reference_sequence_logps(x: LinearInputs, dtype: torch.dtype) -> torch.Tensor:
    """(B,) textbook sequence log-probs in `dtype`, one sequence at a time."""
    with torch.no_grad(), full_precision_matmul():
        weight = x.weight.detach().to(dtype)
        return torch.stack(
            [_sequence_logps(h.detach().to(dtype), weight, labels, x.softcap) for h, labels in zip(x.hidden, x.labels)]
        )


def reference(x: LinearInputs, method: Method) -> Reference:
    """The textbook in fp64 (CPU) / fp32 (GPU), one sequence at a time: the output (log-probs, or
    the DPO loss), then each sequence's backward with its upstream gradient."""
    dtype = reference_dtype(x.hidden.device)
    logps = reference_sequence_logps(x, dtype)
    if x.ref_chosen_logps is None:
        value, upstream = logps, x.upstream.to(dtype)
    else:
        if method.uses_ref_logps:
            ref_chosen, ref_rejected = x.ref_chosen_logps.to(dtype), x.ref_rejected_logps.to(dtype)
        else:
            ref_chosen = ref_rejected = logps.new_zeros(())
        leaf = logps.clone().requires_grad_()
        value = dpo_sigmoid_loss(leaf, ref_chosen, ref_rejected)
        (upstream,) = torch.autograd.grad(value, leaf)
    weight = x.weight.detach().to(dtype).requires_grad_()
    grad_hidden = torch.empty(x.hidden.shape, dtype=dtype, device=x.hidden.device)
    grad_weight = torch.zeros_like(weight)
    with full_precision_matmul():
        for b in range(x.hidden.shape[0]):
            hidden = x.hidden[b].detach().to(dtype).requires_grad_()
            seq = _sequence_logps(hidden, weight, x.labels[b], x.softcap)
            grad_hidden[b], grad_w = torch.autograd.grad(seq, (hidden, weight), upstream[b])
            grad_weight += grad_w
    pieces = (("hidden", slice(None), grad_hidden), ("weight", slice(None), grad_weight))
    return Reference(value.detach(), lambda: pieces)


def valid_token_flops(x: LinearInputs, mode: str) -> float:
    V, H = x.weight.shape
    return GEMMS[mode] * 2 * x.valid_tokens * H * V


def valid_token_gemms(x: LinearInputs) -> dict:
    """The floor of each mode: its GEMMs over the valid tokens alone, into preallocated outputs."""
    h = x.hidden.detach()[x.labels != IGNORE_INDEX]  # (n, H)
    w = x.weight.detach()  # (V, H)
    z = h.new_empty(h.shape[0], w.shape[0])  # (n, V): stands for the logits, then their gradient
    dh, dw = torch.empty_like(h), torch.empty_like(w)

    def forward():
        torch.mm(h, w.T, out=z)

    def backward():
        torch.mm(z, w, out=dh)
        torch.mm(z.T, h, out=dw)

    def both():
        forward()
        backward()

    return {"fwd": forward, "bwd": backward, "fwd+bwd": both}


WORKLOADS = (
    Workload(
        op="linear",
        name="linear_sequence_logps",
        modes=("fwd", "bwd", "fwd+bwd"),
        methods=LOGPS_METHODS,
        setup=setup_logps,
        reference=reference,
        work=valid_token_flops,
        unit="TFLOP/s",
        floor=valid_token_gemms,
    ),
    Workload(
        op="linear",
        name="linear_dpo_loss",
        modes=("fwd+bwd",),
        methods=DPO_METHODS,
        setup=setup_dpo,
        reference=reference,
        work=valid_token_flops,
        unit="TFLOP/s",
        floor=valid_token_gemms,
    ),
)
