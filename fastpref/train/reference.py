"""Reference log-probs: a live frozen copy of the model, or computed once and cached on disk. Under torchrun every
process scores its share of the data (with the reference sharded like the policy under FSDP2) and the shares are
gathered: the cached numbers are those of one process.

The cache key hashes everything the numbers depend on: the reference weights (names, dtypes, bytes)
and config, the tokenized data (so the dataset, the tokenizer, the chat template, the max lengths and
the truncation), the head options (softcap, temperature), LD-DPO's ld_alpha, and how the pass runs:
the autocast dtype, the device type, fastpref's backend and the torch version. The file is written
under a temporary name and renamed, so a reader never sees half of it; a changed dataset, model or
precision gives a new key, never a stale hit. A file that cannot be read back (truncated, corrupt, not
this key's) is named in a warning and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from fastpref.train import modeling
from fastpref.train.data import Splits, collate, eval_batches
from fastpref.train.distributed import Dist

log = logging.getLogger("fastpref.train")
CACHE_VERSION = 2


def default_cache_dir() -> Path:
    root = os.environ.get("FASTPREF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastpref")
    return Path(root) / "ref_logps"


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the weights (names, dtypes, shapes, bytes) and the config."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(model, splits: Splits, tokenizer, ld_alpha, autocast_dtype: torch.dtype | None = None) -> str:
    """autocast_dtype: the dtype autocast runs the pass's matmuls in (None: no autocast). The device and the
    backend are the model's: the pass runs where its weights are."""
    from fastpref.backends import backend_for

    head = modeling.head_of(model)
    parts = {
        "version": CACHE_VERSION,
        "model": model_fingerprint(model),
        "data": splits.fingerprint(),
        "tokenizer": [type(tokenizer).__name__, len(tokenizer), getattr(tokenizer, "chat_template", None)],
        "head": [head.softcap, head.logit_scale],
        "ld_alpha": ld_alpha,
        "autocast": str(autocast_dtype),
        "device": head.weight.device.type,
        "backend": backend_for(head.weight).__name__,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class ReferenceModule(nn.Module):
    """forward(batch) -> (M,) summed completion log-probs of `model` (LD-DPO weighted when ld_alpha): the unit that
    FSDP2 shards for a live reference, so that calling it gathers the weights."""

    def __init__(self, model: nn.Module, ld_alpha=None):
        super().__init__()
        self.model = model
        self.ld_alpha = ld_alpha

    def forward(self, batch: dict) -> torch.Tensor:
        return modeling.sequence_logps(self.model, batch, ld_alpha=self.ld_alpha)


@torch.no_grad()
def compute_logps(scorer, examples, *, batch_size: int, pad_id: int, device, autocast, dist: Dist,
                  collective: bool = False) -> torch.Tensor:
    """(len(examples), 2) float32 reference log-probs of (chosen, rejected), in example order, on every rank.

    Each rank scores its share (every world-th example) and the shares are summed across ranks (each row is
    non-zero on one rank only, so the sum is exact). `collective`: the scorer's forward is a collective (FSDP2),
    so every rank runs as many forwards as rank 0, the ranks with fewer examples repeating one and dropping it."""
    out = torch.zeros(len(examples), 2, dtype=torch.float32)
    batches = eval_batches(len(examples), batch_size, dist.rank, dist.world)
    if collective:
        spare = batches[0] if batches else [0]
        batches += [None] * (len(eval_batches(len(examples), batch_size, 0, dist.world)) - len(batches))
    was_training = scorer.training
    scorer.eval()
    for idx in batches:
        batch = collate([examples[i] for i in (spare if idx is None else idx)], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logps = scorer(batch).float().cpu()
        if idx is not None:
            chosen, rejected = logps.chunk(2)
            out[idx, 0], out[idx, 1] = chosen, rejected
    scorer.train(was_training)
    return dist.sum(out).float().cpu()


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def autocast_dtype(autocast, device) -> torch.dtype | None:
    """The dtype `autocast()` (a context factory) runs matmuls in on `device`, None without autocast."""
    device_type = torch.device(device).type
    with autocast():
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _read_cache(path: Path, key: str, splits: Splits) -> dict | None:
    """The cached log-probs; None when there is no file, or (with a warning naming it) when it cannot be used."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        logps = saved["logps"]
        shapes = (tuple(logps["train"].shape), tuple(logps["eval"].shape))
        problem = ("it holds another key" if saved.get("key") != key else
                   "it does not match the data" if shapes != ((len(splits.train), 2), (len(splits.eval), 2)) else None)
    except Exception as e:  # a truncated or corrupt file fails in many ways (EOFError, RuntimeError, pickle, ...)
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        log.warning("reference cache %s cannot be used (%s): recomputing it", path, problem)
        return None
    return logps


def precomputed(key: str, make_scorer, splits: Splits, tokenizer, *, cache_dir, batch_size, device, autocast,
                dist: Dist, collective: bool):
    """{"train": (N, 2), "eval": (M, 2)} reference log-probs, from the cache or computed by every rank on its share
    (`make_scorer()` builds the scoring module, only on a miss) and written by rank 0. Rank 0 decides hit or miss
    and reads the file (a damaged one is named and recomputed), so the other ranks need not see the cache directory.

    Returns (logps, hit: bool, path)."""
    path = Path(cache_dir or default_cache_dir()) / f"{key}.pt"
    cached = _read_cache(path, key, splits) if dist.main else None
    hit = dist.broadcast_object(cached is not None if dist.main else None)
    if hit:
        logps = dist.from_main(lambda: cached)
    else:
        log.info("precomputing reference log-probs for %d + %d examples over %d process(es)",
                 len(splits.train), len(splits.eval), dist.world)
        scorer = make_scorer()
        logps = {
            name: compute_logps(scorer, examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id, device=device,
                                autocast=autocast, dist=dist, collective=collective)
            for name, examples in (("train", splits.train), ("eval", splits.eval))
        }
        del scorer
        dist.from_main(lambda: _atomic_save({"key": key, "logps": logps}, path))
    return logps, hit, path
