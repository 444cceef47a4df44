"""fused_linear_logprobs against fused_linear_logprobs_ref, the materialized formula (logits,
log_softmax, gather), in float64."""

import pytest
import torch
from helpers import assert_close_to_ref, softmax_scale

import papo_fast.kernels.fused_linear_logprobs as fll
from papo_fast.kernels.fused_linear_logprobs import (
    fused_linear_logprobs,
    fused_linear_logprobs_ref,
    launch_grid,
)


def make_inputs(shape, H, V, dtype, bias):
    hidden = torch.randn(*shape, H, dtype=dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    b = torch.randn(V, dtype=dtype) if bias else None
    targets = torch.randint(0, V, shape)
    return hidden, weight, b, targets


def grads_of(fn, hidden, weight, bias, upstream):
    """(logp, entropy, grad_hidden, grad_weight, grad_bias) of fn on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]  # fmt: skip
    logp, ent = fn(*leaves)
    (logp.double() * upstream).sum().backward()
    return logp, ent, *(t.grad if t is not None else None for t in leaves)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several token chunks at test sizes (the real budget keeps [rows, V] near 64 MiB)."""
    monkeypatch.setattr(fll, "chunk_rows", lambda *a: 16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(45,), (3, 17)], ids=["packed", "padded"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_matches_fp64_reference(small_chunks, backend, shape, bias, temperature):
    hidden, weight, b, targets = make_inputs(shape, 24, 203, torch.float32, bias)
    upstream = torch.randn(shape, dtype=torch.float64)

    def ours(h, w, bb):
        return fused_linear_logprobs(h, w, targets, bias=bb, temperature=temperature,
                                     return_entropy=True, backend=backend)  # fmt: skip

    def ref(h, w, bb):
        return fused_linear_logprobs_ref(h, w, targets, bias=bb, temperature=temperature)

    got = grads_of(ours, hidden, weight, b, upstream)
    want = grads_of(ref, hidden.double(), weight.double(), b.double() if bias else None, upstream)
    same = grads_of(ref, hidden, weight, b, upstream)  # the fp32 formula's own error
    assert got[0].dtype == torch.float32 and got[0].shape == shape
    assert not got[1].requires_grad  # entropy is a detached metric
    names = ["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"]
    for name, g, w, s in zip(names, got, want, same, strict=True):
        if w is None:
            assert g is None
            continue
        assert g.dtype == s.dtype, name
        scale = softmax_scale(hidden, weight, b, temperature, w) if name in names[:2] else None
        assert_close_to_ref(g, w, s, scale=scale, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_within_the_reference_bf16_error(small_chunks, backend):
    hidden, weight, b, targets = make_inputs((40,), 32, 301, torch.bfloat16, True)
    upstream = torch.randn(40, dtype=torch.float64)

    def ours(h, w, bb):
        return fused_linear_logprobs(h, w, targets, bias=bb, temperature=0.9,
                                     return_entropy=True, backend=backend)  # fmt: skip

    def ref(h, w, bb):
        return fused_linear_logprobs_ref(h, w, targets, bias=bb, temperature=0.9)

    got = grads_of(ours, hidden, weight, b, upstream)
    want = grads_of(ref, hidden.double(), weight.double(), b.double(), upstream)
    same = grads_of(ref, hidden, weight, b, upstream)
    for name, g, w, s in zip(["logp", "entropy", "gh", "gw", "gb"], got, want, same, strict=True):
        scale = softmax_scale(hidden, weight, b, 0.9, w) if name in ("logp", "entropy") else None
        assert_close_to_ref(g, w, s, scale=scale, msg=name)


def test_vocab_spanning_several_triton_blocks():
    """V = 5003 > BLOCK_V = 4096: the online logsumexp crosses a block with a ragged tail."""
    hidden, weight, b, targets = make_inputs((6,), 8, 5003, torch.float32, True)
    targets[0] = 5002  # a target in the ragged tail
    upstream = torch.randn(6, dtype=torch.float64)
    kw = dict(bias=b, temperature=1.3, return_entropy=True)
    t = fused_linear_logprobs(hidden, weight, targets, backend="triton", **kw)
    ref = fused_linear_logprobs_ref(
        hidden.double(), weight.double(), targets, bias=b.double(), temperature=1.3
    )
    same = fused_linear_logprobs_ref(hidden, weight, targets, bias=b, temperature=1.3)
    for got, want, s, name in zip(t, ref, same, ["logp", "entropy"], strict=True):
        assert_close_to_ref(
            got, want, s, scale=softmax_scale(hidden, weight, b, 1.3, want), msg=name
        )

    def ours(h, w, bb):
        return fused_linear_logprobs(h, w, targets, bias=bb, temperature=1.3, backend="triton")

    fp32, fp64 = (hidden, weight, b), (hidden.double(), weight.double(), b.double())
    ref_fn = lambda h, w, bb: fused_linear_logprobs_ref(h, w, targets, bias=bb, temperature=1.3)  # noqa: E731
    g = grads_of(ours, *fp32, upstream)
    r, s = grads_of(ref_fn, *fp64, upstream), grads_of(ref_fn, *fp32, upstream)
    for got, want, same_g, name in zip(g[2:], r[2:], s[2:], ["gh", "gw", "gb"], strict=True):
        assert_close_to_ref(got, want, same_g, msg=name)


def test_float64_gradcheck(small_chunks):
    hidden, weight, b, targets = make_inputs((20,), 5, 11, torch.float64, True)
    hidden.requires_grad_(), weight.requires_grad_(), b.requires_grad_()

    def f(h, w, bb):
        return fused_linear_logprobs(h, w, targets, bias=bb, temperature=0.8, backend="torch")[0]

    assert torch.autograd.gradcheck(f, (hidden, weight, b))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_int32_targets(backend):
    hidden, weight, _, targets = make_inputs((2, 5), 8, 50, torch.float32, False)
    got, _ = fused_linear_logprobs(hidden, weight, targets.int(), backend=backend)
    want = fused_linear_logprobs_ref(hidden.double(), weight.double(), targets)[0]
    same = fused_linear_logprobs_ref(hidden, weight, targets)[0]
    assert_close_to_ref(got, want, same, scale=softmax_scale(hidden, weight, want=want))


def test_no_grad_and_frozen_weight():
    hidden, weight, _, targets = make_inputs((30,), 8, 50, torch.float32, False)
    with torch.no_grad():
        logp, ent = fused_linear_logprobs(hidden.requires_grad_(), weight, targets)
    assert ent is None and not logp.requires_grad
    logp, _ = fused_linear_logprobs(hidden, weight, targets)  # weight frozen: only grad_hidden
    logp.sum().backward()
    h64, h32 = hidden.detach().double().requires_grad_(), hidden.detach().clone().requires_grad_()
    fused_linear_logprobs_ref(h64, weight.double(), targets)[0].sum().backward()
    fused_linear_logprobs_ref(h32, weight, targets)[0].sum().backward()
    assert weight.grad is None
    assert_close_to_ref(hidden.grad, h64.grad, h32.grad)


def test_packed_sequence_longer_than_a_grid_dimension():
    """T = 70,000 > 65,535 tokens (one packed sequence): chunked rows on the torch path, and the
    Triton launcher puts rows on grid dimension 0 only (its limit is 2^31 - 1)."""
    T = 70_000
    hidden, weight, _, targets = make_inputs((T,), 4, 8, torch.float32, False)
    logp, ent = fused_linear_logprobs(hidden, weight, targets, return_entropy=True)
    ref = fused_linear_logprobs_ref(hidden.double(), weight.double(), targets)
    same = fused_linear_logprobs_ref(hidden, weight, targets)
    for got, want, s, name in zip((logp, ent), ref, same, ["logp", "entropy"], strict=True):
        assert_close_to_ref(got, want, s, scale=softmax_scale(hidden, weight, want=want), msg=name)
    assert launch_grid(T) == (T,)
    assert launch_grid(2**31 - 1) == (2**31 - 1,)


def test_chunk_rows_budget():
    cpu = torch.device("cpu")
    assert fll.chunk_rows(4096, 32000, cpu) == 256  # 256 x 32000 x 4 B = 31.25 MiB
    assert fll.chunk_rows(4096, 152064, cpu) == 128  # the floor of the clamp
    assert fll.chunk_rows(100, 32000, cpu) == 100  # never more rows than tokens
    assert fll.chunk_rows(16384, 152064, torch.device("cuda")) == 1024


def test_bad_inputs_raise():
    hidden, weight, b, targets = make_inputs((10,), 8, 20, torch.float32, True)
    call = fused_linear_logprobs
    with pytest.raises(ValueError, match="weight"):
        call(hidden, weight[:, :7], targets)  # H mismatch
    with pytest.raises(ValueError, match="targets"):
        call(hidden, weight, targets[:9])
    with pytest.raises(ValueError, match="targets"):
        call(hidden, weight, targets.float())
    bad = targets.clone()
    bad[3] = 20
    with pytest.raises(ValueError, match=r"\[0, V=20\)"):
        call(hidden, weight, bad)
    bad[3] = -1
    with pytest.raises(ValueError, match=r"\[0, V=20\)"):
        call(hidden, weight, bad)
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            call(hidden, weight, targets, temperature=temperature)
    with pytest.raises(ValueError, match="bias"):
        call(hidden, weight, targets, bias=b[:19])
    with pytest.raises(ValueError, match="dtype"):
        call(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="one device"):
        call(hidden, weight.to("meta"), targets)
    with pytest.raises(ValueError, match="backend"):
        call(hidden, weight, targets, backend="cuda")
