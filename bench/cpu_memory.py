"""CPU, one process per run: forward + backward of per-sequence log-probs from hidden states,
fastpref vs the textbook head and its peers, wall time and peak resident memory.

Shape: N = 4096 tokens (8 sequences × 512), the first 25% of each sequence masked, H = 512, fp32;
V from --vocab (default 32768, and llama3's 128256). Methods are the harness's (fastpref.bench.linear):
textbook (h @ Wᵀ -> fp32 log_softmax -> gather -> masked sum), torch-lce (PyTorch's chunked
F.linear_cross_entropy, torch >= 2.13), trl (TRL 1.16's ChunkedLogProbFunction on the valid tokens, as
its trainers call it on a GPU; here its torch fold), fastpref-torch (fastpref's chunked torch backend).
A method that cannot run here (a peer not installed) is left out with a note.

Each (method, vocab) runs in a fresh process so peaks do not mix. It first runs once on tiny inputs (lazy
imports and one-time set-up raise the resident set too); then peak memory: the resident-set high-water mark
of one full-size run above the resident set when it starts (VmHWM, reset through /proc/self/clear_refs), the
first full-size run, as later ones could reuse memory the allocator kept and read low; then time: the
median of --repeats more runs, wall clock and this process's CPU time (user + system: with one thread, the
wall time an idle machine would show; on a shared machine the steadier of the two).
The contenders are interleaved: --rounds rounds, each running every (vocab, method) once in turn, so that a
change in the machine's load falls on all of them; a row holds the median over the rounds.
Results: JSON lines appended to bench/results/cpu_memory.jsonl (tagged with the CPU, threads, torch and TRL
versions, the rounds and the machine's load) and a markdown table on stdout.

    python bench/cpu_memory.py [--vocab 32768 128256] [--repeats 3] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastpref.bench import linear, machine, peers
from fastpref.bench.configs import IGNORE_INDEX, BenchConfig
from fastpref.bench.harness import environment

SEQS, SEQ_LEN, HIDDEN, MASKED = 8, 512, 512, 0.25  # N = 4096 tokens; the first 25% of each sequence masked
METHOD_NAMES = ("textbook", "torch-lce", "trl", "fastpref-torch")
RESULTS = Path(__file__).parent / "results" / "cpu_memory.jsonl"
CPU = torch.device("cpu")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def config(vocab: int, seq_len: int = SEQ_LEN) -> BenchConfig:
    return BenchConfig(f"cpu-memory-{vocab}", seqs=SEQS, seq_len=seq_len, hidden=HIDDEN, vocab=vocab)


def method(name: str) -> linear.Method:
    return next(m for m in linear.LOGPS_METHODS if m.name == name)


def setup(vocab: int, seq_len: int = SEQ_LEN) -> linear.LinearInputs:
    """The harness's inputs (hidden, weight, upstream) with the first MASKED of each sequence ignored."""
    x = linear.setup_logps(config(vocab, seq_len), CPU)
    labels = torch.randint(0, vocab, (SEQS, seq_len), generator=torch.Generator().manual_seed(0))
    labels[:, : int(MASKED * seq_len)] = IGNORE_INDEX
    return dataclasses.replace(x, labels=labels)


def run_one(name: str, vocab: int, repeats: int, threads: int) -> dict:
    """Peak memory of the first full-size forward + backward, then the time of `repeats` more, in this process."""
    torch.set_num_threads(threads)
    run = method(name)
    times, cpu_times, peak_mb = [], [], None
    with environment(run.env):
        tiny = setup(1024, seq_len=16)
        run.run(tiny).backward(tiny.upstream)
        del tiny
        x = setup(vocab)
        for _ in range(repeats + 1):
            x.hidden.grad = x.weight.grad = None
            base = _status_mb("VmRSS")
            _reset_peak()
            start, cpu_start = time.perf_counter(), time.process_time()
            run.run(x).backward(x.upstream)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            if peak_mb is None:
                peak_mb = _status_mb("VmHWM") - base
    return {
        "method": name,
        "vocab": vocab,
        "tokens": SEQS * SEQ_LEN,
        "hidden": HIDDEN,
        "masked": MASKED,
        "valid_tokens": x.valid_tokens,
        "dtype": "float32",
        "p50_s": statistics.median(times[1:]),
        "min_s": min(times[1:]),
        "p50_cpu_s": statistics.median(cpu_times[1:]),
        "peak_extra_mb": round(peak_mb, 1),
        "grads_mb": round((x.hidden.numel() + x.weight.numel()) * 4 / 2**20, 1),
        "threads": torch.get_num_threads(),
        "load_avg": round(os.getloadavg()[0], 1),  # the machine's 1-minute load when the runs ended
        "cpu": machine.device_name(CPU),
        "torch": torch.__version__,
        "trl": peers.versions()["trl"],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def over_rounds(rows: list[dict]) -> dict:
    """One (vocab, method)'s rows from several rounds -> one row: the medians, the load's range."""
    loads = [r["load_avg"] for r in rows]
    merged = {**rows[-1], "rounds": len(rows), "load_avg": [min(loads), max(loads)]}
    merged["min_s"] = min(r["min_s"] for r in rows)
    for key in ("p50_s", "p50_cpu_s", "peak_extra_mb"):
        merged[key] = statistics.median(r[key] for r in rows)
    return merged


def markdown(rows: list[dict]) -> str:
    lines = [
        "| V | method | fwd+bwd p50 (s) | CPU time p50 (s) | vs textbook (CPU time) | peak extra (MB) | grads (MB) "
        "| above grads (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next((r for r in rows if r["vocab"] == row["vocab"] and r["method"] == "textbook"), None)
        ratio = f"{row['p50_cpu_s'] / base['p50_cpu_s']:.2f}x" if base else "—"
        lines.append(
            f"| {row['vocab']} | {row['method']} | {row['p50_s']:.2f} | {row['p50_cpu_s']:.2f} | {ratio} "
            f"| {row['peak_extra_mb']:.0f} | {row['grads_mb']:.0f} | {row['peak_extra_mb'] - row['grads_mb']:+.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 128256])
    parser.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=METHOD_NAMES, metavar="METHOD")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the cold (memory) run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over every (vocab, method)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON lines file the rows are appended to")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.repeats, args.threads)))
        return
    plan = []
    for vocab in args.vocab:
        for name in args.methods:
            reason = method(name).unavailable(config(vocab), CPU)
            if reason:
                print(f"  {name} V={vocab}: skipped, {reason}", file=sys.stderr)
            else:
                plan.append((vocab, name))
    runs = {key: [] for key in plan}
    for round_index in range(args.rounds):
        for vocab, name in plan:
            cmd = [sys.executable, __file__, "--one", name, str(vocab), "--repeats", str(args.repeats)]
            out = subprocess.run([*cmd, "--threads", str(args.threads)], check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            runs[vocab, name].append(row)
            print(f"  round {round_index + 1}, {name} V={vocab}: {row['p50_s']:.2f} s ({row['p50_cpu_s']:.2f} s CPU), "
                  f"+{row['peak_extra_mb']:.0f} MB, load {row['load_avg']}", file=sys.stderr)  # fmt: skip
    rows = [over_rounds(runs[key]) for key in plan]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
