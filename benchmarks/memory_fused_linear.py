"""Peak memory of fused_linear_policy_loss, forward + backward: a formula read off the code's
allocations, and a measurement, against liger-kernel's LigerFusedLinearGRPOLoss.

The formula (``ours_timeline``) replays every tensor the op allocates and frees, in order, with
its size: the persistent fp32 gradients, the chunk's logits buffer, the per-chunk temporaries of
the path that runs (CUDA: Triton kernels in place and cuBLAS products with an fp32 output; CPU:
the PyTorch path and its temporaries, and the scratch its BLAS takes from torch's allocator in
half-precision products, probed on the machine: ``cpu_blas_scratch``), the bf16 casts of the
backward. grad_weight_dtype="weight" (``grad_weight_bytes`` = b): the buffer in the weight's dtype,
the products adding into it in place, no cast in the backward. O(T) and O(rows) vectors
(log-probs, logsumexp, targets, masks) are counted where they are allocated. Its peak is the
step's peak above its inputs, the returned gradients included (they are allocated in the step).

The measurement: on CUDA, torch.cuda.max_memory_allocated above the inputs. On the CPU, torch's
allocator keeps no statistics; torch.profiler(profile_memory=True) records every allocation and
free of its CPU allocator with a timestamp, and their running sum's maximum is the peak of what
the step allocated. That counts tensors only, exactly: the peak resident set (VmHWM) also moves
with page faults, glibc's reuse of freed memory and BLAS scratch buffers, which at a scaled-down
size are of the same order as the step's own tensors. A first untimed step warms caches.

    python benchmarks/memory_fused_linear.py                     # H200 formula, CPU measurement
    python benchmarks/memory_fused_linear.py --size 4 64 128 8192 --dtype bf16 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
H200_SIZE = (16, 1024, 4096, 151936)  # (B, L, H, V): T = 16k tokens, Qwen's vocabulary
CPU_SIZE = (4, 64, 1024, 8192)  # scaled down, one chunk: V·H / (rows·V) = 4, as at the H200 size


class Timeline:
    """Live bytes over a sequence of named allocations and frees; keeps the peak and what was
    live at it."""

    def __init__(self) -> None:
        self.live: dict[str, int] = {}
        self.peak, self.at_peak = 0, {}

    def alloc(self, name: str, nbytes: float) -> None:
        assert name not in self.live, name
        self.live[name] = int(nbytes)
        if (now := sum(self.live.values())) > self.peak:
            self.peak, self.at_peak = now, dict(self.live)

    def free(self, *names: str) -> None:
        for name in names:
            del self.live[name]


def chunk_rows(tokens: int, vocab: int, cuda: bool) -> int:
    """fused_linear_logprobs.chunk_rows, restated (tests/test_roofline.py checks it)."""
    budget = (1 << 30) if cuda else (1 << 25)
    rows = 1 << max(0, (budget // (4 * vocab)).bit_length() - 1)
    return max(1, min(max(rows, 128), 4096, tokens))


def ours_timeline(
    B: int, L: int, H: int, V: int, b: int, cuda: bool, grad_weight_bytes: int = 4,
    scratch: dict[str, int] | None = None,
) -> Timeline:  # fmt: skip
    """fused_linear_policy_loss on [B, L] tokens, all valid (the benchmark's inputs), b bytes per
    element (2: bf16, 4: fp32), then .backward(). Math is fp32 (acc = 4 bytes).

    grad_weight_bytes: 4, the default fp32 accumulation; b, grad_weight_dtype="weight": the
    products add into the weight's dtype in place (cuBLAS or the CPU's addmm_, no temporary), and
    the backward returns that buffer (no cast).

    scratch: bytes the CPU BLAS takes from torch's allocator inside each half-precision product
    of a chunk (``cpu_blas_scratch``, probed), by product: "logits", "grad_hidden",
    "grad_weight"; None: none (CUDA; fp32)."""
    T, acc = B * L, 4
    scratch = scratch or {}

    def product(name: str) -> None:  # the BLAS's own buffer, alive during the product only
        tl.alloc(f"BLAS scratch of the {name} product", scratch.get(name, 0))
        tl.free(f"BLAS scratch of the {name} product")

    rows = chunk_rows(T, V, cuda)
    r = min(T, (rows // L) * L if rows >= L else L)  # greedy chunks of whole sequences
    tl = Timeline()
    tl.alloc("targets.masked_fill (int64)", 8 * T)
    tl.alloc("pack: mask != 0, nonzero (int64)", T + 8 * T)
    tl.free("pack: mask != 0, nonzero (int64)")
    # the forward: outputs and the persistent gradients, then one buffer the chunks reuse
    tl.alloc("logp [T] fp32", acc * T)
    tl.alloc("grad_hidden [T, H] fp32", acc * T * H)
    tl.alloc("grad_weight [V, H]", grad_weight_bytes * V * H)
    tl.alloc("logits buffer [rows, V]", b * r * V)
    for c in range(0, T, r):
        n = min(r, T - c)
        tl.alloc("chunk vectors: lse, logp, grad_logp, coef [rows] fp32", 4 * acc * n)
        if not cuda and b != acc:  # the PyTorch path's math in fp32, products in the inputs' dtype
            product("logits")
            tl.alloc("fp32 copy of the logits (CPU path)", acc * n * V)
            tl.alloc("gradient cast to the weight's dtype", b * n * V)
            tl.alloc("g @ W product before its copy into fp32", b * n * H)
            product("grad_hidden")
            tl.free("g @ W product before its copy into fp32")
            if grad_weight_bytes == b:
                product("grad_weight")  # addmm_ into grad_weight directly
            else:
                tl.alloc("g.T @ h product before its add into fp32", b * V * H)
                product("grad_weight")
                tl.alloc("its fp32 cast inside add_", acc * V * H)  # type promotion
                tl.free("g.T @ h product before its add into fp32", "its fp32 cast inside add_")
            tl.free("gradient cast to the weight's dtype", "fp32 copy of the logits (CPU path)")
        tl.free("chunk vectors: lse, logp, grad_logp, coef [rows] fp32")
    tl.free("logits buffer [rows, V]")
    tl.free("targets.masked_fill (int64)")  # the call returns; its result keeps logp
    # the backward scales in place, then casts: the casts are the parameters' .grad
    if b != acc:
        tl.alloc("hidden.grad [T, H]", b * T * H)
    if b != grad_weight_bytes:
        tl.alloc("weight.grad [V, H]", b * V * H)
    return tl


# ----------------------------------------------------------------------------- measurement


def make_inputs(size, dtype, device):
    import torch

    B, L, H, V = size
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, L, H, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (B, L), generator=gen).to(device)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    old_logp = (torch.randn(B, L, generator=gen) * 0.1 - 8.0).to(device)
    advantages = torch.randn(B, generator=gen).to(device)
    return hidden, weight, targets, mask, old_logp, advantages


def run_step(variant: str, inputs, grad_weight_dtype: str = "float32") -> None:
    hidden, weight, targets, mask, old_logp, advantages = inputs
    hidden.grad = weight.grad = None
    if variant == "ours":
        from papo_fast.kernels.fused_linear_policy_loss import fused_linear_policy_loss

        res = fused_linear_policy_loss(
            hidden, weight, targets, old_logp, advantages, mask=mask,
            grad_weight_dtype=grad_weight_dtype,
        )  # fmt: skip
        res.loss.backward()
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the suites beside this file
    from bench_fused_linear import liger  # the suite's own call: the same settings

    liger(hidden, weight, targets, mask, old_logp, advantages)


def cpu_blas_scratch(B, L, H, V, b: int, grad_weight_bytes: int = 4) -> dict[str, int]:
    """``ours_timeline``'s scratch on this CPU: each product of a chunk of the CPU path, alone,
    its peak allocation less its output. Probed, not derived: the CPU BLAS's half-precision
    products (oneDNN) take a scratchpad from torch's allocator whose size depends on the
    instruction set and the thread count (hundreds of KiB here); fp32 products take none."""
    import torch

    if b == 4:
        return {}
    dt = {2: torch.bfloat16}[b]
    n = min(B * L, (chunk_rows(B * L, V, False) // L) * L or L)  # the chunk's rows, as replayed
    gen = torch.Generator().manual_seed(0)
    h, w, g = (torch.randn(*s, generator=gen).to(dt) for s in ((n, H), (V, H), (n, V)))
    buf, gw = torch.empty(n, V, dtype=dt), torch.zeros(V, H, dtype=dt)
    ops = {  # each as the CPU path calls it, and the bytes of the output it allocates
        "logits": (lambda: torch.mm(h, w.t(), out=buf), 0),
        "grad_hidden": (lambda: g @ w, b * n * H),
        "grad_weight": (lambda: gw.addmm_(g.t(), h), 0)
        if grad_weight_bytes == b
        else (lambda: g.t() @ h, b * V * H),
    }
    out = {}
    for name, (op, out_bytes) in ops.items():
        op()  # warm-up
        out[name] = max(0, _profiled_peak(op) - out_bytes)
    return out


def _profiled_peak(fn) -> int:
    """The maximum of the running sum of the CPU allocator's allocations and frees during fn()."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_peak(
    variant: str, size, dtype_name: str = "bf16", device: str = "cpu", grad_weight_dtype="float32"
) -> int:
    """The step's peak allocated bytes above its inputs (the returned gradients included);
    ``grad_weight_dtype`` is fused_linear_policy_loss's (ours only)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    inputs = make_inputs(size, dtype, torch.device(device))
    step = lambda: run_step(variant, inputs, grad_weight_dtype)  # noqa: E731
    step()  # warm-up: compiles, caches, lazily created state
    if device == "cuda":
        inputs[0].grad = inputs[1].grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    inputs[0].grad = inputs[1].grad = None
    return _profiled_peak(step)


def report(size, dtype_name: str, device: str, measure: bool = True) -> dict:
    """Formula (both paths at ``size``) and, when ``measure``, the measured peaks of ours and
    liger on ``device``."""
    b = {"bf16": 2, "fp32": 4}[dtype_name]
    B, L, H, V = size
    out = {"size": {"B": B, "L": L, "H": H, "V": V}, "dtype": dtype_name, "device": device}
    on_cpu = measure and device == "cpu"  # the CPU formula then counts this CPU's BLAS scratch
    for path in ("cuda", "cpu"):
        scratch = cpu_blas_scratch(*size, b) if on_cpu and path == "cpu" else None
        tl = ours_timeline(*size, b, cuda=path == "cuda", scratch=scratch)
        out[f"formula_{path}_bytes"] = tl.peak
        out[f"formula_{path}_at_peak"] = tl.at_peak
    # grad_weight_dtype="weight": grad_weight summed in the weight's dtype
    out["formula_cuda_weight_dtype_grad_bytes"] = ours_timeline(*size, b, True, b).peak
    scratch = cpu_blas_scratch(*size, b, b) if on_cpu else None
    out["formula_cpu_weight_dtype_grad_bytes"] = ours_timeline(*size, b, False, b, scratch).peak
    if measure:
        out["measured_ours_bytes"] = measure_peak("ours", size, dtype_name, device)
        out["measured_ours_weight_dtype_grad_bytes"] = measure_peak(
            "ours", size, dtype_name, device, grad_weight_dtype="weight"
        )
        out["measured_liger_bytes"] = measure_peak("liger", size, dtype_name, device)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", nargs=4, type=int, metavar=("B", "L", "H", "V"))
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--formula-only", action="store_true", help="no measurement")
    p.add_argument("--json", action="store_true", help="one JSON line instead of text")
    args = p.parse_args(argv)
    size = tuple(args.size) if args.size else (H200_SIZE if args.formula_only else CPU_SIZE)
    res = report(size, args.dtype, args.device, measure=not args.formula_only)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"size B, L, H, V = {size}, {args.dtype}")
    for key, value in res.items():
        if key.endswith("_bytes"):
            print(f"  {key:38s} {value / 2**20:10.2f} MiB")
    path = "cuda" if args.formula_only else args.device
    for name, nbytes in res[f"formula_{path}_at_peak"].items():
        print(f"    live at the {path} formula's peak: {name:55s} {nbytes / 2**20:9.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
