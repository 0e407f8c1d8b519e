"""`fastpref bench rl`: the head of one GRPO micro-batch step, fastpref against the textbook head and TRL 1.16.

What `fastpref train grpo` computes per micro-batch from the three models' hidden states over the sampled completions:
the old policy's and the reference's per-token log-probs (no grad), the policy's per-token log-probs and entropies,
GRPO's loss (dapo, beta 0.04: the k3 KL to the reference; the ratio to the old policy clipped at 0.2), and its
backward to the policy's hidden states and LM head. Every contender gets the same tensors:

- fastpref: `fastpref.linear_token_logps` (entropy from its statistics for the policy, as `fastpref.train.rl` calls
  it) and `fastpref.losses.policy.policy_loss`: no (tokens x vocab) tensor;
- textbook: logits h @ W.T materialised, fp32 (fp64 for fp64 inputs) log_softmax, gather, entropy -(p log p).sum,
  the same loss;
- trl-logits: TRL's own `selective_log_softmax_and_entropy` / `selective_log_softmax` on the materialised logits
  (its path off the fused head) and TRL's `GRPOTrainer._compute_loss` on the result;
- trl-fused: TRL's fused head (`ChunkedLogProbFunction` on the completion tokens, log-probs + entropy, as
  GRPOTrainer 1.16 calls it through `add_fused_lm_head`) and `GRPOTrainer._compute_loss`.

Shapes: completions of 512 positions, the last ones of each past its EOS (-100), V = 128,256. On a GPU (bf16):
8 completions, H 4096 (llama3-8b's head). On a CPU (fp32): 4 completions, H 256, so that the textbook's three
(tokens x vocab) passes fit a few GB and a run takes seconds on 2 threads. --quick: toy sizes, for the tests.

Each contender runs in a fresh process (peaks do not mix) and is interleaved over --rounds rounds. In a process:
one warm-up on toy inputs, then the peak memory of the first full-size step above what its inputs hold (GPU:
`max_memory_allocated`; CPU: the resident set's high-water mark, reset through /proc/self/clear_refs), then the
median wall and CPU time of --repeats more. Rows: JSON lines appended to bench/results/rl_step.jsonl (tagged with
the device, threads, torch and TRL versions and the load average) and a markdown table on stdout.

    fastpref bench rl [--quick] [--contenders ...] [--repeats 3] [--rounds 2] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "rl_step.jsonl"
CONTENDERS = ("fastpref", "textbook", "trl-logits", "trl-fused")
BETA, EPSILON, TEMPERATURE, LOGIT_STD = 0.04, 0.2, 1.0, 2.0


@dataclasses.dataclass(frozen=True)
class Shape:
    completions: int
    length: int  # positions per completion
    hidden: int
    vocab: int


GPU_SHAPE = Shape(completions=8, length=512, hidden=4096, vocab=128256)
CPU_SHAPE = Shape(completions=4, length=512, hidden=256, vocab=128256)
TOY = Shape(completions=2, length=16, hidden=32, vocab=1000)


@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor  # (B, C, H) the policy's, requires grad
    weight: torch.Tensor  # (V, H) the policy's head, requires grad
    old_hidden: torch.Tensor  # (B, C, H) the old policy's (no grad)
    ref_hidden: torch.Tensor  # (B, C, H) the reference's (no grad)
    ref_weight: torch.Tensor  # (V, H) the reference's head (no grad)
    labels: torch.Tensor  # (B, C) the sampled tokens, -100 past each completion's end
    advantages: torch.Tensor  # (B,)

    @property
    def mask(self) -> torch.Tensor:
        return (self.labels != -100).long()


def setup(shape: Shape, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Logits of spread LOGIT_STD; the old policy and the reference a little off the policy; completions ending
    between half and all of their positions."""
    g = torch.Generator().manual_seed(0)
    B, C, H, V = shape.completions, shape.length, shape.hidden, shape.vocab

    def normal(*size, std=1.0):
        return (torch.randn(*size, generator=g) * std).to(device, dtype)

    hidden = normal(B, C, H)
    weight = normal(V, H, std=LOGIT_STD / H**0.5)
    labels = torch.randint(0, V, (B, C), generator=g)
    ends = torch.randint(C // 2, C + 1, (B,), generator=g)
    labels[torch.arange(C)[None] >= ends[:, None]] = -100
    return Inputs(
        hidden=hidden.requires_grad_(), weight=weight.requires_grad_(),
        old_hidden=hidden.detach() + normal(B, C, H, std=0.05), ref_hidden=hidden.detach() + normal(B, C, H, std=0.1),
        ref_weight=weight.detach() + normal(V, H, std=0.1 * LOGIT_STD / H**0.5),
        labels=labels.to(device), advantages=torch.randn(B, generator=g).to(device),
    )


# --- per-token log-probs (and entropies) of each contender ---


def fastpref_head(hidden, weight, labels, entropy: bool):
    import fastpref

    out = fastpref.linear_token_logps(
        hidden, weight, labels, temperature=TEMPERATURE, return_stats="entropy" if entropy else False
    )
    return (out[0], out[1].entropy) if entropy else (out, None)


def textbook_head(hidden, weight, labels, entropy: bool):
    logits = hidden @ weight.T
    logp = (logits.to(torch.promote_types(logits.dtype, torch.float32)) / TEMPERATURE).log_softmax(-1)
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(labels == -100, 0.0)
    return token, (-(logp.exp() * logp).sum(-1) if entropy else None)


def trl_logits_head(hidden, weight, labels, entropy: bool):
    from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

    logits, mask = hidden @ weight.T, labels != -100
    if entropy:
        return selective_log_softmax_and_entropy(logits, labels.clamp(min=0), temperature=TEMPERATURE, row_mask=mask)
    return selective_log_softmax(logits, labels.clamp(min=0), temperature=TEMPERATURE, row_mask=mask), None


def trl_fused_head(hidden, weight, labels, entropy: bool):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    mask = labels != -100
    outputs = ("log_probs", "entropy") if entropy else ("log_probs",)
    fields = ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask], TEMPERATURE,
                                          _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
    logps, ent = (None if f is None else f.new_zeros(mask.shape).masked_scatter(mask, f) for f in fields[:2])
    return logps, ent


