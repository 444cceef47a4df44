"""Prompt datasets from local files with a field mapping, and the resumable sampler."""

import json

import pytest

from papo_fast.config import DataConfig
from papo_fast.data import PromptSampler, load_prompts

ROWS = [{"question": f"{i}+1", "label": i + 1, "why": f"{i}+1={i + 1}"} for i in range(5)]
MAPPING = DataConfig(problem_field="question", answer_field="label", solution_field="why")


def _write(tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_load_with_field_mapping(tmp_path, fmt):
    ds = load_prompts(_write(tmp_path, fmt), MAPPING)
    assert sorted(ds.column_names) == ["answer", "problem", "solution"]
    assert ds[2] == {"problem": "2+1", "answer": "3", "solution": "2+1=3"}  # answers as str


def test_missing_field_names_the_columns(tmp_path):
    with pytest.raises(ValueError, match=r"\['prob', 'answer'\] not found.*question"):
        load_prompts(_write(tmp_path, "jsonl"), DataConfig(problem_field="prob"))


def test_missing_path_and_bad_suffix(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl", DataConfig())
    (tmp_path / "d.csv").write_text("a\n1\n")
    with pytest.raises(ValueError, match="expected .jsonl"):
        load_prompts(tmp_path / "d.csv", DataConfig())


def test_sampler_covers_epochs_and_resumes():
    s = PromptSampler(5, seed=3)
    first = s.take(5)
    assert sorted(first) == [0, 1, 2, 3, 4]  # one epoch is a permutation
    more = s.take(7)  # crosses into the next epochs
    t = PromptSampler(5, seed=3)
    t.take(5)
    state = t.state_dict()
    u = PromptSampler(5, seed=3)
    u.load_state_dict(state)
    assert u.take(7) == more
    with pytest.raises(ValueError, match="data has 6"):
        PromptSampler(6, seed=3).load_state_dict(state)
