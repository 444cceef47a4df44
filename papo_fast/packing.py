"""A step's samples as micro-batches for the model: padded rows or packed sequences.

    batch = step_batch(samples, pad_id, device)          # the step's padded tables (StepBatch)
    parts = micro_batches(batch, rows, max_rows, max_tokens, packed=True)
    out = micro_batch_loss(model, loss_fn, batch, parts[0], step_counts(batch, rows))

Padded: a micro-batch is its rows of the step's tables, trimmed to its longest sequence; the
model sees an attention mask. Packed: its sequences back to back, position ids restarting at 0 per
sequence and no attention mask. transformers then builds a block-diagonal causal mask from the
position ids (a position that does not follow its predecessor starts a new sequence), so no
sequence attends to another; ``check_packed_attention`` verifies that on the loaded model. Both
layouts give the loss the same response tokens: padded as [B, W-1] with the response mask, packed
as the hidden states of the response-target positions only, [T_resp, H] with cu_seqlens [B+1]
(the loss's packed layout).

**Rows as long as the longest sequence.** sdpa and eager attend densely under the mask: one row
of all T tokens would cost T^2 per head, more than the padded B * W^2 once the pack outgrows the
longest sequence W. So the sequences fill rows of W tokens, first fit in order ([R, W], R <= B):
attention costs at most R * W^2, and only the rows' free tails (left over by the fit, not by
padding every sequence to W) are computed for nothing. On the demo model (hidden 64, 2 layers),
a single row was slower than padding; these rows cut the update's time (benchmarks/
bench_packing.py).

Micro-batches are formed from whole sequences (docs/design.md, "Whole sequences") in the order
given: ``max_rows`` rows at a time, or, with ``max_tokens`` > 0, greedily as many sequences as fit
in that many prompt+response tokens (a longer sequence alone). The counts of the whole optimizer
step (``step_counts``) make the loss the same whatever the split (docs/design.md, "Global
counts").
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from papo_fast.config import ConfigError
from papo_fast.kernels.fused_linear_logprobs import fused_linear_logprobs
from papo_fast.policy import hidden_states, pad_rollout_logprobs, pad_samples


class StepBatch(NamedTuple):
    """A step's samples, right-padded (pad_samples' layout), and their per-token data.

    The lengths are host-side lists, read once while the tables are still on the CPU: forming
    micro-batches and the step's counts from them needs no sync with the device.
    """

    ids: torch.Tensor  # [N, L] prompt + response ids
    attn: torch.Tensor  # [N, L] 1 on each sequence's tokens
    targets: torch.Tensor  # [N, L-1] ids[:, 1:], the token each position predicts
    mask: torch.Tensor  # [N, L-1] True where the target is a response token
    lengths: list[int]  # [N] prompt + response tokens of each sequence (attn's row sums)
    response_lengths: list[int]  # [N] response targets of each sequence (mask's row sums)
    rollout_logp: torch.Tensor | None = None  # [N, L-1] the sampler's, when it reports them
    old_logp: torch.Tensor | None = None  # [N, L-1] at sampling time; None on-policy
    ref_logp: torch.Tensor | None = None  # [N, L-1] the reference policy's
    advantages: torch.Tensor | None = None  # [N] one per sequence


def step_batch(samples, pad_id: int, device: torch.device | str = "cpu") -> StepBatch:
    """The step's tables on ``device``; rollout_logp when the backend returned log-probs."""
    ids, attn, targets, mask = pad_samples(samples, pad_id)  # built on the CPU
    lengths, response_lengths = attn.sum(1).tolist(), mask.sum(1).tolist()
    ids, attn, targets, mask = (t.to(device) for t in (ids, attn, targets, mask))
    rollout = pad_rollout_logprobs(samples)
    rollout = None if rollout is None else rollout.to(device)
    return StepBatch(ids, attn, targets, mask, lengths, response_lengths, rollout)


def step_counts(batch: StepBatch, rows: torch.Tensor) -> dict:
    """The counts of ``rows`` of one optimizer step (docs/design.md, "Global counts"), from the
    host-side lengths; a run on many processes sums and maxes them over its ranks."""
    n = [batch.response_lengths[i] for i in rows.tolist()]
    return {"num_tokens": sum(n), "num_seqs": len(n), "max_len": max(n, default=0)}


