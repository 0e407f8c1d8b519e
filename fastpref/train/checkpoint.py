"""Checkpoints that resume exactly, are never half-written, are written and read per process, and hold no pickles.

    checkpoint-<step>/
      config.json, generation_config.json, tokenizer files
      model-0000k-of-0000K.safetensors, model.safetensors.index.json
            the model with full tensors: `from_pretrained(checkpoint-<step>)` loads it. K files of about equal size,
            at least one per process: every process writes its shard through torch.distributed.checkpoint (DCP)
            into a temporary `.sharded/` folder, then assembles its share of the K files from the shards.
      optimizer/shard-<rank + 1>-model-0000k-of-0000K.safetensors, optimizer/param_groups.json
            the AdamW state as each process holds it (its FSDP2 shard), with DCP's sharding offsets in the header
      scheduler.json, rng_state_<rank>.json, trainer_state.json (step, epoch, position in the data)

Loading goes through DCP as well: each process reads only the slices of the tensors it holds, from whatever files
hold them, so a checkpoint resumes on another number of processes and no process holds the whole model on the way
(tests/test_train_distributed.py measures the host memory). Only safetensors and JSON: nothing is unpickled. The directory is written as `.checkpoint-<step>.tmp` and renamed into place once complete; a
crash leaves at most a temporary directory, which `latest()` ignores and the next save removes.

`export` writes the final model the same way into output_dir (hard links to the checkpoint of the last step when
there is one), through a temporary folder whose files are renamed into place.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import random
import re
import shutil
import warnings
from itertools import accumulate, chain
from pathlib import Path

import torch
from torch import nn

from fastpref.train.distributed import Dist

_NAME = re.compile(r"^checkpoint-(\d+)$")
FILE_BYTES = 2 * 1024**3  # the model is cut into files of at most about this size (and one per process at least)
_WEIGHT_FILES = re.compile(r"^(model.*\.safetensors|model\.safetensors\.index\.json|pytorch_model.*\.bin(\.index\.json)?)$")


# --- RNG states, as JSON ---


def _bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": _bytes(torch.get_rng_state())}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), pos, has_gauss, cached]
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = _bytes(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(_tensor(state["torch"]))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor(state["cuda"]))


# --- tensors through DCP, as safetensors ---


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict (DTensor shards under FSDP2), each tied tensor once, under its first name (as
    `save_pretrained` writes it: `model.embed_tokens.weight`, not `lm_head.weight`)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    aliases = _aliases(model)
    return {name: value for name, value in get_model_state_dict(model).items() if name not in aliases}


def _aliases(model: nn.Module) -> set[str]:
    """Names of the tensors already named before (the tied ones)."""
    seen, aliases = set(), set()
    for name, tensor in chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        if id(tensor) in seen:
            aliases.add(name)
        seen.add(id(tensor))
    return aliases


def _file_index(state: dict[str, torch.Tensor], files: int) -> dict[str, int]:
    """{name: file number 1..K}: runs of consecutive tensors of about total / `files` bytes each (K <= files when a
    tensor is larger than a run)."""
    sizes = [value.numel() * value.element_size() for value in state.values()]
    total = max(1, sum(sizes))
    raw = [start * files // total for start in accumulate(sizes, initial=0)][: len(sizes)]
    numbers = {n: i + 1 for i, n in enumerate(sorted(set(raw)))}
    return {name: numbers[n] for name, n in zip(state, raw)}


def _files_for(state: dict[str, torch.Tensor], dist: Dist) -> int:
    total = sum(value.numel() * value.element_size() for value in state.values())
    return max(dist.world, math.ceil(total / FILE_BYTES))


def _save_tensors(state: dict[str, torch.Tensor], folder: Path, index: dict[str, int], dist: Dist) -> None:
    """Every process writes the tensors (or the shards of them) it holds: folder/shard-<rank>-model-<k>-of-<K>."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    with _one_process_quiet(dist):
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(folder), fqn_to_index_mapping=index,
                                                                save_distributed=True), no_dist=not dist.enabled)


