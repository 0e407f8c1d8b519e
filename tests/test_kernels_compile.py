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
    _assert_unselected_statistics_cost_nothing(text)


def _assert_unselected_statistics_cost_nothing(text: str) -> None:
    """A statistic not asked for is compiled out: the forward kernel's inner loop (sm_90a SASS) is shorter
    with the entropy alone (STATS=1) than with all four (STATS=15), for each dtype and softcap."""
    loops: dict[tuple, dict[int, list[int]]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 9 or cells[1] != "token_logps._forward_kernel" or "STATS=" not in cells[2]:
            continue
        parts = cells[2].split(" · ")
        stats = int(next(p for p in parts if p.startswith("STATS="))[6:])
        key = (parts[0], "HAS_SOFTCAP" in parts, next(p for p in parts if p.startswith("BLOCK_V=")))
        loops.setdefault(key, {}).setdefault(stats, []).append(int(cells[7]))
    compared = [(key, by_stats) for key, by_stats in loops.items() if 1 in by_stats and 15 in by_stats]
    assert compared, "no kernel variant compiled with the entropy alone and with all four statistics"
    for key, by_stats in compared:
        assert max(by_stats[1]) < min(by_stats[15]), (key, by_stats)


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


RAGGED_CHECK = """
from fastpref.bench.kernels_compile import class_key
tensor = lambda dtype: {"tensor": dtype, "offset": 0}
def record(n_rows, T, label_stride_b, label_stride_t, V=128256):
    args = [tensor("bfloat16"), T * V, V, 1, tensor("int64"), label_stride_b, label_stride_t,
            tensor("float32"), tensor("float32"), tensor("float32"), n_rows, T, V, -100, 1.44, 1.0]
    kwargs = {"num_warps": 4, "HAS_SOFTCAP": False, "STATS": 0, "BLOCK_ROWS": 1, "BLOCK_V": 4096}
    return {"module": "fastpref.kernels.token_logps", "kernel": "_forward_kernel", "args": args, "kwargs": kwargs}
assert class_key(record(4096, 1024, 1024, 1), 90) == class_key(record(4097, 1, 1025, 3), 90)
assert class_key(record(4096, 1024, 1024, 1), 90) != class_key(record(4096, 1024, 1024, 1, V=50257), 90)
"""


def test_a_ragged_last_chunk_compiles_nothing_new():
    """Row counts, T and label strides are not specialised on: a launch that differs in them alone
    (a ragged last chunk, another sequence length) reuses the compiled kernel; the vocabulary's
    divisibility does select another."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", RAGGED_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_head_model_reads_the_gate_and_predicts_above_the_floor():
    """bench/results/head_model.md's prediction: the row kernels' counts come from the gate's table (a
    missing class fails), and each path costs at least the three valid-token GEMMs, the fused pass less
    than two passes, the 512 MiB forward tile less than the 64 MiB one."""
    import pytest

    from fastpref.bench import head_model

    table = head_model.COMPILE_TABLE.read_text()
    fwd = head_model.per_1024(*head_model.FORWARD_CLASS, table)
    bwd = head_model.per_1024(*head_model.BACKWARD_CLASS, table)
    assert 100 < bwd <= fwd < 633  # under the HBM's allowance: bandwidth-bound
    with pytest.raises(LookupError):
        head_model.per_1024("token_logps._forward_kernel", "no such variant", table)
    for device in head_model.DEVICES:
        floor = 3 * head_model.gemm(device, head_model.ROWS, head_model.VOCAB, head_model.HIDDEN)
        fused = sum(head_model.single_pass(device, fwd, bwd).values())
        now, before = (sum(head_model.two_pass(device, fwd, bwd, rows).values()) for rows in (2093, 261))
        assert floor < fused < now < before
    assert "| H200 | fused linear_dpo_loss | **total**" in head_model.report(table)
