"""logits_policy_loss against the float64 formula (log_softmax, gather, policy_loss_ref), against
liger-kernel's triton_grpo_loss where their settings correspond, its checks and its launch grid."""

import pytest
import torch
from helpers import (
    assert_close,
    assert_close_to_ref,
    cu_of,
    gradcheck_fresh,
    loss_scale,
    make_batch,
    pack,
)

from papo_fast import logits_policy_loss
from papo_fast.kernels import logits_policy_loss_triton as lpt
from papo_fast.kernels.logits_policy_loss import logits_policy_loss_ref

BACKENDS = ["torch", "triton"]
# A vocabulary past one 4096-wide block (the Triton kernels' largest) and a small odd one.
VOCABS = [97, 4099]


def make_logits_batch(b=4, length=9, v=97, *, dtype=torch.float32, seed=0, full=False):
    """make_batch's loss inputs with logits [B, L, V] in ``dtype`` (logits [B, L + 1, V] with
    ``full``, a causal LM's output) and their targets; lengths 9, 1, 5, 7 with holes."""
    d = make_batch(b, length, dtype=torch.float64, seed=seed, lengths=[length, 1, 5, 7][:b])
    d["mask"][0, length // 3] = False  # a hole inside a sequence
    g = torch.Generator().manual_seed(seed + 1)
    d["logits"] = (2 * torch.randn(b, length + full, v, generator=g, dtype=torch.float64)).to(dtype)
    d["targets"] = torch.randint(0, v, (b, length), generator=g)
    # old / ref / rollout near the logits' own logp, as make_batch's lm_head batches are
    z = d["logits"][:, :length].double().log_softmax(-1)
    logp = z.gather(-1, d["targets"][..., None]).squeeze(-1)
    d["old"] = logp + 0.3 * torch.randn(b, length, generator=g, dtype=torch.float64)
    d["ref"] = logp + 0.2 * torch.randn(b, length, generator=g, dtype=torch.float64)
    d["rollout"] = d["old"] + 0.2 * torch.randn(b, length, generator=g, dtype=torch.float64)
    return d


def kw_of(d):
    return dict(ref_logp=d["ref"], rollout_logp=d["rollout"])


def run_ours(d, backend, packed=False, logits=None, **kw):
    """(result, grad_logits laid out like the padded logits)."""
    logits = (d["logits"] if logits is None else logits).detach().clone().requires_grad_()
    m = d["mask"]
    if packed:
        res = logits_policy_loss(
            logits[m], d["targets"][m], pack(d["old"], m), pack(d["adv"], m), cu_seqlens=cu_of(m),
            ref_logp=pack(d["ref"], m), rollout_logp=pack(d["rollout"], m), backend=backend, **kw,
        )  # fmt: skip
    else:
        res = logits_policy_loss(
            logits, d["targets"], d["old"], d["adv"], mask=m, backend=backend, **kw_of(d), **kw
        )
    (grad,) = torch.autograd.grad(res.loss, logits)
    return res, grad


def run_ref(d, dtype, **kw):
    """logits_policy_loss_ref on the same (rounded) logits, computed from ``dtype`` logits."""
    logits = d["logits"].to(dtype).requires_grad_()
    res, logp = logits_policy_loss_ref(
        logits, d["targets"], d["old"], d["adv"], d["mask"], **kw_of(d), **kw
    )
    (grad,) = torch.autograd.grad(res.loss, logits)
    return res, grad, logp.detach()


def assert_matches_formula(res, grad, d, temperature=1.0, **settings):
    """Loss, grad_logits, logp and the metrics against float64, tolerance from the same formula
    computed by plain PyTorch from the logits' dtype (fp32 math, grad rounded to that dtype)."""
    kw = dict(temperature=temperature, **settings)
    want, grad64, logp64 = run_ref(d, torch.float64, **kw)
    same, grad_lo, logp_lo = run_ref(d, d["logits"].dtype, **kw)
    want, same = (type(r)(*(t.detach() for t in r)) for r in (want, same))
    m = d["mask"]
    # logp = z_t - lse rounds relative to |lse|, not to itself; a term exp(logp - x) then rounds
    # relative to itself times that, so the loss rounds relative to its terms' sum times |lse|
    lse = (d["logits"].double() / temperature).logsumexp(-1)[m].abs().max().item()
    scale = loss_scale(d | {"logp": logp64}, **settings) * max(1.0, lse)
    assert_close_to_ref(res.loss, want.loss, same.loss, scale=scale, msg="loss")
    assert_close_to_ref(grad, grad64, grad_lo, msg="grad_logits")
    assert_close_to_ref(res.logp[m], logp64[m], logp_lo[m], scale=lse, msg="logp")
    ratio = torch.exp(logp64 - d["old"])[m].max().item()
    dk3 = (1 - torch.exp(d["ref"] - logp64))[m].abs().max().item()  # |d k3 / d logp|
    for name, slope in (
        ("kl", dk3),
        ("ratio_mean", ratio),
        ("clip_frac_low", 0),
        ("num_tokens", 0),
    ):
        w, sm = getattr(want, name), getattr(same, name)
        sc = max(w.abs().item(), slope * lse)
        assert_close_to_ref(getattr(res, name), w, sm, scale=sc, msg=name)


SETTINGS = [
    dict(),  # the paper's recipe: token-mean, clip 0.2 / 0.28, no KL
    dict(agg="seq-mean-token-mean", beta=0.05, kl="k3", dual_clip=3.0),
    dict(agg="seq-mean-token-sum-norm", ratio_level="sequence", is_cap=None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", VOCABS)
def test_logits_policy_loss_matches_fp64_formula(backend, packed, dtype, vocab):
    d = make_logits_batch(v=vocab, dtype=dtype, seed=vocab)
    for settings in SETTINGS:
        res, grad = run_ours(d, backend, packed=packed, temperature=0.7, **settings)
        if packed:  # logp of the packed rows, back in the padded layout
            logp = torch.zeros(d["mask"].shape).masked_scatter_(d["mask"], res.logp)
            res = res._replace(logp=logp)
        assert_matches_formula(res, grad, d, temperature=0.7, **settings)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_policy_loss_fp16_and_padding_logits_never_read(backend):
    """fp16 logits; padding rows full of NaN with target id -100 change nothing, get 0 gradient."""
    d = make_logits_batch(dtype=torch.float16)
    res, grad = run_ours(d, backend)
    assert_matches_formula(res, grad, d)
    dirty = d["logits"].clone()
    dirty[~d["mask"]] = float("nan")
    targets = d["targets"].masked_fill(~d["mask"], -100)
    res2, grad2 = run_ours(d | {"targets": targets}, backend, logits=dirty)
    assert torch.equal(res2.loss, res.loss)
    assert torch.equal(grad2, grad)
    assert (grad2[~d["mask"]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_policy_loss_reads_a_causal_lm_slice_in_place(backend):
    """logits[:, :-1] of a [B, L + 1, V] output: the same loss and gradient as a contiguous copy,
    and the gradient lands in the slice (the last position gets 0)."""
    d = make_logits_batch(v=131, full=True)
    full = d["logits"].clone().requires_grad_()
    view = full[:, :-1]
    assert not view.is_contiguous()
    res = logits_policy_loss(view, d["targets"], d["old"], d["adv"], mask=d["mask"], **kw_of(d),
                             backend=backend)  # fmt: skip
    (grad,) = torch.autograd.grad(res.loss, full)
    want, want_grad = run_ours(d, backend, logits=d["logits"][:, :-1].contiguous())
    assert torch.equal(res.loss, want.loss)
    assert torch.equal(grad[:, :-1], want_grad)
    assert (grad[:, -1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_policy_loss_micro_batches_with_global_counts_sum_to_the_full_batch(backend):
    d = make_logits_batch(v=61)
    counts = dict(num_tokens=int(d["mask"].sum()), num_seqs=4, max_len=9)
    settings = dict(agg="seq-mean-token-sum-norm", **counts)
    full, grad = run_ours(d, backend, **settings)
    parts = []
    for rows in (slice(0, 1), slice(1, 4)):
        part = {k: v[rows] for k, v in d.items()}
        res, g = run_ours(part, backend, **settings)
        parts.append((res.loss, g))
    # float32 sums in another order: a few roundings of the loss's scale (ULPS in helpers.py)
    tol = (
        8 * torch.finfo(torch.float32).eps * loss_scale(d, agg="seq-mean-token-sum-norm", **counts)
    )
    assert_close(parts[0][0] + parts[1][0], full.loss, atol=tol)
    assert_close(torch.cat([parts[0][1], parts[1][1]]), grad, atol=tol)


def test_logits_policy_loss_gradcheck_fp64():
    d = make_logits_batch(b=2, length=4, v=7, dtype=torch.float64)

    def fn(logits):
        return logits_policy_loss(
            logits, d["targets"], d["old"], d["adv"], mask=d["mask"], **kw_of(d), beta=0.1,
            temperature=0.8, backend="torch",
        ).loss  # fmt: skip

    assert gradcheck_fresh(fn, d["logits"].clone().requires_grad_())


# ----------------------------------------------------------------------------- liger-kernel

# liger loss_type -> our settings (every sequence non-empty, so N_seqs = B on both sides)
LIGER_AGG = {
    "dapo": dict(agg="token-mean"),  # num_items_in_batch None: this call's valid tokens
    "grpo": dict(agg="seq-mean-token-mean"),
    "dr_grpo": dict(agg="seq-mean-token-sum-norm", max_len=9),  # max_completion_length None: L
}


@pytest.mark.parametrize("loss_type", list(LIGER_AGG))
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_logits_policy_loss_matches_liger_triton_grpo_loss(loss_type, level):
    """liger's logits are [B, L + 1, V] (the last row dropped); beta with ref_logp is our k3;
    vllm_is_ratio is our rollout weight min(exp(old - rollout), is_cap), precomputed (token level:
    at sequence level liger spreads a sequence's gradient uniformly, ours by the weights, see
    docs/design.md); importance_sampling_level is ratio_level; no dual clip, no delta."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    d = make_logits_batch(v=4099, full=True)
    m, temp, beta = d["mask"], 0.9, 0.04
    rollout = level == "token"
    w = torch.exp(d["old"] - d["rollout"]).clamp(max=2.0).float()
    settings = dict(LIGER_AGG[loss_type], beta=beta, ratio_level=level, temperature=temp)
    full = d["logits"].clone().requires_grad_()
    loss, metrics = triton_grpo_loss(
        full, d["old"].float(), d["ref"].float(), d["targets"], d["adv"].float(), m.int(),
        temperature=temp, beta=beta, eps_low=0.2, eps_high=0.28, inplace=False,
        loss_type=loss_type, importance_sampling_level=level, reduce=True,
        vllm_is_ratio=w if rollout else None,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, full)
    kl, clip = metrics
    ours_kw = dict(ref_logp=d["ref"], rollout_logp=d["rollout"] if rollout else None)
    d64 = d | {"logits": d["logits"][:, :-1].contiguous()}
    if not rollout:
        d64["rollout"] = None
    res = logits_policy_loss(d64["logits"], d["targets"], d["old"], d["adv"], mask=m, **ours_kw,
                             backend="triton", **settings)  # fmt: skip
    # both against the same float64 formula, with the tolerance of its float32 computation
    agg = {k: v for k, v in settings.items() if k != "temperature"}
    want, grad64, logp64 = run_ref(d64, torch.float64, temperature=temp, **agg)
    same, grad32, _ = run_ref(d64, torch.float32, temperature=temp, **agg)
    scale = loss_scale(d64 | {"logp": logp64}, **agg)
    for name, value in (("liger", loss), ("ours", res.loss)):
        assert_close_to_ref(value, want.loss, same.loss, scale=scale, msg=f"{name} loss")
    assert_close_to_ref(grad[:, :-1], grad64, grad32, msg="liger grad")
    assert (grad[:, -1] == 0).all()
    assert_close_to_ref(kl, want.kl, same.kl, msg="liger kl")
    assert_close_to_ref(res.kl, want.kl, same.kl, msg="ours kl")
    clip_ref = want.clip_frac_low + want.clip_frac_high
    assert_close(clip, clip_ref, atol=1e-6)
    assert_close(res.clip_frac_low + res.clip_frac_high, clip_ref, atol=1e-6)


# ----------------------------------------------------------------------------- grid


def test_launch_grid_stays_under_cuda_grid_limit():
    for rows in (1, 65_535, 65_536, 16 * 8192, 2**31):
        (programs,) = lpt.launch_grid(rows)
        assert 1 <= programs <= 65_535 and programs <= rows


def test_kernels_stride_over_rows_when_programs_are_fewer(monkeypatch):
    """The grid cap at 3 programs for 36 rows: each program strides over 12 rows (the path every
    launch with more than 65,535 rows takes), with the same results as one program per row."""
    d = make_logits_batch(v=50)
    want, want_grad = run_ours(d, "triton")
    monkeypatch.setattr(lpt, "MAX_PROGRAMS", 3)
    grids = []
    launch = lpt.launch_grid
    monkeypatch.setattr(lpt, "launch_grid", lambda rows: grids.append(launch(rows)) or grids[-1])
    res, grad = run_ours(d, "triton")
    assert grids == [(3,), (3,)]
    assert torch.equal(res.loss, want.loss) and torch.equal(grad, want_grad)


# ----------------------------------------------------------------------------- checks


def _call(d, backend="torch", **overrides):
    args = dict(logits=d["logits"], targets=d["targets"], old_logp=d["old"], advantages=d["adv"])
    kw = dict(mask=d["mask"], backend=backend)
    for k, v in overrides.items():
        (args if k in args else kw)[k] = v
    return logits_policy_loss(**args, **kw)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(targets="x"), "targets must be a torch.Tensor"),
        (dict(targets=torch.zeros(4, 9)), "targets must be an integer tensor of token ids"),
        (dict(targets=torch.zeros(4, 8, dtype=torch.long)), r"targets has shape \(4, 8\)"),
        (dict(logits=torch.zeros(4, 9, 5, dtype=torch.int32)), "logits must be a floating"),
        (dict(logits=torch.zeros(36, 5)), r"logits must be \[B, L, V\] with mask"),
        (dict(logits=torch.zeros(4, 9, 0)), "empty vocabulary"),
        (dict(mask=torch.ones(4, 8, dtype=torch.bool)), r"mask has shape \(4, 8\)"),
        (dict(mask=None), "pass exactly one of mask"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(old_logp=torch.zeros(4, 8)), r"old_logp has shape \(4, 8\)"),
        (dict(eps_low=1.5), "eps_low must be in"),
    ],
)
def test_logits_policy_loss_rejects_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(make_logits_batch(), **overrides)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 97])
def test_logits_policy_loss_rejects_targets_outside_the_vocabulary(backend, bad):
    d = make_logits_batch()
    targets = d["targets"].clone()
    targets[2, 4] = bad
    with pytest.raises(ValueError, match=rf"targets has 1 id\(s\) outside \[0, V=97\) at valid "
                       rf"tokens; first at index \(2, 4\): {bad}"):  # fmt: skip
        _call(d, backend, targets=targets)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_logits_policy_loss_rejects_non_finite_logits(backend, value):
    d = make_logits_batch()
    logits = d["logits"].clone()
    logits[3, 6, 10] = value
    with pytest.raises(ValueError, match=r"logits has 1 non-finite value\(s\) at valid tokens; "
                       r"first in the row of token \(3, 6\)"):  # fmt: skip
        _call(d, backend, logits=logits)
    res = _call(d, backend, logits=logits, check_finite=False)  # opted out: no read, no error
    clean = _call(d, backend)
    other = d["mask"].clone()
    other[3, 6] = False
    assert torch.equal(res.logp[other], clean.logp[other])
