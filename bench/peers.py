"""The peer libraries the harness compares with, each optional: their versions, and why one
cannot be imported (a missing peer is skipped with that note, never an error)."""

from __future__ import annotations

import importlib
from importlib import metadata

# distribution name on PyPI, per short name used in method names
DISTRIBUTIONS = {"trl": "trl", "liger": "liger-kernel", "cce": "cut-cross-entropy"}


def versions() -> dict[str, str | None]:
    """{short name: installed version, or None}."""
    found = {}
    for name, distribution in DISTRIBUTIONS.items():
        try:
            found[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def missing(module: str) -> str | None:
    """None when `module` imports, else why not (e.g. "liger_kernel.chunked_loss not importable: ...")."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        return f"{module} not importable: {error}"
    return None


def needs(module: str):
    """A `Method.unavailable` check: the peer module must import."""
    return lambda config, device: missing(module)
