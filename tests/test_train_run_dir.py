"""The output directory as a misusing user meets it: a second run in another run's directory, two runs at
once, kill -9 in the middle of a save, --resume with changed options, an unwritable directory, --fsdp
without torchrun. Tiny models as in test_train.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_train import REPO, model_dir, pair_rows, run, write_jsonl  # noqa: E402

from fastpref.train import checkpoint, loop, make_config, modeling, run_dir, train  # noqa: E402
from fastpref.train.distributed import Dist  # noqa: E402
from fastpref.train.metrics import read_jsonl  # noqa: E402


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows())


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (but the lock) and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != run_dir.LOCK_FILE}


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: the error must come before."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(modeling, "load_model_and_tokenizer", load)


# --- another run's directory ---


def test_a_new_run_refuses_another_runs_directory_and_leaves_it_whole(tmp_path, pairs_file):
    _, out = run("dpo", tmp_path, pairs_file, max_steps=4, save_steps=2)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"holds another run's files \(checkpoint-2, checkpoint-4, .*--resume.*"
                                         r"--overwrite_output_dir"):
        run("dpo", tmp_path, pairs_file, max_steps=2, save_steps=1, save_total_limit=1, learning_rate=5e-4)
    assert _snapshot(out) == before


def test_overwrite_moves_the_other_run_aside_and_resume_continues_the_new_run(tmp_path, pairs_file):
    _, out = run("dpo", tmp_path, pairs_file, max_steps=6, save_steps=2)
    old_id = json.loads((out / "run.json").read_text())["run_id"]
    old_files = _snapshot(out)
    run("dpo", tmp_path, pairs_file, max_steps=2, save_steps=1, save_total_limit=1, overwrite_output_dir=True)
    aside = out / "previous_runs" / old_id
    assert _snapshot(aside) == old_files  # every file of the old run, byte for byte, nothing deleted
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # the new run's, pruned to 1
    new_id = json.loads((out / "run.json").read_text())["run_id"]
    assert new_id != old_id
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["run_id"] == new_id
    assert _steps(out) == [1, 2]
    # --resume continues the new run (not the old run's checkpoint-6), under the same identity
    run("dpo", tmp_path, pairs_file, max_steps=3, save_steps=1, save_total_limit=1, resume_from_checkpoint="last")
    assert _steps(out) == [1, 2, 3]
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["run_id"] == new_id
    assert json.loads((out / "run.json").read_text())["run_id"] == new_id


def test_prune_counts_and_removes_only_this_runs_checkpoints(tmp_path):
    for step, owner in ((1, "old"), (2, "old"), (3, "new"), (4, "new"), (5, "new")):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "run_id": owner}))
    checkpoint.prune(tmp_path, 2, "new")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-4", "checkpoint-5"]


# --- two runs at once ---


def test_a_second_run_is_refused_while_another_writes_the_directory(tmp_path, pairs_file):
    """A real claim held by another process; once that process is killed (-9) the directory is free."""
    out = tmp_path / "out"
    holder_code = (
        "import sys, time\n"
        "from fastpref.train import make_config, run_dir\n"
        "from fastpref.train.distributed import Dist\n"
        "held = run_dir.claim(make_config('dpo', model_name_or_path='x', output_dir=sys.argv[1]), Dist())\n"
        "print('held', flush=True)\n"
        "time.sleep(300)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = rf"--output_dir {out} is in use by another fastpref run \(pid {holder.pid}"
        with pytest.raises(ValueError, match=busy):
            run("dpo", tmp_path, pairs_file, max_steps=1)
    finally:
        holder.kill()
        holder.wait()
    run("dpo", tmp_path, pairs_file, max_steps=1)  # the holder's files are only its run.json: nothing to refuse
    assert _steps(out) == [1]


# --- interrupted saves ---


def test_kill_9_in_the_middle_of_a_save_is_cleaned_up_on_the_next_start(tmp_path, pairs_file):
    out = tmp_path / "out"
    # SIGKILL once checkpoint-4's files are written, before its directory is renamed into place
    script = (
        "import os, signal, sys\n"
        "from fastpref.train import make_config, train\n"
        "real_replace = os.replace\n"
        "def replace(src, dst, *args, **kwargs):\n"
        "    if str(src).endswith('.checkpoint-4.tmp'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real_replace(src, dst, *args, **kwargs)\n"
        "os.replace = replace\n"
        "train(make_config('dpo', model_name_or_path=sys.argv[1], dataset_name=sys.argv[2], output_dir=sys.argv[3],\n"
        "                  max_steps=6, save_steps=2, per_device_train_batch_size=4, logging_steps=1,\n"
        "                  disable_tqdm=True, plot=False, max_length=64, torch_threads=1))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, model_dir(), str(pairs_file), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    assert (out / ".checkpoint-4.tmp").is_dir() and (out / "checkpoint-2").is_dir()
    # the resumed run ends before step 4, so only the start-up can have removed the half-written save
    run("dpo", tmp_path, pairs_file, max_steps=3, save_steps=2, resume_from_checkpoint="last")
    assert not list(out.glob(".checkpoint-*"))
    assert _steps(out) == [1, 2, 3]


def test_a_checkpoint_renamed_away_by_an_interrupted_re_save_is_put_back(tmp_path):
    out = tmp_path / "out"
    old = out / ".checkpoint-4.old"  # a kill fell between `checkpoint-4 -> .old` and `.tmp -> checkpoint-4`
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (out / ".checkpoint-4.tmp").mkdir()
    config = make_config("dpo", model_name_or_path="x", output_dir=str(out), resume_from_checkpoint="last")
    claimed = run_dir.claim(config, Dist())
    claimed.release()
    assert claimed.resume_from == out / "checkpoint-4"
    assert sorted(p.name for p in out.iterdir()) == [run_dir.LOCK_FILE, "checkpoint-2", "checkpoint-4", "run.json"]


# --- resume with changed options ---


def test_resume_applies_the_options_that_may_change(tmp_path, pairs_file, monkeypatch):
    base = dict(max_steps=2, save_steps=2, lr_scheduler_type="constant", learning_rate=1e-3, weight_decay=0.0)
    run("dpo", tmp_path, pairs_file, **base)
    in_force = []
    original = loop.Trainer._step

    def spy(self):
        in_force.append({k: self.optimizer.param_groups[0][k] for k in ("lr", "weight_decay", "betas")})
        return original(self)

    monkeypatch.setattr(loop.Trainer, "_step", spy)
    _, out = run("dpo", tmp_path, pairs_file, **{**base, "max_steps": 4, "learning_rate": 5e-4, "weight_decay": 0.1,
                                                 "adam_beta2": 0.99}, resume_from_checkpoint="last")
    assert in_force == [{"lr": 5e-4, "weight_decay": 0.1, "betas": (0.9, 0.99)}] * 2
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["learning_rate"] for r in rows] == [1e-3, 1e-3, 5e-4, 5e-4]
    settings = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["settings"]
    assert (settings["learning_rate"], settings["weight_decay"]) == (5e-4, 0.1)


@pytest.mark.parametrize("change", [
    {"per_device_train_batch_size": 2}, {"gradient_accumulation_steps": 2}, {"seed": 7}, {"max_length": 48},
    {"dataset": "other"}, {"loss": "simpo"}, {"task": "sft"},
], ids=lambda c: next(iter(c)))
def test_resume_refuses_the_options_that_may_not_change(tmp_path, pairs_file, request, change):
    run("dpo", tmp_path, pairs_file, max_steps=2, save_steps=2)
    task, data, options = "dpo", pairs_file, dict(change)
    if "dataset" in options:
        data = write_jsonl(tmp_path / "other.jsonl", pair_rows(6, 2))
        name = "dataset_name"
        del options["dataset"]
    elif "task" in options:
        task, name = options.pop("task"), "fastpref train dpo"
    else:
        name = next(iter(options))
    request.getfixturevalue("no_model_load")
    with pytest.raises(ValueError, match=f"--resume.*{name}"):
        run(task, tmp_path, data, max_steps=4, save_steps=2, resume_from_checkpoint="last", **options)


def test_a_damaged_trainer_state_is_named_before_the_model_loads(tmp_path, pairs_file, request):
    _, out = run("dpo", tmp_path, pairs_file, max_steps=2, save_steps=2)
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "run_')  # cut short
    request.getfixturevalue("no_model_load")
    with pytest.raises(ValueError, match=r"--resume .*checkpoint-2: its trainer_state.json cannot be read"):
        run("dpo", tmp_path, pairs_file, max_steps=4, resume_from_checkpoint="last")


# --- start-up checks that come before the model loads ---


@pytest.mark.parametrize("case", ["under_a_file", "read_only"])
def test_an_unwritable_output_dir_fails_before_the_model_loads(tmp_path, pairs_file, no_model_load, case):
    if case == "under_a_file":
        (tmp_path / "file").write_text("not a directory")
        out = tmp_path / "file" / "out"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        out = tmp_path / "read-only"
        out.mkdir()
        out.chmod(0o555)
    with pytest.raises(ValueError, match=f"--output_dir {out}: cannot write there"):
        run("dpo", tmp_path, pairs_file, output_dir=str(out))


def test_fsdp_without_torchrun_fails_before_the_model_loads(tmp_path, pairs_file, no_model_load):
    with pytest.raises(ValueError, match="--fsdp .* torchrun"):
        run("dpo", tmp_path, pairs_file, fsdp=True)


@pytest.mark.parametrize("inside", ["model", "dataset"])
def test_an_output_dir_holding_the_runs_inputs_is_refused(tmp_path, pairs_file, no_model_load, inside):
    """With --overwrite_output_dir the inputs would be moved aside under the run's feet."""
    out = Path(model_dir()) if inside == "model" else tmp_path
    before = _snapshot(out)
    with pytest.raises(ValueError, match=f"--{inside} .* lies in --output_dir {out}, where this run writes"):
        run("dpo", tmp_path, pairs_file, output_dir=str(out), overwrite_output_dir=True)
    assert _snapshot(out) == before


