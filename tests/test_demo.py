"""The main job end to end at toy size: warm-up, ORM and PAPO runs, table, summary.json, plots."""

import json

import pytest

from papo_fast.tasks.demo import WarmupConfig, format_table, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


WC = WarmupConfig(hidden_size=64, layers=1, steps=3, batch_size=8, num_train=32, num_heldout=4)
OVERRIDES = [
    "train.steps=2",
    "train.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=8",
    "train.eval_every=1",
    "train.eval_prompts=2",
    "train.eval_k=2",
    "train.progress=false",
]


def test_demo_end_to_end_small(tmp_path):
    summary = run_demo(tmp_path, OVERRIDES, wc=WC, workers=1)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for run in ("orm", "papo"):
        keys = ("heldout_accuracy", "zero_adv_frac", "process_active_frac", "mean_response_len")
        assert all(key in on_disk[run] for key in keys)
        assert on_disk[run]["steps"] == 2
        assert (tmp_path / run / "curves.png").is_file()
        assert (tmp_path / run / "checkpoints" / "latest").is_file()
    assert (tmp_path / "comparison.png").is_file()
    assert (tmp_path / "warmup" / "model.safetensors").is_file()
    assert "papo" in format_table({k: summary[k] for k in ("orm", "papo")})


def test_demo_runs_again_on_the_same_out(tmp_path):
    """`make demo` twice: the second demo replaces the first one's runs instead of refusing them
    (a training run never overwrites another; the demo owns the runs it made)."""
    run_demo(tmp_path, OVERRIDES, wc=WC, workers=1)
    (tmp_path / "notes.txt").write_text("mine")
    summary = run_demo(tmp_path, ["train.steps=1", *OVERRIDES[1:]], wc=WC, workers=1)
    assert summary["papo"]["steps"] == 1
    lines = (tmp_path / "papo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the demo's own runs go
