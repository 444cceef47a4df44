"""Log-probabilities of sampled tokens straight from the LM head, without the [T, V] logits.

    z       = (hidden @ weight.T + bias) / temperature        # [T, V], one token chunk at a time
    lse     = logsumexp(z)                                    # fp32, one pass over the chunk
    logp    = z[target] - lse
    entropy = lse - sum(softmax(z) * z)                       # same pass, a metric (see below)
    dlogp/dz = onehot(target) - softmax(z)

The logits exist only for one chunk of token rows at a time ([rows, V], rows from ``chunk_rows``):
peak extra memory is O(rows x V), never O(T x V). Each chunk sees the whole vocabulary, so its
softmax is exact in one pass and the gradient can be formed from the same buffer.

Three matrix products are the floor (forward, grad_hidden, grad_weight). ``fused_linear_logprobs``
with autograd does four: its backward recomputes each chunk's logits (never storing them).
``fused_linear_policy_loss`` (the sibling file) reaches three: it forms the gradient in the forward.

Layers: ``_lse_fwd_kernel`` / ``_grad_logits_kernel`` (Triton, one program per token row, the
elementwise work on a logits chunk) with cuBLAS products around them; ``_stats_torch`` /
``_grad_torch`` beside them (the CPU path, in place on the chunk); ``chunk_stats`` /
``chunk_grad`` (the per-chunk steps both fused ops share) -> ``FusedLinearLogprobsFunction`` ->
``fused_linear_logprobs``. ``fused_linear_logprobs_ref`` at the end is the materialized formula,
written to be read: the oracle of the tests (in float64).

Choices:
1. **Entropy as a metric.** Entropy is returned detached: the paper trains with no entropy bonus,
   and its gradient would need a second reduction over the vocabulary in the backward.
2. **Scaled in the product.** Temperature and bias go into the product (addmm's alpha/beta), so
   the kernels see final logits.
3. **fp32 math.** Math and accumulators are fp32 (fp64 for fp64 inputs); the products run in the
   inputs' dtype, as the materialized bf16 formula does. grad_weight and grad_bias accumulate in
   fp32; grad_weight in the weight's dtype on request (``w_acc``: half its memory, one rounding
   per chunk; fused_linear_policy_loss's grad_weight_dtype).
4. **Products in cuBLAS.** The GPU path keeps the products in cuBLAS and moves only the
   elementwise softmax work into Triton (one read of the chunk for the statistics, one read-write
   for the gradient). A tl.dot kernel that fuses the product was not measured: no GPU was
   available when this was written.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from ._backend import compute_dtype, none_grads, resolve_backend

# ----------------------------------------------------------------------------- Triton


@triton.heuristics({"BLOCK_V": lambda a: min(4096, triton.next_power_of_2(a["n_vocab"]))})
@triton.jit
def _lse_fwd_kernel(
    # data: logits [rows, V] (any float dtype), targets [rows]; out: lse, logp, entropy [rows] fp32
    logits_ptr,
    targets_ptr,
    lse_ptr,
    logp_ptr,
    entropy_ptr,
    # shapes and strides
    n_vocab,
    stride_row,
    # switches and block sizes
    ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # rows x V passes 2^31: int64 offsets
    row_ptr = logits_ptr + row * stride_row
    m = -float("inf")  # running max
    s = 0.0  # running sum of exp(z - m)
    t = 0.0  # running sum of exp(z - m) * z (entropy)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < n_vocab
        z = tl.load(row_ptr + cols, mask=ok, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block has a valid column
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new)  # 0 on masked lanes
        s = s * alpha + tl.sum(p, axis=0)
        if ENTROPY:
            t = t * alpha + tl.sum(p * tl.where(ok, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row).to(tl.int64)
    z_target = tl.load(row_ptr + target).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_target - lse)
    if ENTROPY:
        tl.store(entropy_ptr + row, lse - t / s)


@triton.heuristics({"BLOCK_V": lambda a: min(4096, triton.next_power_of_2(a["n_vocab"]))})
@triton.jit
def _grad_logits_kernel(
    # data: logits [rows, V], overwritten in place by the gradient; targets, lse, coef [rows]
    logits_ptr,
    targets_ptr,
    lse_ptr,
    coef_ptr,
    # shapes and strides
    n_vocab,
    stride_row,
    # block sizes
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)  # dL/dlogp / temperature
    target = tl.load(targets_ptr + row).to(tl.int64)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < n_vocab
        z = tl.load(row_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        onehot = tl.where(cols == target, 1.0, 0.0)
        g = coef * (onehot - tl.exp(z - lse))
        tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=ok)


def launch_grid(n_rows: int) -> tuple[int]:
    """One program per token row, on grid dimension 0 (to 2^31 - 1; dims 1 and 2 stop at 65,535)."""
    return (n_rows,)


# Bytes per launch, rows x V logits of b bytes: _lse_fwd_kernel reads rows*V*b (~5 FLOPs/elem),
# _grad_logits_kernel reads and writes rows*V*b (~4 FLOPs/elem). The products around them do
# 2*rows*H*V FLOPs each, so at H=4096 the kernels are a few percent of a chunk's time on an H200.


def _stats_triton(z: torch.Tensor, targets: torch.Tensor, entropy: bool):
    rows, n_vocab = z.shape
    lse, logp = (torch.empty(rows, device=z.device, dtype=torch.float32) for _ in range(2))
    ent = torch.empty_like(lse) if entropy else lse  # dummy pointer when ENTROPY is off
    if rows > 0:
        _lse_fwd_kernel[launch_grid(rows)](
            z, targets, lse, logp, ent, n_vocab, z.stride(0), ENTROPY=entropy, num_warps=8
        )
    return lse, logp, (ent if entropy else None)


def _grad_triton(z: torch.Tensor, targets, lse, coef) -> torch.Tensor:
    rows, n_vocab = z.shape
    if rows > 0:
        _grad_logits_kernel[launch_grid(rows)](
            z, targets, lse, coef.float().contiguous(), n_vocab, z.stride(0), num_warps=8
        )
    return z


# For benchmarks/compile_check.py (heaviest last): widths at each BLOCK_V step, a real vocabulary (a
# multiple of 16). Vectors are read only from the logits chunk, a fresh (aligned) buffer.
_WIDTHS = {_lse_fwd_kernel.values["BLOCK_V"]({"n_vocab": v}): v for v in range(4096, 0, -1)}
LAUNCH_SPACE = {
    "dtype": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "vocab": (*sorted(_WIDTHS.values()), 152064),
    "entropy": (False, True),
}


def example_launch(dtype, vocab, entropy) -> None:
    """Both launches at one point of LAUNCH_SPACE, on CPU tensors (the check records them)."""
    z, t = torch.zeros(2, vocab, dtype=dtype), torch.zeros(2, dtype=torch.long)
    _grad_triton(z, t, _stats_triton(z, t, entropy)[0], torch.ones(2))


# ----------------------------------------------------------------------------- PyTorch


def _stats_torch(z: torch.Tensor, targets: torch.Tensor, entropy: bool):
    """Statistics of a logits chunk; leaves e = exp(z - max) in the (fp32) buffer it returns with
    1/sum(e), so the gradient needs no second exp. z is overwritten when it is already fp32."""
    x = z.to(compute_dtype(z))
    m = x.amax(dim=1, keepdim=True)  # [rows, 1]
    z_target = x.gather(1, targets[:, None]).squeeze(1)
    e = torch.sub(x, m) if entropy else x.sub_(m)  # entropy needs x after the exp
    e.exp_()
    s = e.sum(dim=1, keepdim=True)
    lse = (m + s.log()).squeeze(1)
    ent = None
    if entropy:  # lse - sum(e * x) / s, the row dot products without a [rows, V] temporary
        ent = lse - torch.bmm(e[:, None, :], x[:, :, None]).view(-1) / s.squeeze(1)
    return lse, z_target - lse, ent, (e, s.reciprocal_())


def _grad_torch(e: torch.Tensor, inv_s: torch.Tensor, targets, coef) -> torch.Tensor:
    """In place: e <- coef * (onehot(target) - e * inv_s), the gradient of the chunk's logits."""
    coef = coef.to(e.dtype)[:, None]
    e.mul_(-coef * inv_s)
    return e.scatter_add_(1, targets[:, None], coef)


