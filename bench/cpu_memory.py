"""CPU: fastpref's linear_sequence_logps vs the textbook head, forward + backward.

Textbook: logits = h @ Wᵀ -> fp32 log_softmax -> gather -> masked sum -> backward.
fastpref: linear_sequence_logps (only valid tokens, tiles of the logits, recomputed in backward).
TRL 1.16's torch fallback (trl.kernels.chunked_logprob.ChunkedLogProbFunction) runs when installed.

Each (method, vocab) runs in a fresh process so peaks do not mix; peak memory is the resident set's
high-water mark above what the inputs already hold (VmHWM, reset through /proc/self/clear_refs).
Results: JSON lines in bench/results/cpu_memory.jsonl and a markdown table on stdout.

    python bench/cpu_memory.py [--vocab 32768 131072] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

N_TOKENS, HIDDEN, MASKED = 4096, 512, 0.35  # 8 sequences x 512 positions, 35% prompt/pad masked
N_SEQS = 8
RESULTS = Path(__file__).parent / "results" / "cpu_memory.jsonl"


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def setup(vocab: int):
    """Model-shaped inputs: hidden (8, 512, 512), weight (V, 512), labels with 35% ignored."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N_SEQS, N_TOKENS // N_SEQS, HIDDEN, generator=g).requires_grad_()
    weight = (torch.randn(vocab, HIDDEN, generator=g) / HIDDEN**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (N_SEQS, N_TOKENS // N_SEQS), generator=g)
    prompt = int(MASKED * labels.shape[1])
    labels[:, :prompt] = -100
    return hidden, weight, labels


def textbook(hidden, weight, labels):
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != -100
    picked = logp.gather(-1, torch.where(mask, labels, 0)[..., None]).squeeze(-1)
    return (picked * mask).sum(-1)


def fastpref_head(hidden, weight, labels):
    import fastpref

    return fastpref.linear_sequence_logps(hidden, weight, labels)


def trl_chunked(hidden, weight, labels):
    """TRL 1.16's fused head as its trainer calls it off-GPU: every position scored, 32768-wide tiles."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # optional peer

    mask = labels != -100
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = ChunkedLogProbFunction.apply(flat, weight, None, labels.clamp(min=0).reshape(-1), 1.0, 32768, None, 1.0, ())
    return (out[0].view(mask.shape) * mask).sum(-1)


METHODS = {"textbook": textbook, "fastpref": fastpref_head, "trl_chunked": trl_chunked}


def run_one(method: str, vocab: int, repeats: int) -> dict:
    """Time and peak memory of forward + backward of one method, in this process."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    hidden, weight, labels = setup(vocab)
    fn = METHODS[method]
    upstream = torch.randn(N_SEQS, generator=torch.Generator().manual_seed(1))
    times, peaks = [], []
    for _ in range(repeats + 1):  # the first run warms up (thread pools, allocator): not counted
        hidden.grad = weight.grad = None
        base = _rss_mb("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        fn(hidden, weight, labels).backward(upstream)
        times.append(time.perf_counter() - start)
        peaks.append(_rss_mb("VmHWM") - base)
    grads_mb = (hidden.numel() + weight.numel()) * 4 / 2**20
    return {
        "method": method,
        "vocab": vocab,
        "tokens": N_TOKENS,
        "hidden": HIDDEN,
        "masked": MASKED,
        "p50_s": statistics.median(times[1:]),
        "min_s": min(times[1:]),
        "peak_extra_mb": round(max(peaks[1:]), 1),
        "grads_mb": round(grads_mb, 1),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }


def available(method: str) -> bool:
    if method != "trl_chunked":
        return True
    try:
        import trl.kernels.chunked_logprob  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.repeats)))
        return
    rows = []
    for vocab in args.vocab:
        for method in [m for m in METHODS if available(m)]:
            cmd = [sys.executable, __file__, "--one", method, str(vocab), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {method} V={vocab}: {rows[-1]['p50_s']:.2f} s, +{rows[-1]['peak_extra_mb']:.0f} MB", file=sys.stderr)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("| V | method | fwd+bwd p50 (s) | vs textbook | peak extra (MB) | grads (MB) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["vocab"] == row["vocab"] and r["method"] == "textbook")
        print(
            f"| {row['vocab']} | {row['method']} | {row['p50_s']:.2f} | {row['p50_s'] / base['p50_s']:.2f}x "
            f"| {row['peak_extra_mb']:.0f} | {row['grads_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
