"""Helpers of the kernel tests: comparisons with tolerances from the reference's own error, and
the one builder of random loss batches.

The rule (flash-attention's layer-norm tests): a result computed in a low-precision path may be
as far from the float64 reference as twice the plain-PyTorch computation in the same dtype is,
plus a floor of a few units of roundoff of the result's dtype times the data's scale.
"""

from __future__ import annotations

import torch

from papo_fast.kernels.fused_linear_logprobs import fused_linear_logprobs_ref
from papo_fast.kernels.loss_config import PolicyLossConfig
from papo_fast.kernels.policy_loss import policy_loss
from papo_fast.kernels.policy_loss_ref import aggregate_ref, policy_loss_ref, policy_loss_terms_ref

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


# ----------------------------------------------------------------------------- loss batches


def make_batch(
    b: int = 5, length: int = 333, *, dtype: torch.dtype = torch.float64, per_token: bool = False,
    seed: int = 0, lengths: list[int] | None = None, lm_head: tuple[int, int] | None = None,
) -> dict:  # fmt: skip
    """Fresh random padded data [B, L] for the loss tests (never zeros), from its own generator.

    Keys: ``logp``, ``old``, ``ref``, ``rollout`` [B, L] (log-probs in (-3, 0) and near them:
    ratios spread across both clip edges), ``adv`` [B] ([B, L] with ``per_token``), ``mask``
    [B, L] bool. ``lengths``: each row's valid prefix; default random lengths in [1, L] with ~10%
    holes (e.g. masked tool output). ``lm_head=(H, V)``: also ``hidden`` [B, L, H], ``weight``
    [V, H], ``bias`` [V] and ``targets`` [B, L]; ``logp`` is then the head's own (float64).
    ``dtype``: of the inputs of the op under test: every float tensor, or with ``lm_head`` the
    head's (hidden, weight, bias; the rest stays float64).
    """
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    out = {}
    if lm_head is None:
        logp = -3 * torch.rand(b, length, **f64)
    else:
        h, v = lm_head
        out["hidden"] = torch.randn(b, length, h, **f64).to(dtype)
        out["weight"] = (torch.randn(v, h, **f64) / h**0.5).to(dtype)
        out["bias"] = (0.5 * torch.randn(v, **f64)).to(dtype)
        out["targets"] = torch.randint(0, v, (b, length), generator=g)
        head = (out[k].double() for k in ("hidden", "weight"))
        logp = fused_linear_logprobs_ref(*head, out["targets"], bias=out["bias"].double())[0]
    old = logp + 0.3 * torch.randn(b, length, **f64)
    ref = logp + 0.2 * torch.randn(b, length, **f64)
    rollout = old + 0.2 * torch.randn(b, length, **f64)
    adv = torch.randn((b, length) if per_token else (b,), **f64)
    if lengths is None:
        lens = torch.randint(1, length + 1, (b,), generator=g)
        mask = torch.arange(length)[None, :] < lens[:, None]
        mask &= torch.rand(b, length, generator=g) > 0.1
    else:
        mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    cast = (lambda t: t) if lm_head is not None else (lambda t: t.to(dtype))
    data = dict(logp=logp, old=old, ref=ref, rollout=rollout, adv=adv)
    return out | {k: cast(t) for k, t in data.items()} | {"mask": mask}


def lm_head_batch(
    b: int = 6, length: int = 11, h: int = 12, v: int = 97, *, dtype: torch.dtype = torch.float32,
    lengths: list[int] | None = None, seed: int = 0,
) -> dict:  # fmt: skip
    """``make_batch`` with an LM head [V, H]; valid lengths 11, 1, 4, 9, 7, 9 unless given."""
    lengths = lengths or [length, 1, 4, length - 2, 7, 9][:b]
    return make_batch(b, length, dtype=dtype, lengths=lengths, lm_head=(h, v), seed=seed)


