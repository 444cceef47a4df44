"""policy_loss forward + backward against what a user would otherwise run.

    eager     the loss in PyTorch ops as verl writes it, with the same outputs (loss, clip fractions
              low/high, ratio mean/min/max, token count), autograd backward
    compiled  torch.compile of eager (compiled before timing)
    ours      papo_fast.policy_loss with check_finite=False (the trainer's hot-path setting)

The paper's setting: padded [B, 1024] fp32 log-probs with ragged response lengths, one advantage
per response, clip 0.2 / 0.28, token-mean, no KL; ``loss_type`` runs each policy-gradient term
(ppo, cispo, sapo, gpg, clip_cov, kl_cov: PolicyLossConfig's), eager and compiled writing the
same formula (clip_cov and kl_cov as verl selects their tokens, with a host sync; clip_cov's
random draw the one ours makes from its seeded generator, so that the losses agree);
``per_token`` (ppo only) also returns each token's loss and clip flags (ours: per_token=True). Each
records ``tokens`` and ``bytes``, the op's minimal traffic (read logp, old_logp and the mask once,
write the gradient once: 13 B/token in fp32), so that bytes / time is an effective bandwidth
comparable across the three; ours moves ``bytes_moved`` (21 B/token: its backward reads the saved
gradient and writes it scaled by grad_output). ``x_eager`` is eager's best time over this
variant's best, from the same run.
"""

import pytest
import torch
from conftest import device, sync

from papo_fast import policy_loss
from papo_fast.kernels.loss_config import LOSS_TYPES

SIZES = [16_384, 131_072, 1_048_576]  # tokens
SMOKE_SIZES = [192]
VARIANTS = ["eager", "compiled", "ours"]
CASES = [(t, False) for t in LOSS_TYPES] + [("ppo", True)]  # (loss_type, per_token)
COV = dict(clip_cov_ratio=0.002, kl_cov_ratio=0.002)  # a few tokens a batch, verl's band
_best: dict = {}  # (size, variant) -> best seconds in this session


