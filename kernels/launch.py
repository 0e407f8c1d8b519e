"""Launching a kernel, with an error that says what to do when it cannot compile here."""

from __future__ import annotations

import triton


class KernelLaunchError(RuntimeError):
    """A Triton kernel failed to compile or launch on this machine."""


def launch(kernel, grid, *args, num_warps: int, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) with num_warps and fp fusion (FMA) on, whatever Triton's
    default; a failure is re-raised naming the kernel and the way around it."""
    try:
        kernel[grid](*args, num_warps=num_warps, enable_fp_fusion=True, **constexprs)
    except Exception as error:
        name = f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.fn.__name__}"
        raise KernelLaunchError(
            f"fastpref's Triton kernel {name} failed to compile or launch on this machine "
            f"(triton {triton.__version__}{_device()}): {type(error).__name__}: {error}\n"
            "Set FASTPREF_BACKEND=torch to run the chunked PyTorch path instead."
        ) from error


def _device() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    major, minor = torch.cuda.get_device_capability()
    return f", {torch.cuda.get_device_name()} sm_{major}{minor}"