def _load_tensors(state: dict[str, torch.Tensor], folder: Path, dist: Dist) -> None:
    """Fill `state`'s tensors in place with the slices each process holds, from the safetensors files of `folder`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    with _one_process_quiet(dist):
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not dist.enabled)


def _stored(folder: Path) -> dict:
    """{name: DCP TensorStorageMetadata (global size, dtype)} of the tensors in the safetensors files of `folder`."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    return HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata


@contextlib.contextmanager
def _one_process_quiet(dist: Dist):
    """DCP warns on every call without a process group that it assumes one process: that is what we mean."""
    with warnings.catch_warnings():
        if not dist.enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def write_model(folder: Path, model: nn.Module, dist: Dist) -> None:
    """model-*.safetensors and their index into `folder` (every rank calls this; folder exists)."""
    from torch.distributed.checkpoint._consolidate_hf_safetensors import (
        consolidate_safetensors_files,
        consolidate_safetensors_files_on_every_rank,
    )

    state = _model_state(model)
    index = _file_index(state, _files_for(state, dist))
    sharded = folder / ".sharded"
    _save_tensors(state, sharded, index, dist)
    if dist.enabled:  # each rank assembles its share of the K files from every rank's shards
        consolidate_safetensors_files_on_every_rank(str(sharded), str(folder), index)
    else:
        consolidate_safetensors_files(str(sharded), str(folder), index)
    dist.barrier()
    if dist.main:
        shutil.rmtree(sharded)


def write_configs(folder: Path, model: nn.Module, tokenizer, card: str | None = None,
                  model_config: bool = True) -> None:
    """config.json (+ generation_config.json), the tokenizer, as save_pretrained writes them, and the model card
    (rank 0). model_config=False: no config.json (a LoRA checkpoint loads through its adapter_config.json)."""
    if model_config:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if card is not None:
        (folder / "README.md").write_text(card, encoding="utf-8")


