"""Prompt datasets from local files with a field mapping, and the resumable sampler."""

import json
import re

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


# ----------------------------------------------------------------------------- bad rows

GOOD = {"problem": "1+1", "answer": "2"}


def _jsonl(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"problem": null, "answer": "2"}', "field 'problem' is null"),
        ('{"answer": "2"}', "field 'problem' is missing"),
        ('{"problem": "1+1", "answer": null}', "field 'answer' is null"),
        ('{"problem": "1+1"}', "field 'answer' is missing"),
        ('{"problem": ["1", "+1"], "answer": "2"}', "field 'problem' must be text or a number"),
        ('{"problem": {"a": 1}, "answer": "2"}', "field 'problem' must be text or a number"),
        ('{"problem": "1+1", "answer": [2]}', "field 'answer' must be text or a number"),
        ('{"problem": true, "answer": "2"}', "field 'problem' must be text or a number"),
        ('{"problem": "  ", "answer": "2"}', "field 'problem' is empty"),
        ('{"problem": "1+1", "answer": ""}', "field 'answer' is empty"),
        ('{"problem": "1+1", "answer": NaN}', "field 'answer' must be a finite number"),
        ('{"problem": "1+1", "answer": ', "not valid JSON"),
        ('["1+1", "2"]', "expected a JSON object"),
    ],
)
def test_bad_jsonl_row_names_file_line_and_field(tmp_path, bad, message):
    # Line 3 holds the bad row; the blank line 2 is skipped but still counted.
    path = _jsonl(tmp_path, [json.dumps(GOOD), "", bad, json.dumps(GOOD)])
    with pytest.raises(
        ValueError, match=re.escape(f"{path}, line 3: ") + ".*" + re.escape(message)
    ):
        load_prompts(path, DataConfig())


def test_bad_row_names_the_mapped_field(tmp_path):
    path = _jsonl(tmp_path, ['{"question": "1+1", "label": 2}', '{"question": null, "label": 3}'])
    cfg = DataConfig(problem_field="question", answer_field="label")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: field 'question' is null")):
        load_prompts(path, cfg)


def test_empty_jsonl_names_the_file(tmp_path):
    for text in ("", "\n\n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{path}: no rows")):
            load_prompts(path, DataConfig())


def test_json_array_rows_are_checked_by_index(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {"problem": None, "answer": "3"}], indent=2))
    with pytest.raises(ValueError, match=re.escape(f"{path}, row 1: field 'problem' is null")):
        load_prompts(path, DataConfig())
    path.write_text(json.dumps([GOOD, GOOD], indent=2))
    assert load_prompts(path, DataConfig())[1] == GOOD
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")  # JSON lines in a .json
    assert len(load_prompts(path, DataConfig())) == 2
    path.write_text("[]")
    with pytest.raises(ValueError, match=re.escape(f"{path}: no rows")):
        load_prompts(path, DataConfig())


@pytest.mark.parametrize("fmt", ["parquet", "saved"])
@pytest.mark.parametrize(
    "rows, message",
    [
        ([GOOD, {"problem": None, "answer": "3"}], "row 1: field 'problem' is null"),
        ([GOOD, {"problem": "2+2", "answer": None}], "row 1: field 'answer' is null"),
        ([{"problem": ["x"], "answer": "2"}], "row 0: field 'problem' must be text or a number"),
        ([{"problem": {"a": "x"}, "answer": "2"}], "row 0: field 'problem' must be text"),
    ],
)
def test_bad_rows_in_parquet_and_saved_datasets(tmp_path, fmt, rows, message):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / ("d.parquet" if fmt == "parquet" else "saved")
    ds.to_parquet(str(path)) if fmt == "parquet" else ds.save_to_disk(str(path))
    with pytest.raises(ValueError, match=re.escape(f"{path}, {message}")):
        load_prompts(path, DataConfig())


def test_empty_parquet_and_saved_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"problem": [], "answer": []})
    ds.to_parquet(str(tmp_path / "e.parquet"))
    ds.save_to_disk(str(tmp_path / "e"))
    for path in (tmp_path / "e.parquet", tmp_path / "e"):
        with pytest.raises(ValueError, match=re.escape(f"{path}: no rows")):
            load_prompts(path, DataConfig())


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ValueError, match="plain_dir: not a dataset directory"):
        load_prompts(tmp_path / "plain_dir", DataConfig())
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"bad\.parquet: cannot read"):
        load_prompts(tmp_path / "bad.parquet", DataConfig())
    (tmp_path / "latin1.jsonl").write_bytes(
        '{"problem": "caf\xe9", "answer": "1"}\n'.encode("latin-1")
    )
    with pytest.raises(ValueError, match=r"latin1\.jsonl, line 1: not UTF-8 text"):
        load_prompts(tmp_path / "latin1.jsonl", DataConfig())
    with pytest.raises(ValueError, match="no dataset path given"):
        load_prompts("", DataConfig())


def test_numbers_become_the_text_they_were_written_as(tmp_path):
    # A file mixing int and float answers keeps "2" as "2" (not "2.0", as one float column would).
    path = _jsonl(tmp_path, ['{"problem": 12, "answer": 2}', '{"problem": "1+1.5", "answer": 2.5}'])
    ds = load_prompts(path, DataConfig())
    assert [ds[0], ds[1]] == [
        {"problem": "12", "answer": "2"},
        {"problem": "1+1.5", "answer": "2.5"},
    ]


def test_missing_or_null_solution_is_allowed(tmp_path):
    rows = [
        '{"q": "1+1", "a": "2", "s": "1+1=2"}',
        '{"q": "2+2", "a": "4", "s": null}',
        '{"q": "3+3", "a": "6"}',
    ]
    cfg = DataConfig(problem_field="q", answer_field="a", solution_field="s")
    ds = load_prompts(_jsonl(tmp_path, rows), cfg)
    assert [ds[i]["solution"] for i in range(3)] == ["1+1=2", None, None]


def test_same_field_for_problem_and_answer(tmp_path):
    ds = load_prompts(
        _jsonl(tmp_path, ['{"x": "7"}']), DataConfig(problem_field="x", answer_field="x")
    )
    assert ds[0] == {"problem": "7", "answer": "7"}


@pytest.mark.parametrize(
    "state",
    [{}, {"position": 3, "seed": 0}, {"position": -1, "seed": 0, "n": 10}, [1, 2], None],
)
def test_a_damaged_sampler_state_is_a_clear_error(state):
    with pytest.raises(ValueError, match="not a sampler state"):
        PromptSampler(10, 0).load_state_dict(state)


def test_group_field_is_read_as_text_and_checked(tmp_path):
    path = tmp_path / "heldout.jsonl"
    rows = [{"problem": "1+2", "answer": 3, "ops": 1}, {"problem": "1+2-1", "answer": 2, "ops": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_prompts(path, DataConfig(), group_field="ops")
    assert ds["group"] == ["1", "2"]
    with pytest.raises(ValueError, match=r"\['level'\] not found.*eval_group_field"):
        load_prompts(path, DataConfig(), group_field="level")
    path.write_text(json.dumps({"problem": "1+2", "answer": 3, "ops": None}) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'ops' is null"):
        load_prompts(path, DataConfig(), group_field="ops")
