"""The benchmark harness end to end on the smallest CPU shape: the records it appends, the errors
it measures, the plot; a wrong gradient is caught; a missing peer is skipped with a note, a failing
method noted while the others run."""

import dataclasses
import json
import sys

import pytest
import torch

from fastpref import bench
from fastpref.bench import harness, linear, logits
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
    assert bench.main(argv) == 0
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