class MicroBatch(NamedTuple):
    """One micro-batch: the model's inputs and the loss's layout of its response tokens."""

    rows: torch.Tensor  # [B] indices into the step's samples
    resp: torch.Tensor  # [B, W-1] the response mask of the rows, trimmed to the longest
    ids: torch.Tensor  # padded [B, W]; packed [R, W], R <= B rows of whole sequences
    attention_mask: torch.Tensor | None  # padded [B, W]; packed None
    position_ids: torch.Tensor | None  # packed [R, W], from 0 in each sequence; padded None
    select: torch.Tensor | None  # packed [T_resp]: the positions predicting a response token
    cu_seqlens: torch.Tensor | None  # packed [B+1] of the response tokens; padded None
    filler: bool = False  # run for the collectives only: its results are discarded (lockstep)

    @property
    def layout(self) -> dict:
        """The loss's layout argument: ``mask=`` (padded) or ``cu_seqlens=`` (packed)."""
        return {"mask": self.resp} if self.cu_seqlens is None else {"cu_seqlens": self.cu_seqlens}

    def take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A step table [N, L-1] in this micro-batch's loss layout: [B, W-1] or [T_resp]."""
        if t is None:
            return None
        rows = t[self.rows, : self.resp.shape[1]]
        return rows if self.cu_seqlens is None else rows[self.resp]

    def valid(self, t: torch.Tensor) -> torch.Tensor:
        """The response tokens of a tensor in the loss layout: [T_resp]."""
        return t[self.resp] if self.cu_seqlens is None else t

    def put(self, out: torch.Tensor, t: torch.Tensor) -> None:
        """Write ``t`` (loss layout) into the step table ``out`` [N, L-1]."""
        if self.cu_seqlens is not None:
            t = t.new_zeros(self.resp.shape).masked_scatter_(self.resp, t)
        out[self.rows, : self.resp.shape[1]] = t.to(out.dtype)

    def hidden(self, model) -> torch.Tensor:
        """Last hidden states at the positions that predict a token: [B, W-1, H] or [T_resp, H]."""
        if self.cu_seqlens is None:
            return hidden_states(model, self.ids, self.attention_mask)
        out = model.base_model(input_ids=self.ids, position_ids=self.position_ids, use_cache=False)
        h = out.last_hidden_state
        return h.reshape(-1, h.shape[-1])[self.select]


def micro_batch(batch: StepBatch, rows: torch.Tensor, packed: bool) -> MicroBatch:
    """The micro-batch of ``rows`` [B] of the step, padded or packed."""
    lengths = [batch.lengths[i] for i in rows.tolist()]
    width = max(lengths)  # trim the right padding of these rows
    rows = rows.to(batch.ids.device)
    ids, attn = batch.ids[rows, :width], batch.attn[rows, :width]
    resp = batch.mask[rows, : width - 1]
    if not packed:
        return MicroBatch(rows, resp, ids, attn, None, None, None)
    keep = attn.bool()  # [B, W], a prefix of each row (right padding)
    fill, starts = _pack_rows(lengths, width)
    dev, cols = ids.device, torch.arange(width, device=ids.device)
    starts = torch.tensor(starts, device=dev)  # [B] where each sequence begins in the pack
    dest = (starts[:, None] + cols)[keep]  # [T] each token's place in the pack
    packed_ids = ids.new_zeros(len(fill) * width).index_put_((dest,), ids[keep])
    # a row's free tail is one more sequence (positions from 0) whose outputs nobody reads
    position_ids = cols - torch.tensor(fill, device=dev)[:, None]  # [R, W]
    position_ids.view(-1)[dest] = (keep.cumsum(1) - 1)[keep]
    # target j of row i (= token j + 1) is predicted at position j, in the pack starts[i] + j
    select = (starts[:, None] + cols[:-1])[resp]  # [T_resp]
    cu = torch.cat([resp.new_zeros(1, dtype=torch.long), resp.sum(1).cumsum(0)])  # [B+1]
    return MicroBatch(rows, resp, packed_ids.view(-1, width), None, position_ids, select, cu)


def _pack_rows(lengths: list[int], width: int) -> tuple[list[int], list[int]]:
    """First fit of sequences into rows of ``width`` tokens (the longest sequence): each goes
    after the others in the first row with room. Returns each row's tokens and each sequence's
    start in the flattened rows."""
    fill: list[int] = []
    starts = []
    for n in lengths:
        r = next((k for k, used in enumerate(fill) if used + n <= width), len(fill))
        if r == len(fill):
            fill.append(0)
        starts.append(r * width + fill[r])
        fill[r] += n
    return fill, starts


def split_rows(
    rows: torch.Tensor, lengths: list[int], max_rows: int, max_tokens: int = 0
) -> list[torch.Tensor]:
    """Split ``rows`` [B] in order into micro-batches of whole sequences.

    Args:
        rows: the sequences' indices, in the order to keep.
        lengths: each one's prompt+response tokens, aligned with ``rows``.
        max_rows: rows per micro-batch when ``max_tokens`` is 0.
        max_tokens: > 0: greedily as many sequences as fit in that many tokens; a longer sequence
            forms its own micro-batch.
    """
    if len(lengths) != len(rows):
        raise ValueError(f"split_rows: {len(lengths)} lengths for {len(rows)} rows")
    if max_tokens <= 0:
        return list(rows.split(max_rows))
    parts, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n > max_tokens:
            parts.append(rows[start:i])
            start, used = i, 0
        used += n
    return [*parts, rows[start:]]


