"""One benchmark run: every selected workload × config × method × mode, measured in this process.

Per method: fresh inputs; one fwd+bwd on a copy of them, checked against the high-precision
reference (this first call also warms compile caches and autotuners); then per mode the time
(p20/p50/p80 ms) and the peak extra memory. A method that cannot run here is skipped with a note.

    fastpref bench [--quick] [--op logits|linear|all] [--configs ...] [--methods ...] [--time_box S] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from fastpref.bench import accuracy, linear, logits, machine, plot, report
from fastpref.bench.configs import CONFIGS, IGNORE_INDEX, BenchConfig, default_configs
from fastpref.bench.measure import time_and_peak, time_ms
from fastpref.bench.workload import Inputs, Method, Workload
from fastpref.parsers import ArgumentParser

OPS = {"logits": logits.WORKLOADS, "linear": linear.WORKLOADS}
METHOD_NAMES = tuple(dict.fromkeys(m.name for workloads in OPS.values() for w in workloads for m in w.methods))
OUT = Path("bench_results")  # in the working directory, never inside the installed package
UNITS = {"GB/s": ("gbps", 1e9), "TFLOP/s": ("tflops", 1e12)}  # record field, and the unit's size


@contextmanager
def environment(values: Mapping[str, str]):
    """Set environment variables for the duration (e.g. FASTPREF_BACKEND, read on every call)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def mode_callable(method: Method, x: Inputs, mode: str) -> Callable[[], object]:
    """What one run of `mode` does. bwd: the forward runs once here, and each run backpropagates
    through its graph again (retain_graph)."""
    if mode == "fwd":
        return lambda: method.run(x)
    if mode == "fwd+bwd":
        return lambda: method.run(x).backward(x.upstream)
    out = method.run(x)
    return lambda: out.backward(x.upstream, retain_graph=True)


def check_accuracy(workload: Workload, method: Method, x: Inputs) -> dict:
    """Output and gradient error of one fwd+bwd (on a copy: some methods overwrite their inputs)."""
    trial = x.copy()
    out = method.run(trial)
    out.backward(trial.upstream)
    truth = workload.reference(x, method)
    return {
        "value_error": accuracy.relative_error(out.detach(), truth.value),
        "grad_error": accuracy.grad_error({name: t.grad for name, t in trial.leaves.items()}, truth.grads()),
    }


def measure_floor(workload: Workload, config: BenchConfig, device: torch.device, repeats: int) -> dict[str, float]:
    """p50 ms of each mode's floor (the workload's irreducible work alone), or {} without one."""
    if workload.floor is None:
        return {}
    runs = workload.floor(workload.setup(config, device))
    return {mode: time_ms(fn, device, repeats=repeats)[1] for mode, fn in runs.items()}


def measure_method(
    workload: Workload, config: BenchConfig, method: Method, device: torch.device, repeats: int, floor: dict
) -> list[dict]:
    """One record per mode of `method` on `config`."""
    x = workload.setup(config, device)
    errors = check_accuracy(workload, method, x)
    leaves = list(x.leaves.values())
    field, scale = UNITS[workload.unit]
    valid_tokens = int((x.labels != IGNORE_INDEX).sum())
    records = []
    for mode in workload.modes:
        run = mode_callable(method, x, mode)
        p20, p50, p80, peak = time_and_peak(run, device, leaves, repeats=repeats)
        del run
        records.append(
            {
                "op": workload.op,
                "workload": workload.name,
                "config": config.name,
                "method": method.name,
                "mode": mode,
                "seqs": config.seqs,
                "seq_len": config.seq_len,
                "hidden": config.hidden,
                "vocab": config.vocab,
                "softcap": config.softcap,
                "valid_tokens": valid_tokens,
                "dtype": str(leaves[0].dtype).removeprefix("torch."),
                "p20_ms": p20,
                "p50_ms": p50,
                "p80_ms": p80,
                "peak_extra_mb": peak / 2**20,
                field: workload.work(x, mode) / scale / (p50 / 1e3),
                "floor_ms": floor.get(mode),
                **errors,
            }
        )
    return records