HEADS = {"fastpref": fastpref_head, "textbook": textbook_head, "trl-logits": trl_logits_head,
         "trl-fused": trl_fused_head}


# --- the loss ---


def fastpref_loss(logps, entropies, old, ref, x: Inputs) -> torch.Tensor:
    from fastpref.losses.policy import policy_loss

    mask = x.mask
    return policy_loss(logps, old, x.advantages, mask, loss_type="dapo", ref_logps=ref, beta=BETA, epsilon=EPSILON,
                       entropies=entropies, num_items=mask.sum().float()).loss


def trl_loss(logps, entropies, old, ref, x: Inputs) -> torch.Tensor:
    """TRL 1.16's `GRPOTrainer._compute_loss`, run unchanged on a stand-in holding what it reads from its trainer
    (one process, one micro-batch of a generation batch, dapo, beta BETA), its log-prob pass handing these in."""
    from trl import GRPOTrainer

    accelerator = types.SimpleNamespace(num_processes=1, gather=lambda t: t, reduce=lambda t, reduction: t)
    trainer = types.SimpleNamespace(
        args=types.SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1),
        loss_type="dapo", beta=BETA, epsilon_low=EPSILON, epsilon_high=EPSILON, importance_sampling_level="token",
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, accelerator=accelerator,
        model=types.SimpleNamespace(training=True),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, entropies, None),
    )
    mask = x.mask
    inputs = {"prompt_ids": x.labels[:, :1].clamp(min=0), "prompt_mask": torch.ones_like(mask[:, :1]),
              "completion_ids": x.labels.clamp(min=0), "completion_mask": mask, "advantages": x.advantages,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum().float()}
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def step(contender: str, x: Inputs) -> torch.Tensor:
    """Old-policy and reference log-probs (no grad), the policy's with entropies, the loss, its backward."""
    head = HEADS[contender]
    with torch.no_grad():
        old, _ = head(x.old_hidden, x.weight.detach(), x.labels, False)
        ref, _ = head(x.ref_hidden, x.ref_weight, x.labels, False)
    logps, entropies = head(x.hidden, x.weight, x.labels, True)
    loss = (fastpref_loss if contender in ("fastpref", "textbook") else trl_loss)(logps, entropies, old, ref, x)
    loss.backward()
    return loss.detach()


