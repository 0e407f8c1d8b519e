"""Reference log-probs: a live frozen copy of the model, or computed once and cached on disk.

The cache key hashes everything the numbers depend on: the reference weights and config, the
tokenized data (so the dataset, the tokenizer, the chat template and the truncation), the head
options and LD-DPO's ld_alpha. The file is written under a temporary name and renamed, so a reader
never sees half of it; a changed dataset or model gives a new key, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from fastpref.train import modeling
from fastpref.train.data import Splits, collate, eval_batches

log = logging.getLogger("fastpref.train")
CACHE_VERSION = 1


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


def cache_key(model, splits: Splits, tokenizer, ld_alpha) -> str:
    parts = {
        "version": CACHE_VERSION,
        "model": model_fingerprint(model),
        "data": splits.fingerprint(),
        "tokenizer": [type(tokenizer).__name__, len(tokenizer), getattr(tokenizer, "chat_template", None)],
        "head": [modeling.head_of(model).softcap, modeling.head_of(model).logit_scale],
        "ld_alpha": ld_alpha,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@torch.no_grad()
def compute_logps(model, examples, *, batch_size: int, pad_id: int, device, autocast, ld_alpha=None) -> torch.Tensor:
    """(len(examples), 2) float32 reference log-probs of (chosen, rejected), in example order."""
    out = torch.zeros(len(examples), 2, dtype=torch.float32)
    was_training = model.training
    model.eval()
    for idx in eval_batches(len(examples), batch_size, 0, 1):
        batch = collate([examples[i] for i in idx], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logps = modeling.sequence_logps(model, batch, ld_alpha=ld_alpha).float().cpu()
        chosen, rejected = logps.chunk(2)
        out[idx, 0], out[idx, 1] = chosen, rejected
    model.train(was_training)
    return out


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


def precomputed(model, splits: Splits, tokenizer, *, cache_dir, batch_size, device, autocast, ld_alpha, dist):
    """{"train": (N, 2), "eval": (M, 2)} reference log-probs, from the cache or computed (by rank 0) and cached.

    Returns (logps, hit: bool, path)."""
    key = cache_key(model, splits, tokenizer, ld_alpha)
    path = Path(cache_dir or default_cache_dir()) / f"{key}.pt"
    hit = path.exists()
    if not hit and dist.rank == 0:
        log.info("precomputing reference log-probs for %d + %d examples", len(splits.train), len(splits.eval))
        logps = {
            name: compute_logps(model, examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                                device=device, autocast=autocast, ld_alpha=ld_alpha)
            for name, examples in (("train", splits.train), ("eval", splits.eval))
        }
        _atomic_save({"key": key, "logps": logps}, path)
    dist.barrier()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("key") != key:
        raise RuntimeError(f"reference cache {path} holds key {saved.get('key')}, expected {key}")
    logps = saved["logps"]
    if logps["train"].shape[0] != len(splits.train) or logps["eval"].shape[0] != len(splits.eval):
        raise RuntimeError(f"reference cache {path} does not match the data; delete it")
    return logps, hit, path
