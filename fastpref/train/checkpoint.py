"""Checkpoints that resume exactly and are never half-written.

A checkpoint directory `checkpoint-<step>` holds the model and optimizer state (full, unsharded),
the scheduler, every rank's RNG states and `trainer_state.json` (step, epoch, position in the data).
It is written as `.checkpoint-<step>.tmp` and renamed into place once complete; a crash leaves at most
a temporary directory, which `latest()` ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from fastpref.train.distributed import Dist

_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _states(model, optimizer, fsdp: bool):
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def save(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, dist: Dist, fsdp: bool = False) -> Path:
    """Write checkpoint-<step> atomically (every rank calls this)."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(rng_state(), tmp / f"rng_state_{dist.rank}.pt")
    model_state, optim_state = _states(model, optimizer, fsdp)  # collective under FSDP
    if dist.main:
        torch.save(model_state, tmp / "model.pt")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "world_size": dist.world}, indent=1))
    dist.barrier()
    if dist.main:
        if final.exists():  # a re-save of the same step after a resume: swap, never delete first
            old = run_dir / f".checkpoint-{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    dist.barrier()
    return final


def latest(run_dir: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*") if (m := _NAME.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def resolve(run_dir: Path, resume: str) -> Path:
    if resume.lower() in ("last", "latest", "true"):
        found = latest(run_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint-* directory in {run_dir}")
        return found
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"--resume {resume}: not a fastpref checkpoint (no trainer_state.json)")
    return path


def load(path: Path, model, optimizer, scheduler, dist: Dist, fsdp: bool = False) -> dict:
    """Restore the states saved by `save` into the live objects; returns trainer_state."""
    state = json.loads((path / "trainer_state.json").read_text())
    model_state = torch.load(path / "model.pt", map_location="cpu", weights_only=False)
    optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng_state_{dist.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def prune(run_dir: Path, keep: int | None, run_id: str | None = None) -> None:
    """Remove the oldest checkpoints of run `run_id` beyond `keep`; another run's checkpoints (another
    run_id in their trainer_state.json) are neither counted nor removed."""
    if not keep:
        return
    steps = sorted((int(m.group(1)), p) for p in run_dir.glob("checkpoint-*")
                   if (m := _NAME.match(p.name)) and _run_id(p) == run_id)
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _run_id(path: Path) -> str | None:
    try:
        return json.loads((path / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