# ----------------------------------------------------------------------------- chunk steps


def chunk_rows(n_tokens: int, vocab_size: int, device: torch.device) -> int:
    """Token rows per logits chunk: a power of two that keeps [rows, V] in fp32 under a budget
    (32 MiB on the CPU, 1 GiB on a GPU), clamped to [128, 4096] and to the token count.

    Measured on 2 CPU cores at H=512, V=32000: 256 to 2048 rows run the three products within 5%
    of one unchunked product; 128 rows was 8% slower; the whole fused loss ran as fast at 256 rows
    as at 512 or 1024. The products stream the weight once per chunk, so their FLOPs per weight
    byte grow with rows and not with H: H does not enter. The GPU budget is not measured yet.
    """
    budget = (1 << 30) if device.type == "cuda" else (1 << 25)
    rows = 1 << max(0, (budget // (4 * vocab_size)).bit_length() - 1)
    return max(1, min(max(rows, 128), 4096, n_tokens))


def logits_buffer(max_rows: int, weight: torch.Tensor) -> torch.Tensor:
    """One flat buffer that every chunk's logits reuse. On the CPU a fresh [rows, V] allocation per
    chunk is a fresh mmap whose pages fault in again each time: 4% of the whole loss's CPU time
    at T=4096, H=512, V=32000 on one thread."""
    return torch.empty(max_rows * weight.shape[0], device=weight.device, dtype=weight.dtype)


def chunk_logits(h, weight, bias, inv_temp: float, buf: torch.Tensor) -> torch.Tensor:
    """[rows, V] = (h @ weight.T + bias) * inv_temp in the inputs' dtype, scaled inside the GEMM,
    written into the front of ``buf``."""
    out = buf[: h.shape[0] * weight.shape[0]].view(h.shape[0], weight.shape[0])
    if bias is None:
        return torch.mm(h * inv_temp if inv_temp != 1.0 else h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), beta=inv_temp, alpha=inv_temp, out=out)


def chunk_stats(z: torch.Tensor, targets: torch.Tensor, entropy: bool, backend: str):
    """(lse, logp, entropy | None, state): state feeds ``chunk_grad`` without a second exp."""
    if backend == "triton":
        lse, logp, ent = _stats_triton(z, targets, entropy)
        return lse, logp, ent, z
    return _stats_torch(z, targets, entropy)


def chunk_grad(state, targets, lse, coef, backend: str) -> torch.Tensor:
    """Gradient of the chunk's logits, coef * (onehot - softmax), in a buffer the chunk owns."""
    if backend == "triton":
        return _grad_triton(state, targets, lse, coef)
    return _grad_torch(*state, targets, coef)


def chunk_grad_recompute(z, targets, lse, coef, backend: str) -> torch.Tensor:
    """The same gradient from freshly recomputed logits and the saved logsumexp."""
    if backend == "triton":
        return _grad_triton(z, targets, lse, coef)
    e = z.to(compute_dtype(z)).sub_(lse.to(compute_dtype(z))[:, None]).exp_()
    return _grad_torch(e, e.new_ones(()), targets, coef)


_fp32_out_mm = True  # torch >= 2.8 on CUDA: half-precision products written/added in fp32


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (+)= a @ b. Same dtypes: one BLAS call. Half a, b into an fp32 out: on CUDA cuBLAS
    accumulates into out directly (out_dtype); elsewhere through a temporary product."""
    global _fp32_out_mm
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if out.is_cuda and _fp32_out_mm:
        try:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            else:
                torch.mm(a, b, out_dtype=out.dtype, out=out)
            return
        except (RuntimeError, TypeError) as err:  # an older torch: argument checks, nothing ran
            _fp32_out_mm = False
            warnings.warn(
                f"fp32-output products unavailable ({err}); using temporaries", stacklevel=2
            )
    if accumulate:
        out.add_(a @ b)
    else:
        out.copy_(a @ b)


def accumulate_grads(g, h, weight, grad_h_out, grad_w, grad_b) -> None:
    """grad_h_out <- g @ weight; grad_w += g.T @ h; grad_b += sum(g). None skips one."""
    if grad_b is not None:
        grad_b.add_(g.sum(dim=0, dtype=grad_b.dtype))
    if g.dtype != weight.dtype:
        g = g.to(weight.dtype)
    if grad_h_out is not None:
        _mm_into(grad_h_out, g, weight, accumulate=False)
    if grad_w is not None:
        _mm_into(grad_w, g.t(), h, accumulate=True)


# ----------------------------------------------------------------------------- checks


def check_lm_head_inputs(hidden, weight, targets, bias, temperature: float, backend: str) -> str:
    """Shapes, dtypes, devices, target range and temperature; returns the resolved backend."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    backend = resolve_backend(backend, hidden, weight, targets, bias)
    if hidden.dim() not in (2, 3) or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a float [T, H] or [B, L, H], got {hidden.dtype} {tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H={hidden.shape[-1]} (hidden's last dim), "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(
            f"bias must be [V]={weight.shape[0]} of {weight.dtype}, got "
            f"{bias.dtype} {tuple(bias.shape)}"
        )
    if targets.shape != hidden.shape[:-1] or targets.is_floating_point() or targets.is_complex():
        raise ValueError(
            f"targets must be integer {tuple(hidden.shape[:-1])} (hidden's leading "
            f"dims), got {targets.dtype} {tuple(targets.shape)}"
        )
    lo, hi = (int(x) for x in targets.aminmax()) if targets.numel() else (0, 0)  # one reduction
    if lo < 0 or hi >= weight.shape[0]:
        raise ValueError(f"targets must lie in [0, V={weight.shape[0]}), got [{lo}, {hi}]")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return backend


# ----------------------------------------------------------------------------- autograd


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """hidden [T, H], weight [V, H], bias [V] | None, targets [T] -> logp [T], entropy [T] | None.

    Saves hidden, weight, bias, targets and lse [T] fp32; the backward recomputes each chunk's
    logits (one more product than the floor, the price of not storing [T, V]).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, entropy, backend, rows, w_acc):
        T = hidden.shape[0]
        acc = compute_dtype(hidden)
        lse = torch.empty(T, device=hidden.device, dtype=acc)
        logp = torch.empty_like(lse)
        ent = torch.empty_like(lse) if entropy else None
        buf = logits_buffer(min(rows, T), weight)
        for s in range(0, T, rows):
            e = min(s + rows, T)
            z = chunk_logits(hidden[s:e], weight, bias, 1.0 / temperature, buf)
            lse[s:e], logp[s:e], ent_c, state = chunk_stats(z, targets[s:e], entropy, backend)
            if entropy:
                ent[s:e] = ent_c
            del z, state  # an fp32 copy of half-precision logits is freed before the next
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.backend, ctx.rows, ctx.w_acc = temperature, backend, rows, w_acc
        if entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = compute_dtype(hidden)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = weight.new_zeros(weight.shape, dtype=ctx.w_acc) if need_w else None
        grad_b = torch.zeros(weight.shape[0], device=weight.device, dtype=acc) if need_b else None
        coef = grad_logp.to(acc) / ctx.temperature
        T, rows = hidden.shape[0], ctx.rows
        buf = logits_buffer(min(rows, T), weight)
        for s in range(0, T, rows):
            e = min(s + rows, T)
            z = chunk_logits(hidden[s:e], weight, bias, 1.0 / ctx.temperature, buf)
            g = chunk_grad_recompute(z, targets[s:e], lse[s:e], coef[s:e], ctx.backend)
            gh = grad_h[s:e] if need_h else None
            accumulate_grads(g, hidden[s:e], weight, gh, grad_w, grad_b)
            del z, g
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, *_LOGPROBS_NO_GRADS


# hidden, weight and bias have gradients; the inputs after them none
_LOGPROBS_NO_GRADS = none_grads(FusedLinearLogprobsFunction.forward, differentiable=3)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of ``targets`` under softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: [T, H] or [B, L, H] float (any float dtype; weight and bias share it).
        weight: [V, H] LM-head weight.
        targets: int [T] or [B, L], the sampled token ids, each in [0, V).
        bias: optional [V].
        temperature: > 0; the sampler's temperature, so that logp matches the rollout's.
        return_entropy: also return the entropy of each token's distribution (detached: a metric).
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "torch" or "triton".

    Returns:
        (logp, entropy | None), each [T] or [B, L], float32 (float64 for float64 inputs). logp is
        differentiable with respect to hidden, weight and bias; under torch.no_grad() (old and
        reference log-probs at rollout time) only the forward runs.

    Raises:
        ValueError: shape or dtype mismatch, targets outside [0, V), temperature <= 0, tensors on
            different devices, an unknown backend.
    """
    backend = check_lm_head_inputs(hidden, weight, targets, bias, temperature, backend)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    t1 = targets.reshape(-1).long()  # one index dtype (int32 ids are common) for every path
    rows = chunk_rows(h2.shape[0], weight.shape[0], hidden.device)
    args = float(temperature), return_entropy, backend, rows, compute_dtype(h2)
    logp, ent = FusedLinearLogprobsFunction.apply(h2, weight.contiguous(), bias, t1, *args)
    return logp.view(lead), (ent.view(lead) if ent is not None else None)


# ----------------------------------------------------------------------------- reference


def fused_linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula a trainer writes, materialized: all [..., V] logits in the inputs' dtype, then
    log_softmax in float32 (float64 for float64 inputs), gather and entropy. Shapes as in
    ``fused_linear_logprobs``; returns (logp, entropy), each [T] or [B, L] in float32 (float64
    for float64 inputs), differentiable w.r.t. hidden, weight and bias."""
    z = hidden @ weight.T  # [..., V]
    if bias is not None:
        z = z + bias
    z = z.to(compute_dtype(z))
    logsm = (z / temperature).log_softmax(-1)
    logp = logsm.gather(-1, targets.long()[..., None]).squeeze(-1)
    return logp, -(logsm.exp() * logsm).sum(-1)
