"""policy_loss against a float64 eager reference written from DESIGN §2 (verl's formulas)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import F64_ATOL, assert_close, assert_close_to_ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from papo_fast import PolicyLossModule, PolicyLossOutput, policy_loss

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLS = ["k1", "k2", "k3"]
LEVELS = ["token", "sequence"]
BACKENDS = ["torch", "triton"]
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- the reference


def reference(
    logp, old, adv, mask, ref=None, rollout=None, *, eps_low=0.2, eps_high=0.28, dual_clip=None,
    beta=0.0, kl="k3", ratio_level="token", agg="token-mean", num_tokens=None, num_seqs=None,
    max_len=None, is_cap=2.0, dtype=torch.float64, magnitude=False,
):  # fmt: skip
    """The loss on padded [B, L] inputs, eager in ``dtype``, differentiable w.r.t. ``logp``.

    ``magnitude``: aggregate |loss_t| instead, the scale of the terms the loss sums (its rounding
    error is relative to that, not to a loss that nearly cancels)."""
    lp = logp if logp.dtype == dtype else logp.to(dtype)
    m = mask.to(dtype)
    old = lp.detach() if old is None else old.to(dtype)
    a = adv.to(dtype)
    a = a[:, None].expand_as(lp) if a.dim() == 1 else a
    log_ratio = lp - old
    if ratio_level == "sequence":  # GSPO as verl writes it
        seq_mean = (log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1)
        log_ratio = lp - lp.detach() + seq_mean.detach()[:, None]
    ratio = torch.exp(log_ratio)
    pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    if dual_clip is not None:
        pg = torch.where(a < 0, torch.minimum(pg, -dual_clip * a), pg)
    if rollout is not None:
        w = torch.exp(old - rollout.to(dtype)).detach()
        pg = pg * (w if is_cap is None else w.clamp(max=is_cap))
    loss = pg
    if beta:
        d = lp - ref.to(dtype)
        k = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1}[kl]
        loss = loss + beta * k
    loss = loss.abs() if magnitude else loss
    lens = m.sum(-1)  # local counts: an empty batch divides 0 by 1
    n_tok = lens.sum().clamp(min=1) if num_tokens is None else num_tokens
    n_seq = (lens > 0).sum().clamp(min=1) if num_seqs is None else num_seqs
    l_max = lens.max().clamp(min=1) if max_len is None else max_len
    per_seq = (loss * m).sum(-1)
    if agg == "token-mean":
        return per_seq.sum() / n_tok
    if agg == "seq-mean-token-mean":
        return (per_seq / lens.clamp(min=1)).sum() / n_seq
    if agg == "seq-mean-token-sum":
        return per_seq.sum() / n_seq
    return per_seq.sum() / (n_seq * l_max)


def make_batch(b=5, length=333, dtype=torch.float64, per_token=False, seed=0):
    """Fresh random padded data: log-probs in (-3, 0), ratios spread across both clip edges."""
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(b, length, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(b, length, generator=g, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(b, length, generator=g, dtype=torch.float64)
    rollout = old + 0.2 * torch.randn(b, length, generator=g, dtype=torch.float64)
    shape = (b, length) if per_token else (b,)
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    lens = torch.randint(1, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None, :] < lens[:, None]
    mask &= torch.rand(b, length, generator=g) > 0.1  # holes too (e.g. masked tool output)
    cast = lambda t: t.to(dtype)
    return dict(
        logp=cast(logp), old=cast(old), adv=cast(adv), mask=mask, ref=cast(ref),
        rollout=cast(rollout),
    )  # fmt: skip


def pack(t, mask):
    """[B, L] valid tokens → [T] (per-sequence [B] tensors pass through)."""
    return t if t is None or t.dim() == 1 else t[mask]


def cu_of(mask):
    return torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(-1).cumsum(0)])


def ours(d, packed=False, backend="torch", **kw):
    """Loss result and d loss / d logp, through the public API."""
    logp = d["logp"].clone().requires_grad_()
    m = d["mask"]
    args = dict(ref_logp=d["ref"], rollout_logp=d["rollout"], backend=backend, **kw)
    if packed:
        lp = pack(logp, m)
        res = policy_loss(
            lp, pack(d["old"], m), pack(d["adv"], m), cu_seqlens=cu_of(m),
            **{**args, "ref_logp": pack(d["ref"], m), "rollout_logp": pack(d["rollout"], m)},
        )  # fmt: skip
    else:
        res = policy_loss(logp, d["old"], d["adv"], mask=m, **args)
    (grad,) = torch.autograd.grad(res.loss, logp)
    return res, grad


def theirs(d, dtype=torch.float64, **kw):
    logp = d["logp"].to(dtype).clone().requires_grad_()
    loss = reference(logp, d["old"], d["adv"], d["mask"], d["ref"], d["rollout"], dtype=dtype, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


def loss_scale(d, **kw) -> float:
    """The loss aggregated over |loss_t|: the scale of its rounding error."""
    with torch.no_grad():
        lp = d["logp"].double()
        return reference(
            lp, d["old"], d["adv"], d["mask"], d["ref"], d["rollout"], magnitude=True, **kw
        ).item()


def reference_metrics(
    d, dtype=torch.float64, *, eps_low=0.2, eps_high=0.28, dual_clip=None, beta=0.0, kl="k3",
    ratio_level="token", **_,
):  # fmt: skip
    """PolicyLossOutput's metrics over the valid tokens, eager in ``dtype`` (counts exact)."""
    m = d["mask"]
    lp, old = d["logp"].to(dtype), d["old"].to(dtype)
    a = d["adv"].to(dtype)
    a = (a[:, None].expand_as(lp) if a.dim() == 1 else a)[m]
    log_ratio = lp - old
    if ratio_level == "sequence":
        mf = m.to(dtype)
        seq_mean = (log_ratio * mf).sum(-1) / mf.sum(-1).clamp(min=1)
        log_ratio = seq_mean[:, None].expand_as(lp)
    ratio = log_ratio.exp()[m]
    lo, hi = 1 - eps_low, 1 + eps_high
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(lo, hi))
    n = max(int(m.sum()), 1)
    frac = lambda flags: torch.tensor(int(flags.sum()) / n, dtype=torch.float64)  # noqa: E731
    zero = torch.zeros((), dtype=dtype)
    kl_mean = zero
    if beta:
        delta = (lp - d["ref"].to(dtype))[m]
        kl_t = {"k1": delta, "k2": 0.5 * delta * delta, "k3": torch.exp(-delta) + delta - 1}[kl]
        kl_mean = kl_t.sum() / n
    some = ratio.numel() > 0
    return {
        "clip_frac_low": frac((ratio < lo) & (a < 0)),
        "clip_frac_high": frac((ratio > hi) & (a > 0)),
        "dual_clip_frac": frac((a < 0) & (pg > -dual_clip * a)) if dual_clip else zero,
        "kl": kl_mean,
        "ratio_mean": ratio.sum() / n if some else zero,
        "ratio_min": ratio.min() if some else zero,
        "ratio_max": ratio.max() if some else zero,
        "num_tokens": torch.tensor(float(m.sum())),
        "num_nonfinite": zero,
    }


