"""`fastpref bench e2e`: whole optimizer steps of `fastpref train` against TRL 1.16's trainers, stock and
patched with fastpref's head (`fastpref.integrations.trl.patch`).

What a user choosing a trainer reads: the median seconds per optimizer step after warm-up, tokens per second,
and peak memory (the process's resident high-water mark on a CPU, `torch.cuda.max_memory_allocated` on a GPU).
Contenders of one task train the same model (saved once, loaded in fp32 by each), on the same rows (every
prompt and completion exactly as many tokens, so that nothing is truncated or padded), with the same batch,
optimizer (AdamW), learning rate, constant schedule, gradient clipping, dtype, seed and number of steps; DPO
with a live reference model (a second copy of the starting weights) in all three. The settings that differ
are listed in DIFFERENCES and printed with the table.

A step is timed from one `optimizer.step()` to the next (torch's global optimizer step hook), so it holds
everything a loop does per step: collation, the reference forward, the policy forward and backward, the
metrics, host syncs, the optimizer and logging. Each contender runs in a fresh process; the contenders are
interleaved (--rounds rounds, each running every one in turn) so that the machine's load falls on all.

Workloads: tiny (the `tiny-llama` preset's model: H 128, V 50,257, 192 tokens a sequence, 8 rows a step) and
head (the head dominates: H 256, V 128,256, 512 tokens, 2 rows). --quick: a toy model, for the tests.
GRPO (`fastpref train grpo` against GRPOTrainer, TRL's defaults: beta 0, dapo) samples a step's rows as
completions, num_generations per prompt, of at most the workload's completion length, scored by one reward
function (completion_length); a step's time holds the sampling (generate with the KV cache) too.

    python -m fastpref.bench e2e [--tasks dpo sft grpo] [--workloads tiny head] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

RESULTS = Path(__file__).parent / "results"
CONTENDERS = ("fastpref", "trl-patched", "trl-stock")
TRAINERS = {"dpo": "DPOTrainer", "sft": "SFTTrainer", "grpo": "GRPOTrainer"}


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    hidden: int
    intermediate: int
    vocab: int | None  # None: the tokenizer's (GPT-2's 50,257)
    prompt_tokens: int
    completion_tokens: int  # the EOS each trainer appends comes on top
    batch: int  # rows a step: pairs for dpo, completions for grpo (TRL's per_device_train_batch_size)
    num_generations: int  # grpo: completions sampled per prompt
    warmup_steps: int = 2
    timed_steps: int = 4

    @property
    def max_length(self) -> int:
        return self.prompt_tokens + self.completion_tokens + 1


WORKLOADS = {
    "tiny": Workload("tiny", hidden=128, intermediate=384, vocab=None, prompt_tokens=64, completion_tokens=127,
                     batch=8, num_generations=4),
    "head": Workload("head", hidden=256, intermediate=768, vocab=128256, prompt_tokens=128, completion_tokens=383,
                     batch=2, num_generations=2),
}
QUICK = Workload("toy", hidden=32, intermediate=64, vocab=None, prompt_tokens=8, completion_tokens=7, batch=2,
                 num_generations=2, warmup_steps=1, timed_steps=2)

# The same in every contender (TRL's names; fastpref train takes the same options).
SHARED = dict(learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
              seed=0, gradient_checkpointing=False, logging_steps=1, gradient_accumulation_steps=1)
DPO_SHARED = dict(beta=0.1, loss_type="sigmoid")
GRPO_SHARED = dict(temperature=1.0, beta=0.0, loss_type="dapo")  # TRL's defaults
DIFFERENCES = [
    "loop: fastpref's own (`fastpref train`) vs transformers' Trainer under TRL (accelerate, its DataLoader)",
    "collation: fastpref's collator vs TRL's (both pad to the longest row of the batch; the rows are equal length)",
    "head: fastpref's fused linear log-probs (fastpref, trl-patched) vs TRL's own (trl-stock: full logits on a CPU)",
    "metrics: each logs its own set every step (TRL's names in both)",
    "fastpref evaluates and saves once after the last step (not timed); TRL is told to do neither",
    "grpo: each samples its own completions (both with the model's generate and its KV cache, temperature 1, the "
    "same seed but not the same random stream); a random model almost never samples EOS, so nearly every "
    "completion is max_completion_length long in both (tokens/s counts the tokens each step trained on)",
]


def completion_length(prompts, completions, **columns) -> list[float]:
    """The GRPO workloads' reward (TRL's reward-function signature): characters of each completion."""
    return [float(len(c)) for c in completions]
WORDS = "apple banana cherry table river mountain window garden pencil doctor yellow purple music letter silver orange"


def _rows(workload: Workload, count: int) -> list[dict]:
    """Preference rows of exact token lengths (each word one GPT-2 token)."""
    words = WORDS.split()

    def text(n: int, offset: int) -> str:
        return "".join(" " + words[(offset + i * 7) % len(words)] for i in range(n))

    return [{"prompt": text(workload.prompt_tokens, i), "chosen": text(workload.completion_tokens, i + 1),
             "rejected": text(workload.completion_tokens, i + 3)} for i in range(count)]


def prepare(workload: Workload, task: str, folder: Path) -> tuple[Path, Path]:
    """The model folder (tiny-llama's architecture at the workload's sizes, seed 0) and the rows file."""
    from fastpref.train import modeling

    tokenizer = modeling.gpt2_tokenizer()
    config = modeling.tiny_llama_config(workload.vocab or len(tokenizer), tokenizer.eos_token_id)
    config.hidden_size, config.intermediate_size = workload.hidden, workload.intermediate
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(config)
    model_dir = folder / f"model-{workload.name}"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    steps = workload.warmup_steps + workload.timed_steps
    rows = _rows(workload, workload.batch * steps)
    if task == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    if task == "grpo":  # a step samples batch / num_generations prompts
        rows = [{"prompt": r["prompt"]} for r in rows[: len(rows) // workload.num_generations]]
    data = folder / f"{task}-{workload.name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


class StepClock:
    """(wall, CPU) time of every optimizer.step() of any optimizer in this process while it is entered, from
    torch's global optimizer hook."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []

    def __enter__(self):
        self.handle = register_optimizer_step_post_hook(self._mark)
        return self

    def __exit__(self, *_):
        self.handle.remove()

    def _mark(self, *_):
        self.marks.append((time.perf_counter(), time.process_time()))

    def steps(self, warmup: int) -> tuple[list[float], list[float]]:
        """Wall and CPU seconds of each step after the first `warmup` (step i: from step i-1's end to its own)."""
        timed = list(zip(self.marks[warmup - 1:], self.marks[warmup:]))
        return [b[0] - a[0] for a, b in timed], [b[1] - a[1] for a, b in timed]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _run_fastpref(task, workload, model_dir, data, out_dir, device, threads) -> int:
    """`fastpref train <task>` as the CLI runs it; returns the tokens of the last step (its metrics.jsonl)."""
    from fastpref import cli

    options = {**SHARED, "max_steps": workload.warmup_steps + workload.timed_steps, "eval_fraction": 0,
               "per_device_train_batch_size": workload.batch, "max_length": workload.max_length,
               "max_prompt_length": workload.prompt_tokens, "bf16": device.type == "cuda", "torch_threads": threads,
               "disable_tqdm": True, "plot": False, "output_dir": out_dir, "overwrite_output_dir": True}
    if task == "dpo":
        options.update(DPO_SHARED, precompute_ref_log_probs=False)
    if task == "grpo":
        options.update(GRPO_SHARED, num_generations=workload.num_generations,
                       max_completion_length=workload.completion_tokens, reward_funcs=f"{__name__}:completion_length")
        del options["max_prompt_length"]
    argv = ["train", task, "--model", str(model_dir), "--dataset", str(data)]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    if cli.main(argv):
        raise RuntimeError(f"fastpref train {task} failed")
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["num_tokens"] for r in rows if "num_tokens" in r]
    return tokens[-1] - tokens[-2]