def test_a_missing_dataset_fails_before_the_model_loads(tmp_path, no_model_load):
    with pytest.raises(FileNotFoundError, match="--dataset .*nope.jsonl' not found"):
        run("dpo", tmp_path, tmp_path / "nope.jsonl")
    assert not (tmp_path / "out").exists()


def test_resume_without_a_checkpoint_fails_before_the_model_loads(tmp_path, pairs_file, no_model_load):
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        run("dpo", tmp_path, pairs_file, resume_from_checkpoint="last")


# --- weights that turn non-finite ---


def test_weights_that_turn_non_finite_stop_the_run_before_they_are_saved(tmp_path, pairs_file):
    out = tmp_path / "out"
    config = make_config("dpo", model_name_or_path=model_dir(), dataset_name=str(pairs_file), output_dir=str(out),
                         per_device_train_batch_size=4, max_steps=3, save_steps=1, disable_tqdm=True, plot=False,
                         max_length=64, torch_threads=1)
    config.learning_rate = float("inf")  # past the option checks, as an optimizer or schedule bug would be
    threads = torch.get_num_threads()
    try:
        with pytest.raises(loop.TrainingStopped, match="step 1: the optimizer step left non-finite weights"):
            train(config)
    finally:
        torch.set_num_threads(threads)
    assert not list(out.glob("*checkpoint-*")) and not list(out.glob("*.safetensors"))
