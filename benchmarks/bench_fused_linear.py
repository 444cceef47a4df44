"""The policy loss from the LM head, forward + backward, against what a user would otherwise run.

    floor   the three matrix products alone (logits, grad_hidden, grad_weight), nothing else
    naive   materialized logits -> log_softmax -> gather -> policy_loss, autograd backward
    liger   liger-kernel's LigerFusedLinearGRPOLoss (chunked, loss_type "dapo"; compiled on CUDA)
    ours    fused_linear_policy_loss (token-mean, the same clip 0.2 / 0.28, no KL)

Inputs are float32 on the CPU, bf16 on CUDA. Every token is valid, so that all variants do the same
work (with padding ours skips the padded tokens' logits; the others compute them). All four run in
the same session on the same inputs; each records ``x_floor`` (its best time over the floor's best
time, from this run) and ``flops`` = 3 x 2·T·H·V, the products' work (liger does a fourth product:
it recomputes the logits in its backward).

Peak memory is measured in a fresh process per variant (best of two): on a GPU
torch.cuda.max_memory_allocated minus the inputs; on the CPU, where torch's allocations are
invisible to tracemalloc, the peak resident set (VmHWM, reset through /proc/self/clear_refs once the
inputs exist) minus the resident set before the step. It counts everything the step allocates, the
gradients included.

Run as a script to measure one variant's memory: python bench_fused_linear.py ours 8 512 512 32000
"""

import subprocess
import sys

import pytest
import torch
from conftest import device, sync

from papo_fast.kernels.fused_linear_policy_loss import fused_linear_policy_loss
from papo_fast.kernels.policy_loss import policy_loss

SIZES = [(8, 512, 512, 32000)]  # (B, L, H, V): T = 4096 tokens, the CPU point of BENCHMARKS.md
if torch.cuda.is_available():
    SIZES.append((16, 1024, 4096, 151936))  # T = 16k tokens, Qwen's vocabulary, in bf16
SMOKE_SIZES = [(2, 8, 16, 64)]
VARIANTS = ["floor", "naive", "liger", "ours"]  # the floor runs first: the others divide by it
_best: dict = {}  # (size, variant) -> best seconds in this session


def make_inputs(size, dev):
    """Built in place: a temporary larger than the inputs would hide in the CPU peak."""
    B, L, H, V = size
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hidden = torch.empty(B, L, H).normal_(generator=gen).to(dev, dtype).requires_grad_()
    weight = torch.empty(V, H).normal_(generator=gen).div_(H**0.5)
    weight = weight.to(dev, dtype).requires_grad_()
    targets = torch.randint(0, V, (B, L), generator=gen).to(dev)
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)  # no padding: see the module docstring
    old_logp = (torch.randn(B, L, generator=gen) * 0.1 - 10.0).to(dev)
    advantages = torch.randn(B, generator=gen).to(dev)
    return hidden, weight, targets, mask, old_logp, advantages


def floor(hidden, weight, *_):
    h, w = hidden.detach().flatten(0, 1), weight.detach()
    z = h @ w.T  # [T, V]
    return z @ w, z.T @ h  # stand-ins for grad_hidden [T, H] and grad_weight [V, H]


def naive(hidden, weight, targets, mask, old_logp, advantages):
    logp = (hidden @ weight.T).float().log_softmax(-1)  # [B, L, V] materialized
    logp = logp.gather(-1, targets[..., None]).squeeze(-1)
    policy_loss(logp, old_logp, advantages, mask=mask, eps_low=0.2, eps_high=0.28).loss.backward()


def liger(hidden, weight, targets, mask, old_logp, advantages):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(
        beta=0.0, compiled=hidden.is_cuda, use_ref_model=False, epsilon_low=0.2,
        epsilon_high=0.28, loss_type="dapo",
    )  # fmt: skip
    loss, _ = loss_fn(
        hidden, weight, targets, mask.long(), advantages, old_per_token_logps=old_logp
    )
    loss.backward()


def ours(hidden, weight, targets, mask, old_logp, advantages):
    res = fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask=mask)
    res.loss.backward()


def step(variant, inputs):
    inputs[0].grad = inputs[1].grad = None
    globals()[variant](*inputs)
    sync()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_bytes(variant, size) -> int:
    """The step's peak memory above its inputs, in this process (call it in a fresh one)."""
    dev = device()
    inputs = make_inputs(size, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(variant, inputs)
        return torch.cuda.max_memory_allocated() - base
    import liger_kernel.chunked_loss  # noqa: F401  (imported before the baseline, for all)

    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak RSS (VmHWM) to now
        f.write("5")
    base = _status_kib("VmRSS")
    step(variant, inputs)
    return (_status_kib("VmHWM") - base) * 1024


def measure_memory(variant, size, repeats=2) -> int:
    cmd = [sys.executable, __file__, variant, *map(str, size)]
    runs = [int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
            for _ in range(repeats)]  # fmt: skip
    return min(runs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.benchmark(group="fused_linear_policy_loss")
def test_fused_linear_loss(benchmark, size, variant):
    B, L, H, V = size
    T = B * L
    inputs = make_inputs(size, device())
    benchmark.extra_info.update(tokens=T, hidden=H, vocab=V, flops=3 * 2 * T * H * V,
                                products=4 if variant == "liger" else 3)  # fmt: skip
    smoke = benchmark.disabled
    benchmark.extra_info["peak_extra_mb"] = measure_memory(variant, size, 1 if smoke else 2) / 2**20
    warmup = 1 if inputs[0].is_cuda else 0  # CUDA: Triton compiles, liger's torch.compile
    benchmark.pedantic(step, args=(variant, inputs), rounds=1 if smoke else 3, warmup_rounds=warmup)
    if smoke:
        return
    _best[size, variant] = benchmark.stats.stats.min
    if (size, "floor") in _best:
        benchmark.extra_info["x_floor"] = _best[size, variant] / _best[size, "floor"]


if __name__ == "__main__":
    name, *dims = sys.argv[1:]
    print(peak_extra_bytes(name, tuple(int(x) for x in dims)))
