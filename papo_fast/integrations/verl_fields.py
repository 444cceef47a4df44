"""The extra reward fields of a verl batch, handed from the trainer to the ``papo`` estimator.

verl 0.9.1's ``compute_advantage`` calls a registered estimator with the token rewards, the mask
and the uids only. The trainer glue (verl_trainer.py) reads the fields that ``compute_score``
returned beside ``"score"`` (``PROCESS_KEY``, ``CORRECT_KEY``) for the same rows, in the same
order, and holds them here while verl's own ``compute_advantage`` runs; the estimator (verl.py)
takes them, after checking that its uids are the rows the trainer read.

Choices:
1. **Hand-over.** A context variable, set only around verl's own call (``handing_over``): the
   estimator never sees fields of another batch, and verl's code runs unchanged.
2. **Correctness.** A row is correct when its ``CORRECT_KEY`` value equals 1 (``compute_score``
   returns 1.0 / 0.0; verl's reward manager writes the score itself there when ``compute_score``
   returns a bare number, so a bare 0/1 score reads the same). No field: the estimator's default,
   outcome == 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

PROCESS_KEY = "papo_process"  # the rubric score compute_score returns (0 / 0.5 / 1)
CORRECT_KEY = "acc"  # the binary correctness compute_score returns (1.0 / 0.0)


@dataclass
class RewardFields:
    """The extra reward fields of one batch, row for row with the estimator's ``index``."""

    uids: np.ndarray  # [B] object, the prompt uid of each row
    process: np.ndarray | None  # [B] float64, None when no row has PROCESS_KEY
    correct: np.ndarray | None  # [B] bool, None when no row has CORRECT_KEY
    stats: dict[str, float] = field(default_factory=dict)  # filled by the estimator


_CURRENT: ContextVar[RewardFields | None] = ContextVar("papo_fast_reward_fields", default=None)


@contextmanager
def handing_over(fields: RewardFields) -> Iterator[RewardFields]:
    """Make ``fields`` the batch's extra reward fields while the block runs."""
    token = _CURRENT.set(fields)
    try:
        yield fields
    finally:
        _CURRENT.reset(token)


def _column(uids: np.ndarray, values: Sequence, key: str) -> np.ndarray | None:
    """[B] float64 of one field; None when every row lacks it; a ValueError naming the first row
    that lacks it or holds no finite number."""
    missing = [i for i, v in enumerate(values) if v is None]
    if len(missing) == len(values):
        return None
    if missing:
        i = missing[0]
        raise ValueError(
            f"reward field {key!r} is missing for row {i} (uid {uids[i]!r}) but present for "
            "others: compute_score must return it for every response"
        )
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            out[i] = math.nan
        if not math.isfinite(out[i]):
            raise ValueError(
                f"reward field {key!r} of row {i} (uid {uids[i]!r}) must be a finite number, "
                f"got {v!r}"
            )
    return out


def fields_from_rows(uids: Sequence, infos: Sequence[Mapping | None]) -> RewardFields:
    """The fields from one ``compute_score`` dict per row (the v1 trainer's
    ``extra_fields[i]["reward_extra_info"]``); None or a missing key: the row has no such field."""
    uids = np.asarray(list(uids), dtype=object)
    if len(infos) != len(uids):
        raise ValueError(f"{len(infos)} reward infos for {len(uids)} rows")
    infos = [info if isinstance(info, Mapping) else {} for info in infos]
    process = _column(uids, [info.get(PROCESS_KEY) for info in infos], PROCESS_KEY)
    acc = _column(uids, [info.get(CORRECT_KEY) for info in infos], CORRECT_KEY)
    return RewardFields(uids, process, None if acc is None else acc == 1.0)


def fields_from_columns(uids: Sequence, columns: Mapping[str, Sequence]) -> RewardFields:
    """The fields from per-key columns (the legacy trainer's ``non_tensor_batch``)."""
    n = len(uids)
    rows = [
        {k: columns[k][i] for k in (PROCESS_KEY, CORRECT_KEY) if k in columns} for i in range(n)
    ]
    for key in (PROCESS_KEY, CORRECT_KEY):
        if key in columns and len(columns[key]) != n:
            raise ValueError(f"reward field {key!r} has {len(columns[key])} rows for {n} uids")
    return fields_from_rows(uids, rows)


def current_fields(index: np.ndarray | None) -> RewardFields | None:
    """The fields handed over for this batch, after checking that ``index`` (the estimator's
    uids) names the same rows in the same order; None when nothing was handed over."""
    fields = _CURRENT.get()
    if fields is None:
        return None
    if (
        index is None
        or len(index) != len(fields.uids)
        or not np.array_equal(np.asarray(index, dtype=object), fields.uids)
    ):
        raise ValueError(
            "the papo estimator's rows are not the rows whose reward fields were read "
            f"({0 if index is None else len(index)} uids vs {len(fields.uids)}): the batch was "
            "reordered or filtered between the read and verl's compute_advantage"
        )
    return fields
