"""SIGINT / SIGTERM during `fastpref train`: the step under way finishes, checkpoint-<step> is written, one line says
so, the exit status is 130, and --resume from it gives the weights of an uninterrupted run. Under torchrun a signal
to one rank stops every rank after the same step (both write their part of the one checkpoint)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_train import _weights, model_dir, pair_rows, run, write_jsonl  # noqa: E402
from test_train_distributed import WORKER, _cli  # noqa: E402

from fastpref.train.metrics import read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = 60  # long enough that the signal, sent once step 1 is logged, lands well before the end


def _options(out: Path, data: Path) -> dict:
    return dict(model_name_or_path=model_dir(), dataset_name=str(data), output_dir=str(out),
                per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=STEPS, logging_steps=1,
                learning_rate=1e-3, disable_tqdm=True, plot=False, max_length=64, save_steps=1000, eval_fraction=0.0)


def _wait_for_a_logged_step(process: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and any("loss" in row for row in read_jsonl(metrics)):
            return
        assert process.poll() is None, "the run ended before a step was logged"
        time.sleep(0.02)
    raise AssertionError("no step logged in time")


def test_sigint_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    out = tmp_path / "interrupted"
    options = _options(out, data)
    cli_options = {("model" if k == "model_name_or_path" else "dataset" if k == "dataset_name" else k): v
                   for k, v in options.items()}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "fastpref.cli", "train", "dpo", *_cli(cli_options),
                                "--torch_threads", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _wait_for_a_logged_step(process, out)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    step = int(next(p.name for p in out.glob("checkpoint-*")).removeprefix("checkpoint-"))
    assert 1 <= step < STEPS
    assert stderr.strip().splitlines()[-1] == (
        f"fastpref train dpo: interrupted at step {step}; checkpoint-{step} saved; continue with --resume")
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]

    run("dpo", tmp_path, data, **{**options, "resume_from_checkpoint": "last"})
    run("dpo", tmp_path, data, **{**options, "output_dir": str(tmp_path / "straight")})
    resumed, straight = _weights(out), _weights(tmp_path / "straight")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.split(b"=", 1)[1]) for v in environ if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
@pytest.mark.parametrize("how", ["sigterm-to-rank-1", "ctrl-c"])
def test_a_signal_stops_every_rank_at_the_same_step(tmp_path, how):
    """SIGTERM to one rank only (rank 0 must stop with it), or Ctrl-C: SIGINT to the whole process group, which
    torchrun's agent forwards to each worker a second time."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    out = tmp_path / "ddp"
    options = {**_options(out, data), "per_device_train_batch_size": 2, "torch_threads": 1}
    cli_options = {("model" if k == "model_name_or_path" else "dataset" if k == "dataset_name" else k): v
                   for k, v in options.items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log_file = tmp_path / "ddp.log"
    with open(log_file, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                    "2", str(WORKER), "dpo", *_cli(cli_options)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for_a_logged_step(process, out)
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            ranks = {_rank_of(pid): pid for pid in _children(process.pid)}
            os.kill(ranks[1], signal.SIGTERM)
        process.wait(timeout=180)
    text = log_file.read_text()
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, text[-4000:]
    step = int(checkpoints[0].name.removeprefix("checkpoint-"))
    assert 1 <= step < STEPS
    for rank in (0, 1):  # each rank wrote its part of the same checkpoint, and says where it stopped
        assert (checkpoints[0] / f"rng_state_{rank}.json").exists()
        assert f"rank {rank}: interrupted at step {step}; checkpoint-{step} saved; continue with --resume" in text
    # no traceback through fastpref or the worker (torchrun's agent prints its own for a failed or signalled job)
    assert not [line for line in text.splitlines() if line.lstrip().startswith("File ") and
                ("fastpref/" in line or "train_worker.py" in line)], text[-4000:]


def test_a_second_signal_stops_at_once_unless_it_is_the_same_request(monkeypatch):
    """Under torchrun a Ctrl-C reaches a worker twice within milliseconds (terminal, then the agent): that is one
    request; a second Ctrl-C seconds later stops at once."""
    from fastpref.train.loop import StopSignals

    now = [100.0]
    monkeypatch.setattr("fastpref.train.loop.time.monotonic", lambda: now[0])
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a pytest-xdist worker
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT
        now[0] += 0.1
        os.kill(os.getpid(), signal.SIGINT)  # the same request, forwarded
        now[0] += StopSignals.REPEAT_S
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is before  # restored
