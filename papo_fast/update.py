"""One PPO epoch over a step's samples: mini-batches of the whole step, micro-batches in lockstep.

    shard = StepShard(first=0, total=len(batch.ids))      # this process's place in the step
    metrics = ppo_epoch(runner, model, opt, loss_fn, batch, shard, cfg, seed)

Choices:
1. **Mini-batches of the whole step.** The step's samples are shuffled by one seeded permutation
   of all of them, the same on every rank, and cut into ``train.mini_batches`` optimizer steps.
   Each rank takes, of each mini-batch, the samples it holds: the same optimizer steps as one
   process, whatever the number of ranks.
2. **Global counts over ranks.** The counts of each optimizer step (``num_tokens``,
   ``num_seqs``, ``max_len``) are summed, summed and maxed over the ranks, so each rank's loss is
   its share of the one-process loss and the summed gradients are its gradient
   (docs/design.md, "Global counts"; distributed.py, choice "Sum of gradients").
3. **Lockstep.** Each mini-batch runs the same number of micro-batches on every rank
   (packing.micro_batches with the maximum over ranks); a filler micro-batch's loss is
   multiplied by 0, so it adds nothing but its share of the collectives.
4. **Metrics read once.** The summed metrics stay on the device as named float64 sums and are
   read, then reduced over the ranks, once at the end of the epoch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from papo_fast.distributed import all_reduce, total_norm
from papo_fast.packing import micro_batch_loss, micro_batches, step_counts

LOSS_METRICS = ("clip_frac_low", "clip_frac_high", "kl", "ratio_mean")  # token means of the loss
# What an update sums over its micro-batches: the loss metrics and entropy weighted by their
# tokens, the loss, the tokens, and the rollout-correction weights (trainer.py, choice
# "Rollout correction").
SUMMED = (*LOSS_METRICS, "entropy", "loss", "tokens", "is_weight")


class StepShard(NamedTuple):
    """This process's samples of the step: global indices first .. first + its count - 1."""

    first: int
    total: int  # the step's samples over all ranks


def lockstep_count(n: int) -> int:
    """The micro-batch count every rank runs: the maximum of theirs (choice "Lockstep")."""
    return int(all_reduce([n], "max")[0])


def own_minibatches(shard: StepShard, count: int, mini_batches: int, seed: int):
    """Of each mini-batch of the whole step, this rank's samples, as local indices (choice
    "Mini-batches of the whole step")."""
    gen = torch.Generator().manual_seed(seed)
    for chunk in torch.randperm(shard.total, generator=gen).chunk(mini_batches):
        mine = chunk[(chunk >= shard.first) & (chunk < shard.first + count)]
        yield mine - shard.first


def global_counts(batch, rows: torch.Tensor) -> dict:
    """step_counts of ``rows``, summed / summed / maxed over the ranks (choice "Global counts
    over ranks")."""
    c = step_counts(batch, rows)
    tokens, seqs = all_reduce([c["num_tokens"], c["num_seqs"]], "sum")
    (longest,) = all_reduce([c["max_len"]], "max")
    return {"num_tokens": int(tokens), "num_seqs": int(seqs), "max_len": int(longest)}


def ppo_epoch(runner, model, opt, loss_fn, batch, shard: StepShard, cfg, seed: int) -> dict:
    """``train.mini_batches`` optimizer steps over the step's samples; the reduced metrics."""
    t = cfg.train
    zero = torch.zeros((), dtype=torch.float64, device=batch.ids.device)
    sums = dict.fromkeys(SUMMED, zero)
    w_max = zero
    norms = []
    for minibatch in own_minibatches(shard, len(batch.ids), t.mini_batches, seed):
        counts = global_counts(batch, minibatch)
        parts = micro_batches(
            batch, minibatch, t.micro_batch_size, t.micro_batch_tokens, cfg.model.packed,
            count=lockstep_count,
        )  # fmt: skip
        for mb in parts:
            out = runner(micro_batch_loss, loss_fn, batch, mb, counts)
            if mb.filler:  # choice "Lockstep"
                (out.loss * 0).backward()
                continue
            out.loss.backward()
            k = out.num_tokens.double()
            add = {key: getattr(out, key).double() * k for key in LOSS_METRICS}
            add["entropy"] = mb.valid(out.entropy).sum().double()
            add["loss"] = out.loss.detach().double()
            add["tokens"] = k
            if batch.rollout_logp is not None:  # on-policy: old_logp is the loss's own logp
                old = mb.take(batch.old_logp) if batch.old_logp is not None else out.logp
                w = mb.valid(torch.exp(old.double() - mb.take(batch.rollout_logp)))
                add["is_weight"] = w.sum()
                w_max = torch.maximum(w_max, w.max()) if w.numel() else w_max
            sums = {key: sums[key] + add.get(key, zero) for key in SUMMED}
        params = [p for p in model.parameters() if p.grad is not None]
        norms.append(total_norm(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    local = torch.stack(list(sums.values())).tolist()
    total = dict(zip(SUMMED, all_reduce(local, "sum"), strict=True))
    per_token = 1.0 / max(total["tokens"], 1.0)
    res = {key: total[key] * per_token for key in (*LOSS_METRICS, "entropy")}
    if batch.rollout_logp is not None:
        (w_top,) = all_reduce([float(w_max)], "max")
        res |= {"is_weight_mean": total["is_weight"] * per_token, "is_weight_max": w_top}
    return {
        **res,
        "loss": total["loss"] / t.mini_batches,
        "grad_norm": float(torch.stack(norms).mean()),
    }