def split_further(parts: list[torch.Tensor], lengths: list[int], k: int) -> list[torch.Tensor]:
    """``parts`` split into ``k``: the part with the most tokens (``lengths`` of the step's
    sequences) halved, again and again; fewer than ``k`` when every part is one sequence."""
    parts = list(parts)
    while len(parts) < k:
        splittable = [i for i, p in enumerate(parts) if len(p) > 1]
        if not splittable:
            break
        i = max(splittable, key=lambda i: sum(lengths[j] for j in parts[i].tolist()))
        half = len(parts[i]) // 2
        parts[i : i + 1] = [parts[i][:half], parts[i][half:]]
    return parts


def micro_batches(
    batch: StepBatch,
    rows: torch.Tensor,
    max_rows: int,
    max_tokens: int,
    packed: bool,
    count=None,
) -> list[MicroBatch]:
    """``rows`` of the step as micro-batches (``split_rows``), each padded or packed.

    ``count(n) -> k`` (k >= n) makes it exactly k micro-batches, whatever this process's share:
    its parts split further (``split_further``), then filler micro-batches (one sequence, marked
    ``filler``) where it has no sequence left. A run on many processes passes the maximum over
    the ranks, so that all of them run the same number of collectives (distributed.py, choice
    "Lockstep").
    """
    lengths = [batch.lengths[i] for i in rows.tolist()]
    parts = split_rows(rows, lengths, max_rows, max_tokens) if len(rows) else []
    k = len(parts) if count is None else count(len(parts))
    parts = split_further(parts, batch.lengths, k)
    out = [micro_batch(batch, r, packed) for r in parts]
    if len(out) < k:
        out += [micro_batch(batch, torch.arange(1), packed)._replace(filler=True)] * (k - len(out))
    return out


@torch.no_grad()
def step_logprobs(model, batch: StepBatch, parts: list[MicroBatch], temperature: float):
    """log p(target) of the step's response tokens, [N, L-1] float32 (0 elsewhere under packed
    micro-batches), micro-batch by micro-batch, without logits."""
    head = model.get_output_embeddings()
    out = torch.zeros(batch.targets.shape, device=batch.targets.device)
    for mb in parts:
        logp, _ = fused_linear_logprobs(
            mb.hidden(model), head.weight, mb.take(batch.targets), bias=head.bias,
            temperature=temperature,
        )  # fmt: skip
        if not mb.filler:
            mb.put(out, logp)
    return out


def micro_batch_loss(model, loss_fn, batch: StepBatch, mb: MicroBatch, counts: dict):
    """``loss_fn`` (a PAPOLoss) on one micro-batch, with the optimizer step's global counts."""
    head = model.get_output_embeddings()
    return loss_fn(
        mb.hidden(model), head.weight, mb.take(batch.targets), mb.take(batch.old_logp),
        batch.advantages[mb.rows], bias=head.bias, ref_logp=mb.take(batch.ref_logp),
        rollout_logp=mb.take(batch.rollout_logp), **mb.layout, **counts,
    )  # fmt: skip


def check_packed_attention(model) -> None:
    """A ConfigError unless ``model`` keeps packed sequences apart.

    Two packs that differ only in their first sequence must give the second one the same hidden
    states, bit for bit: under a block-diagonal mask the first sequence's keys weigh exactly 0.
    An attention implementation (or a model) that ignores the position ids fails here, before
    any training, instead of mixing sequences in silence.
    """
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    first = torch.arange(5, device=device) % vocab
    second = (torch.arange(4, device=device) + 7) % vocab
    positions = torch.cat([torch.arange(5), torch.arange(4)]).to(device)[None]
    was_training = model.training
    model.eval()  # no dropout: the two runs differ only in the first sequence's tokens
    try:
        with torch.no_grad():
            h = [
                model.base_model(
                    input_ids=torch.cat([a, second])[None], position_ids=positions, use_cache=False
                ).last_hidden_state[0, 5:]
                for a in (first, (first + 1) % vocab)
            ]
    finally:
        model.train(was_training)
    if not torch.equal(h[0], h[1]):
        impl = getattr(model.config, "_attn_implementation", None)
        raise ConfigError(
            f"model.packed: {type(model).__name__} with attn_implementation {impl!r} lets packed "
            "sequences attend to each other (its attention ignores the position ids); set "
            "model.packed: false, or model.attn_implementation: sdpa or eager"
        )
