"""Comparison helpers for kernel tests (tolerances from the reference's own error).

The rule (flash-attention's layer-norm tests): a result computed in a low-precision path may be
as far from the float64 reference as twice the plain-PyTorch computation in the same dtype is,
plus a floor of a few units of roundoff of the result's dtype times the data's scale.
"""

from __future__ import annotations

import torch

# float64 against float64 (hand-computed values, the PyTorch path in float64, gradcheck-style
# identities): the two sides differ only by float64 roundings of O(1) data over at most a few
# thousand terms, i.e. < 1e-12 (about 5000 units of 2^-52). Not a tolerance for any other dtype.
F64_ATOL = 1e-12

# The floor of the derived tolerance, in units of roundoff of the result's dtype times the data's
# scale: one rounding of the result to its dtype (half a unit) plus a few fp32 roundings the
# same-dtype reference may happen to avoid on a given input (then its own error is ~0).
ULPS = 4.0


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
    a = torch.as_tensor(reference_same_dtype).detach().double().cpu()
    e = torch.as_tensor(reference_fp64).detach().double().cpu()
    assert a.shape == e.shape, f"reference shapes differ: {a.shape} != {e.shape}"
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))  # equal infinities, undefined statistics
    err = torch.where(same, 0.0, (a - e).abs())
    # a tolerance built on a NaN or infinite error could never fail: refuse it
    assert torch.isfinite(err).all(), "the same-dtype reference is not finite where float64's is"
    return err.max().item() if err.numel() else 0.0


def ulp_atol(dtype: torch.dtype, scale, ulps: float = ULPS) -> float:
    """``ulps`` units of roundoff of ``dtype`` (its machine epsilon) times ``scale``."""
    return ulps * torch.finfo(dtype).eps * float(scale)


def data_scale(reference) -> float:
    """The scale of a result: its largest finite magnitude (1 for an all-zero result)."""
    r = torch.as_tensor(reference).detach().double()
    r = r[torch.isfinite(r)].abs()
    return r.max().item() if r.numel() and r.max() > 0 else 1.0


def assert_close_to_ref(
    actual, ref_fp64, ref_same_dtype, *, ulps: float = ULPS, scale=None, ref_err: float = 0.0,
    msg: str = "",
) -> None:  # fmt: skip
    """err(ours vs fp64) <= 2 * err(torch same dtype vs fp64) + atol (flash-attention's rule).

    atol = ``ulps`` units of roundoff of ``actual``'s dtype times ``scale`` (default: the largest
    magnitude of the float64 reference; pass the scale of the operands when the result is a
    difference of larger terms); F64_ATOL when ``actual`` is float64 itself. ``ref_err``: a bound
    on the same-dtype reference's error known otherwise (e.g. propagated from its inputs' errors),
    used when larger than the error it happened to make.
    """
    actual = torch.as_tensor(actual)
    scale = data_scale(ref_fp64) if scale is None else scale
    if actual.dtype == torch.float64:  # float64 against float64: F64_ATOL says why
        floor = F64_ATOL
    else:
        floor = ulp_atol(actual.dtype if actual.is_floating_point() else torch.float32, scale, ulps)
    tol = 2 * max(ref_error(ref_same_dtype, ref_fp64), ref_err) + floor
    assert_close(actual, ref_fp64, atol=tol, msg=f"{msg} (tolerance {tol:.3e})")


def softmax_scale(hidden, weight, bias=None, temperature=1.0, want=None) -> float:
    """The scale of logp = z_t - lse and entropy = lse - E_p[z]: differences of terms as large as
    max |lse|, so their rounding is relative to that (and at least to the result's own size)."""
    z = (hidden.double() @ weight.double().T) / temperature
    z = z if bias is None else z + bias.double() / temperature
    return max(z.logsumexp(-1).abs().max().item(), data_scale(want) if want is not None else 0.0)
