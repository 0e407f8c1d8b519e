"""The benchmark harness end to end on the smallest CPU shape: the records it appends, the errors
it measures, the plot; every method that runs here matches the reference; a wrong gradient is
caught; a missing peer is skipped with a note, a failing method noted while the others run, the
time box honoured; `cpu_memory.py`'s runs; `make gpu-check`'s plumbing (--dry-run)."""

import dataclasses
import json
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from fastpref.bench import cpu_memory, gpu_check, harness, linear, logits
from fastpref.bench.configs import CONFIGS
from fastpref.bench.workload import Method

TINY = CONFIGS["cpu-tiny"]
CPU = torch.device("cpu")
RECORD_FIELDS = {
    "op", "workload", "config", "method", "mode", "seqs", "seq_len", "hidden", "vocab", "softcap", "valid_tokens",
    "dtype", "p20_ms", "p50_ms", "p80_ms", "peak_extra_mb", "floor_ms", "grad_error", "value_error",
    "device", "device_name", "threads", "torch", "triton", "peers", "timestamp", "ceilings",
}  # fmt: skip
WORKLOADS = {"logits": {"sequence_logps"}, "linear": {"linear_sequence_logps", "linear_dpo_loss"}}
PEER_MODULES = (
    "trl.trainer.utils",
    "liger_kernel.transformers.cross_entropy",
    "liger_kernel.chunked_loss",
    "cut_cross_entropy",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--configs", "cpu-tiny", "--methods", "textbook", "fastpref-torch", "--out", str(out)]
    assert harness.main(argv) == 0
    return out


@pytest.mark.parametrize("op", ["logits", "linear"])
def test_records_and_plot(results, op):
    records = [json.loads(line) for line in (results / f"{op}.jsonl").read_text().splitlines()]
    assert {r["workload"] for r in records} == WORKLOADS[op]
    assert {r["method"] for r in records} == {"textbook", "fastpref-torch"}
    for r in records:
        assert RECORD_FIELDS <= r.keys(), RECORD_FIELDS - r.keys()
        assert r["config"] == "cpu-tiny" and r["device"] == "cpu" and r["torch"] == torch.__version__
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["peak_extra_mb"] > 0
        assert r["gbps" if op == "logits" else "tflops"] > 0
        assert (r["floor_ms"] is not None) == (op == "linear")
        assert r["grad_error"] < 1e-5 and r["value_error"] < 1e-5, r  # fp32 against fp64
        assert {"copy_gbps", "gemm_tflops"} <= r["ceilings"].keys()
        assert set(r["peers"]) == {"trl", "liger", "cce"}
    assert (results / f"{op}.png").read_bytes().startswith(b"\x89PNG")


def _straight_through(z: torch.Tensor) -> torch.Tensor:
    """0 in value; gradient 1 for every element of z, per sequence of (B, ..., ...)."""
    return (z - z.detach()).flatten(1).sum(-1)


@pytest.mark.parametrize(
    "workload, wrong",
    [
        (logits.WORKLOADS[0], lambda x: logits.textbook(x) + 0.01 * _straight_through(x.logits.float())),
        (linear.WORKLOADS[0], lambda x: linear.textbook_logps(x) + 0.01 * _straight_through(x.hidden.float())),
    ],
)
def test_gradient_error_catches_a_wrong_gradient(workload, wrong):
    """Right values, gradients off by 1% of their scale: the gradient error says so."""
    right = next(m for m in workload.methods if m.name == "textbook")
    x = workload.setup(TINY, CPU)
    assert harness.check_accuracy(workload, right, x)["grad_error"] < 1e-6
    errors = harness.check_accuracy(workload, Method("wrong", wrong), x)
    assert errors["value_error"] < 1e-6
    assert errors["grad_error"] > 1e-3


def test_missing_peers_are_skipped_with_a_note(monkeypatch):
    for module in PEER_MODULES:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    notes = {}
    records = harness.run(logits.WORKLOADS, [TINY], ["textbook", "trl", "liger"], CPU, repeats=1, notes=notes)
    assert {r["method"] for r in records} == {"textbook"}
    assert any(note.startswith("trl") and "not importable" in note for note in notes)
    assert any(note.startswith("liger") and "not importable" in note for note in notes)


def test_a_failing_method_is_noted_and_the_others_still_run():
    def broken(x):
        raise RuntimeError("kernel launch failed\nsecond line")

    workload = logits.WORKLOADS[0]
    workload = dataclasses.replace(workload, methods=(Method("broken", broken), *workload.methods))
    notes = {}
    records = harness.run([workload], [TINY], ["broken", "textbook"], CPU, repeats=1, notes=notes)
    assert {r["method"] for r in records} == {"textbook"}
    assert notes == {"broken (sequence_logps): FAILED, RuntimeError: kernel launch failed": ["cpu-tiny"]}


ALL_METHODS = [(w, m) for workloads in harness.OPS.values() for w in workloads for m in w.methods]


@pytest.mark.parametrize("workload, method", ALL_METHODS, ids=[f"{w.name}-{m.name}" for w, m in ALL_METHODS])
def test_every_method_that_runs_here_matches_the_reference(workload, method):
    """Values and gradients (non-uniform upstream) of each method against the fp64 textbook, on the
    softcap shape where the method takes a softcap, else on the plain one."""
    config = next((c for c in (CONFIGS["cpu-softcap"], TINY) if not method.unavailable(c, CPU)), None)
    if config is None:
        pytest.skip(method.unavailable(TINY, CPU))
    with harness.environment(method.env):
        errors = harness.check_accuracy(workload, method, workload.setup(config, CPU))
    assert errors["value_error"] < 1e-5 and errors["grad_error"] < 1e-5, errors


def test_trl_head_scores_only_the_valid_tokens(monkeypatch):
    """TRL's head is called as its trainers call it on a GPU: the valid positions alone."""
    pytest.importorskip("trl.trainer.utils")
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    rows = []
    apply = ChunkedLogProbFunction.apply
    monkeypatch.setattr(ChunkedLogProbFunction, "apply", lambda h, *rest: rows.append(len(h)) or apply(h, *rest))
    x = linear.setup_logps(TINY, CPU)
    linear.trl_chunked_logps(x)
    assert rows == [x.valid_tokens] and x.valid_tokens < x.labels.numel()


def test_torch_linear_cross_entropy_says_why_it_cannot_run(monkeypatch):
    torch_lce = next(m for m in linear.LOGPS_METHODS if m.name == "torch-lce")
    assert torch_lce.unavailable(TINY, CPU) is None
    assert torch_lce.unavailable(CONFIGS["cpu-softcap"], CPU) == "takes no logit softcap"
    monkeypatch.delattr(F, "linear_cross_entropy")
    assert "has no F.linear_cross_entropy" in torch_lce.unavailable(TINY, CPU)


def test_a_spent_time_box_skips_what_is_left_with_a_note():
    notes = {}
    records = harness.run(logits.WORKLOADS, [TINY], ["textbook"], CPU, repeats=1, notes=notes, deadline=0.0)
    assert records == []
    assert notes == {"textbook (sequence_logps): skipped, the time box (--time_box) was spent": ["cpu-tiny"]}


@pytest.mark.parametrize("method", cpu_memory.METHOD_NAMES)
def test_cpu_memory_run(method):
    """One cpu_memory.py run in this process, on a small vocabulary: its row and the markdown table."""
    if cpu_memory.method(method).unavailable(cpu_memory.config(512), CPU):
        pytest.skip(cpu_memory.method(method).unavailable(cpu_memory.config(512), CPU))
    row = cpu_memory.run_one(method, 512, repeats=1, threads=1)
    assert row["valid_tokens"] == 4096 * 3 // 4 and row["tokens"] == 4096 and row["vocab"] == 512
    assert row["p50_s"] > 0 and row["p50_cpu_s"] > 0 and row["peak_extra_mb"] >= 0 and row["grads_mb"] == 9.0
    assert row["torch"] == torch.__version__ and row["threads"] == 1 and row["cpu"]
    assert f"| 512 | {method} |" in cpu_memory.markdown([row])


def _e2e_records(task: str, folder) -> list[dict]:
    """`fastpref bench e2e`'s records of one task at toy size, fastpref and patched TRL, in this process."""
    pytest.importorskip("trl")
    from fastpref.bench import e2e

    toy, threads = e2e.QUICK, torch.get_num_threads()
    model_dir, data = e2e.prepare(toy, task, folder)
    try:
        return [e2e.run_one(task, contender, toy, model_dir, data, CPU, threads=1)
                for contender in ("fastpref", "trl-patched")]
    finally:
        torch.set_num_threads(threads)


def test_e2e_times_whole_steps_of_fastpref_train_and_patched_trl(tmp_path):
    """`fastpref bench e2e`'s runs at toy size, in this process: the same tokens per step in both loops (the same
    rows, nothing truncated), one time per step after warm-up, the peak memory, the table and the plot."""
    from fastpref.bench import e2e

    toy, records = e2e.QUICK, _e2e_records("dpo", tmp_path)
    for record in records:
        assert len(record["step_s"]) == len(record["step_cpu_s"]) == toy.timed_steps
        assert all(s > 0 for s in record["step_s"]) and record["peak_mb"] > record["rss_start_mb"] > 0
        assert record["tokens_per_step"] == toy.batch * 2 * toy.max_length  # chosen and rejected, prompt + answer + EOS
    rows = [e2e.summarize([record]) for record in records]
    assert {k for row in rows for k in row} >= {"median_step_s", "median_step_cpu_s", "tokens_per_s", "peak_mb",
                                               "differences", "tokens_per_step", "timed_steps"}
    table = e2e.markdown(rows, "peak RSS", "median_step_cpu_s")
    assert "| dpo | toy | fastpref |" in table and "| dpo | toy | trl-patched |" in table and "| 1.00x |" in table
    e2e.plot(rows, tmp_path / "e2e.png", "toy")
    assert (tmp_path / "e2e.png").stat().st_size > 0
    with pytest.raises(SystemExit) as exit_info:
        harness.main(["e2e", "--help"])  # `fastpref bench e2e` reaches it
    assert exit_info.value.code == 0


@pytest.mark.parametrize("contender", ["fastpref", "trl-logits", "trl-fused"])
def test_rl_step_contenders_compute_the_textbook_step(contender):
    """`fastpref bench rl`'s GRPO step at toy size: each contender (TRL's `_compute_loss` on its stand-in trainer
    included) gives the textbook's loss and gradients on the same tensors, so the benchmark times the same work."""
    from fastpref.bench import rl_step

    reason = rl_step.unavailable(contender)
    if reason:
        pytest.skip(reason)
    results = {}
    for name in ("textbook", contender):
        x = rl_step.setup(rl_step.TOY, CPU, torch.float32)
        loss = rl_step.step(name, x)
        results[name] = (loss, x.hidden.grad, x.weight.grad)
    (want_loss, *want_grads), (loss, *grads) = results["textbook"], results[contender]
    assert want_loss.abs() > 0.1 and all(g.abs().max() > 0 for g in want_grads)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for grad, want in zip(grads, want_grads):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)


