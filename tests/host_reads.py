"""A CPU proxy for the host syncs an op makes on a GPU: every read of a device value by the host.

`HostReads` counts, while active:
- aten ops that copy a device value to the host: `_local_scalar_dense` / `is_nonzero` / `item` (`.item()`, `bool(t)`),
  `nonzero`, `masked_select`, indexing with a boolean mask (it runs `nonzero`);
- Python-level reads: `Tensor.tolist`, `.cpu`, `.numpy`;
- device-targeted constructions from host data, `torch.tensor(..., device=...)`: a blocking
  host-to-device copy, forbidden under CUDA-graph capture (`torch.unravel_index` makes two).
A Triton kernel launch is not counted (under the interpreter it reads its arguments on the host;
on a GPU it is asynchronous). Each read is kept with the op's name, so a failure says what synced.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastpref.kernels import pair_sigmoid, token_logps

# (bool(t) reaches the mode as is_nonzero inside a custom op's kernel, as _local_scalar_dense outside)
SYNCING_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.nonzero", "aten.masked_select")
PYTHON_READS = ("tolist", "cpu", "numpy")


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices
    )


class HostReads(TorchDispatchMode):
    """Context manager: self.reads lists what read the device from the host, in order."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self._paused = 0
        self._stack = contextlib.ExitStack()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if func.namespace == "fastpref":
            with self:  # a custom op is opaque to the mode: re-enter its CPU kernel with the count on
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        if not self._paused:
            if name in SYNCING_OPS:
                self.reads.append(name)
                self._paused += 1  # one read, however the op decomposes
                try:
                    return func(*args, **kwargs)
                finally:
                    self._paused -= 1
            if name in ("aten.index", "aten.index_put", "aten.index_put_") and _has_bool_index(args):
                self.reads.append(f"{name} with a boolean mask")
        return func(*args, **kwargs)

    def _patch(self, owner, attr, wrapper):
        original = getattr(owner, attr)
        setattr(owner, attr, wrapper(original))
        self._stack.callback(setattr, owner, attr, original)

    def _counting(self, label):
        def wrap(original):
            def counted(*args, **kwargs):
                if not self._paused:
                    self.reads.append(label)
                self._paused += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self._paused -= 1

            return counted

        return wrap

    def _uncounted(self, original):
        def launch(*args, **kwargs):
            self._paused += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._paused -= 1

        return launch

    def __enter__(self):
        for attr in PYTHON_READS:
            self._patch(torch.Tensor, attr, self._counting(f"Tensor.{attr}"))
        original_tensor = torch.tensor

        def tensor(*args, **kwargs):
            if kwargs.get("device") is not None and not self._paused:
                self.reads.append("torch.tensor(..., device=...)")
            return original_tensor(*args, **kwargs)

        self._patch(torch, "tensor", lambda _: tensor)
        for module in (token_logps, pair_sigmoid):
            self._patch(module, "launch", self._uncounted)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()
            self._stack = contextlib.ExitStack()
