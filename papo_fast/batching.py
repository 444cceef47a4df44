"""Token-id lists -> padded tensors: the one padding loop of rollouts, judges and training.

left  (generation):  [pad pad p p p]        the prompt ends where generation starts
right (training):    [p p r r r pad]        response_mask marks r, from response_starts[i]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Padded(NamedTuple):
    ids: torch.Tensor  # [N, L] int64, pad_id outside the rows
    attention_mask: torch.Tensor  # [N, L] int64, 1 on the rows' tokens
    response_mask: torch.Tensor | None  # [N, L] bool, True from response_starts[i] to the row end


def pad_ids(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    *,
    left: bool = False,
    response_starts: Sequence[int] | None = None,
) -> Padded:
    """Pad ``rows`` to the longest one, on the left (for generate) or the right (for training).

    Args:
        rows: N lists of token ids, N >= 1.
        pad_id: the id written at padded positions (masked out by attention_mask).
        left: pad on the left instead of the right.
        response_starts: per row, the index in the row where the response begins; gives
            ``response_mask`` (right padding only).
    """
    if not rows:
        raise ValueError("pad_ids needs at least one row")
    if response_starts is not None and (left or len(response_starts) != len(rows)):
        raise ValueError("response_starts needs right padding and one start per row")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = None if response_starts is None else torch.zeros_like(ids, dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        attn[i, span] = 1
        if resp is not None:
            resp[i, response_starts[i] : len(row)] = True
    return Padded(ids, attn, resp)