def test_rl_step_run_row_and_table():
    from fastpref.bench import rl_step

    threads = torch.get_num_threads()
    try:
        row = rl_step.run_one("fastpref", rl_step.TOY, CPU, repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert row["completions"] == 2 and row["length"] == 16 and row["vocab"] == 1000 and row["dtype"] == "float32"
    assert 16 <= row["completion_tokens"] <= 32 and row["p50_s"] > 0 and row["p50_cpu_s"] > 0
    assert row["peak_extra_mb"] >= 0 and row["device"] == "cpu" and row["torch"] == torch.__version__
    assert "| fastpref | " in rl_step.markdown([rl_step.over_rounds([row, row])])
    with pytest.raises(SystemExit) as exit_info:
        harness.main(["rl", "--help"])  # `fastpref bench rl` reaches it
    assert exit_info.value.code == 0


def test_gpu_check_part_is_killed_at_its_budget():
    sleep = "print('started', flush=True); import time; time.sleep(60)"
    sleeper = gpu_check.Part("sleeper", [sys.executable, "-c", sleep], gpu_check.Budget(2))
    start = time.monotonic()
    outcome = gpu_check.run_part(sleeper)
    assert time.monotonic() - start < 30
    assert outcome.returncode is None and not outcome.ok and outcome.status == "KILLED at its 2 s budget"
    assert outcome.output.startswith("started")


def test_gpu_check_counts_tests_of_a_killed_run():
    output = "\n".join(
        ["tests/test_gpu.py::test_a[x] PASSED [ 10%]", "tests/test_gpu.py::test_b FAILED [ 20%]", "tests/test_gpu.py::"]
    )
    counts, failed = gpu_check.test_counts(output)
    assert counts == {"passed": 1, "failed": 1} and failed == ["tests/test_gpu.py::test_b"]


def test_gpu_check_dry_run(tmp_path):
    """`make gpu-check`'s plumbing on this CPU: every part runs, the records land in --out, one summary."""
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu_check.md").read_text()
    for part in ("| peers | — | 0 | not run: no --wheels", "| tests | ", "| logits | ", "| linear | ", "| e2e | ",
                 "| rl | ", "| fastpref | ", "| textbook | "):
        assert part in text, part
    assert "tests/test_gpu.py: " in text and " skipped" in text
    records = [json.loads(line) for op in gpu_check.OPS for line in (tmp_path / f"{op}.jsonl").read_text().splitlines()]
    assert {r["config"] for r in records} == {"cpu-micro"}
    assert {(r["op"], r["method"]) for r in records} >= {
        ("logits", "textbook"), ("logits", "fastpref-torch"), ("linear", "fastpref-torch"), ("linear", "torch-lce")
    }
    rows = [line for line in text.splitlines() if line.startswith("| linear | cpu-micro | ")]
    assert len(rows) == len({(r["workload"], r["method"]) for r in records if r["op"] == "linear"})
    assert "- cce (linear_sequence_logps): skipped" in text
    assert "===== linear: ok" in (tmp_path / "gpu_check.log").read_text()
    assert "| sft | toy | fastpref |" in (tmp_path / "e2e.md").read_text()


def test_gpu_check_summary_ratios():
    """× TRL against TRL's record of the same shape; × floor against the GEMM floor (linear) or the
    copy bandwidth (logits); fwd+bwd rows only."""
    ceilings = {"copy_gbps": 100.0}
    shape = {"config": "c", "workload": "w", "mode": "fwd+bwd", "peak_extra_mb": 1.0, "grad_error": 0.0}
    records = [
        {**shape, "op": "linear", "method": "trl", "p50_ms": 4.0, "floor_ms": 2.0},
        {**shape, "op": "linear", "method": "fastpref-triton", "p50_ms": 3.0, "floor_ms": 2.0},
        {**shape, "op": "linear", "method": "fastpref-triton", "p50_ms": 1.0, "floor_ms": 0.5, "mode": "fwd"},
        {**shape, "op": "logits", "method": "textbook", "p50_ms": 9.0, "gbps": 25.0, "ceilings": ceilings},
    ]
    rows = [line.split(" | ") for line in gpu_check.results_table(records)[2:]]
    assert [(r[3], r[6], r[7]) for r in rows] == [("trl", "1.00×", "2.00×"), ("fastpref-triton", "0.75×", "1.50×"),
                                                  ("textbook", "—", "4.00×")]  # fmt: skip


def test_e2e_times_grpo_steps_of_fastpref_train_and_patched_trl(tmp_path):
    """`fastpref bench e2e --tasks grpo` at toy size: both loops sample their own completions of the same prompts
    with the same group size and length limit and train on as many tokens (a random model hardly ever samples
    EOS: every completion runs to max_completion_length)."""
    from fastpref.bench import e2e

    toy, records = e2e.QUICK, _e2e_records("grpo", tmp_path)
    full = toy.batch * (toy.prompt_tokens + toy.completion_tokens)  # completions a step, each prompt + completion
    for record in records:
        assert len(record["step_cpu_s"]) == toy.timed_steps and all(s > 0 for s in record["step_cpu_s"])
        assert record["tokens_per_step"] == pytest.approx(full, rel=0.1), record


def test_gpu_check_parts_fit_one_device_call():
    """A device call runs 10 minutes at most: the parts' budgets (each part is killed at its own) add up to less."""
    assert sum(budget.seconds for budget in gpu_check.BUDGETS.values()) <= 600
