"""Prompts from local files through `datasets`, and a resumable, seeded sampler over them.

    ds = load_prompts("train.jsonl", DataConfig(problem_field="question", answer_field="label"))
    sampler = PromptSampler(len(ds), seed=0)          # state_dict() / load_state_dict() resume
    rows = [ds[i] for i in sampler.take(16)]          # {"problem", "answer"[, "solution"]}

Files: .jsonl/.json and .parquet (Dataset.from_json / from_parquet), or a directory written by
``save_to_disk`` (load_from_disk). Nothing touches the network. The fields named by the mapping
are renamed to problem/answer/solution; a missing field is a ValueError listing the columns found.
"""

from __future__ import annotations

from pathlib import Path

import torch

from papo_fast.config import DataConfig


def load_prompts(path: str | Path, cfg: DataConfig):
    """A datasets.Dataset with columns problem, answer (str) and solution when mapped."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise ValueError(f"dataset not found: {path}")
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{path} holds splits {list(ds)}; point to one split's directory")
            ds = ds["train"]
    elif path.suffix in (".jsonl", ".json"):
        ds = datasets.Dataset.from_json(str(path))
    elif path.suffix == ".parquet":
        ds = datasets.Dataset.from_parquet(str(path))
    else:
        raise ValueError(f"{path}: expected .jsonl, .json, .parquet or a saved dataset directory")
    mapping = {cfg.problem_field: "problem", cfg.answer_field: "answer"}
    if cfg.solution_field:
        mapping[cfg.solution_field] = "solution"
    missing = [f for f in mapping if f not in ds.column_names]
    if missing:
        raise ValueError(
            f"{path}: field(s) {missing} not found (data.problem_field/answer_field/"
            f"solution_field); columns are {ds.column_names}"
        )
    if len(ds) == 0:
        raise ValueError(f"{path}: no rows")
    ds = ds.select_columns(list(mapping)).rename_columns(
        {k: v for k, v in mapping.items() if k != v}
    )
    return ds.cast_column("answer", datasets.Value("string"))


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
        if state["n"] != self.n:
            raise ValueError(f"checkpoint was taken on {state['n']} prompts, the data has {self.n}")
        self.position, self.seed = state["position"], state["seed"]
