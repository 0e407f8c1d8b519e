"""Records out: JSON lines appended per op, and a markdown table for the terminal / README."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def append_jsonl(records: Sequence[dict], path: Path) -> None:
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def number(value: float) -> str:
    """3 significant digits, without an exponent below 1e6."""
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _throughput(record: dict, ceilings: dict) -> tuple[str, str]:
    """("1234 GB/s", "56% of copy") or ("12.3 TFLOP/s", "45% of GEMM")."""
    if "gbps" in record:
        return f"{number(record['gbps'])} GB/s", f"{record['gbps'] / ceilings['copy_gbps']:.0%} of copy"
    return f"{number(record['tflops'])} TFLOP/s", f"{record['tflops'] / ceilings['gemm_tflops']:.0%} of GEMM"


def markdown(op: str, records: Sequence[dict], tags: dict, ceilings: dict) -> str:
    """One table: a row per (config, workload, mode, method), in run order."""
    lines = [
        (
            f"### `{op}` on {tags['device_name']} ({tags['device']}, threads: {tags['threads']}), "
            f"torch {tags['torch']}, triton {tags['triton']}, {tags['timestamp']}"
        ),
        "",
        f"Ceilings: copy {number(ceilings['copy_gbps'])} GB/s, {ceilings['gemm_dtype']} GEMM "
        f"{number(ceilings['gemm_tflops'])} TFLOP/s. Peers: "
        + ", ".join(f"{name} {version or 'absent'}" for name, version in tags["peers"].items()),
        "",
        (
            "| config | workload | mode | method | p50 ms | p20–p80 ms | peak extra MB | throughput | of ceiling "
            "| × floor | grad err |"
        ),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        rate, share = _throughput(r, ceilings)
        floor = f"{r['p50_ms'] / r['floor_ms']:.2f}×" if r["floor_ms"] else "—"
        lines.append(
            f"| {r['config']} | {r['workload']} | {r['mode']} | {r['method']} | {number(r['p50_ms'])} "
            f"| {number(r['p20_ms'])}–{number(r['p80_ms'])} | {number(r['peak_extra_mb'])} | {rate} | {share} "
            f"| {floor} | {r['grad_error']:.1e} |"
        )
    return "\n".join(lines) + "\n"