def assert_matches_reference(res, grad, d, *, metrics=True, **kw):
    """Loss, gradient (and metrics) of ours against the float64 reference, with the tolerance
    derived from the same formula in the inputs' dtype (helpers.assert_close_to_ref)."""
    kw = {k: v for k, v in kw.items() if k not in ("backend", "check_finite")}
    dtype = d["logp"].dtype
    loss64, grad64 = theirs(d, **kw)
    loss_lo, grad_lo = theirs(d, dtype=dtype, **kw)
    assert_close_to_ref(res.loss, loss64, loss_lo, scale=loss_scale(d, **kw), msg="loss")
    assert_close_to_ref(grad, grad64, grad_lo, msg="grad")
    if metrics:
        want, same = reference_metrics(d, **kw), reference_metrics(d, dtype, **kw)
        for name, value in want.items():
            assert_close_to_ref(getattr(res, name), value, same[name], msg=name)


# ----------------------------------------------------------------------------- hand-computed cases


def tiny(logp, old, adv, mask=None, **kw):
    logp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    old = None if old is None else torch.tensor(old, dtype=torch.float64)
    adv = torch.tensor(adv, dtype=torch.float64)
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else torch.tensor(mask)
    res = policy_loss(logp, old, adv, mask=mask, **kw)
    (grad,) = torch.autograd.grad(res.loss, logp)
    return res, grad


def test_hand_clip_high_and_unclipped():
    # ratios 1.5 and 0.5, A = +1, eps 0.2/0.28.
    # token 0: 1.5 > 1.28 and A > 0 → clipped high: loss -1.28, no gradient.
    # token 1: 0.5 < 0.8 but A > 0 → not clipped: loss -0.5, d/dlogp = -A·ρ = -0.5.
    # token-mean: (-1.28 - 0.5) / 2 = -0.89; gradient [0, -0.5 / 2].
    res, grad = tiny([[math.log(1.5), math.log(0.5)]], [[0.0, 0.0]], [1.0])
    assert_close(res.loss, torch.tensor(-0.89, dtype=torch.float64), atol=F64_ATOL)
    assert_close(grad, torch.tensor([[0.0, -0.25]], dtype=torch.float64), atol=F64_ATOL)
    assert res.clip_frac_high.item() == 0.5 and res.clip_frac_low.item() == 0.0
    assert_close(res.ratio_mean, torch.tensor(1.0, dtype=torch.float64), atol=F64_ATOL)
    assert_close(res.ratio_min, torch.tensor(0.5, dtype=torch.float64), atol=F64_ATOL)
    assert_close(res.ratio_max, torch.tensor(1.5, dtype=torch.float64), atol=F64_ATOL)
    assert res.num_tokens.item() == 2


