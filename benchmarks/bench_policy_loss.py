"""policy_loss forward + backward against what a user would otherwise run.

    eager     the loss in PyTorch ops as verl writes it, with the same outputs (loss, clip fractions
              low/high, ratio mean/min/max, token count), autograd backward
    compiled  torch.compile of eager (compiled before timing)
    ours      papo_fast.policy_loss with check_finite=False (the trainer's hot-path setting)

The paper's setting: padded [B, 1024] fp32 log-probs with ragged response lengths, one advantage
per response, clip 0.2 / 0.28, token-mean, no KL. Each records ``tokens`` and ``bytes``, the op's
minimal traffic (read logp, old_logp and the mask once, write the gradient once: 13 B/token in
fp32), so that bytes / time is an effective bandwidth comparable across the three; ours moves
``bytes_moved`` (21 B/token: its backward reads the saved gradient and writes it scaled by
grad_output). ``x_eager`` is eager's best time over this variant's best, from the same run.
"""

import pytest
import torch
from conftest import device, sync

from papo_fast import policy_loss

SIZES = [16_384, 131_072, 1_048_576]  # tokens
SMOKE_SIZES = [192]
VARIANTS = ["eager", "compiled", "ours"]
_best: dict = {}  # (size, variant) -> best seconds in this session


def make_inputs(tokens: int, dev):
    length = min(tokens, 1024)
    b = tokens // length
    gen = torch.Generator().manual_seed(0)
    logp = (-3 * torch.rand(b, length, generator=gen)).to(dev).requires_grad_()
    old_logp = (logp.detach().cpu() + 0.2 * torch.randn(b, length, generator=gen)).to(dev)
    advantages = torch.randn(b, generator=gen).to(dev)
    lengths = torch.randint(length // 4, length + 1, (b,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(dev)
    return logp, old_logp, advantages, mask


def eager(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.28):
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    m = mask.float()
    n = m.sum()
    loss = (torch.maximum(pg1, pg2) * m).sum() / n
    clipped = pg2 > pg1
    r = ratio.detach()
    metrics = (
        (clipped & (adv < 0) & mask).sum() / n,
        (clipped & (adv > 0) & mask).sum() / n,
        (r * m).sum() / n,
        torch.where(mask, r, torch.inf).min(),
        torch.where(mask, r, -torch.inf).max(),
        n,
    )
    return loss, metrics


_compiled = torch.compile(eager, dynamic=False)


def ours(logp, old_logp, advantages, mask):
    res = policy_loss(logp, old_logp, advantages, mask=mask, check_finite=False)
    return res.loss, res[1:]


@pytest.mark.benchmark(group="policy_loss")
@pytest.mark.parametrize("variant", VARIANTS)
def test_policy_loss(benchmark, size, variant):
    logp, old_logp, advantages, mask = make_inputs(size, device())
    fn = {"eager": eager, "compiled": _compiled, "ours": ours}[variant]

    def step():
        loss, metrics = fn(logp, old_logp, advantages, mask)
        (grad,) = torch.autograd.grad(loss, logp)
        sync()
        return loss, grad

    step()  # compiles (torch.compile, Triton) outside the timing
    loss, grad = benchmark(step)
    ref_loss = eager(logp, old_logp, advantages, mask)[0]
    (ref_grad,) = torch.autograd.grad(ref_loss, logp)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-8, rtol=1e-5)

    n = logp.numel()
    benchmark.extra_info.update(tokens=n, bytes=n * 13, bytes_moved=n * (13 + 8))
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # absent under --benchmark-disable
        _best[size, variant] = stats.stats.min
        if (size, "eager") in _best:
            benchmark.extra_info["x_eager"] = _best[size, "eager"] / stats.stats.min
