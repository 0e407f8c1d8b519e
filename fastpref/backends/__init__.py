"""Backend choice, per call, from the tensors' device (callers never branch on device).

`FASTPREF_BACKEND=torch` forces the chunked PyTorch backend.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from fastpref.backends import torch_chunked

BACKENDS = {"torch": torch_chunked}


def backend_for(tensor: torch.Tensor) -> ModuleType:
    """The backend module that computes on `tensor`'s device."""
    choice = os.environ.get("FASTPREF_BACKEND", "torch")
    if choice not in BACKENDS:
        raise ValueError(f"FASTPREF_BACKEND must be one of {sorted(BACKENDS)}, got {choice!r}")
    return BACKENDS[choice]
