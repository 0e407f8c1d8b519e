"""Process group set-up for `torchrun` and where the weights live: DDP or FSDP2 (`fully_shard`), NCCL on GPUs, gloo on
CPU (where FSDP2 runs too: that is how the test suite checks it).

Start-up holds one full copy of the weights in host memory per job, not one per process: rank 0 loads the model
(`from_pretrained`), the other ranks build the same architecture on the meta device (no memory), and the weights
travel from rank 0 one tensor at a time. Under FSDP2 each rank then keeps only its shard; under DDP a full replica.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce sum (in place on a copy on this rank's device); identity on one process."""
        if not self.enabled:
            return tensor
        out = tensor.detach().to(self.device, torch.float64 if self.device.type == "cpu" else torch.float32).clone()
        tdist.all_reduce(out)
        return out

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        return bool(self.sum(torch.tensor(float(flag))).item() > 0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled over the process group: small objects only)."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """`fn()` run on rank 0 only, its result on every rank. Its error is raised on every rank (rank 0 raises the
        original, the others a built-in exception of the same type and message, else a RuntimeError), so no rank
        waits for the others until the process group times out."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
        if self.enabled:
            failure = None if error is None else (type(error).__name__, str(error))
            failure, result = self.broadcast_object((failure, None if error is not None else result))
            if failure is not None and error is None:
                kind = getattr(builtins, failure[0], None)
                raise (kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError)(
                    f"{failure[1]} (on rank 0)")
        if error is not None:
            raise error
        return result


def init() -> Dist:
    """One process, or the torchrun group from its environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank if world > 1 else torch.cuda.current_device())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    rank = tdist.get_rank() if world > 1 else 0
    return Dist(rank, world, local_rank, device)


def shutdown(dist: Dist) -> None:
    if dist.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


# --- loading once per job ---


@dataclass
class Loaded:
    """What `load_on_main` gives each rank: the loaded model (rank 0; None elsewhere), the tokenizer, and the
    architecture to build empty copies from."""

    model: nn.Module | None
    tokenizer: Any
    architecture: tuple  # (model class, config, generation config or None)

    def empty(self) -> nn.Module:
        """The same architecture with every tensor on the meta device (no memory)."""
        cls, config, generation_config = self.architecture
        with torch.device("meta"):
            model = cls(config)
        if generation_config is not None:
            model.generation_config = generation_config
        return model


def load_on_main(load: Callable[[], tuple[nn.Module, Any]], dist: Dist) -> Loaded:
    """Run `load` (-> model, tokenizer) on rank 0 only; every rank learns the tokenizer and the architecture."""
    kept = {}

    def run():
        model, tokenizer = load()
        kept["model"] = model
        return (type(model), model.config, getattr(model, "generation_config", None)), tokenizer

    architecture, tokenizer = dist.from_main(run)
    return Loaded(kept.get("model"), tokenizer, architecture)


def materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """Allocate a meta-device model's tensors on `device` (uninitialised) and tie its weights again."""
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def fill_sharded(model: nn.Module, source: nn.Module | None, dist: Dist) -> None:
    """Give an FSDP2-sharded `model` (inside its sharded root) the weights of rank 0's full `source`: each tensor is
    broadcast in turn and every rank keeps its shard; buffers (rotary tables ...) are copied whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = source.state_dict() if dist.main else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    source_buffers = dict(source.named_buffers()) if dist.main else {}
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if dist.main:
                buffer.copy_(source_buffers[name])
            if dist.enabled:
                tdist.broadcast(buffer, src=0)


# --- wrapping ---


def wrap(module: nn.Module, dist: Dist, fsdp: bool, bf16: bool = False) -> nn.Module:
    """DDP across processes, or FSDP2: each decoder layer and then the whole module `fully_shard`ed, parameters
    all-gathered in bf16 and gradients reduced in fp32 under `bf16` (the fp32 master weights stay sharded). A module
    built on the meta device is allocated on this rank's device after sharding: only its shard."""
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        def policy(cast_inputs: bool):
            if not bf16:
                return MixedPrecisionPolicy()
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                        cast_forward_inputs=cast_inputs)

        for layer in _decoder_layers(module):
            fully_shard(layer, mp_policy=policy(True))
        # The root's inputs hold fp32 reference log-probs and margins: never cast them to bf16. FSDP2 keeps a root's
        # parameters gathered from its forward to its backward; a frozen module has no backward: reshard at once.
        frozen = not any(p.requires_grad for p in module.parameters())
        fully_shard(module, mp_policy=policy(False), reshard_after_forward=True if frozen else None)
        if any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers()):
            module.to_empty(device=dist.device)
        return module
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


@contextlib.contextmanager
def gathered(root: nn.Module):
    """Inside the forward of the FSDP2 root `root`: its inner FSDP2 units (the decoder layers, resharded after each
    forward in training) all-gathered once on entry and kept whole until the block ends, then resharded. For a pass of
    many small forwards, generation's one per new token: without it each would all-gather every layer, and since
    each rank stops at its own EOS the ranks' counts of forwards, hence of collectives, would differ (a hang). Inside
    the block there is no collective. Nothing for a module that is not sharded (one process, DDP)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def _decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the largest nn.ModuleList of the model)."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel) else module
