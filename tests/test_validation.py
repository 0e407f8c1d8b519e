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
