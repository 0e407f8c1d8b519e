"""Which kernel variants (Triton specialisations) a workload launches, recorded under the interpreter
with the GPU's block configs: the set must not depend on how many rows are valid (each new variant is
a compile stall in an eager run, and one that CUDA-graph capture, which computes every position, may
meet for the first time, when loading a module is forbidden), and the linear path's padded rows must
reach the kernels with row strides divisible by 16 (aligned, vector loads), and the backward with a
padded width divisible by 16 too."""

import pytest
import torch

import fastpref
from fastpref.backends import triton_backend
from fastpref.bench.kernel_launches import recorded_launches, variant_of

VOCAB, HIDDEN, POSITIONS = 12325, 8, 24  # an odd vocabulary: a padded row, ragged slices


def _launches(n_valid, call, monkeypatch):
    """The recorded launches of call(hidden, weight, labels) fwd + bwd with n_valid valid labels."""
    monkeypatch.setattr(triton_backend, "MAX_SLICE_COLS", 8192, raising=False)  # two vocab slices
    g = torch.Generator().manual_seed(n_valid)
    hidden = torch.randn(2, POSITIONS, HIDDEN, generator=g).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) / 4).requires_grad_()
    labels = torch.full((2, POSITIONS), -100)
    valid = torch.randperm(2 * POSITIONS, generator=g)[:n_valid]
    labels.view(-1)[valid] = torch.randint(0, VOCAB, (n_valid,), generator=g)
    labels[0, 0], labels[1, 0] = 5, 7  # every sequence has a token
    with recorded_launches() as records:
        call(hidden, weight, labels).backward()
    return records


def _sequence_logps(hidden, weight, labels):
    return fastpref.linear_sequence_logps(hidden, weight, labels).sum()


def _two_pass(hidden, weight, labels):
    refs = torch.zeros(1), torch.zeros(1)
    # a small budget: several row blocks and, before the fix, slice widths that followed the row count
    return fastpref.linear_dpo_loss(hidden, weight, labels, *refs, loss_type="aot", memory_budget=1280 << 10).loss


def _single_pass(hidden, weight, labels):
    return fastpref.linear_dpo_loss(hidden, weight, labels, torch.zeros(1), torch.zeros(1)).loss


@pytest.mark.parametrize("call", [_sequence_logps, _two_pass, _single_pass], ids=["sequence", "two_pass", "fused"])
def test_kernel_variants_do_not_depend_on_the_row_count(monkeypatch, call):
    variants = {n: {variant_of(r) for r in _launches(n, call, monkeypatch)} for n in (2, 9, 40)}
    assert variants[2] == variants[9] == variants[40], {n: len(v) for n, v in variants.items()}


def test_linear_path_rows_reach_the_kernels_aligned(monkeypatch):
    """1-D labels (the linear path's compact rows) with an odd vocabulary: every row stride is the
    padded width's (a multiple of 16), never the row width, which Triton cannot prove aligned."""
    records = _launches(40, _sequence_logps, monkeypatch)
    strides = [
        (name, value)
        for r in records
        for name, value in zip(r["arg_names"], r["args"])
        if name in ("stride_b", "stride_t", "grad_stride_b", "grad_stride_t")
    ]
    assert strides and all(value % 16 == 0 for _, value in strides), strides
    backward_widths = [dict(zip(r["arg_names"], r["args"]))["V"] for r in records if r["kernel"] == "_backward_kernel"]
    assert backward_widths and all(v % 16 == 0 for v in backward_widths), backward_widths  # the padded width