def test_hand_clip_low_and_dual_clip():
    # Same ratios, A = -1. token 0: ρ = 1.5, A < 0 → unclipped: loss +1.5, gradient -A·ρ = 1.5.
    # token 1: ρ = 0.5 < 0.8 and A < 0 → clipped low: loss 0.8, no gradient.
    # token-mean: (1.5 + 0.8) / 2 = 1.15; gradient [1.5 / 2, 0].
    args = ([[math.log(1.5), math.log(0.5)]], [[0.0, 0.0]], [-1.0])
    res, grad = tiny(*args)
    assert_close(res.loss, torch.tensor(1.15, dtype=torch.float64), atol=F64_ATOL)
    assert_close(grad, torch.tensor([[0.75, 0.0]], dtype=torch.float64), atol=F64_ATOL)
    assert res.clip_frac_low.item() == 0.5 and res.clip_frac_high.item() == 0.0
    # dual clip c = 1.2: token 0's 1.5 > -c·A = 1.2 → bounded at 1.2, no gradient.
    # (1.2 + 0.8) / 2 = 1.0; gradient 0 everywhere; half the tokens dual-clipped.
    res, grad = tiny(*args, dual_clip=1.2)
    assert_close(res.loss, torch.tensor(1.0, dtype=torch.float64), atol=F64_ATOL)
    assert_close(grad, torch.zeros(1, 2, dtype=torch.float64), atol=0.0)
    assert res.dual_clip_frac.item() == 0.5


