"""The compile gate (bench/kernels_compile.py): every kernel specialisation the library launches
compiles for sm_80, sm_90a and sm_100a, and no bf16 / fp16 variant spills. No GPU needed: the
launches are recorded under the interpreter and compiled ahead of time in a subprocess."""

import os
import subprocess
import sys

from fastpref.bench.kernel_launches import unlaunched_kernels
from fastpref.bench.kernels_compile import failures, inner_loop_size, Result


def test_every_launched_kernel_compiles_for_every_target(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "kernels_compile.md"
    proc = subprocess.run(
        [sys.executable, "-m", "fastpref.bench.kernels_compile", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 0, f"compile gate failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    text = out.read_text()
    for kernel in ("token_logps._forward_kernel", "token_logps._backward_kernel", "pair_sigmoid._pair_sigmoid_kernel"):
        assert kernel in text
    assert "Failures: none" in text


def test_inner_loop_size_takes_the_largest_innermost_loop():
    sass = "\n".join(
        f"        /*{16 * i:04x}*/  {text} ;"
        for i, text in enumerate([
            "MOV R1, R2",
            "FADD R1, R1, R2",  # 0x10: outer loop head
            "FMUL R3, R3, R3",  # 0x20: inner loop (3 instructions)
            "FADD R4, R4, R3",
            "@P0 BRA 0x20",
            "@P1 BRA 0x10",  # 0x50: outer loop back edge
            "FFMA R5, R5, R5, R5",  # 0x60: a second innermost loop (2 instructions)
            "@P2 BRA 0x60",
            "EXIT",
            "BRA 0x90",  # 0x90: the branch-to-itself padding after EXIT is no loop
        ])
    )  # fmt: skip
    assert inner_loop_size(sass) == 3
    assert inner_loop_size("        /*0000*/  EXIT ;\n        /*0010*/  BRA 0x10 ;") is None


def test_gate_fails_on_errors_spills_and_unlaunched_kernels():
    ok = Result("k", "bf16", 90, registers=40, spill_bytes=0, low_precision=True)
    spilling_fp32 = Result("k", "fp32", 90, registers=255, spill_bytes=64, low_precision=False)
    spilling_bf16 = Result("k", "bf16 · STATS", 90, registers=255, spill_bytes=64, low_precision=True)
    broken = Result("k", "fp16", 80, error="CompilationError at 3:4: NameError('NEG')")
    assert failures([ok, spilling_fp32], []) == []
    found = failures([ok, spilling_bf16, broken], ["fastpref.kernels.new:_kernel"])
    assert len(found) == 3 and "spills 64 bytes" in found[1] and "NameError" in found[0]
    assert "fastpref.kernels.new:_kernel" in found[2]
    records = [{"module": "fastpref.kernels.a", "kernel": "_k"}]
    assert unlaunched_kernels(records, {"fastpref.kernels.a:_k": 1, "fastpref.kernels.b:_j": 2}) == [
        "fastpref.kernels.b:_j"
    ]
