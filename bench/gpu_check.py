"""`make gpu-check`: what a lent GPU should measure, in one command, within 10 minutes on an H100 / H200.

The GPU machine has no network and no venv: `make gpu-check` installs this checkout into its python3
(`pip install --no-deps --no-build-isolation -e .`) and runs `python3 -m fastpref.bench.gpu_check`. The
parts run in order, each in its own process killed at its budget, so one that hangs costs only its share:

| part | what | budget |
|---|---|---|
| peers | `pip install --no-deps --no-index` of the wheels in `--wheels DIR` (or $GPU_WHEELS), if given | 20 s |
| tests | `pytest tests/test_gpu.py`, kernels compiled (TRITON_INTERPRET=0) | 170 s |
| logits | `fastpref bench --op logits` on llama3-8b, gemma2-2b, qwen2.5-7b (starts nothing after 50 s) | 70 s |
| linear | `fastpref bench --op linear`, same configs and methods (starts nothing after 100 s) | 130 s |
| e2e | `fastpref bench e2e --rounds 1`: whole DPO / SFT / GRPO steps, fastpref train vs TRL stock and patched | 140 s |
| rl | `fastpref bench rl --rounds 1`: a GRPO micro-batch's policy / old / reference log-probs, entropy, loss | 60 s |

The GPU tests: bf16 parity, CUDA-graph capture + replay of every linear op and of a DPO step, host
syncs under `torch.cuda.set_sync_debug_mode`, a head on a second GPU (where two are), llama3-8b's
fused DPO peak memory against its planner.

Methods: textbook, fastpref-triton, trl, liger, cce, torch-lce; a peer that is not installed (or, for
torch-lce, a torch without F.linear_cross_entropy) is skipped with a note. The benchmarks append their
records to <out>/logits.jsonl and linear.jsonl and draw their plots; then one summary of this run,
<out>/gpu_check.md (and printed): GPU, torch, triton and peer versions, each part's time and outcome,
the tests' counts, and per (config, workload) the fwd+bwd p50 ms, peak extra MB, ratio to TRL, ratio
to the floor, gradient error. Every part's output goes to <out>/gpu_check.log. Exit status 1 when a
part failed or ran out of time.

`--dry-run` runs the same plumbing on a CPU: no install (pip only resolves the wheels), the tiny
cpu-micro shape, fastpref's chunked torch backend in place of its Triton path, TRL left out (its
import alone takes seconds), small budgets, into a temporary folder unless --out is given.

    python -m fastpref.bench.gpu_check [--wheels DIR] [--out DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastpref.bench import machine, report, rl_step
from fastpref.bench.configs import MICRO_CONFIG, MODEL_CONFIGS

ROOT = Path(__file__).resolve().parent.parent  # the checkout (`make gpu-check` installs it editable)
RESULTS = Path(__file__).parent / "results"
GPU_TESTS = "tests/test_gpu.py"
METHODS = ("textbook", "fastpref-triton", "trl", "liger", "cce", "torch-lce")
# --dry-run: fastpref's chunked torch backend for its Triton path; TRL left out (importing it takes ~10 s per part)
DRY_RUN_METHODS = tuple({"fastpref-triton": "fastpref-torch"}.get(m, m) for m in METHODS if m != "trl")
OPS = ("logits", "linear")


@dataclass(frozen=True)
class Budget:
    """Seconds a part may run (it is killed after), and for a benchmark when it starts nothing new."""

    seconds: float
    time_box: float | None = None


BUDGETS = {"peers": Budget(20), "tests": Budget(170), "logits": Budget(70, 50), "linear": Budget(130, 100),
           "e2e": Budget(140), "rl": Budget(60)}
DRY_RUN_BUDGETS = {"peers": Budget(60), "tests": Budget(120), "logits": Budget(120, 90), "linear": Budget(180, 150),
                   "e2e": Budget(120), "rl": Budget(60)}
# --dry-run's e2e and rl: toy sizes, fastpref and the textbook alone (TRL left out, as above)
DRY_RUN_E2E = ["--quick", "--device", "cpu", "--tasks", "sft", "--contenders", "fastpref"]
DRY_RUN_RL = ["--quick", "--device", "cpu", "--contenders", "fastpref", "textbook", "--repeats", "1"]


@dataclass(frozen=True)
class Part:
    name: str
    command: list[str]
    budget: Budget
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """How a part went: its exit status (None: killed at its budget, or not run), seconds, output."""

    part: Part | None
    name: str
    returncode: int | None
    seconds: float
    output: str
    skipped: str | None = None  # why it did not run

    @property
    def ok(self) -> bool:
        return self.skipped is not None or self.returncode == 0

    @property
    def status(self) -> str:
        if self.skipped is not None:
            return f"not run: {self.skipped}"
        if self.returncode is None:
            return f"KILLED at its {self.part.budget.seconds:.0f} s budget"
        return "ok" if self.returncode == 0 else f"FAILED (exit status {self.returncode})"


def wheels_in(folder: Path | None) -> list[Path]:
    return sorted(folder.glob("*.whl")) if folder is not None else []


def plan(out: Path, wheels: Path | None, dry_run: bool) -> list[Part | Outcome]:
    """The parts in order; a part that cannot run is an Outcome saying why."""
    budgets = DRY_RUN_BUDGETS if dry_run else BUDGETS
    compiled = {"TRITON_INTERPRET": "0", "TQDM_DISABLE": "1"}  # tests/conftest.py sets the interpreter by default
    parts: list[Part | Outcome] = []
    found = wheels_in(wheels)
    if found:
        pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *(["--dry-run"] if dry_run else [])]
        parts.append(Part("peers", [*pip, *map(str, found)], budgets["peers"]))
    else:
        why = f"no *.whl in {wheels}" if wheels is not None else "no --wheels / $GPU_WHEELS: the peers installed here"
        parts.append(Outcome(None, "peers", None, 0.0, "", skipped=why))
    if (ROOT / GPU_TESTS).exists():
        pytest = [sys.executable, "-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider", GPU_TESTS]
        parts.append(Part("tests", pytest, budgets["tests"], compiled))
    else:
        parts.append(Outcome(None, "tests", None, 0.0, "", skipped=f"{GPU_TESTS} not found (not a checkout)"))
    configs = [MICRO_CONFIG.name] if dry_run else [c.name for c in MODEL_CONFIGS]
    device = ["--device", "cpu", "--quick"] if dry_run else []
    for op in OPS:
        budget = budgets[op]
        bench = [sys.executable, "-m", "fastpref.bench", "--op", op, "--configs", *configs, *device]
        bench += ["--methods", *(DRY_RUN_METHODS if dry_run else METHODS), "--out", str(out)]
        parts.append(Part(op, [*bench, "--time_box", str(budget.time_box)], budget, compiled))
    e2e = [sys.executable, "-m", "fastpref.bench", "e2e", "--rounds", "1", "--out", str(out)]
    parts.append(Part("e2e", [*e2e, *(DRY_RUN_E2E if dry_run else [])], budgets["e2e"], compiled))
    rl = [sys.executable, "-m", "fastpref.bench", "rl", "--rounds", "1", "--out", str(out)]
    parts.append(Part("rl", [*rl, *(DRY_RUN_RL if dry_run else [])], budgets["rl"], compiled))
    return parts


def run_part(part: Part) -> Outcome:
    """Run `part` in its own process group from the checkout; kill the group at its budget."""
    start = time.monotonic()
    process = subprocess.Popen(
        part.command,
        cwd=ROOT,
        env={**os.environ, **part.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=part.budget.seconds)
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        returncode = None
    return Outcome(part, part.name, returncode, time.monotonic() - start, output)


def test_counts(output: str) -> tuple[Counter, list[str]]:
    """pytest -v output -> (count per outcome, ids of failed / errored tests); a killed run counts what it reached."""
    counts: Counter = Counter()
    failed = []
    for test_id, outcome in re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", output, re.M):
        counts[outcome.lower()] += 1
        if outcome in ("FAILED", "ERROR"):
            failed.append(test_id)
    return counts, failed


def load_records(out: Path, since: datetime.datetime, names=OPS) -> list[dict]:
    """This run's records: those of <out>/<name>.jsonl stamped at or after `since`."""
    records = []
    for op in names:
        path = out / f"{op}.jsonl"
        if path.exists():
            lines = path.read_text().splitlines()
            records += [r for r in map(json.loads, lines) if datetime.datetime.fromisoformat(r["timestamp"]) >= since]
    return records


