"""Memory, measured by what the ops allocate: a TorchDispatchMode records every tensor any aten op
returns, so no allocation hides. No tensor on the linear path reaches N x V elements; the logits
path allocates nothing of N x V fp32 elements besides the gradient it returns."""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import fastpref
from fastpref.backends import torch_chunked

N_SEQS, N_POS, HIDDEN, VOCAB = 4, 64, 32, 8192  # N = 256 tokens, N x V = 2M elements
TILE_BYTES = 1 << 20  # tiles of 256k fp32 elements, an eighth of N x V


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(torch_chunked, "TILE_BYTES", TILE_BYTES)
    monkeypatch.setattr(torch_chunked, "LINEAR_TILE_BYTES", TILE_BYTES)


class AllocationLog(TorchDispatchMode):
    """Records (op, numel, dtype) of every tensor an aten op allocates (returns in new storage)."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastpref":
            # a custom op is one opaque call to a dispatch mode: re-enter its CPU kernel with the
            # log on, so that what it allocates inside is seen
            with self:  # (its outputs were allocated in there, and logged: not logged twice)
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        out = func(*args, **kwargs)
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        input_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # a view or an in-place result shares an input's storage: not an allocation
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in input_storages:
                self.outputs.append((str(func), t.numel(), t.dtype))
        return out

    def ops(self):
        return {op for op, _, _ in self.outputs}

    def largest(self, dtype=None):
        sizes = [numel for _, numel, dt in self.outputs if dtype is None or dt == dtype]
        return max(sizes, default=0)


class PeakLog(AllocationLog):
    """The allocation log, plus the high-water mark of the bytes alive at once: each allocated storage
    (counted once, however many ops return it) stays alive until its last tensor is gone."""

    def __init__(self):
        super().__init__()
        self.alive = {}  # storage id -> (weak reference, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        seen = len(self.outputs)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.outputs) > seen:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    ref = StorageWeakRef(t.untyped_storage())
                    self.alive.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes()))
        self.alive = {key: (ref, size) for key, (ref, size) in self.alive.items() if not ref.expired()}
        self.peak = max(self.peak, sum(size for _, size in self.alive.values()))
        return out


def test_linear_path_peaks_within_32_mb_of_its_gradients(monkeypatch):
    """bench/cpu_memory.py's shape (N = 4096, the first 25% of each sequence masked, V = 32768, fp32) at H = 128
    (a quarter of its FLOPs; what the tiles hold does not depend on H) with the default tiles: forward + backward
    hold at most the gradients + 32 MB at once (now +17 MB). Before: +97 MB (a 64 MB tile, the previous tile still alive
    while the next one was computed, compact copies of h and dh)."""
    monkeypatch.undo()  # the default tile sizes
    torch.manual_seed(0)
    hidden = torch.randn(8, 512, 128, requires_grad=True)
    weight = (torch.randn(32768, 128) * 0.05).requires_grad_()
    labels = torch.randint(0, 32768, (8, 512))
    labels[:, :128] = -100
    with PeakLog() as log:
        fastpref.linear_sequence_logps(hidden, weight, labels).backward(torch.randn(8))
    grads = (hidden.numel() + weight.numel()) * 4
    assert log.peak >= grads  # the log sees the gradients
    assert log.peak - grads <= 32 << 20, f"{(log.peak - grads) / 2**20:.0f} MB above the gradients"


def test_peak_log_sees_the_textbook_logits():
    """The peak log can fail: the textbook head holds its (N, V) logits and their softmax at once."""
    hidden = torch.randn(N_SEQS, N_POS, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (N_SEQS, N_POS))
    with PeakLog() as log:
        logits = hidden @ weight.T
        torch.log_softmax(logits, -1).gather(-1, labels[..., None]).sum().backward()
    assert log.peak >= 2 * N_SEQS * N_POS * VOCAB * 4


def test_linear_path_never_holds_n_by_v():
    hidden = torch.randn(N_SEQS, N_POS, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (N_SEQS, N_POS))
    with AllocationLog() as log:
        out = fastpref.linear_sequence_logps(hidden, weight, labels)
        out.backward(torch.randn(N_SEQS))
    n_by_v = N_SEQS * N_POS * VOCAB
    assert "aten.matmul.default" in log.ops()  # the log sees inside the custom ops
    assert log.largest() <= TILE_BYTES // 4  # one tile at most
    assert log.largest() < n_by_v // 4
    assert weight.grad is not None  # the grads themselves are (V, H): legitimately large
    # and the test itself can fail: the textbook path does allocate N x V
    with AllocationLog() as textbook:
        logits = hidden @ weight.T
        torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).sum().backward()
    assert textbook.largest() >= n_by_v


def test_statistics_cost_one_tile_sized_temporary_per_tile():
    """The forward with statistics (entropy, top-1, mean logit, log Σp²) allocates, per logits tile, the tile and
    one temporary of its size (the probabilities); before: six more (a column mask and a masked copy for the top-1,
    2z for log Σp², p·z, a p > 0 mask and a masked copy for the entropy), which made it 3x the plain forward's time
    on a CPU (now 1.9x)."""
    hidden = torch.randn(N_SEQS, N_POS, HIDDEN)
    weight = torch.randn(VOCAB, HIDDEN)
    labels = torch.randint(0, VOCAB, (N_SEQS, N_POS))
    tile = TILE_BYTES // 4
    with AllocationLog() as log:
        fastpref.linear_token_logps(hidden, weight, labels, return_stats=True)
    n_tiles = N_SEQS * N_POS * VOCAB // tile
    tile_sized = [op for op, numel, _ in log.outputs if numel >= tile]
    assert tile_sized.count("aten.mm.default") + tile_sized.count("aten.matmul.default") == n_tiles
    assert len(tile_sized) <= 2 * n_tiles, sorted(set(tile_sized))


def test_fused_dpo_pass_allocates_its_logits_tile_once():
    """linear_dpo_loss's single pass (fp32, no softcap) turns its (rows, V) logits tile into the probabilities
    and then the gradient in place: the GEMM's output is the one tensor of that size (before: z − max too, and
    logsumexp's exp inside its kernel, which the log does not see: the fused pass was 1.25x slower than the two
    passes on a CPU at 256 rows x 50,257 x 128; now 0.85x)."""
    hidden = torch.randn(N_SEQS, N_POS, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (N_SEQS, N_POS))
    with AllocationLog() as log:
        out = fastpref.linear_dpo_loss(hidden, weight, labels, None, None, reference_free=True)
        out.loss.backward()
    tile_sized = [op for op, numel, _ in log.outputs if numel >= N_SEQS * N_POS * VOCAB // 2]  # a pair's rows
    # the GEMM's output, nothing else (inside a custom op, below autograd, matmul reaches the log undecomposed)
    assert tile_sized and set(tile_sized) <= {"aten.mm.default", "aten.matmul.default"}, tile_sized


def test_logits_path_allocates_only_the_gradient():
    logits = torch.randn(N_SEQS, N_POS, VOCAB, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, VOCAB, (N_SEQS, N_POS))
    with AllocationLog() as log:
        out = fastpref.sequence_logps(logits, labels)
        out.backward(torch.randn(N_SEQS))
    n_by_v = N_SEQS * N_POS * VOCAB
    assert "aten.amax.default" in log.ops()  # the log sees inside the custom ops
    assert log.largest(torch.float32) < n_by_v // 4  # no fp32 copy of the logits
    assert [op for op, numel, dt in log.outputs if numel >= n_by_v and dt == torch.float32] == []
    big = [dt for _, numel, dt in log.outputs if numel >= n_by_v]
    assert big and set(big) == {torch.bfloat16}  # the gradient, in the logits' dtype


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_path_in_place_allocates_nothing_of_n_by_v(monkeypatch, backend):
    monkeypatch.setenv("FASTPREF_BACKEND", backend)
    leaf = torch.randn(N_SEQS, N_POS, VOCAB, requires_grad=True)
    logits = leaf * 1.0  # allocated before the log: the model's output
    labels = torch.randint(0, VOCAB, (N_SEQS, N_POS))
    labels[0] = -100
    with AllocationLog() as log:
        out = fastpref.sequence_logps(logits, labels, inplace_backward=True)
        torch.autograd.grad(out, logits, torch.randn(N_SEQS))
    n_by_v = N_SEQS * N_POS * VOCAB
    assert log.largest() < n_by_v // 4


# llama3-8b's head under DPO: 4 pairs of 1,024 positions, 37% of them masked (the prompt), bf16.
LLAMA3_8B = {"hidden_shape": (8, 1024, 4096), "n_vocab": 128256, "dtype": torch.bfloat16}
LLAMA3_8B_VALID = round(1024 * 0.63)  # valid tokens per sequence
GOAL_ABOVE_INPUTS = 1.7e9  # bytes (TRL's head: +3.4 GB)


def test_llama3_8b_single_pass_fits_its_budget():
    """The planner's account of the fused DPO pass at llama3-8b's shape on the Triton backend: dW in
    the weight's dtype (no fp32 copy, no second copy in the backward), the tile within
    memory_budget, all of it ≤ +1.7 GB above the inputs."""
    from fastpref.api import DEFAULT_MEMORY_BUDGET
    from fastpref.ops.linear_dpo import single_pass_buffers

    pairs = [2 * LLAMA3_8B_VALID] * 4
    buffers = single_pass_buffers(**LLAMA3_8B, rows_per_pair=pairs, memory_budget=DEFAULT_MEMORY_BUDGET)
    print("\n".join(f"{name}: {size / 1e6:.1f} MB" for name, size in buffers.items()))
    assert buffers["dW (V, H), the weight's dtype"] == 128256 * 4096 * 2
    tile = buffers["logits tile (rows, V padded), turned into dz in place"]
    assert 2 * LLAMA3_8B_VALID * 128256 * 2 <= tile <= DEFAULT_MEMORY_BUDGET
    assert sum(buffers.values()) <= GOAL_ABOVE_INPUTS, f"{sum(buffers.values()) / 1e9:.2f} GB"


def test_single_pass_holds_dw_once_in_the_weights_dtype(monkeypatch):
    """What the planner counts is what the Triton single pass allocates: one (V, H) buffer, in the
    weight's dtype (fp16 here: the interpreter computes fp16 exactly), from the forward through the
    backward, which scales it in place; nothing larger than a planned buffer."""
    from fastpref.ops.linear_dpo import single_pass_buffers

    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    hidden = torch.randn(N_SEQS, N_POS, HIDDEN, dtype=torch.float16, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) / 8).half().requires_grad_()
    labels = torch.randint(0, VOCAB, (N_SEQS, N_POS))
    labels[:, :10] = -100
    refs = -torch.rand(N_SEQS // 2) * 10, -torch.rand(N_SEQS // 2) * 10
    budget = 2 * N_POS * VOCAB * 2  # one pair per chunk
    with AllocationLog() as log:
        fastpref.linear_dpo_loss(hidden, weight, labels, *refs, memory_budget=budget).loss.backward()
    weight_sized = [(op, dt) for op, numel, dt in log.outputs if numel == VOCAB * HIDDEN]
    assert len(weight_sized) == 1 and weight_sized[0][1] == torch.float16, weight_sized
    planned = single_pass_buffers((N_SEQS, N_POS, HIDDEN), VOCAB, torch.float16, [2 * (N_POS - 10)] * 2, budget)
    largest = max(numel * dt.itemsize for _, numel, dt in log.outputs)
    assert largest <= max(planned.values())


def test_the_training_loops_peak_meter_sees_the_tiles_inside_fastprefs_ops(monkeypatch):
    """`fastpref train`'s head memory report (metrics.PeakMeter on a CPU) counts what the custom ops hold
    inside, not only their outputs: here one (256, 8192) fp32 logits tile, 8 MB, against 1 MB of gradients."""
    from fastpref.train.metrics import PeakMeter

    monkeypatch.setattr(torch_chunked, "LINEAR_TILE_BYTES", 8 << 20)
    hidden = torch.randn(1, 256, 32, requires_grad=True)
    weight = torch.randn(8192, 32, requires_grad=True)
    labels = torch.randint(0, 8192, (1, 256))
    with PeakMeter(torch.device("cpu")) as meter:
        fastpref.linear_sequence_logps(hidden, weight, labels).sum().backward()
    assert meter.mb >= 8, f"{meter.mb:.1f} MB"
