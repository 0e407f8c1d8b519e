"""The output directory of a run: who owns it, a lock, and what a new run may do with what is there.

- `run.json` names the run that owns the directory (a random run_id, task, pid, host, start time); every
  checkpoint's trainer_state.json records the same run_id and the options the run was started with.
- A new run (no --resume) refuses a directory that holds another run's files, unless
  --overwrite_output_dir: then those files move into `previous_runs/<their run_id>/`. Nothing is deleted.
- `--resume` continues the run of its checkpoint (its run_id), with the options that may change
  (`config.resume_changes`); the checkpoint is found and checked here, before any model loads.
- A lock file (`filelock`: the OS drops it when the process dies, kill -9 included) keeps a second run
  out of a directory while one writes there.
- Interrupted saves are cleaned up on the next start: `.checkpoint-N.tmp` directories are removed, and a
  `.checkpoint-N.old` whose `checkpoint-N` is missing (a kill between the two renames of a re-save) is
  put back.

Rank 0 does the file work; every rank raises if it fails, so no rank waits at a barrier for a run that
will not start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastpref.train import checkpoint
from fastpref.train.config import OBJECTIVE_OPTIONS, TrainConfig, resume_changes
from fastpref.train.distributed import Dist

log = logging.getLogger("fastpref.train")

LOCK_FILE = ".fastpref.lock"
RUN_FILE = "run.json"
PREVIOUS = "previous_runs"
_OURS = (LOCK_FILE, RUN_FILE, PREVIOUS)


@dataclass
class RunDir:
    """A claimed output directory (rank 0 holds its lock); `settings` are the options in force, as given
    (before an SFT warm-up points the model at its result)."""

    path: Path
    run_id: str | None = None
    settings: dict = field(default_factory=dict)
    resume_from: Path | None = None
    _lock: object = None

    def trainer_state(self) -> dict:
        """What every checkpoint's trainer_state.json records about the run."""
        return {"run_id": self.run_id, "settings": self.settings}

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def claim(config: TrainConfig, dist: Dist) -> RunDir:
    """Lock `config.run_dir()` for this run and check that it may write there (every rank calls this)."""
    path = Path(config.run_dir())
    error, run = None, RunDir(path)
    if dist.main:
        try:
            run = _claim(config, path, dist.world)
        except (ValueError, FileNotFoundError) as e:
            error = e
    if dist.any(error is not None):
        raise error or ValueError(f"--output_dir {path}: rank 0 could not start the run there (see its message)")
    return run


def _claim(config: TrainConfig, path: Path, world: int) -> RunDir:
    lock = _lock(path)
    try:
        _clean_interrupted_saves(path)
        owner = _read_run_file(path)
        resume_from, saved = None, {}
        if config.resume_from_checkpoint:
            resume_from = checkpoint.resolve(path, config.resume_from_checkpoint)
            try:
                saved = json.loads((resume_from / "trainer_state.json").read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"--resume {resume_from}: its trainer_state.json cannot be read ({e})") from None
            _check_resume(saved, config, resume_from, world)
        # a checkpoint inside the directory continues its run, also one written before runs had an id
        inside = resume_from is not None and resume_from.resolve().parent == path.resolve()
        run_id = saved.get("run_id") or (inside and (owner or {}).get("run_id")) or uuid.uuid4().hex[:12]
        same_run = inside or (owner is not None and owner.get("run_id") == run_id)
        others = [] if same_run else _their_files(path)
        if others:
            if not config.overwrite_output_dir:
                listed = sorted(others, key=lambda name: (not name.startswith("checkpoint-"), name))
                shown = ", ".join(listed[:6]) + (", ..." if len(others) > 6 else "")
                raise ValueError(
                    f"--output_dir {path} holds another run's files ({shown}): add --resume to continue that run, "
                    f"--overwrite_output_dir to start a new one there (its files move to {path / PREVIOUS}/), "
                    "or choose another --output_dir"
                )
            _move_aside(path, others, owner)
        _write_run_file(path, config, run_id, resume_from)
    except BaseException:
        lock.release()
        raise
    return RunDir(path, run_id, dataclasses.asdict(config), resume_from, lock)