def floor_ratio(record: dict) -> float | None:
    """p50 over the floor: the valid-token GEMMs alone (linear), or the logits' passes at copy bandwidth (logits)."""
    if record.get("floor_ms"):
        return record["p50_ms"] / record["floor_ms"]
    if "gbps" in record:
        return record["ceilings"]["copy_gbps"] / record["gbps"]
    return None


def results_table(records: list[dict]) -> list[str]:
    """fwd+bwd rows, one per (op, config, workload, method), in run order."""
    rows = [r for r in records if r["mode"] == "fwd+bwd"]
    trl = {(r["op"], r["config"], r["workload"]): r["p50_ms"] for r in rows if r["method"] == "trl"}
    lines = [
        "| op | config | workload | method | p50 ms | peak extra MB | × TRL | × floor | grad err |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        trl_ms, floor = trl.get((r["op"], r["config"], r["workload"])), floor_ratio(r)
        vs_trl = f"{r['p50_ms'] / trl_ms:.2f}×" if trl_ms else "—"
        vs_floor = f"{floor:.2f}×" if floor else "—"
        lines.append(
            f"| {r['op']} | {r['config']} | {r['workload']} | {r['method']} | {report.number(r['p50_ms'])} "
            f"| {report.number(r['peak_extra_mb'])} | {vs_trl} | {vs_floor} | {r['grad_error']:.1e} |"
        )
    return lines


def summary(tags: dict, outcomes: list[Outcome], records: list[dict], dry_run: bool, rl_records=()) -> str:
    peers = ", ".join(f"{name} {version or 'absent'}" for name, version in tags["peers"].items())
    lines = [
        f"## `make gpu-check`{' --dry-run' if dry_run else ''} on {tags['device_name']}, {tags['timestamp']}",
        "",
        f"torch {tags['torch']}, triton {tags['triton']}; peers: {peers}.",
        "",
        "| part | budget s | took s | outcome |",
        "|---|---:|---:|---|",
    ]
    for o in outcomes:
        budget = f"{o.part.budget.seconds:.0f}" if o.part else "—"
        lines.append(f"| {o.name} | {budget} | {o.seconds:.0f} | {o.status} |")
    tests = next((o for o in outcomes if o.name == "tests" and o.skipped is None), None)
    if tests is not None:
        counts, failed = test_counts(tests.output)
        lines += ["", f"{GPU_TESTS}: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing ran")]
        lines += [f"- {test_id}" for test_id in failed]
    lines += ["", "fwd+bwd; × TRL: p50 over TRL's on the same shape; × floor: p50 over the valid-token GEMMs alone"]
    lines += ["(linear) or three passes over the logits at the measured copy bandwidth (logits).", ""]
    lines += results_table(records) if records else ["No benchmark records."]
    if rl_records:
        lines += ["", "RL step (`fastpref bench rl`, bench/rl_step.py):", "", rl_step.markdown(rl_records)]
    notes = [line for o in outcomes if o.name in OPS for line in o.output.splitlines() if line.startswith("- ")]
    if notes:
        lines += ["", "Benchmark notes:", *notes]
    return "\n".join(lines) + "\n"


