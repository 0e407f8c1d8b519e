"""After `make test-latest` failed: which installed releases differ from the pinned set (constraints.txt)?

    python .ci/drift.py constraints.txt

Prints one line per package whose installed version is not the pinned one (newer, older or new to the set), so the
CI log names the release that broke the suite: bound it in pyproject.toml or fix the code, with a test, then
`make lock`.
"""

from __future__ import annotations

import sys
from importlib.metadata import distributions

from packaging.utils import canonicalize_name


def pinned(path: str) -> dict[str, str]:
    """{canonical name: version} of the `name==version` lines of a constraints file."""
    pins = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    """{canonical name: version, local label dropped} of this environment's distributions."""
    found = {canonicalize_name(d.metadata["Name"]): d.version.split("+")[0] for d in distributions()}
    for tool in ("fastpref", "pip", "setuptools", "wheel"):  # ours, and what `pip freeze` leaves out
        found.pop(tool, None)
    return found


def main(lock: str) -> None:
    pins, have = pinned(lock), installed()
    changed = [f"{name} {have[name]} (pinned {pins[name]})" for name in sorted(have.keys() & pins.keys())
               if have[name] != pins[name]]
    new = [f"{name} {have[name]} (not pinned)" for name in sorted(have.keys() - pins.keys())]
    if not changed and not new:
        print(f"test-latest failed with exactly the releases of {lock}: the failure is not drift.")
        return
    print(f"test-latest failed; releases that differ from {lock}:")
    for line in changed + new:
        print(f"  {line}")


if __name__ == "__main__":
    main(sys.argv[1])
