"""Every Triton launch the library makes, recorded from real calls.

Representative public API calls (every dtype, softcap, statistics, in-place, f-divergence, reference
and margin option, small / odd / large vocabularies, the linear backward's vocab slices, a batch
stride past int32) run under the Triton
interpreter with the block configs a GPU gets, and each kernel launch is kept as (kernel, arguments),
a tensor reduced to its dtype and its pointer's alignment: all Triton's binder needs to specialise the
launch for a GPU (`fastpref.bench.kernels_compile` compiles them). A new launch site is covered as
soon as one of these calls reaches it; a kernel no call launches is reported by `unlaunched_kernels`.

`TRITON_INTERPRET=1 python -m fastpref.bench.kernel_launches` prints the records as JSON lines.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import pkgutil
import re
import warnings

import numpy as np
import torch

import fastpref

ALIGNMENT = 16  # bytes: the pointer divisibility Triton specialises on


def describe(value):
    """A launch argument as JSON: a tensor by dtype and alignment, a scalar as itself."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "offset": value.data_ptr() % ALIGNMENT}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a launch argument of type {type(value).__name__}")


@contextlib.contextmanager
def recorded_launches():
    """Within the block the Triton backend runs (FASTPREF_BACKEND=triton) with the GPU's block
    configs, and every interpreted kernel launch is appended to the yielded list. Needs
    TRITON_INTERPRET=1 set before the kernels import."""
    import os

    from triton.runtime.interpreter import InterpretedFunction

    from fastpref.kernels import config

    if not config.INTERPRETING:
        raise RuntimeError("recording launches needs TRITON_INTERPRET=1 set before fastpref imports")
    records = []
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        records.append({
            "module": self.fn.__module__,
            "kernel": self.fn.__qualname__,
            "arg_names": self.arg_names[: len(args)],
            "args": [describe(a) for a in args],
            "kwargs": {k: describe(v) for k, v in kwargs.items()},
        })  # fmt: skip
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    backend = os.environ.get("FASTPREF_BACKEND")
    InterpretedFunction.run = recording_run
    config.interpreter_configs = False
    os.environ["FASTPREF_BACKEND"] = "triton"
    try:
        yield records
    finally:
        InterpretedFunction.run = run
        config.interpreter_configs = True
        if backend is None:
            del os.environ["FASTPREF_BACKEND"]
        else:
            os.environ["FASTPREF_BACKEND"] = backend


def _labels(shape, vocab, generator):
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels[..., 0] = -100
    return labels


# The statistics callers select (each a kernel variant): TRL's GRPO / RLOO, SFT, DPO, KTO, and all four
# (DPO with WPO's weights). The workload cycles through them, so each meets several dtypes, softcaps and
# vocabulary classes without multiplying the gate's classes.
SELECTIONS = [
    ("entropy",), ("entropy", "is_top1"), ("entropy", "is_top1", "mean_logit"), ("entropy", "mean_logit"), True
]


def _logits_path_calls(generator):
    """token_logps forward (without stats, and with a selection of them) and backward (out of place, in
    place, through the entropy too), for each dtype, softcap and vocabulary class: small (several rows per
    program), odd (one masked block), large (full blocks and a tail)."""
    selections = itertools.cycle(SELECTIONS)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for softcap in (None, 30.0):
            for vocab, rows in ((97, 5), (3001, 3), (8208, 2)):  # 8208 = 2·4096 + 16: as 128,256, a multiple of 16
                logits = torch.randn(2, rows, vocab, generator=generator).to(dtype).requires_grad_()
                labels = _labels((2, rows), vocab, generator)
                upstream = torch.randn(2, rows, generator=generator)
                logps = fastpref.token_logps(logits, labels, softcap=softcap)
                torch.autograd.grad(logps, logits, upstream)
                logps, stats = fastpref.token_logps(logits, labels, softcap=softcap, return_stats=next(selections))
                torch.autograd.grad((logps, stats.entropy), logits, (upstream, upstream))  # an entropy bonus
                leaf = logits.detach().clone().requires_grad_()
                logps = fastpref.token_logps(leaf * 1, labels, softcap=softcap, inplace_backward=True)
                logps.backward(upstream)


def _linear_path_calls(generator):
    """linear_token_logps (the entropy, and no stats) and linear_dpo_loss (single pass, WPO weighting,
    two-pass) with the statistics `fastpref train dpo` logs."""
    for dtype in (torch.bfloat16, torch.float32):
        hidden = torch.randn(4, 6, 16, generator=generator).to(dtype).requires_grad_()
        weight = (torch.randn(3001, 16, generator=generator) / 4).to(dtype).requires_grad_()
        labels = _labels((4, 6), 3001, generator)
        logps, stats = fastpref.linear_token_logps(hidden, weight, labels, return_stats="entropy", softcap=30.0)
        (logps.sum() + stats.entropy.sum()).backward()
        fastpref.linear_sequence_logps(hidden, weight, labels).sum().backward()
        refs = (-torch.rand(2, generator=generator) * 50, -torch.rand(2, generator=generator) * 50)
        for options in ({}, {"use_weighting": True}, {"loss_type": "aot"}):
            out, _stats = fastpref.linear_dpo_loss(hidden, weight, labels, *refs, return_stats=SELECTIONS[2], **options)
            out.loss.backward()


