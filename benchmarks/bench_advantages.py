"""papo_advantages against the released training code's per-group Python loop.

The baseline is reimplemented from the released code's semantics (docs/design.md, "PAPO
advantages"): a Python loop over groups, torch mean / unbiased std per group, and a host-side
comparison with eps per group.
"""

from collections import defaultdict

import pytest
import torch
from conftest import device, sync

from papo_fast import papo_advantages

GROUP = 8
SIZES = [128, 1024, 8192]  # number of groups of GROUP responses
SMOKE_SIZES = [4]
# papo_advantages' estimators, each with the arguments it reads (reinforce_pp: token counts)
ESTIMATORS = ["grpo", "drgrpo", "rloo", "batch_std", "reinforce_pp", "gdpo"]


def released_loop(outcome, process, correct, index, eps=1e-6, lam=1.0):
    """The released code's shape: bucket by prompt id, then per group mean / std and a host-side
    comparison with eps (one sync per group part), writing each group's slice."""
    buckets = defaultdict(list)
    for i, gid in enumerate(index):
        buckets[gid].append(i)
    adv = torch.zeros_like(outcome)
    for members in buckets.values():
        idx = torch.tensor(members, device=outcome.device)
        out = outcome[idx]
        a = torch.zeros_like(out)
        if len(members) > 1:
            std = out.std()
            if std.item() > eps:
                a = (out - out.mean()) / (std + eps)
        corr = correct[idx]
        if corr.sum().item() >= 2:
            proc = process[idx][corr]
            std = proc.std()
            if std.item() > eps:
                a[corr] += lam * (proc - proc.mean()) / (std + eps)
        adv[idx] = a
    return adv


def make_rewards(num_groups: int, dev):
    n = num_groups * GROUP
    gen = torch.Generator().manual_seed(num_groups)
    outcome = (torch.rand(n, generator=gen) < 0.6).float()
    process = torch.randint(0, 3, (n,), generator=gen).float() / 2
    ids = torch.arange(num_groups).repeat_interleave(GROUP)[torch.randperm(n, generator=gen)]
    return outcome.to(dev), process.to(dev), ids.to(dev)


def _record(benchmark, num_groups):
    n = num_groups * GROUP
    # outcome + process (fp32) + correct (bool) + ids (int64) in; three fp32 outputs
    benchmark.extra_info.update(responses=n, bytes=n * (4 + 4 + 1 + 8 + 3 * 4))


@pytest.mark.benchmark(group="advantages")
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_papo_fast(benchmark, size, estimator):
    outcome, process, ids = make_rewards(size, device())
    _record(benchmark, size)
    kw = dict(group_ids=ids, estimator=estimator)
    if estimator == "reinforce_pp":
        kw["lengths"] = torch.arange(outcome.numel(), device=outcome.device) % 97 + 1
    if estimator == "gdpo":  # two reward columns, outcome-only mode
        outcome, kw["mode"] = torch.stack([outcome, process], 1), "orm"

    def run():
        res = papo_advantages(outcome, process, **kw)
        sync()
        return res

    res = benchmark(run)
    if estimator == "grpo":  # the released loop computes this one
        ref = released_loop(outcome.cpu(), process.cpu(), (outcome == 1).cpu(), ids.cpu().tolist())
        torch.testing.assert_close(res.advantages.cpu(), ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(res.advantages).all()


@pytest.mark.benchmark(group="advantages")
def test_released_loop(benchmark, size):
    outcome, process, ids = make_rewards(size, device())
    _record(benchmark, size)
    correct = outcome == 1
    index = ids.tolist()
    benchmark.pedantic(
        released_loop, args=(outcome, process, correct, index), rounds=3 if size > 1024 else 10
    )
