"""The trainer's update step on padded rows against packed sequences (papo_fast/packing.py).

One update over a mini-batch: the model body's forward, the fused policy loss from the LM head and
the backward, micro-batch by micro-batch with the mini-batch's global counts, as update.ppo_epoch
runs it. The model is the demo's tiny Qwen2 (papo_fast.tasks.arith.build_model, random weights,
float32); the batch has a realistic spread of lengths: prompts of 10-20 tokens and responses drawn
log-uniformly between 8 and 200 tokens (many short, a long tail), 64 sequences in micro-batches of
16 rows.

    padded   each micro-batch right-padded to its longest sequence, with an attention mask
    packed   its sequences back to back in rows as long as its longest sequence (first fit),
             position ids restarting per sequence, no attention mask

Both compute the same loss and gradients; packed skips the padding (attention and MLP of padded
positions). Recorded: ``tokens`` (prompt + response tokens of the mini-batch), ``padding_share``
(the share of the positions the body computes that hold no token: the rows' free tails when
packed), ``tokens_per_s`` and, for packed, ``x_padded`` (the padded best time over the packed
one, from this run). One torch thread: tiny matrices run best on one (as in bench_trainer.py),
and it keeps the ratio free of thread scheduling noise.
"""

import math

import pytest
import torch
from conftest import device, sync

from papo_fast.kernels.fused_linear_policy_loss import PAPOLoss
from papo_fast.kernels.loss_config import PolicyLossConfig
from papo_fast.packing import micro_batch_loss, micro_batches, step_batch, step_counts
from papo_fast.rollout import Sample
from papo_fast.tasks import arith

# (hidden, layers, sequences, longest response, rows per micro-batch)
SIZES = [(64, 2, 64, 200, 16)]
SMOKE_SIZES = [(64, 1, 6, 16, 3)]
LAYOUTS = ["padded", "packed"]  # padded first: packed divides by its time
_best: dict = {}  # (size, layout) -> best seconds in this session


def make_step(size):
    """The model, the step's batch (with advantages) and the mini-batch's rows."""
    hidden, layers, n, longest, _ = size
    tok = arith.build_tokenizer()
    model = arith.build_model(tok, hidden_size=hidden, layers=layers, seed=0).to(device())
    gen = torch.Generator().manual_seed(0)
    lo, hi = math.log(8), math.log(longest)
    samples = []
    for _ in range(n):
        p = int(torch.randint(10, 21, (), generator=gen))
        r = int(math.exp(lo + (hi - lo) * float(torch.rand((), generator=gen))))
        ids = torch.randint(0, len(tok), (p + r,), generator=gen).tolist()
        samples.append(Sample(ids[:p], ids[p:], True))
    batch = step_batch(samples, tok.pad_token_id, device())
    advantages = torch.randn(n, generator=gen).to(device())
    return model, batch._replace(advantages=advantages), torch.arange(n)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.benchmark(group="packing")
def test_update_step(benchmark, size, layout, one_thread):
    model, batch, rows = make_step(size)
    parts = micro_batches(batch, rows, size[-1], 0, packed=layout == "packed")
    counts = step_counts(batch, rows)
    loss_fn = PAPOLoss(PolicyLossConfig(), temperature=1.0)

    def update():
        model.zero_grad(set_to_none=True)
        for mb in parts:
            micro_batch_loss(model, loss_fn, batch, mb, counts).loss.backward()
        sync()

    smoke = benchmark.disabled
    benchmark.pedantic(update, rounds=1 if smoke else 5, warmup_rounds=0 if smoke else 1)
    tokens = int(batch.attn.sum())
    computed = sum(mb.ids.numel() for mb in parts)  # the positions the body runs on
    benchmark.extra_info.update(tokens=tokens, padding_share=1 - tokens / computed)
    assert all(p.grad is not None for p in model.parameters())
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # absent under --benchmark-disable
        _best[size, layout] = stats.stats.min
        benchmark.extra_info["tokens_per_s"] = tokens / stats.stats.min
        if layout == "packed" and (size, "padded") in _best:
            benchmark.extra_info["x_padded"] = _best[size, "padded"] / stats.stats.min
