"""papo_advantages against papo_advantages_ref, the per-group loop of the released training code,
in float64: hand-computed groups, edge groups, modes, dtypes, ragged groups, huge rewards. Bad and
unrepresentable inputs are in test_advantages_inputs.py."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64_ATOL, assert_close, assert_close_to_ref, data_scale, ref_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from papo_fast import papo_advantages
from papo_fast.kernels.advantages import MODES, papo_advantages_ref

MODE_NAMES = list(MODES)  # papo, orm, prm, mult, fullnorm
BACKENDS = ["torch", "triton"]


# ---------------------------------------------------------------- the reference


def pow2_scale(x: torch.Tensor) -> float:
    """2^floor(log2 max|x|), 1 for zeros: dividing by it is exact and brings max|x| into [1, 2)."""
    m = x.double().abs().max().item() if x.numel() else 0.0
    return 2.0 ** math.floor(math.log2(m)) if m > 0 else 1.0


def reference_fp32_unit_scale(want, outcome, process, correct, groups, mode, lam=1.0, scale=True):
    """The float32 reference with each group's rewards brought to [1, 2) by a power of two (exact,
    eps divided alike) and its results scaled back: float32's own error on rewards whose squares
    float32 cannot hold (plain float32 overflows there). Its statistics are those of ``want``, the
    float64 reference: the advantages' error bounds theirs (``assert_stats_match``)."""
    n, eps = outcome.numel(), 1e-6
    parts = [torch.zeros(n, dtype=torch.float32) for _ in range(2)]  # outcome part, process part
    for idx in groups:
        idx_t = torch.tensor(idx, dtype=torch.long)
        o = outcome.double()[idx_t]
        p = process.double()[idx_t] if process is not None else torch.zeros_like(o)
        if mode == "mult":  # the product (exact in float64), normalized like an outcome
            o, p = o * p, torch.ones_like(o)
        k_out, k_proc = pow2_scale(o), pow2_scale(p)
        for part, k in ((0, k_out), (1, k_proc)):  # each part with its own eps / k
            res = papo_advantages_ref(
                o / k_out, p / k_proc, group_ids=torch.zeros(len(idx)), correct=correct[idx_t],
                mode=mode, lam=lam, eps=eps / k, scale_by_std=scale, dtype=torch.float32,
            )  # fmt: skip
            got = res[1 + part]  # outcome_adv, process_adv
            parts[part][idx_t] = got if scale else got * k  # a power of two: exact
    weight = 1.0 if mode == "prm" else lam
    return want._replace(advantages=parts[0] + weight * parts[1], outcome_adv=parts[0],
                         process_adv=parts[1])  # fmt: skip


def assert_stats_match(stats, want, same, correct):
    """Ours against the float64 reference's statistics, the tolerance from the float32
    reference's. A mean or min of advantages each within the advantages' tolerance is within it
    too: the advantages' own float32 error bounds theirs, at the scale of those advantages."""
    adv_err = ref_error(same.advantages, want.advantages)
    of = {"correct_adv_min": correct, "correct_adv_mean": correct, "wrong_adv_mean": ~correct}
    for key, value in want.stats.items():
        scale, err = None, 0.0
        if key in of:
            scale, err = data_scale(want.advantages[of[key]]), adv_err
        s = same.stats[key]
        assert_close_to_ref(stats[key].cpu(), value, s, scale=scale, ref_err=err, msg=key)


def groups_of(group_ids: torch.Tensor) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        groups.setdefault(g, []).append(i)
    return list(groups.values())


def check(outcome, process, group_ids, mode, backend, correct=None, scale=True, lam=1.0):
    """Run ours with group ids, compare all outputs and stats with the reference."""
    corr = correct if correct is not None else outcome == 1
    kw = dict(group_ids=group_ids, correct=correct, mode=mode, lam=lam, scale_by_std=scale)
    res = papo_advantages(outcome, process, backend=backend, **kw)
    want = papo_advantages_ref(outcome, process, **kw)
    same = papo_advantages_ref(outcome, process, dtype=torch.float32, **kw)
    for name in ("advantages", "outcome_adv", "process_adv"):
        ours = getattr(res, name)
        assert ours.dtype == torch.float32
        w, s = getattr(want, name), getattr(same, name)
        assert_close_to_ref(ours, w, s, msg=f"{mode} {backend} {name}")
    assert_stats_match(res.stats, want, same, corr)
    return res