def _run_trl(task, workload, model_dir, data, out_dir, device, patched) -> int:
    """TRL's trainer, stock or patched; returns the tokens of the last step (TRL's num_tokens)."""
    import datasets
    import transformers
    import trl

    from fastpref.integrations import trl as fastpref_trl

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    settings = dict(SHARED, output_dir=out_dir, per_device_train_batch_size=workload.batch,
                    max_steps=workload.warmup_steps + workload.timed_steps, max_length=workload.max_length,
                    bf16=device.type == "cuda", use_cpu=device.type == "cpu", report_to="none", save_strategy="no",
                    eval_strategy="no", disable_tqdm=True)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    extra = {}
    if task == "dpo":
        config = trl.DPOConfig(**settings, **DPO_SHARED)
        extra["ref_model"] = load()
    elif task == "grpo":
        del settings["max_length"]
        config = trl.GRPOConfig(**settings, **GRPO_SHARED, num_generations=workload.num_generations,
                                max_completion_length=workload.completion_tokens)
        extra["reward_funcs"] = completion_length
    else:
        config = trl.SFTConfig(**settings)
    trainer = getattr(trl, TRAINERS[task])(
        model=load(), args=config, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir), **extra)
    if patched:
        fastpref_trl.patch(trainer)
    trainer.train()
    tokens = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    return tokens[-1] - tokens[-2]


