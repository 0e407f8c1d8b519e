"""The compile gate: every Triton kernel specialisation the library launches, compiled ahead of time
for sm_80, sm_90a and sm_100a on a machine without a GPU.

1. `fastpref.bench.kernel_launches` runs representative API calls under the interpreter (a
   subprocess with TRITON_INTERPRET=1) and records each launch.
2. Here, without the interpreter, Triton's own binder specialises each recorded launch for the target
   (argument types, i32 / i64, divisibility by 16, ints equal to 1); launches that specialise alike
   are one structural class, compiled once per target with
   `triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))`.
3. The PTX goes through the ptxas Triton ships (`-v`: registers, spills, stack); sm_90a's cubin
   through its cuobjdump: SASS instructions of the kernel's inner loop (the largest innermost loop),
   and the warp instructions that loop issues per 1,024 elements, body × num_warps × 1024 / elements
   per iteration (the product of the kernel's BLOCK_* constexprs).
A failed compile, or a spill in a variant that reads bf16 / fp16, fails the gate.

`python -m fastpref.bench.kernels_compile` rewrites bench/results/kernels_compile.md; exit status 1
on a failure (listed). tests/test_kernels_compile.py runs it in `make test`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TARGETS = (80, 90, 100)
SASS_TARGET = 90  # the loop counts come from sm_90a's SASS (disassembling every target would double the gate's time)
RESULTS = Path(__file__).resolve().parent / "results" / "kernels_compile.md"
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(0x[0-9a-f]+)")


@dataclass
class Result:
    """One structural class compiled for one target."""

    kernel: str
    variant: str
    cc: int
    launches: int = 0  # recorded launches of this class
    registers: int | None = None
    spill_bytes: int | None = None  # spill stores + spill loads
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    loop_instructions: int | None = None
    per_1024: float | None = None
    low_precision: bool = False  # reads bf16 / fp16
    error: str | None = None
    seconds: float = 0.0


def record_launches() -> list[dict]:
    """The workload's launches, recorded in a subprocess under the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fastpref.bench.kernel_launches"], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"recording the launches failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


class _Pointer:
    """A recorded tensor argument: what the binder reads of a tensor (dtype, data_ptr)."""

    def __init__(self, dtype: str, offset: int):
        import torch

        self.dtype = getattr(torch, dtype)
        self._ptr = (1 << 20) + offset

    def data_ptr(self) -> int:
        return self._ptr


def _argument(value):
    return _Pointer(value["tensor"], value["offset"]) if isinstance(value, dict) else value


def kernel_function(record: dict):
    """The @triton.jit function a record launched (import without the interpreter)."""
    import importlib

    return getattr(importlib.import_module(record["module"]), record["kernel"])


