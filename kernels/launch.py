"""Launching a kernel: on its tensors' device, with an error that says what to do when it cannot
compile here.

Triton launches on the *current* device's current stream. A head on another GPU (`device_map="auto"`
puts the lm_head on the last one) would otherwise run on the wrong device (an illegal address) or,
with peer access, on a stream unordered with the one that wrote its inputs; so every launch runs
under `torch.cuda.device(<the first tensor argument's device>)`.
"""

from __future__ import annotations

import contextlib

import torch
import triton


class KernelLaunchError(RuntimeError):
    """A Triton kernel failed to compile or launch on this machine."""


def device_of(args) -> torch.device | None:
    """The device of the first tensor among a launch's arguments (None without one)."""
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)


def on_device(device: torch.device | None):
    """Context in which `device` is the current CUDA device (nothing to do off CUDA)."""
    return torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, grid, *args, num_warps: int, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) on the tensors' device, with num_warps and fp fusion (FMA)
    on, whatever Triton's default; a failure is re-raised naming the kernel and the way around it."""
    try:
        with on_device(device_of(args)):
            kernel[grid](*args, num_warps=num_warps, enable_fp_fusion=True, **constexprs)
    except Exception as error:
        name = f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.fn.__name__}"
        raise KernelLaunchError(
            f"fastpref's Triton kernel {name} failed to compile or launch on this machine "
            f"(triton {triton.__version__}{_device()}): {type(error).__name__}: {error}\n"
            "Set FASTPREF_BACKEND=torch to run the chunked PyTorch path instead."
        ) from error


def _device() -> str:
    if not torch.cuda.is_available():
        return ""
    major, minor = torch.cuda.get_device_capability()
    return f", {torch.cuda.get_device_name()} sm_{major}{minor}"