def _linear_slice_calls(generator):
    """The linear backward's vocab slices: a tile small enough for slices of 4,096 columns, so an odd
    vocabulary gives a full slice and a last one of an odd width (with its padded, aligned rows), for
    each dtype, softcap and entropy gradient. A slice's width depends on V alone, never on the rows."""
    from fastpref.ops.linear_token_logps import linear_token_logps_op
    from fastpref.params import ENTROPY

    vocab, hidden_size = 2 * 4096 + 17, 16
    tile_bytes = 4096 * 4 * hidden_size  # slices of 4,096 columns (their fp32 dW fills the tile)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        hidden = torch.randn(2, 6, hidden_size, generator=generator).to(dtype).requires_grad_()
        weight = (torch.randn(vocab, hidden_size, generator=generator) / 4).to(dtype).requires_grad_()
        labels = _labels((2, 6), vocab, generator)
        for softcap in (None, 30.0):
            for with_entropy in (False, True):
                logps, _lse, stats = linear_token_logps_op(
                    hidden, weight, None, labels, -100, 1.0, softcap, tile_bytes, 1.0, ENTROPY if with_entropy else 0
                )
                (logps.sum() + (stats[0].sum() if with_entropy else 0)).backward()


def _pair_loss_calls(generator):
    """dpo_loss sigmoid for every f-divergence, with and without a reference; bt_loss with and
    without margin and reward centring, for each dtype of its inputs."""
    policy = [(-torch.rand(9, generator=generator) * 40).requires_grad_() for _ in range(2)]
    refs = [(-torch.rand(9, generator=generator) * 40) for _ in range(2)]
    for f_divergence in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
        fastpref.dpo_loss(*policy, *refs, f_divergence_type=f_divergence).loss.backward()
        fastpref.dpo_loss(*policy, None, None, reference_free=True, f_divergence_type=f_divergence).loss.backward()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        chosen, rejected = (torch.randn(9, generator=generator).to(dtype).requires_grad_() for _ in range(2))
        fastpref.bt_loss(chosen, rejected).backward()
        fastpref.bt_loss(chosen, rejected, margin=torch.rand(9, generator=generator).to(dtype)).backward()
        fastpref.bt_loss(chosen, rejected, center_rewards_coefficient=0.01).backward()


def variant_of(record: dict) -> tuple:
    """What Triton's binder specialises a recorded launch on, read off the record (no compiling):
    the kernel, per tensor its dtype and 16-byte alignment, per specialised int whether it is 1,
    divisible by 16 or past int32, the constexprs and warps. Equal tuples compile to one binary (the
    compile gate's classes refine this with the target's own binder)."""
    kernel = getattr(importlib.import_module(record["module"]), record["kernel"])
    unspecialised = set(getattr(kernel, "kwargs", {}).get("do_not_specialize") or ())
    unspecialised |= {record["arg_names"][i] for i in getattr(kernel, "do_not_specialize", ()) if isinstance(i, int)}
    parts = []
    for name, value in zip(record["arg_names"], record["args"]):
        if isinstance(value, dict):
            parts.append((name, value["tensor"], value["offset"] == 0))
        elif type(value) is int and name not in unspecialised:
            parts.append((name, value == 1, value % 16 == 0, abs(value) >= 2**31))
    return (record["module"], record["kernel"], tuple(parts), tuple(sorted(record["kwargs"].items())))


WORKLOAD = (_logits_path_calls, _linear_path_calls, _linear_slice_calls, _pair_loss_calls)
WIDE = 2**32  # added to a stride: past int32, same divisibility


def with_wide_strides(records: list[dict]) -> list[dict]:
    """Each bf16 launch again with every stride argument above 1 past int32 (a (B, T, V) batch
    stride of 16k tokens × 128k vocab), which Triton's binder types i64: logits that large do not fit
    the interpreter's memory, their launches are otherwise the same."""
    wide = []
    for record in records:
        first = record["args"][0] if record["args"] else None
        if isinstance(first, dict) and first["tensor"] == "bfloat16":
            args = [
                value + WIDE if "stride" in name and type(value) is int and value > 1 else value
                for name, value in zip(record["arg_names"], record["args"])
            ]
            if args != record["args"]:
                wide.append({**record, "args": args})
    return records + wide


def record_workload() -> list[dict]:
    """The launches of every call in WORKLOAD, on the Triton backend (the interpreter on CPU), and
    their twins with wide strides."""
    generator = torch.Generator().manual_seed(0)
    with recorded_launches() as records, warnings.catch_warnings(), np.errstate(all="ignore"):
        # bf16 values are raw bits in the interpreter: the numbers are garbage, the launches are not
        warnings.simplefilter("ignore")
        for calls in WORKLOAD:
            calls(generator)
    return with_wide_strides(records)


def jit_kernels() -> dict[str, object]:
    """Every launchable @triton.jit function of fastpref.kernels, as "module:name" -> function.
    A jit function that another one in its module calls is a helper, not a kernel."""
    from triton.runtime.jit import JITFunction

    import fastpref.kernels

    kernels = {}
    for info in pkgutil.iter_modules(fastpref.kernels.__path__):
        module = importlib.import_module(f"fastpref.kernels.{info.name}")
        jitted = {
            name: fn for name, fn in vars(module).items()
            if isinstance(fn, JITFunction) and fn.fn.__module__ == module.__name__
        }  # fmt: skip
        for name, fn in jitted.items():
            called = re.compile(rf"\b{re.escape(name)}\s*\(")
            if not any(called.search(other.src) for other_name, other in jitted.items() if other_name != name):
                kernels[f"{module.__name__}:{name}"] = fn
    return kernels


def unlaunched_kernels(records: list[dict], kernels: dict[str, object]) -> list[str]:
    """The kernels (from jit_kernels) that no recorded launch ran."""
    launched = {f"{r['module']}:{r['kernel']}" for r in records}
    return sorted(set(kernels) - launched)


if __name__ == "__main__":
    for record in record_workload():
        print(json.dumps(record))
