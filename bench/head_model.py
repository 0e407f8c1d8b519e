"""The on-paper time of llama3-8b's head under DPO on an H100 and an H200, from the compile gate's SASS
counts (bench/results/kernels_compile.md) and a GEMM model, so that the first GPU run has a prediction
to check. `python -m fastpref.bench.head_model` rewrites bench/results/head_model.md.

Model. A GEMM takes max(flops / (rate · tile efficiency), bytes / bandwidth): rate and bandwidth are
the ones measured on the lent machines (KINDS.md), tile efficiency the share of 128 × 256 output tiles
that are not padding. A row kernel takes max(bytes / bandwidth, warp instructions / issue rate): the
instructions are the gate's SASS loop counts per 1,024 elements, issued at 4 per cycle per SM. Work
outside GEMMs and row kernels (gathers, the loss on (B,) tensors, launches) is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COMPILE_TABLE = RESULTS / "kernels_compile.md"

# llama3-8b's head under DPO (tests/test_memory.py, tests/test_gpu.py): 4 pairs × 1,024 positions, 37% masked
PAIRS, POSITIONS, HIDDEN, VOCAB, ITEMSIZE = 4, 1024, 4096, 128256, 2
VALID_PER_SEQ = round(POSITIONS * 0.63)
ROWS = 2 * PAIRS * VALID_PER_SEQ
TILE_BYTES = 512 << 20  # the single pass's memory_budget and the Triton backend's tile (defaults)
SLICE_COLS = 16384  # the two-pass backward's vocab slices at that tile (triton_backend.slice_width)
# the gate's classes of the bf16 row kernels on these rows: aligned (padded) rows, one row per program
FORWARD_CLASS = (
    "token_logps._forward_kernel",
    "bf16 · STATS=0 · BLOCK_ROWS=1 · BLOCK_V=4096 · =1: stride_v · %16!=0: ignore_index · warps=4",
)
BACKWARD_CLASS = (
    "token_logps._backward_kernel",
    "bf16 · BLOCK_ROWS=1 · BLOCK_V=4096 · =1: stride_v,grad_stride_v · %16!=0: ignore_index · warps=4",
)


@dataclass(frozen=True)
class Device:
    name: str
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written (measured, KINDS.md)
    gemm_flops: float  # bf16 8192³ GEMM on random data (measured, KINDS.md)
    sms: int = 132
    clock_hz: float = 1.98e9  # SM clock under load (KINDS.md: 1980 MHz)

    @property
    def issue_rate(self) -> float:
        """Warp instructions per second: 4 schedulers per SM, one each per cycle."""
        return self.sms * 4 * self.clock_hz


DEVICES = (Device("H100 SXM 80 GB", 3.0e12, 798e12), Device("H200", 4.3e12, 788e12))


def per_1024(kernel: str, variant: str, table: str) -> float:
    """The warp instructions per 1,024 elements the gate recorded for a class (sm_90a SASS)."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[0] == kernel and cells[1] == variant:
            return float(cells[-1])
    raise LookupError(f"{kernel} [{variant}] is not in {COMPILE_TABLE.name}: run the compile gate")


def gemm(device: Device, m: int, n: int, k: int, beta: bool = False, out_bytes: int = ITEMSIZE) -> float:
    """Seconds of an (m, k) · (k, n) GEMM in bf16 (beta: it also reads its output)."""
    efficiency = m / (math.ceil(m / 128) * 128) * n / (math.ceil(n / 256) * 256)
    flops = 2 * m * n * k
    bytes_ = (m * k + k * n) * ITEMSIZE + m * n * out_bytes * (2 if beta else 1)
    return max(flops / (device.gemm_flops * efficiency), bytes_ / device.copy_bytes_per_s)


def row_kernel(device: Device, elements: int, passes: int, instructions_per_1024: float) -> float:
    """Seconds of a row kernel over `elements` logits moved `passes` times (1: read; 2: read + write)."""
    memory = elements * ITEMSIZE * passes / device.copy_bytes_per_s
    return max(memory, elements / 1024 * instructions_per_1024 / device.issue_rate)


def single_pass(device: Device, fwd: float, bwd: float) -> dict[str, float]:
    """linear_dpo_loss's fused pass: per pair chunk (one pair: its logits fill most of the 512 MiB tile),
    a logits GEMM, the forward and backward row kernels, dW += dzᵀ·h and dh = dz·W."""
    r = 2 * VALID_PER_SEQ
    chunks = PAIRS
    return {
        "logits GEMMs": chunks * gemm(device, r, VOCAB, HIDDEN),
        "row kernels": chunks * (row_kernel(device, r * VOCAB, 1, fwd) + row_kernel(device, r * VOCAB, 2, bwd)),
        "dW GEMMs": chunks * gemm(device, VOCAB, HIDDEN, r, beta=True),
        "dh GEMMs": chunks * gemm(device, r, HIDDEN, VOCAB),
    }