def write_log(path: Path, outcomes: list[Outcome]) -> None:
    with path.open("w") as log:
        for o in outcomes:
            command = " ".join(o.part.command) if o.part else "-"
            log.write(f"===== {o.name}: {o.status}, {o.seconds:.0f} s\n$ {command}\n{o.output}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastpref.bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--wheels",
        type=Path,
        default=os.environ.get("GPU_WHEELS") or None,
        help="a folder of peer wheels to pip install --no-deps first (default: $GPU_WHEELS)",
    )
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results; --dry-run: a temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="the plumbing on a CPU, tiny shapes, nothing installed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.dry_run else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    since = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    outcomes = []
    for step in plan(out, args.wheels, args.dry_run):
        if isinstance(step, Outcome):
            outcomes.append(step)
        else:
            print(f"[gpu-check] {step.name}: running (budget {step.budget.seconds:.0f} s)", flush=True)
            outcomes.append(run_part(step))
        print(f"[gpu-check] {outcomes[-1].name}: {outcomes[-1].status}, {outcomes[-1].seconds:.0f} s", flush=True)
    write_log(out / "gpu_check.log", outcomes)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    rl_records = load_records(out, since, ("rl_step",))
    text = summary(machine.tags(device), outcomes, load_records(out, since), args.dry_run, rl_records)
    (out / "gpu_check.md").write_text(text)
    print(text)
    print(f"[gpu-check] {out / 'gpu_check.md'}, {out / 'gpu_check.log'}")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
