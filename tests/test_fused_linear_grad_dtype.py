"""fused_linear_policy_loss with grad_weight_dtype="weight": grad_weight accumulated over the token
chunks in the weight's own dtype (half the [V, H] buffer for bf16 / fp16) instead of fp32.

The bound. The default path sums the chunks' products P_c = g_c^T h_c in fp32 and rounds once,
at the end, to the weight's dtype d; its error against float64 is what the same-dtype materialized
formula's is, 2x (helpers.assert_close_to_ref). The option rounds the running sum to d after each
of the C chunks instead: S_c = round_d(S_(c-1) + P_c), one rounding of at most half a unit of d
(eps/2 x |S_c|; below d's smallest normal number, half its subnormal spacing, eps/2 x tiny). The
C errors add up to at most C x eps/2 x max_c |S_c| <= C x eps/2 x A, where A = sum_t |g_t| |h_t|
elementwise bounds every partial sum. They are independent and of either sign for random data, so
they USUALLY grow like sqrt(C); but a test must hold on every input, and round-to-nearest errors
can share a sign (a column whose partial sums all round the same way), so the bound is the
worst case, linear in C. Taken with a full eps per chunk (the second-order growth of the partial
sums by their own errors and the products' fp32 roundings fit in the other half).
"""

import pytest
import torch
from helpers import ULPS, assert_close, assert_close_to_ref, lm_head_batch
from test_fused_linear_policy_loss import ours, reference

import papo_fast.kernels.fused_linear_logprobs as fll
import papo_fast.kernels.fused_linear_policy_loss as flpl
from papo_fast.kernels.fused_linear_logprobs import accumulate_grads
from papo_fast.kernels.fused_linear_policy_loss import PAPOLoss, fused_linear_policy_loss

HALF = (torch.bfloat16, torch.float16)


@pytest.fixture
def record(monkeypatch):
    """The grad_weight buffer each accumulate_grads call adds into (both paths): its dtypes."""
    seen = []

    def spy(g, h, weight, gh, grad_w, grad_b):
        seen.append(None if grad_w is None else grad_w.dtype)
        accumulate_grads(g, h, weight, gh, grad_w, grad_b)

    monkeypatch.setattr(flpl, "accumulate_grads", spy)
    monkeypatch.setattr(fll, "accumulate_grads", spy)
    return seen


def abs_product_scale(d, want, temperature: float = 1.0) -> float:
    """A = max over [V, H] of sum_t |dloss/dz_t| |h_t|, in float64: bounds every partial sum of
    grad_weight over the chunks, whatever their order."""
    h, w, b = (d[k].double() for k in ("hidden", "weight", "bias"))
    m = d["mask"]
    z = (h[m] @ w.T + b) / temperature  # [T, V]
    onehot = torch.nn.functional.one_hot(d["targets"][m], w.shape[0]).double()
    g = want.grad_logp[m][:, None] * (onehot - z.softmax(-1)) / temperature
    return (g.abs().T @ h[m].abs()).max().item()


def test_unknown_grad_weight_dtype_is_named():
    d = lm_head_batch()
    args = (d["hidden"], d["weight"], d["targets"], d["old"].float(), d["adv"].float())
    with pytest.raises(ValueError, match=r"grad_weight_dtype must be 'float32' or 'weight'"):
        fused_linear_policy_loss(*args, mask=d["mask"], grad_weight_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"grad_weight_dtype must be .*got torch.bfloat16"):
        PAPOLoss(grad_weight_dtype=torch.bfloat16)


