"""`--report_to`: the rows written to metrics.jsonl, sent live to tensorboard, trackio or wandb too.

Each backend is imported only when asked for. Names as transformers' callbacks log them:
tensorboard gets the rows' own names (`loss`, `eval_loss`, ...) at their step; wandb and trackio get
`train/<name>` and `eval/<name>`.
"""

from __future__ import annotations

from pathlib import Path

BACKENDS = ("tensorboard", "trackio", "wandb")


def check(names: list[str]) -> list[str]:
    """The backends asked for ('none' alone: none); ValueError naming an unknown one."""
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(
            f"--report_to {unknown} is not supported by fastpref train; choose from none, {', '.join(BACKENDS)}"
        )
    return names


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("step", "epoch")}


def _prefixed(values: dict[str, float]) -> dict[str, float]:
    return {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in values.items()}


class Reporter:
    """write(row) forwards a metrics row to every backend asked for; close() flushes them."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict):
        self.sinks = []
        for name in check(names):
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ImportError(
                        "--report_to tensorboard needs the `tensorboard` package: pip install tensorboard"
                    ) from e
                writer = SummaryWriter(log_dir=str(run_dir / "runs"))
                self.sinks.append((lambda row, step, w=writer: [w.add_scalar(k, v, step) for k, v in row.items()],
                                   writer.close))
            else:
                try:
                    module = __import__(name)
                except ImportError as e:
                    raise ImportError(f"--report_to {name} needs the `{name}` package: pip install {name}") from e
                run = module.init(project="fastpref", name=run_name, config=config)
                log = run.log if hasattr(run, "log") else module.log
                self.sinks.append((lambda row, step, log=log: log(_prefixed(row), step=step), module.finish))

    def write(self, row: dict) -> None:
        values = _numbers(row)
        for send, _ in self.sinks:
            send(values, row.get("step", 0))

    def close(self) -> None:
        for _, close in self.sinks:
            close()
