"""Bad input to the log-prob functions: a TypeError / ValueError that names the argument, never a
crash deep in a kernel, a NaN or silent garbage."""

import pytest
import torch

import fastpref

V = 11


def logits_args():
    return {"logits": torch.randn(2, 3, V), "labels": torch.randint(0, V, (2, 3))}


def linear_args():
    return {"hidden": torch.randn(2, 3, 4), "weight": torch.randn(V, 4), "labels": torch.randint(0, V, (2, 3))}


LOGITS_CASES = [
    ({"logits": [[1.0]]}, TypeError, "logits"),
    ({"logits": torch.ones(2, 3, V, dtype=torch.long)}, TypeError, "logits"),
    ({"logits": torch.randn(2, 3, 0)}, ValueError, "logits"),
    ({"labels": torch.zeros(2, 4, dtype=torch.long)}, ValueError, "labels"),
    ({"labels": torch.zeros(2, 3)}, TypeError, "labels"),
    ({"labels": torch.zeros(2, 3, dtype=torch.bool)}, TypeError, "labels"),
    ({"labels": torch.full((2, 3), V)}, ValueError, "labels"),
    ({"labels": torch.full((2, 3), -1)}, ValueError, "labels"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index"),
    ({"labels": torch.zeros(2, 3, dtype=torch.long, device="meta")}, ValueError, "device"),
]


@pytest.mark.parametrize("change, error, match", LOGITS_CASES)
@pytest.mark.parametrize("fn", [fastpref.token_logps, fastpref.sequence_logps])
def test_logits_functions(fn, change, error, match):
    args = logits_args() | change
    with pytest.raises(error, match=match):
        fn(**args)


LINEAR_CASES = [
    ({"hidden": torch.randn(2, 3, 5)}, ValueError, "H=4"),
    ({"weight": torch.randn(V, 4, 1)}, ValueError, "weight"),
    ({"weight": torch.randn(V, 4, dtype=torch.float64)}, TypeError, "weight"),
    ({"bias": torch.randn(V + 1)}, ValueError, "bias"),
    ({"bias": torch.randn(V, dtype=torch.float64)}, TypeError, "bias"),
    ({"labels": torch.full((2, 3), V)}, ValueError, "labels"),
    ({"labels": torch.zeros(3, 2, dtype=torch.long)}, ValueError, "labels"),
    ({"weight": torch.randn(V, 4, device="meta")}, ValueError, "device"),
]


@pytest.mark.parametrize("change, error, match", LINEAR_CASES)
@pytest.mark.parametrize("fn", [fastpref.linear_token_logps, fastpref.linear_sequence_logps])
def test_linear_functions(fn, change, error, match):
    args = linear_args() | change
    with pytest.raises(error, match=match):
        fn(**args)


def test_sequence_functions_want_batch_by_time():
    with pytest.raises(ValueError, match="reduction"):
        fastpref.sequence_logps(**logits_args(), reduction="max")
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        fastpref.sequence_logps(torch.randn(3, V), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T, H\)"):
        fastpref.linear_sequence_logps(torch.randn(3, 4), torch.randn(V, 4), torch.zeros(3, dtype=torch.long))


def test_masked_sum_checks():
    with pytest.raises(ValueError, match="mask"):
        fastpref.masked_sum(torch.randn(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="values"):
        fastpref.masked_mean(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))


def test_ignore_index_other_than_default_is_honoured():
    args = logits_args()
    args["labels"][0, 0] = 7
    out = fastpref.token_logps(**args, ignore_index=7)
    assert out[0, 0] == 0 and (out[1] != 0).all()


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.uint8, torch.int8])
def test_every_integer_label_dtype_works(dtype):
    args = logits_args()
    want = fastpref.token_logps(**args)
    assert torch.equal(fastpref.token_logps(args["logits"], args["labels"].to(dtype)), want)
    hidden = linear_args()
    want = fastpref.linear_sequence_logps(**hidden)
    assert torch.equal(fastpref.linear_sequence_logps(hidden["hidden"], hidden["weight"], hidden["labels"].to(dtype)), want)


def test_numpy_arrays_are_named():
    import numpy as np

    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        fastpref.token_logps(torch.randn(2, 3, V), np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        fastpref.linear_token_logps(torch.randn(2, 3, 4), torch.randn(V, 4), np.zeros((2, 3), dtype=np.int64))


def test_loss_type_none_is_named():
    x = torch.randn(3)
    with pytest.raises(TypeError, match="loss_type"):
        fastpref.dpo_loss(x, x, x, x, loss_type=None)
    with pytest.raises(TypeError, match="loss_type"):
        fastpref.linear_dpo_loss(**linear_args() | {"labels": torch.randint(0, V, (2, 3))}, ref_chosen_logps=None,
                                 ref_rejected_logps=None, loss_type=None, reference_free=True)  # fmt: skip


def test_inplace_backward_refuses_logits_that_share_memory():
    row = torch.randn(1, 1, V, requires_grad=True)
    expanded = row.expand(2, 3, V)
    with pytest.raises(ValueError, match="inplace_backward"):
        fastpref.token_logps(expanded, torch.randint(0, V, (2, 3)), inplace_backward=True)
    shifted = torch.randn(2, 4, V)[:, :-1]  # the usual shift: a view that shares nothing between elements
    fastpref.token_logps(shifted, torch.randint(0, V, (2, 3)), inplace_backward=True)


def test_out_of_range_labels_raise_under_torch_compile():
    """The label check runs inside the ops, so a compiled step raises as eager does."""
    step = torch.compile(lambda z, y: fastpref.sequence_logps(z, y).sum(), fullgraph=True)
    logits = torch.randn(2, 3, V)
    assert torch.isfinite(step(logits, torch.randint(0, V, (2, 3))))
    with pytest.raises(Exception, match=f"labels must lie in \\[0, {V}\\)"):
        step(logits, torch.full((2, 3), V))
