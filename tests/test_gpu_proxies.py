"""CPU proxies for defects that only a GPU would show: the device a kernel launches on, the GEMMs a
forward runs over the weight, the bias epilogue, column offsets past int32. Their GPU twins are in
tests/test_gpu.py."""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastpref
from assertions import assert_close
from fastpref.backends import rows, triton_backend
from fastpref.kernels import launch as launch_module
from fastpref.kernels import token_logps as kernels


@pytest.fixture
def entered_devices(monkeypatch):
    """The devices `torch.cuda.device(...)` is entered with (the real one needs CUDA)."""
    devices = []

    @contextlib.contextmanager
    def device(d):
        devices.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    return devices


def test_a_kernel_launches_on_its_tensors_device(entered_devices):
    """A head on cuda:1 while cuda:0 is current (device_map="auto"): the launch runs under
    torch.cuda.device(cuda:1), so Triton takes that device and its current stream."""
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(list(entered_devices))

    with FakeTensorMode(allow_non_fake_inputs=True):
        logits = torch.empty(4, 8, device="cuda:1")
    launch_module.launch(Kernel(), (1,), 3, logits, num_warps=4)
    assert launched == [[torch.device("cuda:1")]]


def test_capture_is_asked_of_the_tensors_device(entered_devices, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        labels = torch.empty(4, dtype=torch.long, device="cuda:1")
    assert rows.capturing(labels) and entered_devices == [torch.device("cuda:1")]
    assert not rows.capturing(torch.zeros(2))


class GemmLog(torch.utils._python_dispatch.TorchDispatchMode):
    """(op, M, out contiguous) of every matmul-like aten op run."""

    def __init__(self):
        super().__init__()
        self.gemms = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if func.namespace == "fastpref":  # a custom op is opaque to the mode: re-enter its CPU kernel
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        out = func(*args, **kwargs)
        if name in ("aten.mm", "aten.addmm"):
            a = args[1] if name == "aten.addmm" else args[0]
            self.gemms.append((name, a.shape[0], out.is_contiguous()))
        return out


def test_forward_reads_the_weight_once_where_the_tile_allows(monkeypatch):
    """llama3-8b's ~5,200 valid rows: 3 forward GEMMs over the 1 GB weight at the Triton backend's
    512 MiB tile (they were 20 at 64 MiB); here, a tile sized for all rows makes one."""
    assert triton_backend.forward_rows(128256, 2, triton_backend.TILE_BYTES) * 3 >= 5200
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    hidden, weight = torch.randn(3, 40, 16), torch.randn(3001, 16) / 4
    labels = torch.randint(0, 3001, (3, 40))
    monkeypatch.setattr(triton_backend, "TILE_BYTES", 120 * 3008 * 4)  # all 120 rows, padded, fp32
    with GemmLog() as log:
        fastpref.linear_token_logps(hidden, weight, labels)
    assert [m for _, m, _ in log.gemms] == [120]


def test_a_bias_is_added_in_the_gemm_epilogue():
    """With a bias the GEMM writes a contiguous (rows, V) buffer (cuBLASLt adds the bias in its
    epilogue); a padded, strided output would make addmm copy the bias over the whole tile first."""
    h, w, b = torch.randn(5, 8), torch.randn(3001, 8), torch.randn(3001)
    with GemmLog() as log:
        z = triton_backend._logits(h, w, b)
    assert log.gemms == [("aten.addmm", 5, True)] and z.is_contiguous()
    assert_close(z, h @ w.T + b, rtol=1e-5, atol=1e-5, name="logits")
    z = triton_backend._logits(h, w, None)
    assert z.stride(0) % 16 == 0  # without a bias: rows padded to 16 elements (aligned loads)


def test_a_view_whose_columns_pass_int32_runs_the_chunked_code(monkeypatch):
    """The kernels offset columns in int32: a vocab-strided view spanning 2^31 elements would wrap, so
    the Triton backend runs the chunked code on it (forward and backward alike, the same lse units):
    the values and gradients of the kernels, no kernel launched."""
    wide = torch.empty(0, device="meta").as_strided((2, 3, 50), (150, 50, 2**26))  # (V − 1) · 2^26 ≥ 2^31
    assert not kernels.columns_fit_int32(wide) and kernels.columns_fit_int32(torch.empty(2, 3, 50))
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    logits = torch.randn(3, 7, 101).transpose(1, 2).requires_grad_()  # (3, 101, 7), stride_v = 101
    labels = torch.randint(0, 7, (3, 101))
    labels[0, :5] = -100
    upstream = torch.randn(3, 101)
    want = fastpref.token_logps(logits, labels)
    (want_grad,) = torch.autograd.grad(want, logits, upstream)

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel launched on a view whose column offsets pass int32")

    monkeypatch.setattr(kernels, "columns_fit_int32", lambda t: False)
    monkeypatch.setattr(kernels, "launch", refuse)
    got = fastpref.token_logps(logits, labels)
    (got_grad,) = torch.autograd.grad(got, logits, upstream)
    assert_close(got, want, rtol=1e-5, atol=1e-6, name="logps")
    assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6, name="grad")


def test_gpu_check_runs_the_gpu_cases():
    """`make gpu-check` runs tests/test_gpu.py: capture + replay of every linear op, sync debug mode
    around each, a head on a second GPU, llama3-8b's peak memory are all collected there."""
    import subprocess
    import sys

    from fastpref.bench import gpu_check

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", gpu_check.GPU_TESTS],
        cwd=gpu_check.ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    collected = proc.stdout
    for op in ("linear_token_logps", "linear_sequence_logps", "linear_dpo_loss", "linear_dpo_loss_two_pass"):
        assert f"test_cuda_graph_replays_a_training_step[{op}]" in collected
        assert f"test_a_step_syncs_once_per_call_and_never_in_the_backward[{op}]" in collected
    assert "test_a_head_on_the_second_gpu" in collected and "test_llama3_8b_single_pass_peak_memory" in collected
