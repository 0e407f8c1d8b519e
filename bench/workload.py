"""What the harness measures: a workload (one op's function, its inputs, its modes, its reference)
and the methods that compute it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fastpref.bench.configs import BenchConfig

# A reference gradient, piece by piece: (input name, index into that input's grad, values).
GradPiece = tuple[str, object, torch.Tensor]


class Inputs(Protocol):
    """Tensors one run consumes. `labels` (B, T) with IGNORE_INDEX where masked; `upstream` is the
    gradient fed to the output's backward (the output's shape); `leaves` are the tensors whose
    gradients are checked; `copy()` gives fresh leaves with the same values."""

    labels: torch.Tensor
    upstream: torch.Tensor

    @property
    def leaves(self) -> dict[str, torch.Tensor]: ...

    def copy(self) -> Inputs: ...


Unavailable = Callable[[BenchConfig, torch.device], "str | None"]


def anywhere(config: BenchConfig, device: torch.device) -> str | None:
    return None


def cuda_only(why: str) -> Unavailable:
    """A `Method.unavailable` for methods whose kernels need CUDA."""
    return lambda config, device: None if device.type == "cuda" else f"needs CUDA ({why})"


def first_reason(*checks: Unavailable) -> Unavailable:
    """A `Method.unavailable` that reports the first check that fails."""
    return lambda config, device: next((r for check in checks if (r := check(config, device))), None)


@dataclass(frozen=True)
class Method:
    """One way to compute a workload. `run(inputs)` returns its differentiable output;
    `unavailable(config, device)` says why it cannot run that shape there (None: it can); `env` holds environment
    variables set while it runs; `uses_ref_logps=False` marks a DPO method that cannot take given
    reference log-probs (its loss is checked against the reference-free loss)."""

    name: str
    run: Callable[[Inputs], torch.Tensor]
    unavailable: Unavailable = anywhere
    env: Mapping[str, str] = field(default_factory=dict)
    uses_ref_logps: bool = True


@dataclass(frozen=True)
class Reference:
    """The output and the gradients of the workload in high precision (`grads` yields them piece by
    piece, so a (B, T, V) gradient never needs to be held whole)."""

    value: torch.Tensor
    grads: Callable[[], Iterable[GradPiece]]


@dataclass(frozen=True)
class Workload:
    """One function of one op, e.g. `linear_dpo_loss` of op `linear`.

    `setup(config, device)` builds fresh inputs; `reference(inputs, method)` the high-precision
    truth for that method; `work(inputs, mode)` the bytes (unit "GB/s") or flops ("TFLOP/s") one
    run in `mode` does; `floor(inputs)` (optional) gives, per mode, a callable doing only the
    irreducible part of that mode's work (its time is the floor a method is compared with)."""

    op: str
    name: str
    modes: tuple[str, ...]
    methods: tuple[Method, ...]
    setup: Callable[[BenchConfig, torch.device], Inputs]
    reference: Callable[[Inputs, Method], Reference]
    work: Callable[[Inputs, str], float]
    unit: str
    floor: Callable[[Inputs], dict[str, Callable[[], object]]] | None = None