def _lock(path: Path):
    from filelock import FileLock, Timeout

    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path / LOCK_FILE), timeout=0)
        lock.acquire()
    except Timeout:
        owner = _read_run_file(path) or {}
        who = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}" if owner else "unknown"
        raise ValueError(
            f"--output_dir {path} is in use by another fastpref run ({who}); wait for it to end or choose another "
            "--output_dir"
        ) from None
    except OSError as e:
        raise ValueError(f"--output_dir {path}: cannot write there ({e.strerror or e})") from None
    return lock


def _read_run_file(path: Path) -> dict | None:
    try:
        owner = json.loads((path / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _write_run_file(path: Path, config: TrainConfig, run_id: str, resume_from: Path | None) -> None:
    record = {"run_id": run_id, "task": config.task, "model": config.model_name_or_path, "pid": os.getpid(),
              "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "resumed_from": None if resume_from is None else str(resume_from)}
    tmp = path / f".{RUN_FILE}.tmp"
    try:
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path / RUN_FILE)
    except OSError as e:
        raise ValueError(f"--output_dir {path}: cannot write there ({e.strerror or e})") from None


def _their_files(path: Path) -> list[str]:
    """The entries of `path` that another run wrote (anything but the lock, run.json and previous_runs)."""
    return [entry.name for entry in path.iterdir() if entry.name not in _OURS]


def _move_aside(path: Path, names: list[str], owner: dict | None) -> None:
    """Move another run's files into previous_runs/<its run_id>/ (run.json last, so a kill halfway leaves
    the remaining files still named by it)."""
    label = (owner or {}).get("run_id") or time.strftime("unnamed-%Y%m%d-%H%M%S")
    target = path / PREVIOUS / label
    n = 1
    while target.exists():
        n += 1
        target = path / PREVIOUS / f"{label}-{n}"
    target.mkdir(parents=True)
    for name in names:
        os.replace(path / name, target / name)
    if (path / RUN_FILE).exists():
        os.replace(path / RUN_FILE, target / RUN_FILE)
    log.warning("--overwrite_output_dir: moved the previous run's files (%s) into %s", ", ".join(sorted(names)), target)


def _clean_interrupted_saves(path: Path) -> None:
    """Remove `.checkpoint-N.tmp` (a save that never finished); put back `.checkpoint-N.old` when its
    `checkpoint-N` is missing (the kill fell between the two renames of a re-save), else remove it."""
    for entry in sorted(path.glob(".checkpoint-*")):
        if not entry.is_dir():
            continue
        if entry.name.endswith(".old"):
            final = path / entry.name[1:].removesuffix(".old")
            if not final.exists():
                os.replace(entry, final)
                log.warning("restored %s from %s (a save was interrupted)", final.name, entry.name)
                continue
        elif not entry.name.endswith(".tmp"):
            continue
        shutil.rmtree(entry)
        log.info("removed %s, left by an interrupted save", entry.name)


def _check_resume(saved: dict, config: TrainConfig, resume_from: Path, world: int) -> None:
    """Refuse options that cannot change within a run; log the ones that change and are applied."""
    settings = saved.get("settings")
    if settings is None:
        log.warning("%s records no options (an older checkpoint): changed options cannot be checked", resume_from)
        return
    changed = resume_changes({**settings, "task": saved.get("task", settings.get("task"))}, config,
                             (saved.get("world_size", 1), world))
    for name, (old, new) in changed.items():
        note = " (the objective changes from here on)" if name in OBJECTIVE_OPTIONS else ""
        log.warning("--resume: --%s %r -> %r, applied%s", name, old, new, note)
