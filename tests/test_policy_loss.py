"""policy_loss against policy_loss_ref in float64 and hand-computed cases: formulas, settings,
layouts, dtypes, gradients, micro-batches and both backends. Edge-case and bad inputs are in
test_policy_loss_inputs.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import (
    F64_ATOL,
    assert_close,
    assert_close_to_ref,
    assert_matches_reference,
    cu_of,
    gradcheck_fresh,
    loss_scale,
    make_batch,
    ours,
    pack,
    theirs,
)

from papo_fast import PolicyLossOutput, policy_loss
from papo_fast.kernels.loss_config import AGGS, KLS, RATIO_LEVELS
from papo_fast.kernels.policy_loss_ref import policy_loss_ref

LEVELS = RATIO_LEVELS
BACKENDS = ["torch", "triton"]
LN2 = math.log(2.0)


# ---------------------------------------------------------- hand-computed cases


def tiny(logp, old, adv, mask=None, **kw):
    """policy_loss on a hand-written float64 case; policy_loss_ref must give the same numbers
    (so the hand values check the reference too)."""
    logp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    old = None if old is None else torch.tensor(old, dtype=torch.float64)
    adv = torch.tensor(adv, dtype=torch.float64)
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else torch.tensor(mask)
    res = policy_loss(logp, old, adv, mask=mask, **kw)
    (grad,) = torch.autograd.grad(res.loss, logp)
    want = policy_loss_ref(logp, old, adv, mask, **kw)
    (want_grad,) = torch.autograd.grad(want.loss, logp)
    for name, value in zip(res._fields, res, strict=True):
        assert_close(value, getattr(want, name).detach(), atol=F64_ATOL, msg=f"reference {name}")
    assert_close(grad, want_grad, atol=F64_ATOL, msg="reference grad")
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
    # GSPO with per-token rollout weights (docs/design.md, "GSPO with rollout weights"), as verl
    # does it: each token's gradient is its share w_t * (-A_i) * s_i of the sequence's, not the
    # exact derivative of the returned loss (TRL, liger: uniform over the sequence's tokens,
    # s_i * sum_u w_u / |y_i| each).
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


# -------------------------------------------------------- against the reference

COMBOS = list(itertools.product(AGGS, KLS, LEVELS))


@pytest.mark.parametrize("agg, kl, level", COMBOS)
@pytest.mark.parametrize("per_token", [False, True], ids=["adv-seq", "adv-tok"])
def test_matches_reference(agg, kl, level, per_token):
    d = make_batch(per_token=per_token, seed=COMBOS.index((agg, kl, level)))
    kw = dict(agg=agg, kl=kl, ratio_level=level, beta=0.05)
    res, grad = ours(d, **kw)
    want, ref_grad = theirs(d, **kw)
    assert_close(res.loss, want.loss, atol=F64_ATOL, msg="loss")
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
    want, ref_grad = theirs(d, **kw)
    assert_close(res.loss, want.loss, atol=F64_ATOL, msg="loss")
    assert_close(grad, ref_grad, atol=F64_ATOL, msg="grad")
    if dual_clip is not None and level == "token":  # sequence ratios stay near 1
        assert res.dual_clip_frac.item() > 0


def test_no_rollout_and_on_policy_match_reference():
    d = make_batch()
    d["rollout"] = None
    for old in (d["old"], None):
        e = {**d, "old": old}
        res, grad = ours(e)
        want, ref_grad = theirs(e)
        assert_close(res.loss, want.loss, atol=F64_ATOL)
        assert_close(grad, ref_grad, atol=F64_ATOL)


def test_metrics_match_reference():
    d = make_batch()
    res, _ = ours(d, beta=0.1, kl="k2", dual_clip=2.0)
    expected, _ = theirs(d, beta=0.1, kl="k2", dual_clip=2.0)
    assert expected.dual_clip_frac > 0 and expected.clip_frac_low > 0  # all of them bite
    for name in PolicyLossOutput._fields[1:]:
        got = getattr(res, name)
        assert got.dim() == 0 and not got.requires_grad, name
        assert_close(got, getattr(expected, name).detach(), atol=F64_ATOL, msg=name)
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


# ----------------------------------------------------------------------- dtypes


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


# -------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("agg", AGGS)
# k3+ takes k2's gradient on purpose (straight-through): not its value's derivative
@pytest.mark.parametrize("kl", [k for k in KLS if k != "k3+"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradcheck(agg, kl, packed):
    d = make_batch(b=3, length=5, per_token=True)
    m = d["mask"]
    kw = dict(agg=agg, kl=kl, beta=0.1, dual_clip=2.0, is_cap=1.5)
    layout = dict(cu_seqlens=cu_of(m)) if packed else dict(mask=m)
    old, adv, ref, rollout = (
        pack(d[k], m) if packed else d[k] for k in ("old", "adv", "ref", "rollout")
    )
    x = pack(d["logp"], m) if packed else d["logp"]

    def fn(lp):
        return policy_loss(lp, old, adv, ref_logp=ref, rollout_logp=rollout, **layout, **kw).loss

    assert gradcheck_fresh(fn, x.clone().requires_grad_())


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
    assert gradcheck_fresh(fn, d["logp"].clone().requires_grad_())


# ---------------------------------------------------------------- micro-batches


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
    want, grad64 = theirs(d, **ref_kw)
    same, grad_lo = theirs(d, dtype=dtype, **ref_kw)
    for splits in (1, 2, 4):
        total, grads = 0.0, []
        for rows in torch.arange(8).chunk(splits):
            part = {k: v[rows] for k, v in d.items()}
            res, g = ours(part, packed=packed, **kw)
            total = total + res.loss
            grads.append(g)
        msg = f"{splits} micro-batches"
        scale = loss_scale(d, **ref_kw)
        assert_close_to_ref(total, want.loss, same.loss, scale=scale, msg=f"{msg}: loss")
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


# ----------------------------------------------------------------------- Triton


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