def run_one(task: str, contender: str, workload: Workload, model_dir: Path, data: Path, device: torch.device,
            threads: int) -> dict:
    """One contender's run in this process -> its record (per-step times after warm-up, tokens, peak memory)."""
    torch.set_num_threads(threads)
    rss_start = _status_mb("VmRSS") if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as out_dir, StepClock() as clock:
        if contender == "fastpref":
            tokens = _run_fastpref(task, workload, model_dir, data, out_dir, device, threads)
        else:
            tokens = _run_trl(task, workload, model_dir, data, out_dir, device, contender == "trl-patched")
    wall, cpu = clock.steps(workload.warmup_steps)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _status_mb("VmHWM")
    return {"task": task, "contender": contender, "workload": workload.name, "hidden": workload.hidden,
            "vocab": workload.vocab, "seq_tokens": workload.max_length, "batch": workload.batch,
            "tokens_per_step": tokens, "step_s": wall, "step_cpu_s": cpu, "peak_mb": round(peak, 1),
            "rss_start_mb": None if rss_start is None else round(rss_start, 1)}


def summarize(runs: list[dict]) -> dict:
    """One (task, workload, contender)'s records from several rounds -> one result row."""
    step_s = statistics.median(s for r in runs for s in r["step_s"])
    step_cpu_s = statistics.median(s for r in runs for s in r["step_cpu_s"])
    first = runs[0]
    return {k: first[k] for k in ("task", "contender", "workload", "hidden", "vocab", "seq_tokens", "batch",
                                  "tokens_per_step")} | {
        "rounds": len(runs), "timed_steps": sum(len(r["step_s"]) for r in runs), "median_step_s": step_s,
        "median_step_cpu_s": step_cpu_s, "tokens_per_s": first["tokens_per_step"] / step_s,
        "tokens_per_cpu_s": first["tokens_per_step"] / step_cpu_s,
        "peak_mb": statistics.median(r["peak_mb"] for r in runs), "differences": DIFFERENCES}


