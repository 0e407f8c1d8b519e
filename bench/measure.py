"""Time and memory of one callable: p20/p50/p80 ms and the peak bytes it allocates beyond what
already lives when it starts (its inputs, and for a backward the graph it consumes).

GPU: `triton.testing.do_bench` (CUDA events, L2 flushed before each run) and the caching
allocator's `max_memory_allocated`. CPU: a perf_counter loop after warm-up, and `LiveBytes`, a
TorchDispatchMode that adds up the storages tensors are allocated in while they live.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

QUANTILES = (0.2, 0.5, 0.8)
ATEN_NAMESPACES = ("aten", "prim", "prims")


def _clear_grads(leaves: Iterable[torch.Tensor]) -> None:
    for leaf in leaves:
        leaf.grad = None


def time_and_peak(fn: Callable[[], object], device: torch.device, leaves=(), *, repeats: int) -> tuple[float, ...]:
    """(p20 ms, p50 ms, p80 ms, peak extra bytes) of fn(). On a CPU the memory run (slowed by the
    dispatch mode) is the warm-up of the timed runs."""
    if device.type == "cuda":
        return (*time_ms(fn, device, leaves, repeats=repeats), peak_extra_bytes(fn, device, leaves))
    peak = peak_extra_bytes(fn, device, leaves)
    return (*time_ms(fn, device, leaves, repeats=repeats, warm=True), peak)


def time_ms(
    fn: Callable[[], object], device: torch.device, leaves=(), *, repeats: int, warm: bool = False
) -> tuple[float, ...]:
    """(p20, p50, p80) ms of fn(); the gradients of `leaves` are reset before each run so runs do
    not accumulate. On a GPU do_bench sizes the run itself (at least ~10 runs and 100 ms);
    on a CPU, `repeats` timed runs after one warm-up run (none if `warm`: fn has just run)."""
    leaves = list(leaves)
    if device.type == "cuda":
        import triton.testing

        _clear_grads(leaves)
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        once_ms = (time.perf_counter() - start) * 1e3
        return tuple(
            triton.testing.do_bench(
                fn, warmup=max(25.0, 2 * once_ms), rep=max(100.0, 10 * once_ms), grad_to_none=leaves,
                quantiles=list(QUANTILES),
            )
        )  # fmt: skip
    if not warm:  # thread pools, allocator, lazy imports
        _clear_grads(leaves)
        fn()
    times = []
    for _ in range(repeats):
        _clear_grads(leaves)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    ms = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(ms.tolist())


def peak_extra_bytes(fn: Callable[[], object], device: torch.device, leaves=()) -> int:
    """Peak bytes allocated during fn() above what was allocated when it started; gradients of
    `leaves` are reset first, so the gradients fn leaves behind count."""
    _clear_grads(leaves)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    with LiveBytes() as live:
        fn()
    return live.peak


class LiveBytes(TorchDispatchMode):
    """CPU: the live bytes of storages that tensors were allocated in while this mode is on, and
    their peak.

    Every tensor an op returns in a storage none of the op's inputs has is a new allocation; its
    storage is counted until it is freed (`weakref.finalize` on the storage: a tensor object can die
    while autograd keeps its storage alive as a saved output, the storage cannot). Custom ops
    (fastpref's torch.library ops) are opaque to a dispatch mode: their CPU kernel is re-entered with
    the mode on, so the tiles they allocate inside count too.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._bytes: dict[int, int] = {}  # storage address -> its bytes, while it lives

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ATEN_NAMESPACES:
            out = func(*args, **kwargs)
        else:
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._hold(t.untyped_storage(), inputs)
        return out

    def _hold(self, storage: torch.UntypedStorage, input_addresses: set[int]) -> None:
        address, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or address in input_addresses or address in self._bytes:
            return  # empty, a view or in-place result, or already counted
        self._bytes[address] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, address)

    def _release(self, address: int) -> None:
        self.live -= self._bytes.pop(address)
