"""Backend choice, per call, from the tensors' device (callers never branch on device).

CUDA tensors run the Triton backend when Triton imports; everything else runs the chunked PyTorch
backend. `FASTPREF_BACKEND=torch|triton` overrides; with `TRITON_INTERPRET=1`, `triton` also runs
on CPU tensors (that is how CI tests the kernels).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from fastpref.backends import torch_chunked

try:  # imported once here, not per call: torch.compile traces backend_for
    from fastpref.backends import triton_backend
except ImportError:
    triton_backend = None

BACKEND_NAMES = ("torch", "triton")


def backend_for(tensor: torch.Tensor) -> ModuleType:
    """The backend module that computes on `tensor`'s device."""
    choice = os.environ.get("FASTPREF_BACKEND")
    if choice is not None and choice not in BACKEND_NAMES:
        raise ValueError(f"FASTPREF_BACKEND must be one of {list(BACKEND_NAMES)}, got {choice!r}")
    if choice == "torch" or (choice is None and tensor.device.type != "cuda"):
        return torch_chunked
    if triton_backend is None:
        if choice == "triton":
            raise ValueError("FASTPREF_BACKEND=triton, but triton cannot be imported")
        return torch_chunked
    return triton_backend
