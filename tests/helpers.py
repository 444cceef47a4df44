"""Comparison helpers for kernel tests (tolerances from the reference's own error)."""

from __future__ import annotations

import torch


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor) -> str:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    lines = [
        f"{int(bad.sum())}/{bad.numel()} elements out of tolerance",
        f"max abs err {diff.nan_to_num(nan=float('inf')).max().item():.3e}, "
        f"mean abs err {diff.nan_to_num(nan=0.0).mean().item():.3e}",
        f"NaN in actual only: {int((nan_a & ~nan_e).sum())}, in expected only: "
        f"{int((nan_e & ~nan_a).sum())}; inf mismatches: {int((a.isinf() != e.isinf()).sum())}",
    ]
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        lines.append(f"first bad index {idx}: actual {a[idx].item()!r} expected {e[idx].item()!r}")
    return "\n".join(lines)


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, msg: str = "") -> None:
    """allclose that lets NaN through only where the expected value is NaN too, and explains
    where it failed."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{msg} shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    ok = (a - e).abs() <= atol + rtol * e.abs()
    ok &= torch.isfinite(a) == torch.isfinite(e)
    ok |= (a == e) & torch.isinf(e)  # equal infinities
    ok |= torch.isnan(a) & torch.isnan(e)  # an undefined statistic, e.g. no correct response
    bad = ~ok
    assert not bad.any(), f"{msg}\n{describe_mismatch(actual, expected, bad)}"


def ref_error(reference_same_dtype, reference_fp64) -> float:
    """Max abs error of a plain-PyTorch computation in the test dtype against float64."""
    return (
        (torch.as_tensor(reference_same_dtype).double() - torch.as_tensor(reference_fp64).double())
        .abs()
        .max()
        .item()
    )


def assert_close_to_ref(actual, ref_fp64, ref_same_dtype, *, atol: float, msg: str = "") -> None:
    """err(ours vs fp64) <= 2 * err(torch same dtype vs fp64) + atol (flash-attention's rule)."""
    tol = 2 * ref_error(ref_same_dtype, ref_fp64) + atol
    assert_close(actual, ref_fp64, atol=tol, msg=msg)
