"""policy_loss on edge-case and bad inputs: empty and ragged sequences, masked garbage,
non-finite values, counts, shapes and layouts, each against policy_loss_ref or a named error."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64_ATOL, assert_close, assert_matches_reference, make_batch, ours, theirs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from papo_fast import PolicyLossModule, policy_loss
from papo_fast.kernels.loss_config import AGGS, RATIO_LEVELS

LEVELS = RATIO_LEVELS
BACKENDS = ["torch", "triton"]


# ------------------------------------------------------------------- edge cases


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


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's NaN math
@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_a_non_finite_logp_counts_once(backend):
    # old_logp None: only logp is read (the ratio is exp(logp - sg(logp))), so one NaN in it is
    # one non-finite value, as policy_loss_ref counts it, on both backends.
    d = make_batch(b=3, length=20, dtype=torch.float32)
    d["logp"] = d["logp"].clone()
    d["logp"][0, 0] = float("nan")
    d["mask"][0, 0] = True
    d["old"] = None
    res, _ = ours(d, backend=backend, check_finite=False)
    want, _ = theirs(d)
    assert res.num_nonfinite.item() == want.num_nonfinite.item() == 1


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


# ------------------------------------------------------------------- bad inputs


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


# ---------------------------------------------------------------- property test


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
    want, ref_grad = theirs(d, agg=agg, ratio_level=level)
    assert_close(res.loss, want.loss, atol=F64_ATOL)
    assert_close(grad, ref_grad, atol=F64_ATOL)


# ----------------------------------------------------------------------- counts

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
