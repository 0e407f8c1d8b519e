"""Metrics: exact averaging across micro-batches and processes, JSON lines, memory, PNG plots."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastpref.train.distributed import Dist

log = logging.getLogger("fastpref.train")


class Accumulator:
    """Sums (value x units, units) per metric name; `reduce` averages over every process."""

    def __init__(self):
        self.sums: dict[str, list[torch.Tensor]] = defaultdict(list)

    def add(self, metrics: dict) -> None:
        for name, (total, units) in metrics.items():
            self.sums[name].append(torch.stack([total.detach().double().cpu(), units.detach().double().cpu()]))

    def merge(self, other: "Accumulator") -> None:
        for name, values in other.sums.items():
            self.sums[name].extend(values)

    def local(self) -> dict[str, float]:
        """This process's averages, without communication (for the progress bar)."""
        out = {}
        for name, values in self.sums.items():
            total, units = torch.stack(values).sum(0).tolist()
            out[name] = total / units if units > 0 else float("nan")
        return out

    def reduce(self, dist: Dist) -> dict[str, float]:
        if not self.sums:
            return {}
        names = sorted(self.sums)
        stacked = torch.stack([torch.stack(self.sums[n]).sum(0) for n in names])  # (metrics, 2)
        stacked = dist.sum(stacked).cpu()
        self.sums.clear()
        return {n: t / u if u > 0 else float("nan") for n, (t, u) in zip(names, stacked.tolist())}


def json_safe(value):
    """`value` with every non-finite float replaced by None, so that it is valid JSON (no bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value, indent: int | None = 1) -> str:
    return json.dumps(json_safe(value), indent=indent, allow_nan=False)


class JsonLog:
    """One JSON object per line (rank 0 writes); `truncate(step)` drops rows past a resumed step."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.listeners = []  # objects with write(row) / close(): --report_to backends

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()

    def truncate(self, step: int) -> None:
        """Keep the rows up to `step` (a torn line, left by a kill mid-write, is dropped), rewritten atomically."""
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(row) for row in read_jsonl(self.path) if row.get("step", 0) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(to_json(row, indent=None) + "\n")
            for listener in self.listeners:
                listener.write(row)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a line that is not a JSON object (a torn last write) is skipped with a warning."""
    rows = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            log.warning("%s:%d is not a JSON object (a write cut short?): skipped", path, line_no)
            continue
        rows.append(row)
    return rows


# --- memory ---


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_memory_mb(device: torch.device) -> float | None:
    """CUDA: the allocator's peak; CPU: the process's resident high-water mark (Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_status_mb("VmHWM")


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates while it is alive (a weakref on the storage,
    whose Python object lives as long as the storage), and their peak. A fastpref custom op is one
    opaque call to a dispatch mode: its CPU kernel is re-entered with the count on, so that the tiles
    it holds inside are seen."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastpref":
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key, size = id(storage), storage.nbytes()
                if size and key not in self.live:
                    self.live[key] = size
                    self.current += size
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


class PeakMeter:
    """Peak memory allocated inside a block: the CUDA allocator's peak, or on CPU the peak of the
    bytes held by tensors created in the block (tracked op by op)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.mode = _LiveBytes().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.mode.__exit__(*exc)
            self.mb = self.mode.peak / 2**20
        return False


def textbook_head_mb(rows: int, positions: int, vocab: int, dtype: torch.dtype) -> float:
    """What the textbook head holds at once: N x V logits in the model's dtype plus their fp32
    log_softmax, N = every scored position (rows x positions), from shapes alone."""
    n = rows * positions
    return n * vocab * (torch.empty((), dtype=dtype).element_size() + 4) / 2**20


class Throughput:
    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else float("nan")
        self.start, self.tokens = time.perf_counter(), 0
        return rate


# --- plots ---

PLOTTED = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "mean_token_accuracy",
    "grad_norm",
    "learning_rate",
    "reward",  # the RL stage (fastpref.train.rl)
    "kl",
    "completions/mean_length",
)


def plot(metrics_path: Path, out_dir: Path, title: str = "") -> list[Path]:
    """One PNG of the train (and eval_ prefixed) curves per metric present, and an overview grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in PLOTTED if any(n in r or f"eval_{n}" in r for r in rows)]
    written = []

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    def draw(ax, name):
        for key, label, style in ((name, "train", "-"), (f"eval_{name}", "held-out", "o--")):
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, style, label=label, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    for name in names:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        draw(ax, name)
        fig.tight_layout()
        path = out_dir / f"{name.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if names:
        cols = 3
        grid = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(grid, cols, figsize=(4.2 * cols, 3 * grid), squeeze=False)
        for ax, name in zip(axes.flat, names):
            draw(ax, name)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