@pytest.mark.parametrize(
    "kl, value, slope",
    [
        ("k1", LN2, 1.0),  # δ = ln 2;  d/dδ = 1
        ("k2", 0.5 * LN2**2, LN2),  # δ²/2 = 0.2402;  d/dδ = δ
        ("k3", 0.5 + LN2 - 1.0, 0.5),  # e^-δ + δ - 1 = 0.5 + 0.6931 - 1 = 0.1931;  1 - e^-δ = 0.5
    ],
)
def test_hand_kl(kl, value, slope):
    # On-policy (ratio 1) with A = 0: pg = 0, so loss = beta·KL on one token, gradient beta·dKL/dδ.
    logp = torch.tensor([[LN2]], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(1, 1, dtype=torch.float64)
    res = policy_loss(
        logp, None, torch.zeros(1, dtype=torch.float64), mask=torch.ones(1, 1, dtype=torch.bool),
        ref_logp=ref, beta=0.1, kl=kl,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(res.loss, logp)
    assert_close(res.loss, torch.tensor(0.1 * value, dtype=torch.float64), atol=F64_ATOL)
    assert_close(grad, torch.tensor([[0.1 * slope]], dtype=torch.float64), atol=F64_ATOL)
    assert_close(res.kl, torch.tensor(value, dtype=torch.float64), atol=F64_ATOL)


@pytest.mark.parametrize(
    "agg, loss, scale",
    [
        ("token-mean", -10 / 4, [[1 / 4], [1 / 4]]),  # 4 tokens
        ("seq-mean-token-mean", (-1 / 1 - 9 / 3) / 2, [[1 / 2], [1 / 6]]),  # |y| = 1, 3; 2 seqs
        ("seq-mean-token-sum", -10 / 2, [[1 / 2], [1 / 2]]),
        ("seq-mean-token-sum-norm", -10 / (2 * 3), [[1 / 6], [1 / 6]]),  # L_max = 3
    ],
)
def test_hand_aggregation(agg, loss, scale):
    # On-policy, per-token A: sequence 0 = [1] (+2 padding), sequence 1 = [2, 3, 4].
    # ratio 1 everywhere, so loss_t = -A_t (sum -10) and d loss_t / d logp_t = -A_t.
    adv = [[1.0, 9.0, 9.0], [2.0, 3.0, 4.0]]
    mask = [[True, False, False], [True, True, True]]
    res, grad = tiny([[-1.0, -1.0, -1.0], [-1.0, -2.0, -0.5]], None, adv, mask, agg=agg)
    expected = (
        -torch.tensor(adv, dtype=torch.float64)
        * torch.tensor(scale, dtype=torch.float64)
        * torch.tensor(mask)
    )
    assert_close(res.loss, torch.tensor(loss, dtype=torch.float64), atol=F64_ATOL)
    assert_close(grad, expected, atol=F64_ATOL)


def test_hand_sequence_ratio():
    # GSPO: log-ratios [ln 2, 0] → mean ln2 / 2 → s = √2 = 1.414 for both tokens.
    # A = +1: s > 1.28 → clipped, loss -1.28 per token, no gradient.
    # A = -1: unclipped, loss √2 per token; d loss / d logp_t = -A·s = √2, / 2 tokens.
    res, grad = tiny([[LN2, 0.0]], [[0.0, 0.0]], [1.0], ratio_level="sequence")
    assert_close(res.loss, torch.tensor(-1.28, dtype=torch.float64), atol=F64_ATOL)
    assert_close(grad, torch.zeros(1, 2, dtype=torch.float64), atol=0.0)
    res, grad = tiny([[LN2, 0.0]], [[0.0, 0.0]], [-1.0], ratio_level="sequence")
    assert_close(res.loss, torch.tensor(math.sqrt(2), dtype=torch.float64), atol=F64_ATOL)
    assert_close(grad, torch.full((1, 2), math.sqrt(2) / 2, dtype=torch.float64), atol=F64_ATOL)
    assert_close(res.ratio_min, torch.tensor(math.sqrt(2), dtype=torch.float64), atol=F64_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gspo_gradient_per_token_follows_the_rollout_weights(backend):
    # GSPO with per-token rollout weights, verl's choice: each token's gradient is its share
    # w_t * (-A_i) * s_i of the sequence's, not the exact derivative of the returned loss (TRL,
    # liger: uniform over the sequence's tokens, s_i * sum_u w_u / |y_i| each).
    # Sequence 0: log-ratios [0.1, -0.2, 0.04] -> s_0 = exp(-0.02) = 0.9802, A = -1, w = [.5, 1, 2].
    # Sequence 1: log-ratios [0.05, -0.05] (and a padded slot) -> s_1 = 1, A = 0.5, w = [1, 4].
    # Both unclipped (0.8 < s < 1.28); token-mean over 5 tokens:
    #   loss = (s_0 * (.5 + 1 + 2) - 0.5 * (1 + 4)) / 5;  d loss / d logp_t = -A_i * s_i * w_t / 5.
    mask = torch.tensor([[True, True, True], [True, True, False]])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, 0.0]])
    old = logp - torch.tensor([[0.1, -0.2, 0.04], [0.05, -0.05, 0.0]])
    w = torch.tensor([[0.5, 1.0, 2.0], [1.0, 4.0, 1.0]])
    rollout = old - w.log()  # w = exp(old - rollout)
    adv = torch.tensor([-1.0, 0.5])
    lp = logp.clone().requires_grad_()
    res = policy_loss(
        lp, old, adv, mask=mask, rollout_logp=rollout, ratio_level="sequence", is_cap=None,
        backend=backend,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(res.loss, lp)

    def expected(dtype):  # the hand formula above, on the float32 inputs, in ``dtype``
        m = mask.to(dtype)
        r = (logp.to(dtype) - old.to(dtype)) * m
        s = torch.exp(r.sum(1) / m.sum(1))[:, None]  # [B, 1]
        w_t = torch.exp(old.to(dtype) - rollout.to(dtype)) * m
        a = adv.to(dtype)[:, None]
        return (-a * s * w_t).sum() / m.sum(), -a * s * w_t / m.sum()

    (loss64, grad64), (loss32, grad32) = expected(torch.float64), expected(torch.float32)
    assert_close_to_ref(res.loss, loss64, loss32, msg="loss")
    assert_close_to_ref(grad, grad64, grad32, msg="grad")
    # grad64 is in proportion to w_t within each sequence. The exact derivative has the same
    # total per sequence, spread evenly: s_0 * 3.5 / 3 / 5 = 0.2287 on each token of sequence 0,
    # where ours is [0.098, 0.196, 0.392].
    uniform = grad64[0].sum() / 3
    assert (grad[0] - uniform).abs().max() > 0.1


@pytest.mark.parametrize("is_cap, weight", [(None, 2.0), (1.5, 1.5)])
def test_hand_rollout_correction(is_cap, weight):
    # logp = old = 0 (ratio 1), rollout = -ln 2 → w = exp(old - rollout) = 2, or min(2, 1.5).
    # A = 1: pg = -1, weighted: -w; gradient -A·ρ·w = -w. KL is not weighted: beta·k1 = 0.1·δ.
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    full = lambda v: torch.full((1, 1), v, dtype=torch.float64)
    res = policy_loss(
        logp, full(0.0), torch.ones(1, dtype=torch.float64), mask=full(1.0) > 0,
        rollout_logp=full(-LN2), is_cap=is_cap, ref_logp=full(-1.0), beta=0.1, kl="k1",
    )  # fmt: skip
    (grad,) = torch.autograd.grad(res.loss, logp)
    assert_close(res.loss, torch.tensor(-weight + 0.1, dtype=torch.float64), atol=F64_ATOL)
    assert_close(grad, torch.tensor([[-weight + 0.1]], dtype=torch.float64), atol=F64_ATOL)


# ------------------------------------------------------------------------- against the reference

COMBOS = list(itertools.product(AGGS, KLS, LEVELS))


@pytest.mark.parametrize("agg, kl, level", COMBOS)
@pytest.mark.parametrize("per_token", [False, True], ids=["adv-seq", "adv-tok"])
def test_matches_reference(agg, kl, level, per_token):
    d = make_batch(per_token=per_token, seed=COMBOS.index((agg, kl, level)))
    kw = dict(agg=agg, kl=kl, ratio_level=level, beta=0.05)
    res, grad = ours(d, **kw)
    loss, ref_grad = theirs(d, **kw)
    assert_close(res.loss, loss, atol=F64_ATOL, msg="loss")
    assert_close(grad, ref_grad, atol=F64_ATOL, msg="grad")


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("is_cap", [None, 1.1])
def test_matches_reference_dual_clip_and_rollout(agg, level, dual_clip, is_cap):
    d = make_batch(per_token=True)
    d["adv"] = d["adv"] * 3  # large |A| so that the dual clip bites
    kw = dict(agg=agg, ratio_level=level, dual_clip=dual_clip, is_cap=is_cap)
    res, grad = ours(d, **kw)
    loss, ref_grad = theirs(d, **kw)
    assert_close(res.loss, loss, atol=F64_ATOL, msg="loss")
    assert_close(grad, ref_grad, atol=F64_ATOL, msg="grad")
    if dual_clip is not None and level == "token":  # sequence ratios stay near 1
        assert res.dual_clip_frac.item() > 0


def test_no_rollout_and_on_policy_match_reference():
    d = make_batch()
    d["rollout"] = None
    for old in (d["old"], None):
        e = {**d, "old": old}
        res, grad = ours(e)
        loss, ref_grad = theirs(e)
        assert_close(res.loss, loss, atol=F64_ATOL)
        assert_close(grad, ref_grad, atol=F64_ATOL)


def test_metrics_match_reference():
    d = make_batch()
    res, _ = ours(d, beta=0.1, kl="k2", dual_clip=2.0)
    expected = reference_metrics(d, beta=0.1, kl="k2", dual_clip=2.0)
    assert expected["dual_clip_frac"] > 0 and expected["clip_frac_low"] > 0  # all of them bite
    for name, value in expected.items():
        got = getattr(res, name)
        assert got.dim() == 0 and not got.requires_grad, name
        assert_close(got, value, atol=F64_ATOL, msg=name)
    assert isinstance(res, PolicyLossOutput)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("agg", AGGS)
def test_packed_and_padded_match_reference(backend, level, agg):
    d = make_batch(b=4, length=300, per_token=True, dtype=torch.float32)
    kw = dict(agg=agg, ratio_level=level, beta=0.1, backend=backend)
    padded, g_padded = ours(d, **kw)
    packed, g_packed = ours(d, packed=True, **kw)  # its gradient is w.r.t. the padded tensor too
    assert_matches_reference(padded, g_padded, d, **kw)
    assert_matches_reference(packed, g_packed, d, **kw)
    assert (g_padded[~d["mask"]] == 0).all() and (g_packed[~d["mask"]] == 0).all()


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("level", LEVELS)
def test_low_precision_inputs(backend, dtype, level):
    d = make_batch(b=3, length=357, per_token=True, dtype=dtype)
    kw = dict(agg="seq-mean-token-mean", ratio_level=level, beta=0.1, dual_clip=3.0, is_cap=2.0)
    res, grad = ours(d, backend=backend, **kw)
    assert res.loss.dtype == torch.float32 and grad.dtype == dtype
    # float64 on the same (rounded) inputs, against the same formula in the input dtype; the
    # clip counts of a half-precision formula flip at random, so its metrics are no yardstick
    assert_matches_reference(res, grad, d, metrics=dtype == torch.float32, **kw)


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradcheck(agg, kl, packed):
    d = make_batch(b=3, length=5, per_token=True)
    m = d["mask"]
    kw = dict(agg=agg, kl=kl, beta=0.1, dual_clip=2.0, is_cap=1.5)
    if packed:
        args = [pack(d[k], m) for k in ("old", "adv", "ref", "rollout")]
        fn = lambda lp: (
            policy_loss(
                lp,
                args[0],
                args[1],
                cu_seqlens=cu_of(m),
                ref_logp=args[2],
                rollout_logp=args[3],
                **kw,
            ).loss
        )
        x = pack(d["logp"], m)
    else:
        fn = lambda lp: (
            policy_loss(
                lp, d["old"], d["adv"], mask=m, ref_logp=d["ref"], rollout_logp=d["rollout"], **kw
            ).loss
        )
        x = d["logp"]
    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),))