def specialise(record: dict, cc: int):
    """Triton's binder on the recorded arguments, for target cc ->
    (fn, signature, constexprs, attrs, options, target)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = kernel_function(record)
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {k: _argument(v) for k, v in record["kwargs"].items()}
    bound, specialization, options = binder(*map(_argument, record["args"]), **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return fn, signature, constexprs, attrs, options, target


def class_key(record: dict, cc: int) -> str:
    """Launches with equal keys compile to the same code."""
    fn, signature, constexprs, attrs, options, _ = specialise(record, cc)
    parts = (record["module"], record["kernel"], signature, sorted(constexprs.items()), sorted(attrs.items()))
    return repr((parts, options.num_warps, options.num_stages, cc))


def variant_name(record: dict, cc: int) -> str:
    """What sets a class apart: the logits' dtype, the constexpr options, the ints specialised to 1,
    typed i64 or not divisible by 16."""
    fn, signature, constexprs, attrs, options, _ = specialise(record, cc)
    names = fn.arg_names
    declared = {p.name for p in fn.params if p.is_constexpr}
    pointers = [t[1:] for t in signature.values() if t.startswith("*")]
    parts = [pointers[0]] if pointers else []
    for (index,), value in sorted(constexprs.items()):
        name = names[index]
        if name in declared:
            if value is True:
                parts.append(name)
            elif value is not False:
                parts.append(f"{name}={value}")
    ones = [names[i] for (i,), v in constexprs.items() if names[i] not in declared and v == 1]
    wide = [n for n, t in signature.items() if t == "i64"]
    unaligned = [names[i] for (i,), a in attrs.items() if not a and signature[names[i]] in ("i32", "i64")]
    for label, group in (("=1", ones), ("i64", wide), ("%16!=0", unaligned)):
        if group:
            parts.append(f"{label}: {','.join(group)}")
    parts.append(f"warps={options.num_warps}")
    return " · ".join(parts)


def ptxas_report(ptx: str, cc: int) -> tuple[int, int, int]:
    """(registers, spill bytes (stores + loads), stack bytes) from `ptxas -v` on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(cc).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cc)}"]
        proc = subprocess.run([*cmd, str(src), "-o", str(Path(tmp) / "kernel.o")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    log = proc.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stack, stores, loads = map(int, re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log
    ).groups())  # fmt: skip
    return registers, stores + loads, stack


def inner_loop_size(sass: str) -> int | None:
    """Instructions in the largest innermost loop of a SASS listing (a backward branch's span), or
    None for straight-line code."""
    addresses, loops = [], []
    for match in _INSTRUCTION.finditer(sass):
        address = int(match.group(1), 16)
        addresses.append(address)
        branch = _BRANCH.search(match.group(2))
        if branch and int(branch.group(1), 16) < address:  # (a branch to itself pads the end)
            loops.append((int(branch.group(1), 16), address))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    if not innermost:
        return None
    return max(sum(1 for x in addresses if a <= x <= b) for a, b in innermost)


def sass_of(cubin: bytes) -> str:
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {proc.stderr[-2000:]}")
    return proc.stdout


def compile_class(record: dict, cc: int) -> Result:
    """Compile one class for one target and measure it; a failure is kept in Result.error."""
    import triton
    from triton.compiler import ASTSource

    start = time.perf_counter()
    result = Result(f"{record['module'].rsplit('.', 1)[-1]}.{record['kernel']}", "", cc)
    try:
        fn, signature, constexprs, attrs, options, target = specialise(record, cc)
        result.variant = variant_name(record, cc)
        result.low_precision = any(t in ("*bf16", "*fp16") for t in signature.values())
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        result.registers, result.spill_bytes, result.stack_bytes = ptxas_report(compiled.asm["ptx"], cc)
        result.shared_bytes = compiled.metadata.shared
        if cc == SASS_TARGET:
            result.loop_instructions = inner_loop_size(sass_of(compiled.asm["cubin"]))
        if result.loop_instructions is not None:
            per_iteration = math.prod(v for k, v in record["kwargs"].items() if k.startswith("BLOCK_"))
            result.per_1024 = result.loop_instructions * options.num_warps * 1024 / per_iteration
    except Exception as error:  # noqa: BLE001  (every failure is a finding of the gate)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
        where = f"{lines[0]} " if len(lines) > 1 else ""  # a CompilationError: its position, then the cause
        result.error = f"{type(error).__name__} {where}{lines[-1]}"
    result.seconds = time.perf_counter() - start
    return result


def run_gate(records: list[dict], targets=TARGETS, jobs: int | None = None) -> list[Result]:
    """Each structural class of the records compiled once per target, in parallel processes."""
    classes: dict[str, tuple[dict, int, int]] = {}
    for record in records:
        for cc in targets:
            try:
                key = class_key(record, cc)
            except Exception:  # noqa: BLE001  (a binder failure shows as that class's compile error)
                key = repr((record, cc))
            first, _, count = classes.get(key, (record, cc, 0))
            classes[key] = (first, cc, count + 1)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs or os.cpu_count(), mp_context=context) as pool:
        futures = [(pool.submit(compile_class, record, cc), count) for record, cc, count in classes.values()]
        results = []
        for future, count in futures:
            result = future.result()
            result.launches = count
            results.append(result)
    return sorted(results, key=lambda r: (r.kernel, r.variant, r.cc))


