"""policy_loss's backward: the gradient the forward stored, scaled by grad_output (and by 1 / D
when the counts were not numbers) in place, so a call moves no token bytes in its backward when
the counts are numbers and grad_output is 1; and one backward per forward."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_ref, cu_of, make_batch, pack

from papo_fast.kernels.policy_loss import policy_loss
from papo_fast.kernels.policy_loss_ref import policy_loss_ref

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# What the upstream does with the loss: autograd hands the op grad_output 1 (the loss itself),
# 3.5 (a scaled loss), or 3.5 with another loss's gradient accumulated into the same logp.
UPSTREAMS = {
    "loss": lambda loss, lp: loss,
    "scaled": lambda loss, lp: 3.5 * loss,
    "summed": lambda loss, lp: 3.5 * loss + 0.5 * lp.sum(),
}


def step_counts(d: dict) -> dict:
    """Counts of a whole optimizer step that holds this micro-batch and more (larger than the
    batch's own, so that folding the wrong D shows)."""
    lens = d["mask"].sum(-1)
    return {
        "num_tokens": int(lens.sum()) + 7,
        "num_seqs": int((lens > 0).sum()) + 2,
        "max_len": int(lens.max()) + 3,
    }


def given(counts: dict, how: str) -> dict:
    if how == "local":
        return {}
    if how == "tensors":
        return {k: torch.tensor(v) for k, v in counts.items()}
    return counts


def run_ours(d, packed, backend, agg, counts, upstream=UPSTREAMS["loss"]):
    logp = d["logp"].clone().requires_grad_()
    m = d["mask"]
    if packed:
        res = policy_loss(pack(logp, m), pack(d["old"], m), d["adv"], cu_seqlens=cu_of(m),
                          backend=backend, agg=agg, **counts)  # fmt: skip
    else:
        res = policy_loss(logp, d["old"], d["adv"], mask=m, backend=backend, agg=agg, **counts)
    (grad,) = torch.autograd.grad(upstream(res.loss, logp[m]), logp)  # the other loss: valid tokens
    return res, grad


def run_ref(d, dtype, agg, counts, upstream):
    logp = d["logp"].to(dtype).clone().requires_grad_()
    res = policy_loss_ref(logp, d["old"], d["adv"], d["mask"], agg=agg, **counts)
    (grad,) = torch.autograd.grad(upstream(res.loss, logp[d["mask"]]), logp)
    return grad


@pytest.mark.parametrize("how", ["numbers", "tensors", "local"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_matches_reference_for_each_upstream(backend, packed, dtype, agg, how):
    d = make_batch(4, 37, dtype=dtype, seed=11)
    step = step_counts(d)
    counts = given(step, how)
    ref_counts = {} if how == "local" else step
    for name, upstream in UPSTREAMS.items():
        _, grad = run_ours(d, packed, backend, agg, counts, upstream)
        want = run_ref(d, torch.float64, agg, ref_counts, upstream)
        same = run_ref(d, dtype, agg, ref_counts, upstream)
        assert_close_to_ref(grad, want, same, msg=f"{name} grad")


def saved_gradient(backend, how, agg="token-mean", packed=False):
    """(logp, result, the [B, L] gradient buffer the op saved for its backward)."""
    d = make_batch(3, 29, dtype=torch.float32, seed=5)
    logp = d["logp"].clone().requires_grad_()
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        res = policy_loss(logp, d["old"], d["adv"], mask=d["mask"], backend=backend, agg=agg,
                          **given(step_counts(d), how))  # fmt: skip
    (buf,) = [t for t in saved if t.shape == logp.shape]
    return logp, res, buf


@pytest.mark.parametrize("upstream", [1.0, 3.5])
@pytest.mark.parametrize("how", ["numbers", "tensors", "local"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_scales_the_saved_gradient_in_place(backend, how, upstream):
    logp, res, buf = saved_gradient(backend, how)
    before = buf.clone()
    loss = res.loss if upstream == 1.0 else upstream * res.loss
    (grad,) = torch.autograd.grad(loss, logp)
    # the buffer saved in the forward now holds the gradient returned: no new [B, L] tensor
    assert torch.equal(buf, grad)
    if how == "numbers" and upstream == 1.0:
        # D folded into the forward's store, grad_output 1: the backward left the tokens alone
        assert torch.equal(buf, before)
    else:
        assert not torch.equal(buf, before)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_second_backward_raises(backend):
    logp, res, _ = saved_gradient(backend, "numbers")
    (3.5 * res.loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        res.loss.backward()


@pytest.mark.parametrize("value", [1.0, 2.5, -0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scale_kernel_multiplies_in_place(dtype, value):
    from papo_fast.kernels.policy_loss_triton import scale_grad_

    # 1500 values: two programs of 1024, the second ragged
    grad = torch.randn(1500, dtype=torch.float64).to(dtype)
    before = grad.clone()
    scale = torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ptr = grad.data_ptr()
    out = scale_grad_(grad, scale)
    assert out.data_ptr() == ptr
    if value == 1.0:  # skipped: every bit as it was
        assert torch.equal(grad, before)
    else:  # the product rounded to the gradient's dtype, as torch rounds it
        assert_close_to_ref(grad, before.double() * value, before * value, msg="scaled")