def test_gradcheck_sequence_level():
    # GSPO's stop-gradient form has the true gradient when each sequence's loss is its token mean
    # of one shared value: per-sequence advantages, "seq-mean-token-mean", no per-token weights.
    d = make_batch(b=3, length=6)
    fn = lambda lp: (
        policy_loss(
            lp,
            d["old"],
            d["adv"],
            mask=d["mask"],
            ratio_level="sequence",
            agg="seq-mean-token-mean",
        ).loss
    )
    assert torch.autograd.gradcheck(fn, (d["logp"].clone().requires_grad_(),))


# ----------------------------------------------------------------------------- micro-batches


# float64 on the PyTorch path, every combination; the kernels compute in float32 and run in the
# interpreter here, so they take each layout once per ratio level (padded-token, packed-sequence).
MICRO = [
    (agg, level, packed, "torch", torch.float64)
    for agg, level, packed in itertools.product(AGGS, LEVELS, [False, True])
] + [
    (agg, level, level == "sequence", "triton", torch.float32)
    for agg, level in itertools.product(AGGS, LEVELS)
]


@pytest.mark.parametrize(
    "agg, level, packed, backend, dtype",
    MICRO,
    ids=[f"{m[3]}-{'packed' if m[2] else 'padded'}-{m[1]}-{m[0]}" for m in MICRO],
)
def test_micro_batch_invariance(agg, level, packed, backend, dtype):
    d = make_batch(b=8, length=40, per_token=False, seed=3, dtype=dtype)
    d["mask"][5] = False  # an empty response: counted by the caller's N_seqs or not, never NaN
    m = d["mask"]
    glob = dict(num_tokens=int(m.sum()), num_seqs=8, max_len=40)
    kw = dict(agg=agg, ratio_level=level, beta=0.1, backend=backend, **glob)
    full, g_full = ours(d, packed=packed, **kw)
    assert_matches_reference(full, g_full, d, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "backend"}
    loss64, grad64 = theirs(d, **ref_kw)
    loss_lo, grad_lo = theirs(d, dtype=dtype, **ref_kw)
    for splits in (1, 2, 4):
        total, grads = 0.0, []
        for rows in torch.arange(8).chunk(splits):
            part = {k: v[rows] for k, v in d.items()}
            res, g = ours(part, packed=packed, **kw)
            total = total + res.loss
            grads.append(g)
        msg = f"{splits} micro-batches"
        scale = loss_scale(d, **ref_kw)
        assert_close_to_ref(total, loss64, loss_lo, scale=scale, msg=f"{msg}: loss")
        assert_close_to_ref(torch.cat(grads), grad64, grad_lo, msg=f"{msg}: grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_counts_as_tensors(backend, agg):
    # A trainer's all-reduced counts arrive as tensors: same numbers, no host sync needed.
    d = make_batch(b=4, length=30, dtype=torch.float32)
    numbers = dict(num_tokens=500, num_seqs=7, max_len=64)
    tensors = {k: torch.tensor(float(v)) for k, v in numbers.items()}
    for counts in (numbers, tensors):
        res, grad = ours(d, agg=agg, backend=backend, **counts)
        assert_matches_reference(res, grad, d, agg=agg, **numbers)


def test_local_counts_per_micro_batch_differ():
    # The bug class the global counts exist for: normalizing each micro-batch by its own counts.
    d = make_batch(b=8, length=40, seed=4)
    full, _ = ours(d)
    halves = sum(
        ours({k: v[rows] for k, v in d.items()})[0].loss for rows in torch.arange(8).chunk(2)
    )
    assert abs(halves.item() / 2 - full.loss.item()) > 1e-4


# ----------------------------------------------------------------------------- Triton vs PyTorch


@pytest.mark.parametrize("agg, kl, level", COMBOS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_backends_match_reference(agg, kl, level, packed, backend):
    # Each backend against float64, never against each other: k3's 1 - exp(ref - logp) cancels,
    # so two fp32 paths may differ by more than any fixed relative tolerance on one CPU.
    d = make_batch(b=4, length=521, per_token=(kl == "k2"), dtype=torch.float32, seed=7)
    d["mask"][1] = False
    kw = dict(agg=agg, kl=kl, ratio_level=level, beta=0.05, dual_clip=2.5, is_cap=1.2)
    res, grad = ours(d, packed=packed, backend=backend, **kw)
    assert_matches_reference(res, grad, d, **kw)


def test_triton_long_packed_sequence():
    # One packed sequence longer than 65,535 tokens: lengths never go on a grid dimension.
    g = torch.Generator().manual_seed(1)
    t = 70_001
    logp = -3 * torch.rand(t + 3, generator=g)
    old = logp + 0.1 * torch.randn(t + 3, generator=g)
    adv = torch.tensor([0.7, -1.3])
    cu = torch.tensor([0, t, t + 3], dtype=torch.int32)
    mask = torch.arange(t)[None, :] < torch.tensor([t, 3])[:, None]  # the same data, padded
    padded = lambda x: x.new_zeros(mask.shape).masked_scatter(mask, x)  # noqa: E731
    d = dict(logp=padded(logp), old=padded(old), adv=adv, mask=mask, ref=None, rollout=None)
    kw = dict(ratio_level="sequence", agg="seq-mean-token-mean")
    for backend in BACKENDS:
        lp = logp.clone().requires_grad_()
        res = policy_loss(lp, old, adv, cu_seqlens=cu, backend=backend, **kw)
        (grad,) = torch.autograd.grad(res.loss, lp)
        assert_matches_reference(res, padded(grad), d, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("level", LEVELS)
def test_cuda_matches_reference(dtype, packed, level):
    # The compiled kernels (not the interpreter): B > 1 block, ragged, every optional input.
    d = make_batch(b=6, length=1500, per_token=True, dtype=dtype, seed=11)
    kw = dict(agg="seq-mean-token-mean", ratio_level=level, beta=0.1, dual_clip=3.0, is_cap=2.0)
    cuda = {k: v.cuda() for k, v in d.items()}
    res, grad = ours(cuda, packed=packed, backend="auto", **kw)
    assert grad.dtype == dtype and grad.is_cuda
    res = PolicyLossOutput(*(x.cpu() for x in res))
    assert_matches_reference(res, grad.cpu(), d, metrics=dtype == torch.float32, **kw)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_empty_sequences(backend, agg):
    d = make_batch(b=4, length=37, dtype=torch.float32)
    d["mask"][2] = False
    res, grad = ours(d, agg=agg, backend=backend)
    assert_matches_reference(res, grad, d, agg=agg)
    d["mask"][:] = False  # nothing valid at all: 0, not NaN
    res, grad = ours(d, agg=agg, backend=backend)
    assert res.loss.item() == 0.0 and (grad == 0).all() and res.num_tokens.item() == 0
    assert all(torch.isfinite(v).all() for v in res)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # the interpreter's exp(2e4)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("garbage", [math.nan, math.inf, 1e4])  # 1e4: finite, but exp overflows
def test_masked_positions_are_ignored(backend, garbage):
    d = make_batch(b=3, length=50, dtype=torch.float32)
    clean, g_clean = ours(d, beta=0.1, kl="k3", backend=backend)
    for k, sign in (("logp", 1), ("old", -1), ("ref", -1), ("rollout", 1)):
        d[k] = d[k].masked_fill(~d["mask"], sign * garbage)
    dirty, g_dirty = ours(d, beta=0.1, kl="k3", backend=backend)
    assert_close(dirty.loss, clean.loss, atol=0.0)
    assert_close(g_dirty, g_clean, atol=0.0)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's NaN math
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["logp", "old_logp", "ref_logp", "advantages", "rollout_logp"])
def test_nonfinite_inputs(backend, name):
    d = make_batch(b=3, length=20, dtype=torch.float32)
    key = {"old_logp": "old", "ref_logp": "ref", "advantages": "adv", "rollout_logp": "rollout"}
    k = key.get(name, name)
    d[k] = d[k].clone()
    d[k].view(-1)[0] = float("nan")  # token (0, 0), made valid
    d["mask"][0, 0] = True
    with pytest.raises(ValueError, match=name):
        ours(d, beta=0.1, backend=backend)
    res, _ = ours(d, beta=0.1, backend=backend, check_finite=False)
    assert res.num_nonfinite.item() >= 1 and not torch.isfinite(res.loss)


def test_beta_zero_does_not_read_ref():
    d = make_batch(b=3, length=20)
    clean, g_clean = ours(d)
    d["ref"] = torch.full_like(d["ref"], float("nan"))
    res, grad = ours(d)  # beta = 0: no error, same numbers
    assert res.loss.item() == clean.loss.item() and torch.equal(grad, g_clean)
    assert res.kl.item() == 0.0


def test_module_matches_function():
    d = make_batch(b=3, length=20)
    module = PolicyLossModule(eps_low=0.1, eps_high=0.2, dual_clip=3.0, agg="seq-mean-token-sum")
    res = module(d["logp"], d["old"], d["adv"], mask=d["mask"], num_seqs=5)
    ref = policy_loss(
        d["logp"], d["old"], d["adv"], mask=d["mask"], eps_low=0.1, eps_high=0.2, dual_clip=3.0,
        agg="seq-mean-token-sum", num_seqs=5,
    )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(res, ref, strict=True))
    assert "seq-mean-token-sum" in repr(module)


def _bad(**change):
    d = make_batch(b=3, length=8)
    args = dict(logp=d["logp"], old_logp=d["old"], advantages=d["adv"], mask=d["mask"])
    args.update(change)
    return args


BAD = [
    (dict(cu_seqlens=torch.tensor([0, 8, 16, 24])), "exactly one of mask"),
    (dict(mask=None), "exactly one of mask"),
    (dict(mask=torch.ones(3, 7, dtype=torch.bool)), "mask"),
    (dict(old_logp=torch.zeros(3, 7, dtype=torch.float64)), "old_logp"),
    (dict(advantages=torch.zeros(4, dtype=torch.float64)), "advantages"),
    (dict(advantages=torch.zeros(3, dtype=torch.int64)), "advantages"),
    (dict(ref_logp=torch.zeros(2, 8, dtype=torch.float64), beta=0.1), "ref_logp"),
    (dict(beta=0.1), "ref_logp"),
    (dict(rollout_logp=torch.zeros(8, dtype=torch.float64)), "rollout_logp"),
    (dict(agg="mean"), "agg"),
    (dict(kl="k4"), "kl"),
    (dict(ratio_level="seq"), "ratio_level"),
    (dict(eps_low=1.0), "eps_low"),
    (dict(eps_low=-0.1), "eps_low"),
    (dict(eps_high=-0.1), "eps_high"),
    (dict(dual_clip=1.0), "dual_clip"),
    (dict(beta=-1.0), "beta"),
    (dict(is_cap=0.0), "is_cap"),
    (dict(num_tokens=0), "num_tokens"),
    (dict(num_seqs=-2), "num_seqs"),
    (dict(max_len=torch.tensor([3, 4])), "max_len"),
    (dict(backend="cuda"), "backend"),
    (dict(logp=torch.zeros(3, 8, dtype=torch.int64)), "logp"),
]


@pytest.mark.parametrize("change, match", BAD, ids=[m + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_inputs(change, match):
    with pytest.raises(ValueError, match=match):
        policy_loss(**_bad(**change))


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_advantages_read_by_shape_when_valid_tokens_equal_b(backend):
    # mask [[1, 1, 0], [0, 0, 0]]: 2 valid tokens for B = 2. [B, L] is per token, [B] per
    # sequence, whatever the counts. On-policy, token-mean of -A_t: -(1 - 3) / 2 = +1 per token;
    # -(1 + 1) / 2 = -1 per sequence (A = [1, -3]: sequence 0 gets 1 on both tokens).
    logp = torch.tensor([[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    per_token = torch.tensor([[1.0, -3.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    res = policy_loss(logp, None, per_token, mask=mask, backend=backend)
    assert res.loss.item() == 1.0
    per_seq = torch.tensor([1.0, -3.0], dtype=torch.float64)
    assert policy_loss(logp, None, per_seq, mask=mask, backend=backend).loss.item() == -1.0


def test_packed_advantages_with_t_equal_b_are_per_sequence():
    # lens [0, 2]: T == B == 2, so advantages of 2 values are read per sequence (A_0 unused).
    logp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    res = policy_loss(
        logp,
        None,
        torch.tensor([5.0, 1.0], dtype=torch.float64),
        cu_seqlens=torch.tensor([0, 0, 2]),
    )
    assert res.loss.item() == -1.0  # on-policy: -A_1 on both tokens, token-mean


@pytest.mark.parametrize(
    "cu, match",
    [
        (torch.tensor([0, 5, 3, 10]), "cu_seqlens"),  # not rising
        (torch.tensor([1, 5, 10]), "cu_seqlens"),  # does not start at 0
        (torch.tensor([0, 5, 9]), "cu_seqlens"),  # does not end at T
        (torch.tensor([0.0, 10.0]), "cu_seqlens"),  # not integer
        (torch.tensor([10]), "cu_seqlens"),  # no sequence
    ],
)
def test_bad_cu_seqlens(cu, match):
    logp = torch.randn(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        policy_loss(logp, None, torch.ones(10, dtype=torch.float64), cu_seqlens=cu)


# ----------------------------------------------------------------------------- property test


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    agg=st.sampled_from(AGGS),
    level=st.sampled_from(LEVELS),
    seed=st.integers(0, 2**16),
)
def test_ragged_packed_matches_reference(lens, agg, level, seed):
    width = max(max(lens), 1)
    # T == B reads [B] advantages as per-sequence (documented), so per-token only when T != B.
    per_token = sum(lens) != len(lens)
    d = make_batch(b=len(lens), length=width, per_token=per_token, seed=seed)
    d["mask"] = torch.arange(width)[None, :] < torch.tensor(lens)[:, None]
    res, grad = ours(d, packed=True, agg=agg, ratio_level=level)
    loss, ref_grad = theirs(d, agg=agg, ratio_level=level)
    assert_close(res.loss, loss, atol=F64_ATOL)
    assert_close(grad, ref_grad, atol=F64_ATOL)


# ----------------------------------------------------------------------------- counts

NAN, INF = float("nan"), float("inf")
BAD_COUNTS = [
    torch.tensor(0.0),
    torch.tensor(-3.0),
    torch.tensor(NAN),
    torch.tensor(INF),
    torch.tensor(0),  # an integer count, e.g. mask.sum() of an empty step
    torch.tensor([-1]),  # a 1-element tensor
    INF,
    NAN,
    -INF,
]
COUNT_AGG = {"num_tokens": "token-mean", "num_seqs": "seq-mean-token-sum",
             "max_len": "seq-mean-token-sum-norm"}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(COUNT_AGG))
@pytest.mark.parametrize("value", BAD_COUNTS, ids=[repr(v) for v in BAD_COUNTS])
def test_counts_that_are_not_positive_and_finite_raise(backend, name, value):
    # The README passes mask.sum(): a tensor count of 0 (or NaN, inf, < 0) would make the loss
    # and its gradient 0 or NaN in silence.
    d = make_batch(b=3, length=20, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"{name} must be a positive"):
        ours(d, agg=COUNT_AGG[name], backend=backend, **{name: value})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(COUNT_AGG))
def test_module_rejects_a_zero_tensor_count(backend, name):
    d = make_batch(b=3, length=20, dtype=torch.float32)
    module = PolicyLossModule(agg=COUNT_AGG[name], backend=backend)
    with pytest.raises(ValueError, match=name):
        module(d["logp"], d["old"], d["adv"], mask=d["mask"], **{name: torch.tensor(0)})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [torch.tensor(0.0), torch.tensor(NAN), torch.tensor(INF)])
def test_unchecked_bad_tensor_count_makes_the_loss_nan(backend, value):
    # check_finite=False: no host sync to raise from, so the bad count shows as NaN, never as 0.
    d = make_batch(b=3, length=20, dtype=torch.float32)
    res, grad = ours(d, num_tokens=value, backend=backend, check_finite=False)
    assert torch.isnan(res.loss) and torch.isnan(grad[d["mask"]]).all()


def test_the_result_is_a_policy_loss_output():
    import papo_fast

    d = make_batch(b=2, length=4)
    res = policy_loss(d["logp"], d["old"], d["adv"], mask=d["mask"])
    assert type(res) is papo_fast.PolicyLossOutput and type(res).__name__ == "PolicyLossOutput"
    assert papo_fast.PolicyLoss is papo_fast.PolicyLossOutput  # the old name, kept for a release
    assert {"PolicyLossOutput", "PolicyLoss", "PolicyLossConfig"} <= set(papo_fast.__all__)