def pack(t: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """Padded [B, L, ...] -> packed [T, ...] of the valid tokens; per-sequence [B] passes."""
    return t if t is None or t.dim() == 1 else t[mask]


def cu_of(mask: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [B + 1] of the valid tokens of ``mask`` [B, L]."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(-1).cumsum(0)])


# ----------------------------------------------------------------------------- policy_loss runs

COUNTS = ("num_tokens", "num_seqs", "max_len")


def ours(d: dict, packed: bool = False, backend: str = "torch", **kw):
    """policy_loss on a ``make_batch`` dict through the public API: (result, d loss / d logp),
    the gradient laid out like the padded logp in either layout."""
    logp = d["logp"].clone().requires_grad_()
    m = d["mask"]
    if packed:
        res = policy_loss(
            pack(logp, m), pack(d["old"], m), pack(d["adv"], m), cu_seqlens=cu_of(m),
            ref_logp=pack(d["ref"], m), rollout_logp=pack(d["rollout"], m), backend=backend, **kw,
        )  # fmt: skip
    else:
        res = policy_loss(
            logp, d["old"], d["adv"], mask=m, ref_logp=d["ref"], rollout_logp=d["rollout"],
            backend=backend, **kw,
        )  # fmt: skip
    (grad,) = torch.autograd.grad(res.loss, logp)
    return res, grad


def theirs(d: dict, dtype: torch.dtype = torch.float64, **kw):
    """policy_loss_ref on the same (rounded) inputs in ``dtype``: (result, d loss / d logp)."""
    logp = d["logp"].to(dtype).clone().requires_grad_()
    res = policy_loss_ref(
        logp, d["old"], d["adv"], d["mask"], ref_logp=d["ref"], rollout_logp=d["rollout"], **kw
    )
    (grad,) = torch.autograd.grad(res.loss, logp)
    return res, grad


def loss_scale(d: dict, **kw) -> float:
    """The loss aggregated over |loss_t| in float64: the scale of its rounding error (a loss that
    nearly cancels rounds relative to its terms, not to itself)."""
    counts = {k: kw.pop(k) for k in COUNTS if k in kw}
    with torch.no_grad():
        terms = policy_loss_terms_ref(
            d["logp"].double(), d["old"], d["adv"], d["mask"], ref_logp=d["ref"],
            rollout_logp=d["rollout"], **kw,
        )  # fmt: skip
        agg = PolicyLossConfig.resolve(None, kw).agg
        return aggregate_ref(terms.loss.abs(), d["mask"], agg, **counts).item()


def assert_matches_reference(res, grad, d: dict, *, metrics: bool = True, **kw) -> None:
    """Loss, gradient (and metrics) of ours against policy_loss_ref in float64, with the
    tolerance derived from the same formula in the inputs' dtype (``assert_close_to_ref``)."""
    kw = {k: v for k, v in kw.items() if k not in ("backend", "check_finite")}
    dtype = d["logp"].dtype
    want, grad64 = theirs(d, **kw)
    same, grad_lo = theirs(d, dtype=dtype, **kw)
    assert_close_to_ref(res.loss, want.loss, same.loss, scale=loss_scale(d, **kw), msg="loss")
    assert_close_to_ref(grad, grad64, grad_lo, msg="grad")
    if metrics:
        for name in res._fields[1:]:
            want_m, same_m = getattr(want, name).detach(), getattr(same, name).detach()
            assert_close_to_ref(getattr(res, name), want_m, same_m, msg=name)


class _FreshForward(torch.autograd.Function):
    """fn(x) whose backward runs fn again: a loss with one backward per forward (policy_loss scales
    its saved gradient in place) under gradcheck, which backpropagates twice through one graph."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.save_for_backward(x)
        ctx.fn = fn
        return fn(x).detach()

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            fresh = x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(ctx.fn(fresh), fresh, grad_out)
        return grad, None


def gradcheck_fresh(fn, x: torch.Tensor) -> bool:
    """torch.autograd.gradcheck of ``fn`` at ``x``, each backward after a forward of its own."""
    return torch.autograd.gradcheck(lambda t: _FreshForward.apply(t, fn), (x,))