def make_inputs(tokens: int, dev):
    # two sequences at least: with one, every advantage is the batch mean and kl_cov's covariances
    # all tie at 0 (its top k is then arbitrary)
    length = min(max(tokens // 2, 1), 1024)
    b = tokens // length
    gen = torch.Generator().manual_seed(0)
    logp = (-3 * torch.rand(b, length, generator=gen)).to(dev).requires_grad_()
    old_logp = (logp.detach().cpu() + 0.2 * torch.randn(b, length, generator=gen)).to(dev)
    advantages = torch.randn(b, generator=gen).to(dev)
    lengths = torch.randint(length // 4, length + 1, (b,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(dev)
    return logp, old_logp, advantages, mask


def cov_draw(mask):
    """The keys ours draws for clip_cov (policy_loss_cov.py) from its generator seeded 0."""
    gen = torch.Generator(mask.device).manual_seed(0)
    return torch.rand(mask.shape, generator=gen, dtype=torch.float64, device=mask.device)


def eager(logp, old_logp, advantages, mask, loss_type="ppo", per_token=False, keys=None):
    eps_low, eps_high = 0.2, 0.28
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    lo, hi = 1 - eps_low, 1 + eps_high
    clip_low = clip_high = torch.zeros_like(mask)
    if loss_type in ("clip_cov", "kl_cov"):  # verl's covariance over the valid tokens
        a = adv.expand_as(logp)
        cov = (a - a[mask].mean()) * (logp.detach() - logp.detach()[mask].mean())
        n_valid = int(mask.sum())  # verl reads it on the host
    if loss_type in ("ppo", "clip_cov"):
        pg1, pg2 = -adv * ratio, -adv * ratio.clamp(lo, hi)
        pg = torch.maximum(pg1, pg2)
        clipped = pg2 > pg1
        clip_low, clip_high = clipped & (adv < 0), clipped & (adv > 0)
        if loss_type == "clip_cov":  # a random few in the band get loss 0
            band = torch.nonzero(mask & ~clipped & (cov > 1.0) & (cov < 5.0))
            k = max(1, int(COV["clip_cov_ratio"] * n_valid))
            chosen = band[torch.argsort(keys[band[:, 0], band[:, 1]], stable=True)[:k]]
            corr = torch.ones_like(pg)
            corr[chosen[:, 0], chosen[:, 1]] = 0.0
            pg = pg * corr
    elif loss_type == "kl_cov":  # the top k by covariance get 0.1 |log-ratio|
        pg = -adv * ratio
        top = torch.topk(cov[mask], max(1, int(COV["kl_cov_ratio"] * n_valid))).indices
        rows, cols = torch.nonzero(mask)[top].unbind(-1)
        penalty = torch.zeros_like(pg)
        penalty[rows, cols] = 0.1 * (logp - old_logp).abs()[rows, cols]
        pg = pg + penalty
    elif loss_type == "cispo":
        pg = -ratio.clamp(lo, hi).detach() * adv * logp
        clip_low, clip_high = ratio < lo, ratio > hi
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, 1.0, 1.05)
        pg = -adv * torch.sigmoid(tau * (ratio - 1)) * 4 / tau
    else:  # gpg
        pg = -adv * logp
    m = mask.float()
    n = m.sum()
    loss = (pg * m).sum() / n
    r = ratio.detach()
    metrics = (
        (clip_low & mask).sum() / n,
        (clip_high & mask).sum() / n,
        (r * m).sum() / n,
        torch.where(mask, r, torch.inf).min(),
        torch.where(mask, r, -torch.inf).max(),
        n,
    )
    if per_token:
        metrics = (*metrics, pg.detach() * m, clip_low & mask, clip_high & mask)
    return loss, metrics


_compiled = torch.compile(eager, dynamic=False)


def ours(logp, old_logp, advantages, mask, loss_type="ppo", per_token=False, keys=None):
    gen = torch.Generator(logp.device).manual_seed(0)
    res = policy_loss(
        logp, old_logp, advantages, mask=mask, check_finite=False, loss_type=loss_type,
        per_token=per_token, generator=gen, **COV,
    )  # fmt: skip
    return res.loss, res[1:]


@pytest.mark.benchmark(group="policy_loss")
@pytest.mark.parametrize("loss_type, per_token", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_policy_loss(benchmark, size, variant, loss_type, per_token):
    logp, old_logp, advantages, mask = make_inputs(size, device())
    fn = {"eager": eager, "compiled": _compiled, "ours": ours}[variant]
    keys = cov_draw(mask) if loss_type == "clip_cov" else None

    def step():
        loss, metrics = fn(logp, old_logp, advantages, mask, loss_type, per_token, keys)
        (grad,) = torch.autograd.grad(loss, logp)
        sync()
        return loss, grad

    step()  # compiles (torch.compile, Triton) outside the timing
    loss, grad = benchmark(step)
    ref_loss = eager(logp, old_logp, advantages, mask, loss_type, False, keys)[0]
    (ref_grad,) = torch.autograd.grad(ref_loss, logp)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-8, rtol=1e-5)

    n = logp.numel()
    # per_token: ours also writes each token's loss and KL (4 B each) and flags (1 B)
    moved = n * (13 + 8 + (9 if per_token else 0))
    benchmark.extra_info.update(tokens=n, bytes=n * 13, bytes_moved=moved)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # absent under --benchmark-disable
        case = (size, loss_type, per_token)
        _best[(*case, variant)] = stats.stats.min
        if (*case, "eager") in _best:
            benchmark.extra_info["x_eager"] = _best[(*case, "eager")] / stats.stats.min


# Rollout correction (ppo): the sampler's log-probs beside old_logp. "token": the truncated token
# weight; "sequence": one weight per sequence (exp of the summed log-ratios, clamped to +-20,
# truncated at 2); "rs-sequence": that weight and sequence rejection outside [0.5, 2] (the
# rejected tokens leave the mask). Eager writes verl's steps; ``bytes`` adds the rollout read.
ROLLOUT = {
    "token": dict(),
    "sequence": dict(is_level="sequence"),
    "rs-sequence": dict(is_level="sequence", rollout_rs="sequence", rs_low=0.5, rs_high=2.0),
}


def eager_rollout(logp, old_logp, advantages, mask, rollout_logp, rollout):
    log_w = old_logp - rollout_logp
    m = mask.float()
    if rollout != "token":
        log_w = ((log_w * m).sum(-1, keepdim=True)).clamp(-20, 20)
    w = torch.exp(log_w).clamp(max=2.0)
    if rollout == "rs-sequence":
        m = m * ((log_w >= -0.6931471805599453) & (log_w <= 0.6931471805599453)).float()
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28)) * w
    return (pg * m).sum() / m.sum()


@pytest.mark.benchmark(group="policy_loss_rollout")
@pytest.mark.parametrize("rollout", list(ROLLOUT))
@pytest.mark.parametrize("variant", ["eager", "ours"])
def test_policy_loss_rollout(benchmark, size, variant, rollout):
    logp, old_logp, advantages, mask = make_inputs(size, device())
    gen = torch.Generator().manual_seed(1)
    rollout_logp = (old_logp.cpu() + 0.02 * torch.randn(old_logp.shape, generator=gen)).to(
        old_logp.device
    )

    def run():
        if variant == "eager":
            return eager_rollout(logp, old_logp, advantages, mask, rollout_logp, rollout)
        return policy_loss(
            logp, old_logp, advantages, mask=mask, rollout_logp=rollout_logp,
            check_finite=False, **ROLLOUT[rollout],
        ).loss  # fmt: skip

    def step():
        loss = run()
        (grad,) = torch.autograd.grad(loss, logp)
        sync()
        return loss, grad

    step()
    loss, grad = benchmark(step)
    ref_loss = eager_rollout(logp, old_logp, advantages, mask, rollout_logp, rollout)
    (ref_grad,) = torch.autograd.grad(ref_loss, logp)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-8, rtol=1e-5)
    n = logp.numel()
    benchmark.extra_info.update(tokens=n, bytes=n * 17, bytes_moved=n * (17 + 8))
