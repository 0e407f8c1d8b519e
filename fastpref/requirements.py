"""Is what an extra needs installed, at or above its floor? One source of truth: the floors that pyproject.toml
declares, read back from the installed distribution's metadata, so `fastpref train` on torch 2.8 stops at once with
"needs torch>=2.9 (installed: 2.8.0)" instead of an AttributeError in the middle of a checkpoint."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement


def missing(extra: str) -> list[str]:
    """What `fastpref[extra]` declares and this environment lacks: "torch>=2.9 (installed: 2.8.0)", "peft (missing)".
    Empty when fastpref runs from a source tree without its metadata (nothing to check against)."""
    try:
        declared = requires("fastpref") or []
    except PackageNotFoundError:
        return []
    problems = []
    for requirement in map(Requirement, declared):
        if requirement.marker is None or not requirement.marker.evaluate({"extra": extra}):
            continue  # a core dependency (pip enforced it) or another extra's
        wanted = f"{requirement.name}{requirement.specifier}"
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            problems.append(f"{wanted} (missing)")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{wanted} (installed: {installed})")
    return problems


def check(extra: str, what: str) -> None:
    """Raise ImportError naming every unmet requirement of `fastpref[extra]`, and the install command."""
    problems = missing(extra)
    if problems:
        raise ImportError(f"{what} needs {', '.join(problems)}: pip install 'fastpref[{extra}]'")
