"""Rooflines of the ops the GPU benchmarks time: bytes moved and FLOPs per call, and the time floor
they imply on an H200.

For each op and each GPU size of its benchmark suite, two counts:

    minimum   what an ideal implementation must move: every input read once, every output
              written once, nothing else
    ours      what papo_fast's CUDA path moves, counted from its code: every load and store of
              each kernel pass and each torch op it runs, in order (``Step`` rows)

Counting rules. A torch elementwise op or reduction reads each input once and writes its output
once. A cuBLAS product reads each operand once and writes (or reads and writes, when it
accumulates) its output once: L2 re-reads are not counted, so this is a lower bound of the real
traffic. A sort counts as one pass (CUB's radix sort makes several). Sizes are in bytes; O(1)
scalars are left out.

Floors. The op's floor is max(bytes / bandwidth, FLOPs / peak) over the whole call; ours sums
max(bytes / bandwidth, FLOPs / peak) step by step (a memory-bound step cannot hide behind a
compute-bound one that runs before or after it). Each step is one launch at least: a floor of a few
µs is below the launches' own cost, which this file does not estimate.

    python benchmarks/roofline.py          # the markdown table of BENCHMARKS.md
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Hardware:
    name: str
    bytes_per_s: float  # HBM bandwidth
    flops_per_s: float  # dense bf16 matrix products


# The vendor's H200 SXM figures; the copy and matmul rates measured on one are lower (benchmarks/
# gpu_check.sh measures both on the machine it runs on).
H200 = Hardware("H200 SXM: HBM3e 4.8 TB/s, 989 TFLOP/s dense bf16", 4.8e12, 989e12)


@dataclass(frozen=True)
class Step:
    """A pass over memory (a kernel launch or a torch op) made ``times`` times (once per chunk):
    bytes read and written and FLOPs of one pass."""

    name: str
    read: float
    write: float
    flops: float = 0.0
    times: int = 1

    @property
    def bytes(self) -> float:
        return (self.read + self.write) * self.times

    def seconds(self, hw: Hardware) -> float:
        one = max((self.read + self.write) / hw.bytes_per_s, self.flops / hw.flops_per_s)
        return one * self.times


@dataclass(frozen=True)
class Roofline:
    op: str
    size: str
    minimum: list[Step]
    ours: list[Step]

    def floor_s(self, which: str, hw: Hardware = H200) -> float:
        steps = getattr(self, which)
        if which == "minimum":
            flops = sum(s.flops * s.times for s in steps)
            return max(self.total(which, "bytes") / hw.bytes_per_s, flops / hw.flops_per_s)
        return sum(s.seconds(hw) for s in steps)

    def total(self, which: str, field: str) -> float:
        """Summed over the steps: "bytes", "read", "write", "flops" or "times" (passes)."""
        steps = getattr(self, which)
        if field in ("bytes", "times"):
            return sum(getattr(s, field) for s in steps)
        return sum(getattr(s, field) * s.times for s in steps)


def bench_sizes(suite: str) -> list:
    """The GPU sizes of a benchmark suite, read from its source: the ``SIZES = [...]`` literal and
    any ``SIZES.append(...)`` (bench_fused_linear.py adds its H200 size under CUDA). Read, not
    imported: the suites import torch and the package."""
    tree = ast.parse((HERE / suite).read_text())
    sizes: list = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "SIZES" for t in node.targets
        ):
            sizes = list(ast.literal_eval(node.value))
    for node in ast.walk(tree):
        call = node.value if isinstance(node, ast.Expr) else None
        func = getattr(call, "func", None)
        appends = isinstance(func, ast.Attribute) and func.attr == "append"
        if appends and getattr(func.value, "id", "") == "SIZES":
            sizes.append(ast.literal_eval(call.args[0]))
    if not sizes:
        raise ValueError(f"benchmarks/{suite} has no SIZES literal")
    return sizes


# ----------------------------------------------------------------------------- papo_advantages


def advantages(num_groups: int, group: int = 8) -> Roofline:
    """bench_advantages.py: fp32 outcome and process rewards, int64 group ids (shuffled), mode
    "papo", correct = (outcome == 1); outputs three fp32 [N] advantages and the statistics."""
    n = num_groups * group
    minimum = [Step("read outcome, process, ids; write 3 advantages", n * (4 + 4 + 8), n * 12)]
    ours = [
        Step("correct = outcome == 1", n * 4, n),
        Step("torch.sort(ids, stable): keys, perm", n * 8, n * 16),
        Step("starts = ones; starts[1:] = ids[1:] != ids[:-1]", n * 16, n * 2),
        Step("slot = starts.cumsum(0) - 1", n * 9, n * 16),
        Step("positions = arange; offsets = full(n + 1)", 0, n * 16),
        Step("offsets.scatter_reduce_(slot, positions, amin)", n * 24, n * 8),
        # one program per response slot (group ids bound the group count): per group its offsets,
        # perm, correct, outcome, process (re-read from cache in the norm's passes), 3 outputs,
        # and a row of 7 float64 statistics per program
        Step("_papo_adv_kernel", n * (16 + 8 + 1 + 4 + 4), n * (12 + 7 * 8)),
        Step("partials.sum(0); partials[:, MIN].amin()", n * (7 * 8 + 8), 0),
        # _check_values: ~(t.abs() <= max).any() per reward, ~isfinite(t).all() per output
        Step("beyond_float32(outcome, process).any()", 2 * n * 10, 2 * n * 6),
        Step("isfinite(3 outputs).all()", 3 * n * 5, 3 * n),
    ]
    return Roofline("papo_advantages", f"{num_groups} x {group}", minimum, ours)


# ----------------------------------------------------------------------------- policy_loss

# policy_loss_triton's row of float32 sums per program (policy_loss_torch.py's slots): 16 wide,
# the first 14 written by the token pass, all 16 read by the finalize kernel
NUM_STATS, NUM_METRICS = 16, 14


def policy_loss(
    tokens: int, length: int = 1024, block: int = 1024, counts: str = "local"
) -> Roofline:
    """bench_policy_loss.py: padded [B, L] fp32 logp and old_logp, bool mask, one fp32 advantage
    per sequence, token-mean, no KL, check_finite=False; forward + backward (grad_output 1).

    ``counts``: "local" (the suite's call: N_tokens is this call's own, so D is known only after
    the token pass and the backward scales the stored gradient), or "numbers" (the trainer's
    call: num_tokens given as a number, the forward stores the gradient divided by D, and the
    backward's kernel reads grad_output = 1 and returns). Counted with every token valid (the
    suite's ``bytes`` counts the same way; its ragged padding skips the two log-prob reads at
    padded positions, in both counts)."""
    b = tokens // min(tokens, length)
    programs = math.ceil(tokens / block)
    minimum = [Step("read logp, old_logp, mask, advantages; write grad", tokens * 9 + b * 4,
                    tokens * 4)]  # fmt: skip
    ours = [
        # token-mean without caller counts needs no per-sequence counts: no seq-stats launch
        Step("_policy_loss_fwd_kernel: logp, old, mask, adv; grad, partials",
             tokens * 9 + b * 4, tokens * 4 + programs * NUM_METRICS * 4, flops=tokens * 12),
        Step("_policy_loss_finalize_kernel: the rows, read twice for min / max",
             programs * NUM_STATS * 4 + programs * 8, 0),
        Step("num_nonfinite = metrics[...].sum()", 0, 0),
        Step("autograd: ones_like(loss) as grad_output", 0, 0),
    ]  # fmt: skip
    if counts == "numbers":  # each program reads the scale (O(1)), finds it 1 and returns
        ours.append(Step("_policy_loss_scale_kernel: grad_output is 1, no token touched", 0, 0))
    elif counts == "local":
        ours += [
            Step("backward: scale = grad_loss * inv_denom", 0, 0),
            Step("_policy_loss_scale_kernel: the saved gradient scaled in place",
                 tokens * 4, tokens * 4, flops=tokens),
        ]  # fmt: skip
    else:
        raise ValueError(f'counts must be "local" or "numbers", got {counts!r}')
    label = f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)
    how = "local counts" if counts == "local" else "counts as numbers"
    return Roofline(f"policy_loss fwd+bwd, {how}", f"{label} tokens", minimum, ours)


# ----------------------------------------------------------------------------- fused linear


def chunk_rows(tokens: int, vocab: int, cuda: bool = True) -> int:
    """fused_linear_logprobs.chunk_rows, restated: [rows, V] fp32 under 1 GiB on a GPU (32 MiB on
    the CPU), a power of two in [128, 4096], at most the token count."""
    budget = (1 << 30) if cuda else (1 << 25)
    rows = 1 << max(0, (budget // (4 * vocab)).bit_length() - 1)
    return max(1, min(max(rows, 128), 4096, tokens))


def fused_linear(B: int, L: int, H: int, V: int, b: int = 2) -> Roofline:
    """bench_fused_linear.py on CUDA: bf16 hidden [B, L, H] and weight [V, H], no padding, whole
    sequences of L tokens, token-mean, no KL; forward (which forms every gradient) + backward.

    Per chunk of ``rows`` tokens (whole sequences: a chunk holds max(1, rows // L) of them): the
    logits product into a bf16 buffer, the logsumexp kernel, the chunk's policy_loss, the
    gradient kernel in place, then grad_hidden (fp32 out) and grad_weight (fp32, accumulated).
    The backward scales both fp32 gradients in place and casts them to bf16."""
    T = B * L
    rows = chunk_rows(T, V)
    if 4 * rows < L:
        raise ValueError(f"L={L} > 4 x {rows} rows: the two-pass path, not counted here")
    rows = (rows // L) * L if rows >= L else L  # greedy chunks of whole sequences
    chunks = math.ceil(T / rows)
    prod = 2.0 * rows * H * V
    minimum = [
        # and the int64 targets, fp32 old_logp, bool mask, fp32 advantages
        Step("read hidden, weight; write grad_hidden, grad_weight (bf16)",
             b * (T * H + V * H) + T * 13 + B * 4, b * (T * H + V * H), 3 * 2.0 * T * H * V),
    ]  # fmt: skip
    n = chunks
    per_chunk = [
        Step("logits = h @ W.T (bf16 buffer)", b * (rows * H + V * H), b * rows * V, prod, n),
        Step("_lse_fwd_kernel: read the chunk's logits", b * rows * V, rows * 8, times=n),
        # packed, the counts as tensors: the kernel pass, then the finalization in torch ops on
        # O(1) data; autograd.grad scales the saved gradient
        Step("policy_loss on the chunk: logp, old; grad", rows * 8, rows * 4, times=n),
        Step("its backward: grad * scale", rows * 4, rows * 4, times=n),
        Step("grad_logp / temperature", rows * 4, rows * 4, times=n),
        Step("_grad_logits_kernel: logits -> gradient, in place", b * rows * V + rows * 12,
             b * rows * V, times=n),
        Step("grad_hidden[chunk] = g @ W (fp32 out)", b * (rows * V + V * H), 4 * rows * H, prod,
             n),
        Step("grad_weight += g.T @ h (fp32, accumulated)", b * (rows * V + rows * H) + 4 * V * H,
             4 * V * H, prod, n),
    ]  # fmt: skip
    ours = [
        Step("mask == 0", T, T),
        Step("targets.masked_fill(mask == 0, 0)", 9 * T, 8 * T),
        Step("targets.aminmax()", 8 * T, 0),
        Step("pack: mask != 0, nonzero, (mask != 0).sum(1)", 4 * T, 10 * T),
        Step("grad_weight = zeros (fp32)", 0, 4 * V * H),
        *per_chunk,
        Step("backward: grad_hidden, grad_weight *= grad_output (fp32, in place)",
             4 * (T * H + V * H), 4 * (T * H + V * H)),
        Step("backward: .to(bf16) of both", 4 * (T * H + V * H), b * (T * H + V * H)),
    ]  # fmt: skip
    return Roofline("fused_linear_policy_loss fwd+bwd", f"T={T}, H={H}, V={V}", minimum, ours)


# ----------------------------------------------------------------------------- table


def rooflines() -> list[Roofline]:
    rows = [advantages(g) for g in bench_sizes("bench_advantages.py")]
    for counts in ("local", "numbers"):
        rows += [policy_loss(t, counts=counts) for t in bench_sizes("bench_policy_loss.py")]
    gpu = [s for s in bench_sizes("bench_fused_linear.py") if s[2] >= 4096]
    return rows + [fused_linear(*s) for s in gpu]


def _fmt_bytes(x: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.3g} ms" if x >= 1e-3 else f"{x * 1e6:.3g} µs"


def markdown(hw: Hardware = H200) -> str:
    head = ("| op | size | bytes min | bytes ours | FLOPs | floor min | floor ours | steps |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    lines = [head]
    for r in rooflines():
        lines.append(
            f"| {r.op} | {r.size} | {_fmt_bytes(r.total('minimum', 'bytes'))} "
            f"| {_fmt_bytes(r.total('ours', 'bytes'))} | {r.total('ours', 'flops'):.3g} "
            f"| {_fmt_s(r.floor_s('minimum', hw))} | {_fmt_s(r.floor_s('ours', hw))} "
            f"| {r.total('ours', 'times'):.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"Hardware: {H200.name}\n")
    print(markdown())
