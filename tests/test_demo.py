"""The main job end to end at toy size: warm-up, ORM and PAPO runs, table, summary.json, plots."""

import json

import pytest

from papo_fast.demo import WarmupConfig, format_table, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_end_to_end_small(tmp_path):
    wc = WarmupConfig(hidden_size=64, layers=1, steps=3, batch_size=8, num_train=32, num_heldout=4)
    overrides = [
        "train.steps=2",
        "train.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=8",
        "train.eval_every=1",
        "train.eval_prompts=2",
        "train.eval_k=2",
        "train.progress=false",
    ]
    summary = run_demo(tmp_path, overrides, wc=wc, workers=1)
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
