"""Prompts from local files through `datasets`, and a resumable, seeded sampler over them.

    ds = load_prompts("train.jsonl", DataConfig(problem_field="question", answer_field="label"))
    sampler = PromptSampler(len(ds), seed=0)          # state_dict() / load_state_dict() resume
    rows = [ds[i] for i in sampler.take(16)]          # {"problem", "answer"[, "solution"]}

Files: .jsonl/.json (one object per line, or a .json array of objects), .parquet, or a directory
written by ``save_to_disk`` (load_from_disk). Nothing touches the network. The fields named by the
mapping become problem/answer/solution. Every row is checked: a problem or answer that is missing,
null, empty, or not text or a number (a list, an object, true/false) is a ValueError naming the
file, the line (JSON lines, 1-based) or row (0-based index) and the field. A solution may be
missing or null. Numbers become the text they were written as (an answer 2 is "2", never "2.0").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from papo_fast.config import DataConfig


def load_prompts(path: str | Path, cfg: DataConfig, group_field: str | None = None):
    """A datasets.Dataset with columns problem, answer (str), solution (str or None) when mapped,
    and group (str) when ``group_field`` names one (data.eval_group_field, for held-out data)."""
    import datasets

    if not str(path).strip():
        raise ValueError("no dataset path given (data.train_path / data.eval_path)")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"dataset not found: {path}")
    if path.is_dir():
        columns, rows = _saved_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        columns, rows = _json_rows(path)
    elif path.suffix == ".parquet":
        columns, rows = _parquet_rows(path)
    else:
        raise ValueError(f"{path}: expected .jsonl, .json, .parquet or a saved dataset directory")
    if not rows:
        raise ValueError(f"{path}: no rows")
    fields = {"problem": cfg.problem_field, "answer": cfg.answer_field}
    if cfg.solution_field:
        fields["solution"] = cfg.solution_field
    if group_field:
        fields["group"] = group_field
    missing = [f for f in fields.values() if f not in columns]
    if missing:
        raise ValueError(
            f"{path}: field(s) {missing} not found (data.problem_field/answer_field/"
            f"solution_field/eval_group_field); columns are {sorted(columns)}"
        )
    out = {name: [] for name in fields}
    for where, row in rows:
        for name, key in fields.items():
            out[name].append(_text(f"{path}, {where}", key, row, optional=name == "solution"))
    return datasets.Dataset.from_dict(
        out, features=datasets.Features({k: datasets.Value("string") for k in out})
    )


def _text(where: str, key: str, row: dict, optional: bool) -> str | None:
    """The field ``key`` of one row as text, or a ValueError saying what is wrong with it."""
    if key not in row or row[key] is None:
        if optional:
            return None
        raise ValueError(f"{where}: field {key!r} is {'null' if key in row else 'missing'}")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(
            f"{where}: field {key!r} must be text or a number, got {type(value).__name__} "
            f"{value!r:.80}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: field {key!r} must be a finite number, got {value}")
    text = str(value)
    if not optional and not text.strip():
        raise ValueError(f"{where}: field {key!r} is empty")
    return text


def _json_rows(path: Path) -> tuple[set[str], list[tuple[str, dict]]]:
    """("line N", object) per non-blank line, or ("row i", object) for a .json array."""
    raw = path.read_bytes()
    if path.suffix == ".json" and raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        try:
            items = json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err})") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from err
        rows = [(f"row {i}", item) for i, item in enumerate(items)]
    else:
        rows = []
        for number, line in enumerate(raw.splitlines(), 1):
            try:
                text = line.decode("utf-8-sig")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}, line {number}: not UTF-8 text ({err})") from err
            if not text.strip():
                continue
            try:
                rows.append((f"line {number}", json.loads(text)))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})"
                ) from err
    columns = set()
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{path}, {where}: expected a JSON object, got {type(row).__name__}")
        columns.update(row)
    return columns, rows


def _parquet_rows(path: Path) -> tuple[set[str], list[tuple[str, dict]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: cannot read it as parquet ({err})") from err
    return set(table.column_names), [(f"row {i}", r) for i, r in enumerate(table.to_pylist())]


def _saved_rows(path: Path) -> tuple[set[str], list[tuple[str, dict]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ValueError(
            f"{path}: not a dataset directory written by save_to_disk ({err})"
        ) from err
    except IndexError as err:  # datasets cannot concatenate zero shards: an empty dataset
        raise ValueError(f"{path}: no rows (the saved dataset holds no data files)") from err
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path} holds splits {list(ds)}; point to one split's directory")
        ds = ds["train"]
    return set(ds.column_names), [(f"row {i}", r) for i, r in enumerate(ds)]


class PromptSampler:
    """Epoch-wise seeded permutations of range(n); ``position`` counts prompts handed out."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.position = n, seed, 0

    def _perm(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, offset = divmod(self.position, self.n)
            perm = self._perm(epoch)
            m = min(k - len(out), self.n - offset)
            out += perm[offset : offset + m].tolist()
            self.position += m
        return out

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        """A ValueError naming what is wrong when ``state`` is no sampler state of this data."""
        keys = ("position", "seed", "n")
        if not isinstance(state, dict) or not all(
            type(state.get(k)) is int and state[k] >= 0 for k in keys
        ):
            shown = state if not isinstance(state, dict) else {k: state.get(k) for k in keys}
            raise ValueError(f"not a sampler state (non-negative ints {keys}): {shown!r:.120}")
        if state["n"] != self.n:
            raise ValueError(f"checkpoint was taken on {state['n']} prompts, the data has {self.n}")
        self.position, self.seed = state["position"], state["seed"]
