"""A PNG per op: for each workload's fwd+bwd, p50 time (p20–p80 whiskers; the floor, where the
workload has one, as a dashed line) and peak extra memory, bars per method grouped by config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MODE = "fwd+bwd"


def plot(records: Sequence[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    workloads = list(dict.fromkeys(r["workload"] for r in records))
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in records))}  # one per method
    fig = Figure(figsize=(6.5 * len(workloads), 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(workloads), squeeze=False)
    for col, workload in enumerate(workloads):
        rows = [r for r in records if r["workload"] == workload and r["mode"] == MODE]
        configs = list(dict.fromkeys(r["config"] for r in rows))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        width = 0.8 / len(methods)
        time_ax, memory_ax = axes[0][col], axes[1][col]
        for i, method in enumerate(methods):
            mine = {r["config"]: r for r in rows if r["method"] == method}
            xs = [j - 0.4 + (i + 0.5) * width for j, c in enumerate(configs) if c in mine]
            picked = [mine[c] for c in configs if c in mine]
            p50 = [r["p50_ms"] for r in picked]
            spread = [[r["p50_ms"] - r["p20_ms"] for r in picked], [r["p80_ms"] - r["p50_ms"] for r in picked]]
            time_ax.bar(xs, p50, width, yerr=spread, label=method, color=colors[method])
            memory_ax.bar(xs, [r["peak_extra_mb"] for r in picked], width, label=method, color=colors[method])
        for j, config in enumerate(configs):
            floor = next((r["floor_ms"] for r in rows if r["config"] == config and r["floor_ms"]), None)
            if floor:
                time_ax.hlines(
                    floor, j - 0.45, j + 0.45, colors="k", linestyles="--", label="_floor" if j else "valid-token GEMMs"
                )
        for ax, what in ((time_ax, "p50 time (ms)"), (memory_ax, "peak extra memory (MB)")):
            ax.set_xticks(range(len(configs)), configs)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else ""))
            ax.set_ylabel(what)
            ax.set_title(f"{workload} {MODE}: {what}")
            ax.grid(axis="y", alpha=0.3)
        time_ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