# --- measuring one contender in this process ---


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class Peak:
    """Peak memory above the start of the block, in MB: the caching allocator's on a GPU, the resident set's
    high-water mark on a CPU."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = _status_mb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *_):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.mb = _status_mb("VmHWM") - self.base


def run_one(contender: str, shape: Shape, device: torch.device, repeats: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    toy = setup(TOY, device, dtype)
    step(contender, toy)  # lazy imports, thread pools, kernel compilation
    del toy
    x = setup(shape, device, dtype)
    times, cpu_times = [], []
    for i in range(repeats + 1):
        x.hidden.grad = x.weight.grad = None
        with Peak(device) as peak:
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = step(contender, x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        if i == 0:
            peak_mb = peak.mb
    tokens = int(x.mask.sum())
    return {
        "contender": contender, **dataclasses.asdict(shape), "completion_tokens": tokens,
        "dtype": str(dtype).removeprefix("torch."), "loss": float(loss),
        "grad_norm_hidden": float(x.hidden.grad.float().norm()),
        "grad_norm_weight": float(x.weight.grad.float().norm()),
        "p50_s": statistics.median(times[1:]), "p50_cpu_s": statistics.median(cpu_times[1:]),
        "peak_extra_mb": round(peak_mb, 1),
        "textbook_logits_mb": round(tokens * shape.vocab * 4 / 2**20, 1),  # one fp32 (tokens x V) tensor
        **_tags(device),
    }


def _tags(device: torch.device) -> dict:
    from fastpref.bench import machine, peers

    return {"device": device.type, "device_name": machine.device_name(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "trl": peers.versions()["trl"], "load_avg": round(os.getloadavg()[0], 1),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def unavailable(contender: str) -> str | None:
    if contender.startswith("trl"):
        from fastpref.bench import peers

        return peers.missing("trl.kernels.chunked_logprob")
    return None


# --- the run: contenders in fresh processes, interleaved ---


def over_rounds(rows: list[dict]) -> dict:
    loads = [r["load_avg"] for r in rows]
    merged = {**rows[-1], "rounds": len(rows), "load_avg": [min(loads), max(loads)]}
    for key in ("p50_s", "p50_cpu_s", "peak_extra_mb"):
        merged[key] = statistics.median(r[key] for r in rows)
    return merged


def markdown(rows: list[dict]) -> str:
    base = next((r for r in rows if r["contender"] == "fastpref"), None)
    time_key = "p50_s" if rows and rows[0]["device"] == "cuda" else "p50_cpu_s"
    lines = ["| contender | step p50 (s) | CPU time p50 (s) | vs fastpref (time) | peak extra (MB) "
             "| vs fastpref (memory) | loss | grad norm (W) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r[time_key] / base[time_key]:.2f}x" if base else "—"
        memory = f"{r['peak_extra_mb'] / base['peak_extra_mb']:.1f}x" if base and base["peak_extra_mb"] > 0 else "—"
        lines.append(f"| {r['contender']} | {r['p50_s']:.3f} | {r['p50_cpu_s']:.3f} | {ratio} "
                     f"| {r['peak_extra_mb']:.0f} | {memory} | {r['loss']:.6f} | {r['grad_norm_weight']:.6g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastpref bench rl", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (the tests)")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=CONTENDERS, metavar="NAME")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the first (memory) one")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the contenders")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS.parent, help=f"rows appended to <out>/{RESULTS.name}")
    parser.add_argument("--one", metavar="CONTENDER", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = TOY if args.quick else GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    if args.one:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.one, shape, device, args.repeats)))
        return 0
    plan = []
    for name in args.contenders:
        reason = unavailable(name)
        if reason:
            print(f"  {name}: skipped, {reason}", file=sys.stderr)
        else:
            plan.append(name)
    runs = {name: [] for name in plan}
    for round_index in range(args.rounds):
        for name in plan:
            cmd = [sys.executable, "-m", "fastpref.bench", "rl", "--one", name, "--device", args.device,
                   "--repeats", str(args.repeats), "--threads", str(args.threads), *(["--quick"] if args.quick else [])]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"  {name}: FAILED\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            runs[name].append(row)
            print(f"  round {round_index + 1}, {name}: {row['p50_s']:.3f} s ({row['p50_cpu_s']:.3f} s CPU), "
                  f"+{row['peak_extra_mb']:.0f} MB, load {row['load_avg']}", file=sys.stderr)
    rows = [over_rounds(runs[name]) for name in plan]
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / RESULTS.name).open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