def failures(results: list[Result], unlaunched: list[str]) -> list[str]:
    """What fails the gate: compile errors, spills in bf16 / fp16 variants, kernels never launched."""
    found = [f"{r.kernel} [{r.variant}] sm_{r.cc}: {r.error}" for r in results if r.error]
    found += [
        f"{r.kernel} [{r.variant}] sm_{r.cc}: spills {r.spill_bytes} bytes"
        for r in results
        if not r.error and r.low_precision and r.spill_bytes
    ]
    found += [f"{name}: no workload call launches it (add one to bench/kernel_launches.py)" for name in unlaunched]
    return found


def _arch(cc: int) -> str:
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    return sm_arch_from_capability(cc)


def _cell(value, fmt="{}"):
    return "—" if value is None else fmt.format(value)


def table(results: list[Result]) -> str:
    """Markdown: one row per (kernel, variant); registers / spills / shared memory per target, and the
    inner loop of the SASS target."""
    rows: dict[tuple[str, str], dict[int, Result]] = {}
    for r in results:
        rows.setdefault((r.kernel, r.variant), {})[r.cc] = r
    targets = sorted({r.cc for r in results})
    head = " | ".join(f"{_arch(cc)} regs / spill B / smem B" for cc in targets)
    lines = [
        f"| kernel | variant | launches | {head} | {_arch(SASS_TARGET)} loop | per 1,024 |",
        "|---|---|---|" + "---|" * len(targets) + "---|---|",
    ]
    for (kernel, variant), by_cc in rows.items():
        cells = []
        for cc in targets:
            r = by_cc.get(cc)
            if r is None:
                cells.append("—")
            elif r.error:
                cells.append(f"**FAILED** {r.error[:80]}")
            else:
                cells.append(f"{r.registers} / {r.spill_bytes} / {r.shared_bytes}")
        sass = by_cc.get(SASS_TARGET)
        loop = "—" if sass is None else f"{_cell(sass.loop_instructions)} | {_cell(sass.per_1024, '{:.0f}')}"
        launches = max(r.launches for r in by_cc.values())
        lines.append(f"| {kernel} | {variant} | {launches} | " + " | ".join(cells) + f" | {loop} |")
    return "\n".join(lines)


def report(results: list[Result], unlaunched: list[str], n_launches: int, seconds: float) -> str:
    import triton

    compiled = sum(1 for r in results if not r.error)
    classes = len({(r.kernel, r.variant) for r in results})
    found = failures(results, unlaunched)
    lines = [
        "# Triton kernels compiled ahead of time (no GPU): `python -m fastpref.bench.kernels_compile`",
        "",
        f"triton {triton.__version__}; {n_launches} launches recorded from the workload in "
        "`bench/kernel_launches.py` -> "
        f"{classes} structural classes × {len({r.cc for r in results})} targets: "
        f"{compiled} of {len(results)} compiled in {seconds:.0f} s.",
        "Per target: registers / spill bytes (stores + loads) / shared memory bytes (`ptxas -v`); for "
        f"{_arch(SASS_TARGET)} the SASS instructions of the inner loop and the warp instructions it issues per 1,024 "
        "elements (loop × warps × 1024 / elements per iteration; ~633 is what the HBM allows for bf16 at 3 TB/s "
        "on an H100). `=1`: ints Triton specialised to 1; `%16!=0`: ints not divisible by 16 (loads of those rows "
        "do not vectorise); `i64`: ints past int32.",
        "",
        table(results),
        "",
        "Failures: " + ("none" if not found else "\n- " + "\n- ".join(found)),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown table to write")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET=1: the kernels must compile, not be interpreted")
    from fastpref.bench.kernel_launches import jit_kernels, unlaunched_kernels

    start = time.perf_counter()
    records = record_launches()
    results = run_gate(records, jobs=args.jobs)
    text = report(results, unlaunched_kernels(records, jit_kernels()), len(records), time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 1 if failures(results, unlaunched_kernels(records, jit_kernels())) else 0


if __name__ == "__main__":
    sys.exit(main())
