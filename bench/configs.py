"""Benchmark shapes: model-shaped LM heads for the GPU, small ones for a CPU, and the labels
every op shares (a prompt prefix and a pad tail masked with ignore_index, ~35% of positions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
PROMPT_FRACTION = (0.20, 0.30)  # of each sequence's positions, masked at its start
PAD_FRACTION = (0.05, 0.15)  # masked at its end: ~35% masked in all
LOGIT_STD = 2.0  # spread of the logits (and of hidden @ weight.T on the linear path)


@dataclass(frozen=True)
class BenchConfig:
    """One head shape. B = seqs sequences (chosen-then-rejected halves for DPO) of T = seq_len
    positions; hidden size H, vocab V; `softcap` as Gemma-2's final-logit softcapping."""

    name: str
    seqs: int
    seq_len: int
    hidden: int
    vocab: int
    softcap: float | None = None

    @property
    def tokens(self) -> int:
        return self.seqs * self.seq_len


MODEL_CONFIGS = (
    BenchConfig("llama3-8b", seqs=8, seq_len=2048, hidden=4096, vocab=128256),
    BenchConfig("gemma2-2b", seqs=8, seq_len=1024, hidden=2304, vocab=256000, softcap=30.0),
    BenchConfig("qwen2.5-7b", seqs=8, seq_len=2048, hidden=3584, vocab=152064),
)
CPU_CONFIGS = (
    BenchConfig("cpu-tiny", seqs=8, seq_len=128, hidden=128, vocab=4096),
    BenchConfig("cpu-softcap", seqs=8, seq_len=128, hidden=128, vocab=8192, softcap=30.0),
    BenchConfig("cpu-small", seqs=8, seq_len=256, hidden=256, vocab=16384, softcap=30.0),
)
MICRO_CONFIG = BenchConfig("cpu-micro", seqs=4, seq_len=32, hidden=32, vocab=512)  # gpu_check --dry-run's plumbing
CONFIGS = {c.name: c for c in (*MODEL_CONFIGS, *CPU_CONFIGS, MICRO_CONFIG)}
QUICK_CONFIGS = ("cpu-tiny", "cpu-softcap")


def default_configs(device: torch.device, quick: bool) -> tuple[str, ...]:
    """--quick: the two smallest shapes anywhere (under a minute on a 2-core CPU); otherwise the
    model shapes on a GPU, the CPU shapes on a CPU (a model-shaped textbook head needs tens of GB
    and minutes per step there)."""
    if quick:
        return QUICK_CONFIGS
    return tuple(c.name for c in (MODEL_CONFIGS if device.type == "cuda" else CPU_CONFIGS))


def make_labels(config: BenchConfig, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B, T) int64 targets in [0, V), with each sequence's prompt prefix and pad tail set to
    IGNORE_INDEX (lengths drawn per sequence, so valid lengths differ between sequences)."""
    B, T = config.seqs, config.seq_len
    labels = torch.randint(0, config.vocab, (B, T), generator=generator)
    for row in labels:
        prompt = int(T * torch.empty(()).uniform_(*PROMPT_FRACTION, generator=generator))
        pad = int(T * torch.empty(()).uniform_(*PAD_FRACTION, generator=generator))
        row[:prompt] = IGNORE_INDEX
        row[T - pad :] = IGNORE_INDEX
    return labels.to(device)


def input_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (what training feeds the head), fp32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def reference_dtype(device: torch.device) -> torch.dtype:
    """What gradients are checked against: fp32 on a GPU, fp64 on a CPU."""
    return torch.float32 if device.type == "cuda" else torch.float64
