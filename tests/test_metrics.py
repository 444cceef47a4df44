"""metrics.jsonl handling on resume, and the plots."""

from papo_fast.metrics import MetricsLogger, plot_comparison, plot_run, read_metrics


def test_resume_drops_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLogger(path)
    for step in range(1, 5):
        log.write({"step": step, "reward": step / 10})
    MetricsLogger(path, resume_step=2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    MetricsLogger(path)  # a fresh run starts an empty file
    assert read_metrics(path) == []


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