def markdown(rows: list[dict], memory: str, time_key: str = "median_step_s") -> str:
    """The table; 'vs fastpref' compares time_key (a CPU's CPU time: with one thread, an idle machine's wall time)."""
    tokens = "tokens/s" if time_key == "median_step_s" else "tokens/CPU s"
    lines = [f"| task | workload | contender | s/step (median) | CPU s/step | {tokens} | {memory} (MB) | vs fastpref |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ours = next((r for r in rows if r["task"] == row["task"] and r["workload"] == row["workload"]
                     and r["contender"] == "fastpref"), None)
        ratio = f"{row[time_key] / ours[time_key]:.2f}x" if ours else "—"
        lines.append(f"| {row['task']} | {row['workload']} | {row['contender']} | {row['median_step_s']:.3f} "
                     f"| {row['median_step_cpu_s']:.3f} | {row['tokens_per_step'] / row[time_key]:.0f} "
                     f"| {row['peak_mb']:.0f} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str, time_key: str = "median_step_s") -> None:
    """Seconds per step (time_key) and peak memory, one group of bars per (task, workload)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["task"], r["workload"]) for r in rows))
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(contenders)
    for i, contender in enumerate(contenders):
        mine = {(r["task"], r["workload"]): r for r in rows if r["contender"] == contender}
        xs = [j + i * width for j in range(len(groups))]
        axes[0].bar(xs, [mine[g][time_key] if g in mine else 0 for g in groups], width, label=contender)
        axes[1].bar(xs, [mine[g]["peak_mb"] if g in mine else 0 for g in groups], width, label=contender)
    seconds = "CPU seconds per step (median)" if time_key == "median_step_cpu_s" else "seconds per step (median)"
    for ax, label in zip(axes, (seconds, "peak memory (MB)"), strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{t} {w}" for t, w in groups])
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fastpref.bench e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=tuple(TRAINERS), default=list(TRAINERS))
    parser.add_argument("--workloads", nargs="+", choices=tuple(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--quick", action="store_true", help="a toy model and two timed steps (the tests)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over every contender")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where e2e.jsonl, e2e.md and e2e.png go")
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)  # task contender workload model data json-out
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    workloads = [QUICK] if args.quick else [WORKLOADS[name] for name in args.workloads]
    if args.one:
        task, contender, name, model_dir, data, out = args.one
        workload = next(w for w in [QUICK, *WORKLOADS.values()] if w.name == name)
        record = run_one(task, contender, workload, Path(model_dir), Path(data), device, args.threads)
        Path(out).write_text(json.dumps(record))
        return 0
    from fastpref.bench import machine, peers

    contenders, notes = list(args.contenders), []
    if importlib.util.find_spec("trl") is None and any(c.startswith("trl") for c in contenders):
        contenders = [c for c in contenders if not c.startswith("trl")]
        notes.append("- skipped: trl-patched, trl-stock (trl is not installed)")
    runs: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        plan = []
        for workload in workloads:
            for task in args.tasks:
                model_dir, data = prepare(workload, task, Path(folder))
                plan += [(task, contender, workload, model_dir, data) for contender in contenders]
        for round_index in range(args.rounds):
            for task, contender, workload, model_dir, data in plan:
                out = Path(folder) / "record.json"
                cmd = [sys.executable, "-m", "fastpref.bench", "e2e", "--device", args.device, "--threads",
                       str(args.threads), "--one", task, contender, workload.name, str(model_dir), str(data), str(out)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                    raise RuntimeError(f"{contender} {task} on {workload.name} failed")
                record = json.loads(out.read_text())
                runs.setdefault((task, workload.name, contender), []).append(record)
                print(f"  round {round_index + 1} {task} {workload.name} {contender}: "
                      f"{statistics.median(record['step_s']):.3f} s/step, {record['peak_mb']:.0f} MB, "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    tags = {"device_name": machine.device_name(device), "threads": args.threads, "torch": torch.__version__,
            "trl": peers.versions()["trl"], "load_avg": round(os.getloadavg()[0], 1),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    rows = [summarize(r) | tags for r in runs.values()]
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "e2e.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    memory = "peak max_memory_allocated" if device.type == "cuda" else "peak RSS"
    time_key = "median_step_s" if device.type == "cuda" else "median_step_cpu_s"
    table = markdown(rows, memory, time_key)
    notes = "\n".join([*(f"- differs: {d}" for d in DIFFERENCES), *notes])
    (args.out / "e2e.md").write_text(f"{table}\n\n{notes}\n")
    print(table)
    print(notes)
    plot(rows, args.out / "e2e.png", f"whole steps on {tags['device_name']}, {args.threads} thread(s)", time_key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
