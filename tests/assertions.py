"""An assertion that says where two tensors first disagree."""

from __future__ import annotations

import torch


def assert_close(actual, expected, *, rtol: float, atol: float, name: str = "value") -> None:
    """Like torch.testing.assert_close after casting both to float64, with a short report:
    the count of mismatches and the first few indices with both values."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{name}: non-finite values differ"
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5]
        rows = "\n".join(
            f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item():.10g}, want {expected[tuple(i)].item():.10g}"
            for i in idx
        )
        worst = ((actual - expected).abs() / (expected.abs() + atol))[bad].max().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol}, atol={atol}, "
            f"worst rel {worst:.3g}):\n{rows}"
        )


def assert_selected_stats(stats, names, want) -> None:
    """A TokenStats against the reference's statistics (ref.token_stats): the named ones equal (is_top1
    exactly), every other one None."""
    for name in stats._fields:
        got = getattr(stats, name)
        if name not in names:
            assert got is None, f"{name} was not asked for, got a value"
        elif name == "is_top1":
            assert got.dtype == torch.bool and torch.equal(got, want[name]), name
        else:
            assert_close(got, want[name], rtol=1e-5, atol=1e-5, name=name)