def _optimizer_tensors(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's state as it is held (DTensor shards under FSDP2): {'<parameter name>/<state key>': tensor}."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {f"{names[id(p)]}/{key}": value for p, state in optimizer.state.items() for key, value in state.items()}


def _optimizer_groups(model: nn.Module, optimizer) -> list[dict]:
    """The hyperparameters of each parameter group, with its parameters by name (JSON)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [{**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
            for group in optimizer.param_groups]


def _load_optimizer(folder: Path, model: nn.Module, optimizer, dist: Dist) -> None:
    """Make the saved state tensors, laid out like their parameters (an FSDP2 shard of each moment), fill them
    through DCP, and hand them to the optimizer. No optimizer step is taken to create the state first."""
    params = dict(model.named_parameters())
    saved_groups = json.loads((folder / "param_groups.json").read_text())
    live_groups = _optimizer_groups(model, optimizer)
    if [g["params"] for g in saved_groups] != [g["params"] for g in live_groups]:
        raise ValueError(f"{folder}: the checkpoint's optimizer holds other parameters than this model's")
    tensors = {}
    for key, meta in _stored(folder).items():
        param = params[key.rpartition("/")[0]]
        like_param = len(meta.size) > 0 and tuple(meta.size) == tuple(param.shape)
        tensors[key] = (torch.zeros_like(param, dtype=meta.properties.dtype) if like_param  # its shard, its device
                        else torch.zeros(meta.size, dtype=meta.properties.dtype))  # e.g. AdamW's step, on the CPU
    _load_tensors(tensors, folder, dist)
    position = {name: i for i, name in enumerate(name for g in saved_groups for name in g["params"])}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(position[name], {})[field] = value
    groups = [{**live, **{k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in saved.items()},
               "params": [position[name] for name in saved["params"]]} for saved, live in zip(saved_groups, live_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


# --- checkpoints ---


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"checkpoint-{step}"


def save(run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict, dist: Dist,
         tokenizer=None, card: str | None = None, adapter_base: str | None = None) -> Path:
    """Write checkpoint-<step> atomically (every rank calls this). `model` is the transformers model (FSDP2-sharded
    or not) whose parameters `optimizer` updates; `card`: the model card, README.md; `adapter_base`: under LoRA, the
    base model's path, for the adapter files that make the checkpoint load with `from_pretrained`."""
    final = checkpoint_path(run_dir, step)
    tmp = run_dir / f".checkpoint-{step}.tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    _write_json(tmp / f"rng_state_{dist.rank}.json", rng_state())
    write_model(tmp, model, dist)
    tensors = _optimizer_tensors(model, optimizer)
    _save_tensors(tensors, tmp / "optimizer", _file_index(tensors, _files_for(tensors, dist)), dist)
    if dist.main:
        _write_json(tmp / "optimizer" / "param_groups.json", _optimizer_groups(model, optimizer))
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        if adapter_base is not None:
            from fastpref.train.lora import save_adapter

            save_adapter(model, tmp, adapter_base)
        write_configs(tmp, model, tokenizer, card, model_config=adapter_base is None)
        _write_json(tmp / "trainer_state.json", {**state, "world_size": dist.world})
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


def load(path: Path, model: nn.Module, optimizer, scheduler, dist: Dist) -> dict:
    """Restore the states saved by `save` into the live objects (every rank calls this); returns trainer_state."""
    if (path / "model.pt").exists():
        raise ValueError(f"--resume {path}: a checkpoint of an older fastpref (model.pt / optimizer.pt pickles), "
                         "which this version does not read; start from its weights with --model instead")
    state = json.loads((path / "trainer_state.json").read_text())
    model_state = _model_state(model)
    stored = {k: tuple(meta.size) for k, meta in _stored(path).items()}
    wrong = [name for name, value in model_state.items() if stored.get(name) != tuple(value.shape)]
    if wrong:
        raise ValueError(f"--resume {path}: the checkpoint holds another model than this run's {type(model).__name__}: "
                         f"{len(wrong)} tensors missing or shaped otherwise, e.g. {wrong[0]} "
                         f"{stored.get(wrong[0], 'missing')} in the checkpoint, {tuple(model_state[wrong[0]].shape)} here")
    _load_tensors(model_state, path, dist)  # in place, into the parameters (their shards)
    _load_optimizer(path / "optimizer", model, optimizer, dist)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng_file = path / f"rng_state_{dist.rank}.json"
    if rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
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


# --- the final model ---


def export(run_dir: Path, model: nn.Module, tokenizer, dist: Dist, checkpoint_dir: Path | None = None,
           card: str | None = None) -> None:
    """The model, its config and tokenizer into run_dir, loadable with `from_pretrained` (every rank calls this).
    With `checkpoint_dir` (a checkpoint of these very weights) its files are hard-linked, not written again. The
    files are made in a temporary folder and renamed into place; weight files of an earlier export are removed."""
    tmp = run_dir / ".export.tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if checkpoint_dir is None:
        write_model(tmp, model, dist)
    elif dist.main:
        for source in checkpoint_dir.iterdir():
            if _WEIGHT_FILES.match(source.name):
                try:
                    os.link(source, tmp / source.name)
                except OSError:  # a file system without hard links
                    shutil.copyfile(source, tmp / source.name)
    if dist.main:
        write_configs(tmp, model, tokenizer, card)
        new = {p.name for p in tmp.iterdir()}
        for stale in run_dir.iterdir():
            if _WEIGHT_FILES.match(stale.name) and stale.name not in new:
                stale.unlink()
        weights_first = sorted(tmp.iterdir(), key=lambda p: (not p.name.endswith(".safetensors"), p.name))
        for source in weights_first:
            os.replace(source, run_dir / source.name)
        tmp.rmdir()
    dist.barrier()
