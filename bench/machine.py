"""The machine a run measures on: what it is (tags on every record) and how fast it can go at
all (copy bandwidth and GEMM throughput, measured in the same run as the methods)."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

from fastpref.bench import peers
from fastpref.bench.measure import time_ms


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def tags(device: torch.device) -> dict:
    """Fields every record of this run carries."""
    return {
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "peers": peers.versions(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def ceilings(device: torch.device, *, quick: bool, repeats: int) -> dict:
    """Device-to-device copy bandwidth (GB/s, read + write) and GEMM throughput (TFLOP/s): bf16
    8192³ on a GPU, fp32 2048³ (1024³ quick) on a CPU."""
    if device.type == "cuda":
        copy_bytes, gemm_size, gemm_dtype = 1 << 30, 8192, torch.bfloat16
    else:
        copy_bytes, gemm_size, gemm_dtype = (64 if quick else 256) << 20, 1024 if quick else 2048, torch.float32
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, repeats=repeats)[1]
    a = torch.randn(gemm_size, gemm_size, device=device, dtype=gemm_dtype)
    b = torch.randn(gemm_size, gemm_size, device=device, dtype=gemm_dtype)
    out = torch.empty_like(a)
    gemm_ms = time_ms(lambda: torch.mm(a, b, out=out), device, repeats=repeats)[1]
    return {
        "copy_gbps": 2 * copy_bytes / (copy_ms / 1e3) / 1e9,
        "gemm_tflops": 2 * gemm_size**3 / (gemm_ms / 1e3) / 1e12,
        "gemm_dtype": str(gemm_dtype).removeprefix("torch."),
    }
