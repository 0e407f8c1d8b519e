"""Op `logits`: per-sequence log-prob sums from given logits, (B, T, V), (B, T) -> (B,), forward
and backward (the gradient w.r.t. the logits, (B, T, V) in their dtype).

Work: the logits' bytes, once read forward, read and written backward: fwd+bwd = 3 passes.
Methods: the textbook head (fp32 log_softmax -> gather -> masked sum), fastpref on each backend,
TRL's `selective_log_softmax`, Liger's cross-entropy kernel (`reduction='none'`; CUDA only).
A peer that takes no softcap (TRL) applies it in torch first, inside the measurement: fused or
not, the softcap is part of the head's work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import fastpref
from fastpref.bench import peers
from fastpref.bench.configs import IGNORE_INDEX, LOGIT_STD, BenchConfig, input_dtype, make_labels, reference_dtype
from fastpref.bench.workload import Method, Reference, Workload, cuda_only, first_reason

PASSES = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}  # passes over the logits' bytes


@dataclass(frozen=True)
class LogitsInputs:
    logits: torch.Tensor  # (B, T, V) bf16 on a GPU, fp32 on a CPU; requires grad
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX where masked
    softcap: float | None
    upstream: torch.Tensor  # (B,) fp32: the gradient fed to the sequence log-probs

    @property
    def leaves(self) -> dict[str, torch.Tensor]:
        return {"logits": self.logits}

    def copy(self) -> LogitsInputs:
        return dataclasses.replace(self, logits=self.logits.detach().clone().requires_grad_())


def setup(config: BenchConfig, device: torch.device) -> LogitsInputs:
    """Logits ~ N(0, LOGIT_STD²), drawn on the device; the same values on every call."""
    labels_rng = torch.Generator().manual_seed(0)
    logits_rng = torch.Generator(device).manual_seed(0)
    shape = (config.seqs, config.seq_len, config.vocab)
    logits = torch.randn(shape, generator=logits_rng, device=device, dtype=input_dtype(device)).mul_(LOGIT_STD)
    return LogitsInputs(
        logits=logits.requires_grad_(),
        labels=make_labels(config, labels_rng, device),
        softcap=config.softcap,
        upstream=torch.randn(config.seqs, generator=labels_rng).to(device),
    )


def softcapped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def masked_sequence_logps(z: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The textbook, in z's dtype: (..., T, V), (..., T) -> (...)."""
    logp = torch.log_softmax(softcapped(z, softcap), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != IGNORE_INDEX)).sum(-1)


def textbook(x: LogitsInputs) -> torch.Tensor:
    return masked_sequence_logps(x.logits.float(), x.labels, x.softcap)


def fastpref_sequence_logps(x: LogitsInputs) -> torch.Tensor:
    return fastpref.sequence_logps(x.logits, x.labels, softcap=x.softcap)


def trl_selective_log_softmax(x: LogitsInputs) -> torch.Tensor:
    """TRL 1.16: its fused Triton kernel on CUDA (masked rows skipped), a per-sequence torch loop elsewhere."""
    from trl.trainer.utils import selective_log_softmax

    mask = x.labels != IGNORE_INDEX
    logps = selective_log_softmax(softcapped(x.logits, x.softcap), x.labels.clamp(min=0), row_mask=mask)
    return logps.sum(-1, dtype=torch.float32)


def liger_cross_entropy(x: LogitsInputs) -> torch.Tensor:
    """Liger 0.8.5's cross-entropy, per token: its forward also writes the gradient into the logits'
    storage (so the logits are spent after one call); nll comes back in the logits' dtype."""
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

    B, T, V = x.logits.shape
    loss = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none", softcap=x.softcap)
    nll = loss(x.logits.view(B * T, V), x.labels.view(B * T))
    return -nll.view(B, T).sum(-1, dtype=torch.float32)


METHODS = (
    Method("textbook", textbook),
    Method("fastpref-torch", fastpref_sequence_logps, env={"FASTPREF_BACKEND": "torch"}),
    Method(
        "fastpref-triton",
        fastpref_sequence_logps,
        unavailable=cuda_only("Triton kernels; a CPU only interprets them"),
        env={"FASTPREF_BACKEND": "triton"},
    ),
    Method("trl", trl_selective_log_softmax, unavailable=peers.needs("trl.trainer.utils")),
    Method(
        "liger",
        liger_cross_entropy,
        unavailable=first_reason(
            peers.needs("liger_kernel.transformers.cross_entropy"),
            cuda_only("Liger's cross-entropy is a Triton kernel"),
        ),
    ),
)


def reference(x: LogitsInputs, method: Method) -> Reference:
    """The textbook in fp64 (CPU) / fp32 (GPU), one sequence at a time."""
    dtype = reference_dtype(x.logits.device)
    B = x.logits.shape[0]
    with torch.no_grad():
        value = torch.stack([masked_sequence_logps(x.logits[b].to(dtype), x.labels[b], x.softcap) for b in range(B)])

    def grads():
        for b in range(B):
            z = x.logits[b].detach().to(dtype).requires_grad_()
            logps = masked_sequence_logps(z, x.labels[b], x.softcap)
            (grad,) = torch.autograd.grad(logps, z, x.upstream[b].to(dtype))
            yield "logits", b, grad

    return Reference(value, grads)


def logits_bytes(x: LogitsInputs, mode: str) -> float:
    return PASSES[mode] * x.logits.numel() * x.logits.element_size()


WORKLOADS = (
    Workload(
        op="logits",
        name="sequence_logps",
        modes=("fwd", "bwd", "fwd+bwd"),
        methods=METHODS,
        setup=setup,
        reference=reference,
        work=logits_bytes,
        unit="GB/s",
    ),
)