def two_pass(device: Device, fwd: float, bwd: float, forward_rows: int) -> dict[str, float]:
    """linear_sequence_logps (or a batch-coupled loss): forward in row chunks of forward_rows, backward
    in vocab slices with every row in one block: recompute, dz, dW[slice] = dzᵀ·h, dh += dz·W (fp32)."""
    chunks = [min(forward_rows, ROWS - r0) for r0 in range(0, ROWS, forward_rows)]
    slices = [min(SLICE_COLS, VOCAB - c0) for c0 in range(0, VOCAB, SLICE_COLS)]
    return {
        "forward GEMMs": sum(gemm(device, r, VOCAB, HIDDEN) for r in chunks),
        "row kernels": row_kernel(device, ROWS * VOCAB, 1, fwd) + row_kernel(device, ROWS * VOCAB, 2, bwd),
        "recompute GEMMs": sum(gemm(device, ROWS, c, HIDDEN) for c in slices),
        "dW GEMMs": sum(gemm(device, c, HIDDEN, ROWS) for c in slices),
        "dh GEMMs (fp32 accumulate)": sum(gemm(device, ROWS, HIDDEN, c, beta=True, out_bytes=4) for c in slices),
    }


def report(table: str) -> str:
    fwd, bwd = per_1024(*FORWARD_CLASS, table), per_1024(*BACKWARD_CLASS, table)
    rows_512 = TILE_BYTES // (VOCAB * ITEMSIZE)
    lines = [
        "# On-paper time of llama3-8b's head under DPO: `python -m fastpref.bench.head_model`",
        "",
        f"Shape: {PAIRS} pairs × {POSITIONS} positions, 37% masked ({ROWS} valid rows), H {HIDDEN}, V {VOCAB}, "
        "bf16.",
        "",
        "Assumptions (bench/head_model.py): a GEMM takes max(flops / (rate × tile efficiency), bytes / bandwidth), "
        "tile efficiency the non-padding share of 128 × 256 output tiles; a row kernel takes max(bytes / bandwidth, "
        "warp instructions / (132 SMs × 4 per cycle × 1.98 GHz)), its instructions the compile gate's sm_90a SASS "
        "loop "
        f"counts: forward {fwd:.0f}, backward {bwd:.0f} warp instructions per 1,024 bf16 logits "
        "(bench/results/kernels_compile.md). Rates measured on the lent machines (/work/.library/device/KINDS.md): "
        "H100 3.0 TB/s copy (read + write) and 798 TFLOP/s bf16; H200 4.3 TB/s and 788 TFLOP/s (datasheets: "
        "3.35 / 4.8 TB/s, ~990 TFLOP/s dense bf16, /work/.library/device/H200.md). Gathers, the loss on (B,) "
        "tensors and launch gaps are left out.",
        "",
        "| device | path | part | ms |",
        "|---|---|---|---|",
    ]
    for device in DEVICES:
        floor = 3 * gemm(device, ROWS, VOCAB, HIDDEN)  # the three valid-token GEMMs, 6·n·H·V
        paths = {
            "fused linear_dpo_loss": single_pass(device, fwd, bwd),
            "two passes, 512 MiB tile (now)": two_pass(device, fwd, bwd, rows_512),
            "two passes, 64 MiB tile (before: forward 20 GEMMs)": two_pass(device, fwd, bwd, (64 << 20) // VOCAB // 2),
        }
        lines.append(f"| {device.name} | three valid-token GEMMs (floor) | 6·n·H·V | {floor * 1e3:.2f} |")
        for path, parts in paths.items():
            for part, seconds in parts.items():
                lines.append(f"| {device.name} | {path} | {part} | {seconds * 1e3:.2f} |")
            total = sum(parts.values())
            ratio = f"**total** ({total / floor:.2f}× the floor)"
            lines.append(f"| {device.name} | {path} | {ratio} | **{total * 1e3:.2f}** |")
    lines += [
        "",
        f"The row kernels are bandwidth-bound on both chips: their instructions take well under their bytes' time. "
        f"Forward GEMMs at the 512 MiB tile: {math.ceil(ROWS / rows_512)} reads of the 1.05 GB weight, "
        f"{math.ceil(ROWS / ((64 << 20) // (VOCAB * 2)))} at 64 MiB.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    text = report(COMPILE_TABLE.read_text())
    (RESULTS / "head_model.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
