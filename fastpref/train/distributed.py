"""Process group set-up for `torchrun`: DDP or FSDP2 (`fully_shard`), NCCL on GPUs, gloo on CPU (where FSDP2
runs too: that is how the test suite checks it)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

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


def wrap(module: nn.Module, dist: Dist, fsdp: bool) -> nn.Module:
    """DDP across processes, or FSDP2: each decoder layer and then the whole module `fully_shard`ed."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        layers = _decoder_layers(module)
        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def _decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the largest nn.ModuleList of the model)."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel) else module
