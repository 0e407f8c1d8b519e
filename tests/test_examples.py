"""The README's Python blocks are runnable scripts in examples/: each runs as a user runs it, from the repo root,
and the README names each one."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
NEEDS = {"trl_patch.py": "trl"}


def test_the_readme_names_every_example():
    readme = (REPO / "README.md").read_text()
    assert EXAMPLES and [p.name for p in EXAMPLES if f"examples/{p.name}" not in readme] == []


def test_every_example_runs():
    """One interpreter for all of them (each script as __main__), so the suite pays torch's import once."""
    runnable = [p for p in EXAMPLES if importlib.util.find_spec(NEEDS.get(p.name, "torch")) is not None]
    code = ("import runpy, sys\n"
            "for path in sys.argv[1:]:\n"
            "    print('running', path, flush=True)\n"
            "    sys.argv = [path]  # as `python examples/<name>.py` gives it\n"
            "    runpy.run_path(path, run_name='__main__')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, *map(str, runnable)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("running ") == len(runnable)