@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("dtype", [*HALF, torch.float32, torch.float64])
def test_weight_option_accumulates_in_the_weight_dtype(monkeypatch, record, dtype, two_pass):
    """ "weight": every chunk adds into a buffer of the weight's dtype, and weight.grad is that
    dtype; the default keeps fp32 (fp64 for fp64); fp32 / fp64 weights see no difference. The
    two-pass path (a sequence longer than 4 x the chunk's rows) honours it too."""
    rows = 2 if two_pass else 16  # valid lengths 11, 1, 4, 9, 7, 9: 11 > 4 x 2 goes two-pass
    monkeypatch.setattr(flpl, "chunk_rows", lambda *a: rows)
    d = lm_head_batch(dtype=dtype)
    calls = -(-int(d["mask"].sum()) // rows) if two_pass else 3  # 41 tokens in 21 | 3 chunks
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for option, want in (("float32", acc), ("weight", dtype)):
        record.clear()
        got = ours(d, "padded", 1.0, grad_weight_dtype=option)
        assert len(record) == calls and set(record) == {want}, (option, record)
        assert got.grad_weight.dtype == dtype and got.grad_bias.dtype == dtype


@pytest.mark.parametrize("dtype", HALF)
def test_accumulate_grads_rounds_once_per_chunk_into_a_half_buffer(dtype):
    """accumulate_grads into a bf16 / fp16 grad_weight: the product is formed at fp32 precision
    and added before the one rounding to the buffer's dtype (never rounded to it first): the
    error is at most half a unit of the new sum, plus the fp32 product's own roundings."""
    gen = torch.Generator().manual_seed(0)
    rows, v, h = 64, 301, 48
    g = torch.randn(rows, v, generator=gen) * 1e-2  # fp32, as the CPU path forms it
    x = torch.randn(rows, h, generator=gen).to(dtype)
    w = torch.randn(v, h, generator=gen).to(dtype)
    grad_w = (torch.randn(v, h, generator=gen) * 0.1).to(dtype)
    exact = grad_w.double() + g.to(dtype).double().T @ x.double()
    gw = grad_w.clone()
    accumulate_grads(g, x, w, None, gw, None)
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    # fp32 inner products of `rows` terms: rows x eps32 of sum |g||x| at most (float32 eps)
    terms = g.to(dtype).double().abs().T @ x.double().abs()
    tol = eps / 2 * (exact.abs() + tiny) + rows * torch.finfo(torch.float32).eps * terms
    assert ((gw.double() - exact).abs() <= tol).all()


def _run(d, rows, monkeypatch, **kw):
    monkeypatch.setattr(flpl, "chunk_rows", lambda *a: rows)
    return ours(d, "padded", 1.0, **kw)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("rows", [128, 32, 8])  # 1, 4 and 16 chunks of 8-token sequences
@pytest.mark.parametrize("dtype", HALF)
def test_weight_option_within_the_chunk_count_bound(monkeypatch, record, dtype, rows, device):
    """Against float64: the default path's bound (2x the same-dtype formula's error, ULPS units)
    plus one eps per chunk at the scale A of the partial sums (the module's docstring derives it).
    Against the default path: the option's C roundings (eps/2 x A each), the default's final one
    (eps/2 x A) and, on the CPU, its rounding of each chunk's product to d before the fp32 add
    (eps/2 x A each): (C + 1/2) eps x A, held to (C + 1) eps x A. On CUDA: the Triton kernels
    and cuBLAS adding into the half-precision buffer in place."""
    d = lm_head_batch(b=16, length=8, h=32, v=211, dtype=dtype, lengths=[8] * 16)
    want = reference(d, torch.float64, 1.0)
    same = reference(d, dtype, 1.0)
    on_device = {k: v.to(device) for k, v in d.items()}
    got = _run(on_device, rows, monkeypatch, grad_weight_dtype="weight")
    chunks = len(record)
    assert chunks == 128 // rows
    # below the smallest normal number the spacing is eps x tiny, not relative: in the scale
    scale = abs_product_scale(d, want) + torch.finfo(dtype).tiny
    assert_close_to_ref(got.grad_weight.cpu(), want.grad_weight, same.grad_weight,
                        ulps=ULPS + chunks, scale=scale, msg=f"{chunks} chunks")  # fmt: skip
    default = _run(on_device, rows, monkeypatch)
    tol = (chunks + 1) * torch.finfo(dtype).eps * scale
    assert_close(got.grad_weight.cpu(), default.grad_weight.cpu(), atol=tol, msg="vs default")
    # the rest is the default path's: grad_hidden bit for bit
    assert torch.equal(got.grad_hidden, default.grad_hidden)
