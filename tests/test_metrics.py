"""metrics.jsonl handling on resume, damaged files, and the plots."""

import pytest
import torch

from papo_fast.metrics import MetricsLogger, plot_comparison, plot_run, read_metrics


def test_resume_drops_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLogger(path)
    for step in range(1, 5):
        log.write({"step": step, "reward": step / 10})
    MetricsLogger(path, resume_step=2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_a_new_logger_never_truncates_metrics(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    MetricsLogger(path).write({"step": 1, "reward": 0.5})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="metrics.jsonl already holds metrics"):
        MetricsLogger(path)
    assert path.read_bytes() == before
    path.write_text("")  # an empty file holds nothing to lose
    MetricsLogger(path).write({"step": 1})
    assert read_metrics(path) == [{"step": 1}]


def test_partial_last_line_is_dropped_with_a_warning(tmp_path):
    # a kill (or a full disk) in the middle of write(): the last line has no newline and is cut
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.25}\n{"step": 3, "rew')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: dropped a partial last line"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    with pytest.warns(UserWarning, match="partial last line"):
        log = MetricsLogger(path, resume_step=2)  # resume rewrites the file without it
    log.write({"step": 3, "reward": 0.75})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


@pytest.mark.parametrize(
    "middle, why",
    [('{"step": 2, "rew', "not a JSON line"), ("[2, 3]", "not a JSON object")],
)
def test_bad_line_in_the_middle_names_file_and_line(tmp_path, middle, why):
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"step": 1}}\n{middle}\n{{"step": 3}}\n')
    with pytest.raises(ValueError, match=rf"metrics.jsonl:2: {why}"):
        read_metrics(path)
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        MetricsLogger(path, resume_step=3)
    assert path.read_text().count("\n") == 3  # left as it was


def test_plots(tmp_path):
    runs = {}
    for name in ("orm", "papo"):
        log = MetricsLogger(tmp_path / name / "metrics.jsonl")
        for step in range(1, 6):
            log.write({"step": step, "accuracy": 0.1 * step, "zero_adv_frac": 0.5,
                       "eval_accuracy": 0.2, "process_mean": float("nan")})  # fmt: skip
        runs[name] = tmp_path / name / "metrics.jsonl"
    assert plot_run(runs["orm"], tmp_path / "a.png").stat().st_size > 1000
    assert plot_comparison(runs, tmp_path / "b.png").stat().st_size > 1000


def test_zero_adv_counts_split_by_the_groups_outcome():
    from papo_fast.kernels.advantages import papo_advantages
    from papo_fast.metrics import zero_adv_counts

    # groups of 4: all correct, all wrong, mixed, and mixed with equal (shaped) outcome rewards
    correct = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    outcome = correct.float()
    outcome[12:] = 0.5
    process = torch.rand(16) * correct
    group_ids = torch.arange(16) // 4
    for mode, expected in (("orm", (12, 4, 4)), ("papo", (6, 0, 4))):
        adv = papo_advantages(outcome, process, group_ids=group_ids, correct=correct, mode=mode)
        assert zero_adv_counts(adv.advantages, correct, group_ids) == expected, mode
        assert expected[0] == round(float(adv.stats["zero_adv_frac"]) * 16)


def test_group_accuracy_orders_values_and_counts_each():
    from papo_fast.metrics import group_accuracy

    assert group_accuracy(None, ["2"], ["2"], [True]) == {}
    out = group_accuracy("ops", ["10", "2", "2", "x"], ["2", "2", "10", "x"], [1, 0, 1, 0])
    assert list(out) == ["eval_accuracy/ops=2", "eval_accuracy/ops=10", "eval_accuracy/ops=x"]
    assert list(out.values()) == [0.5, 1.0, 0.0]