def exactly(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- hand-computed


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_group(backend):
    # One group of 4: outcome [1, 0, 1, 1] -> mean 0.75, unbiased std sqrt(0.75 / 3) = 0.5,
    #   A_out = [0.25, -0.75, 0.25, 0.25] / (0.5 + eps) = [0.5, -1.5, 0.5, 0.5] (1 - 2e-6).
    # Correct ones {0, 2, 3} have process [1, 0.5, 1] -> mean 5/6, std sqrt((2/36 + 4/36) / 2)
    #   = sqrt(1/12) = 0.288675; A_proc = [1/6, -1/3, 1/6] / (0.288675 + eps)
    #   = [0.57735, -1.1547, 0.57735]; the wrong response's process score (0.9) is ignored.
    eps, std_c = 1e-6, math.sqrt(1 / 12)
    a_out = exactly(0.25, -0.75, 0.25, 0.25) / (0.5 + eps)
    a_proc = exactly(1 / 6, 0.0, -1 / 3, 1 / 6) / (std_c + eps)
    out = torch.tensor([1.0, 0.0, 1.0, 1.0])
    proc = torch.tensor([1.0, 0.9, 0.5, 1.0])
    res = papo_advantages(out, proc, group_offsets=torch.tensor([0, 4]), backend=backend)
    want = papo_advantages_ref(out, proc, group_offsets=torch.tensor([0, 4]))
    assert_close(want.advantages, a_out + a_proc, atol=F64_ATOL, msg="the reference")
    same = papo_advantages_ref(out, proc, group_offsets=torch.tensor([0, 4]), dtype=torch.float32)
    assert_close_to_ref(res.outcome_adv, a_out, same[1], msg="outcome_adv")
    assert_close_to_ref(res.process_adv, a_proc, same[2], msg="process_adv")
    assert_close_to_ref(res.advantages, a_out + a_proc, same[0], msg="advantages")
    assert res.stats["proc_active_frac"].item() == 1.0
    assert_close_to_ref(res.stats["correct_adv_min"], (a_out + a_proc)[2], same[0][2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_centre_only_and_lambda(backend):
    # scale_by_std=False: A_out = r - mean = [0.25, -0.75, 0.25, 0.25];
    # A_proc among correct = [1/6, -1/3, 1/6]; lam = 0.5 halves the process part.
    out = torch.tensor([1.0, 0.0, 1.0, 1.0])
    proc = torch.tensor([1.0, 0.0, 0.5, 1.0])
    res = papo_advantages(
        out, proc, group_offsets=torch.tensor([0, 4]), scale_by_std=False, lam=0.5, backend=backend
    )
    want = exactly(0.25 + 0.5 / 6, -0.75, 0.25 - 0.5 / 3, 0.25 + 0.5 / 6)
    kw = dict(group_offsets=torch.tensor([0, 4]), scale_by_std=False, lam=0.5)
    assert_close(papo_advantages_ref(out, proc, **kw).advantages, want, atol=F64_ATOL)
    same = papo_advantages_ref(out, proc, dtype=torch.float32, **kw)
    assert_close_to_ref(res.advantages, want, same[0])


def test_orm_needs_no_process():
    # [1, 0]: mean 0.5, unbiased std sqrt(0.5), A = +-0.5 / (sqrt(0.5) + eps) = +-0.70711
    out = torch.tensor([1.0, 0.0])
    res = papo_advantages(out, group_offsets=torch.tensor([0, 2]), mode="orm")
    want = exactly(0.5, -0.5) / (math.sqrt(0.5) + 1e-6)
    kw = dict(group_offsets=torch.tensor([0, 2]), mode="orm")
    assert_close(papo_advantages_ref(out, **kw).advantages, want, atol=F64_ATOL)
    same = papo_advantages_ref(out, dtype=torch.float32, **kw)
    assert_close_to_ref(res.advantages, want, same[0])


# ------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_edge_groups(mode, backend):
    # ids 10: group of one; 20: all correct, distinct process; 30: all wrong; 40: exactly one
    # correct; 50: all correct with equal process scores; 60: mixed.
    ids = [10, 20, 20, 20, 30, 30, 30, 40, 40, 40, 50, 50, 50, 60, 60, 60, 60]
    out = [1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0]
    proc = [1, 1, 0.5, 0, 0, 0, 0, 0.5, 0, 0, 0.5, 0.5, 0.5, 1, 0, 0.5, 0]
    perm = torch.randperm(len(ids))
    ids_t, out_t, proc_t = (torch.tensor(v)[perm] for v in (ids, out, proc))
    res = check(out_t.float(), proc_t.float(), ids_t, mode, backend)
    by_id = {g: res.advantages[ids_t == g] for g in ids}
    assert (by_id[10] == 0).all() and (by_id[30] == 0).all()
    if mode == "papo":
        # all-correct group: ORM would give 0, PAPO keeps a signal from the rubric
        assert (by_id[20] != 0).any()
        assert (by_id[50] == 0).all()  # equal process scores: std 0 -> inactive
        assert (res.process_adv[ids_t == 40] == 0).all()  # one correct: A_proc needs two


@pytest.mark.parametrize("backend", BACKENDS)
def test_correct_given_separately_from_shaped_outcome(backend):
    # An overlong penalty shapes outcome 1 -> 0.8; the response is still correct, so it joins
    # the process normalization although outcome != 1.
    out = torch.tensor([1.0, 0.8, 0.0, 1.0, 0.8, 0.0])
    proc = torch.tensor([1.0, 0.5, 0.0, 0.5, 1.0, 1.0])
    correct = torch.tensor([True, True, False, True, True, False])
    ids = torch.tensor([5, 5, 5, 9, 9, 9])
    res = check(out, proc, ids, "papo", backend, correct=correct)
    assert (res.process_adv[[1, 4]] != 0).all()
    default = papo_advantages(out, proc, group_ids=ids, backend=backend)
    assert (default.process_adv == 0).all()  # only one outcome == 1 per group


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["papo", "fullnorm"])
def test_large_groups(mode, backend):
    # two ragged groups of 1024 and 1000 (not a multiple of any block) in shuffled order
    ids = torch.cat([torch.zeros(1024), torch.ones(1000)]).long()[torch.randperm(2024)]
    out = (torch.rand(2024) < 0.6).float()
    proc = torch.randint(0, 3, (2024,)).float() / 2
    check(out, proc, ids, mode, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_input_dtypes(dtype, backend):
    # shaped outcomes and continuous process scores, exactly representable in every dtype
    ids = torch.randint(0, 12, (96,))
    out = (torch.randint(0, 4, (96,)) / 4).to(dtype)
    proc = (torch.randint(0, 8, (96,)) / 8).to(dtype)
    for mode in MODE_NAMES:
        check(out, proc, ids, mode, backend, correct=out > 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_noncontiguous_ids_and_offsets_agree(backend):
    ids = torch.randint(-(2**62), 2**62, (40,)).unique()  # distinct, sorted, huge, gappy
    sizes = torch.randint(1, 11, (ids.numel(),))
    ids_sorted = torch.repeat_interleave(ids, sizes)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    n = ids_sorted.numel()
    out, proc = torch.rand(n), torch.rand(n)
    correct = torch.rand(n) < 0.5
    by_offsets = papo_advantages(out, proc, group_offsets=offsets, correct=correct, backend=backend)
    want, same = (
        papo_advantages_ref(out, proc, group_offsets=offsets, correct=correct, dtype=t)
        for t in (torch.float64, torch.float32)
    )
    assert_close_to_ref(by_offsets.advantages, want[0], same[0], msg="by offsets")
    perm = torch.randperm(n)
    check(out[perm], proc[perm], ids_sorted[perm], "papo", backend, correct=correct[perm])


# ---------------------------------------------------------------- property test


group_strategy = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from([0.0, 1.0, 1.0, 0.7]),  # outcome (0.7 = shaped, still correct)
            st.sampled_from([0.0, 0.5, 1.0]),  # rubric tier
            st.floats(-3, 3, allow_nan=False),  # a continuous score, for "prm"/"mult" spread
        ),
        min_size=1,
        max_size=9,
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups=group_strategy, data=st.data())
def test_random_ragged_groups(groups, data):
    backend = data.draw(st.sampled_from(BACKENDS))
    mode = data.draw(st.sampled_from(MODE_NAMES))
    scale = data.draw(st.booleans())
    tiered = data.draw(st.booleans())
    rows = [(gi * 7919 + 3, o, t if tiered else c) for gi, g in enumerate(groups) for o, t, c in g]
    order = data.draw(st.permutations(range(len(rows))))
    ids = torch.tensor([rows[i][0] for i in order])
    out = torch.tensor([rows[i][1] for i in order])
    proc = torch.tensor([rows[i][2] for i in order])
    check(out, proc, ids, mode, backend, correct=out > 0.5, scale=scale, lam=0.7)


# ------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_cuda_kernel_matches_the_cpu_path(mode):
    # 2000 ragged groups (~8 each) in shuffled order, plus one group of 1500: the compiled kernel
    ids = torch.cat([torch.randint(0, 2000, (16000,)), torch.full((1500,), 10**12)])
    ids = ids[torch.randperm(ids.numel())]
    out = (torch.randint(0, 4, (ids.numel(),)) / 4).float()
    proc = (torch.randint(0, 3, (ids.numel(),)) / 2).float()
    correct = out > 0.5
    gpu = papo_advantages(
        out.cuda(), proc.cuda(), group_ids=ids.cuda(), correct=correct.cuda(), mode=mode
    )
    assert all(a.is_cuda for a in gpu[:3])
    kw = dict(group_ids=ids, correct=correct, mode=mode)
    want = papo_advantages_ref(out, proc, **kw)
    same = papo_advantages_ref(out, proc, dtype=torch.float32, **kw)
    for name, a, r64, r32 in zip(gpu._fields, gpu[:3], want, same, strict=False):
        assert_close_to_ref(a.cpu(), r64, r32, msg=name)
    assert_stats_match(gpu.stats, want, same, correct)


# ----------------------------------------------------------------- huge rewards


def huge_batch(big: float):
    """Shuffled groups: outcomes at ``big``, process scores at ``big``, ordinary rewards, small
    rewards, one group that mixes ``big`` with ordinary values, one of +-big. Centred values stay
    within +-big, so that even scale_by_std=False advantages fit in float32."""
    groups = [  # (outcome, process, correct)
        ([big, 0, big / 2, big / 4, big, 0.75 * big], [1, 0, 0.5, 0.5, 1, 0], [1, 0, 1, 0, 1, 1]),
        ([1, 0, 1, 0.7], [0.3 * big, big, 0.6 * big, 0.9 * big], [1, 0, 1, 1]),
        ([1, 0, 1, 0.7, 0], [0.5, 1, 0, 1, 0.5], [1, 0, 1, 1, 0]),
        ([1e-3, 4e-3, 2e-3], [0.2, 0.1, 0.4], [1, 1, 0]),
        ([big, 1, 2, 3, 0], [1, 0.5, 1, 0, 1], [1, 1, 0, 1, 1]),
        # mean 0, so centred values stay within +-big; the squares sum to 6.5 big^2
        ([big, -big, big, -big, big / 2, -big / 2, big, -big], [0, 1] * 4, [1, 0] * 4),
    ]
    ids = [g for g, (o, _, _) in enumerate(groups) for _ in o]
    cat = lambda k: [v for g in groups for v in g[k]]  # noqa: E731
    perm = torch.randperm(len(ids))
    return (
        torch.tensor(ids)[perm],
        torch.tensor(cat(0), dtype=torch.float32)[perm],
        torch.tensor(cat(1), dtype=torch.float32)[perm],
        torch.tensor(cat(2), dtype=torch.bool)[perm],
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("big", [1e19, 1e30, 3e38])
@pytest.mark.parametrize("scale", [True, False], ids=["std", "centre"])
def test_huge_rewards_match_the_float64_reference(backend, mode, big, scale):
    # 1e19 squared overflows float32 (3.4e38): the normalization must not square raw rewards.
    ids, out, proc, correct = huge_batch(big)
    res = papo_advantages(
        out, proc, group_ids=ids, correct=correct, mode=mode, lam=0.7, scale_by_std=scale,
        backend=backend,
    )  # fmt: skip
    groups = groups_of(ids)
    kw = dict(correct=correct, mode=mode, lam=0.7, scale_by_std=scale)
    want = papo_advantages_ref(out, proc, group_ids=ids, **kw)
    same = reference_fp32_unit_scale(want, out, proc, correct, groups, mode, 0.7, scale=scale)
    for name, ours, r64, r32 in zip(res._fields, res[:3], want, same, strict=False):
        for g, idx in enumerate(groups):  # each group at its own scale
            msg = f"{name}, group {g}"
            assert_close_to_ref(ours[idx], r64[idx], r32[idx], msg=msg)
    assert (res.advantages[ids == 0] != 0).any()  # the big groups are active, not zeroed
    assert_stats_match(res.stats, want, same, correct)
