"""The README and `--help` agree: the README's table of `fastpref train` options lists exactly the options each task's
`--help` prints, with the defaults it prints; every `--option` the README names exists; every FASTPREF_* variable
the package reads is in the README's table of environment variables."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from unittest import mock

import pytest

pytest.importorskip("transformers")

from fastpref import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TASKS = tuple(cli.TASKS)  # every task fastpref train runs
BEGIN, END = "<!-- options table: begin -->", "<!-- options table: end -->"


def help_text(*argv: str) -> str:
    """What `fastpref <argv> --help` prints, at a terminal width of 100 columns."""
    out = io.StringIO()
    with mock.patch.dict(os.environ, {"COLUMNS": "100"}), contextlib.redirect_stdout(out), \
            contextlib.suppress(SystemExit):
        cli.main([*argv, "--help"])
    return out.getvalue()


def help_options(text: str) -> dict[str, str]:
    """{option: default as --help prints it} from the options part of a --help text ('' where none is printed)."""
    options, name, body = {}, None, []
    for line in text.splitlines():
        match = re.match(r"^  (--[a-z][a-z0-9_]*)", line)
        if match or not line.startswith("  "):
            if name:
                joined = " ".join(" ".join(body).split())
                default = joined.rsplit("(default: ", 1)[1][:-1] if "(default: " in joined else ""
                options[name] = default
            name, body = (match.group(1), [line]) if match else (None, [])
        elif name:
            body.append(line)
    options.pop("--help", None)
    return options


def expected_table() -> str:
    defaults = {task: help_options(help_text("train", task)) for task in TASKS}
    names = list(dict.fromkeys(name for task in TASKS for name in defaults[task]))
    rows = [f"| option | {' | '.join(TASKS)} |", "|---" * (len(TASKS) + 1) + "|"]
    for name in names:
        cells = [f"`{defaults[task][name]}`" if name in defaults[task] else "—" for task in TASKS]
        rows.append(f"| `{name}` | {' | '.join(cells)} |")
    return "\n".join(rows)


def test_the_readme_table_lists_every_option_with_the_default_help_prints():
    table = README.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    expected = expected_table()
    assert table == expected, f"README.md's options table is stale; between the markers it should read:\n{expected}"


def test_every_option_the_readme_names_exists():
    known = set()
    for argv in [("train", task) for task in TASKS] + [("score",), ("bench",), ()]:
        known |= set(re.findall(r"--[a-z][a-z0-9_]*", help_text(*argv)))
    from fastpref.train.trl_names import NO_EFFECT, TASK_DEFAULTS, TRANSLATED  # TRL's names fastpref translates,
    # accepts without effect, or accepts only at TRL's default (refusing other values by name)
    known |= {f"--{name}" for name in (*TRANSLATED, *NO_EFFECT, *(n for d in TASK_DEFAULTS.values() for n in d))}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*(?![\w-])", README))
    not_ours = {"--nproc_per_node", "--dist"}  # torchrun's, pytest-xdist's
    assert sorted(named - known - not_ours) == []


def test_every_environment_variable_the_package_reads_is_documented():
    read = set()
    for path in (REPO / "fastpref").rglob("*.py"):
        read |= set(re.findall(r"environ(?:\.get)?\(?\[?\"(FASTPREF_[A-Z_]+)\"", path.read_text()))
    assert read >= {"FASTPREF_BACKEND", "FASTPREF_CACHE"}
    section = README.split("### Environment variables", 1)[1].split("###", 1)[0]
    assert sorted(name for name in read if f"`{name}`" not in section) == []