def run(
    workloads: Sequence[Workload],
    configs: Sequence[BenchConfig],
    method_names: Sequence[str],
    device: torch.device,
    repeats: int,
    notes: dict[str, list[str]],
    deadline: float | None = None,
) -> list[dict]:
    """Records of every (workload, config, method, mode); `notes` collects, per reason, where a
    method was skipped (cannot run here, or `deadline`, a time.monotonic() value, has passed) or
    failed (raised: its other runs and the other methods go on, so one peer's kernel breaking on a
    machine does not lose the run)."""
    from tqdm import tqdm

    plan = [(w, c, m) for c in configs for w in workloads for m in w.methods if m.name in method_names]
    records = []
    floors: dict[tuple[str, str], dict] = {}
    with tqdm(plan, desc="bench", unit="method") as bar:
        for workload, config, method in bar:
            bar.set_postfix_str(f"{config.name} {workload.name} {method.name}")
            reason = method.unavailable(config, device)
            if not reason and deadline is not None and time.monotonic() > deadline:
                reason = "the time box (--time_box) was spent"
            if reason:
                notes.setdefault(f"{method.name} ({workload.name}): skipped, {reason}", []).append(config.name)
                continue
            key = (workload.name, config.name)
            if key not in floors:
                floors[key] = measure_floor(workload, config, device, repeats)
            try:
                with environment(method.env):
                    records += measure_method(workload, config, method, device, repeats, floors[key])
            except Exception as error:  # noqa: BLE001 (reported in the notes and the exit status)
                message = (str(error).strip().splitlines() or [""])[0][:200]
                notes.setdefault(
                    f"{method.name} ({workload.name}): FAILED, {type(error).__name__}: {message}", []
                ).append(config.name)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return records


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="fastpref bench", description=__doc__.split("\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (a CPU in under a minute)")
    parser.add_argument("--op", choices=(*OPS, "all"), default="all")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=tuple(CONFIGS),
        metavar="CONFIG",
        help=f"of {', '.join(CONFIGS)}; default: the model shapes on a GPU, the cpu-* ones on a CPU",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHOD_NAMES,
        default=METHOD_NAMES,
        metavar="METHOD",
        help=f"of {', '.join(METHOD_NAMES)} (default: all; those that cannot run here are skipped with a note)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (1 gives steadier timings beside other work)")
    parser.add_argument("--out", type=Path, default=OUT, help="where <op>.jsonl and <op>.png go")
    parser.add_argument(
        "--time_box", "--time-box",  # the dashed name of earlier versions stays an alias
        type=float,
        metavar="SECONDS",
        help="start no measurement after this many seconds of the run; those left are skipped with a note",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, append the records to <out>/<op>.jsonl, print a markdown table per op, plot <out>/<op>.png.
    Exit status 1 when a method failed (the others' records are still written). `e2e` first: bench/e2e.py; `rl`
    first: bench/rl_step.py."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["e2e"]:
        from fastpref.bench import e2e

        return e2e.main(argv[1:])
    if argv[:1] == ["rl"]:
        from fastpref.bench import rl_step

        return rl_step.main(argv[1:])
    args = parse_args(argv)
    deadline = None if args.time_box is None else time.monotonic() + args.time_box
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 10  # timed runs per measurement on a CPU (a GPU sizes its own)
    configs = [CONFIGS[name] for name in args.configs or default_configs(device, args.quick)]
    ops = tuple(OPS) if args.op == "all" else (args.op,)
    tags = machine.tags(device)
    ceilings = machine.ceilings(device, quick=args.quick, repeats=repeats)
    notes: dict[str, list[str]] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for op in ops:
        records = [
            {**record, **tags, "ceilings": ceilings}
            for record in run(OPS[op], configs, args.methods, device, repeats, notes, deadline)
        ]
        report.append_jsonl(records, args.out / f"{op}.jsonl")
        print(report.markdown(op, records, tags, ceilings))
        if records:
            plot.plot(records, args.out / f"{op}.png", title=f"{op} on {tags['device_name']}")
    for note, where in notes.items():
        print(f"- {note} [{', '.join(where)}]")
    return 1 if any(": FAILED, " in note for note in notes) else 0
