"""The `papo-fast` command: bad input is a one-line error and exit status 2, before any work."""

from papo_fast.cli import main


def test_unknown_key_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss:\n  eps_high: 0.28\n")
    assert main(["train", str(cfg), "--set", "loss.eps_hihg=0.3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key config.loss.eps_hihg" in err and "eps_high" in err


def test_missing_config_and_missing_model(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: {tmp_path / 'no_model'}\ndata:\n  train_path: {data}\n")
    assert main(["train", str(cfg), "--set", f"train.out_dir={tmp_path / 'run'}"]) == 2
    assert "is not a directory with a config.json" in capsys.readouterr().err


def test_demo_rejects_a_bad_override_before_the_warm_up(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", "advantage.mode=grpo"]) == 2
    assert "advantage.mode must be one of" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "init").exists()


def test_demo_needs_at_least_one_seed(tmp_path, capsys):
    for seeds in ("0", "-2"):
        assert main(["demo", "--out", str(tmp_path / "demo"), "--seeds", seeds]) == 2
        assert f"demo --seeds must be >= 1, got {seeds}" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "taken")]) == 2
    assert f"demo --out {tmp_path / 'taken'} exists and is not a directory" in (
        capsys.readouterr().err
    )


def test_plot_names_a_missing_run_or_metrics_file(tmp_path, capsys):
    png = str(tmp_path / "cmp.png")
    assert main(["plot", png, str(tmp_path / "nope")]) == 2
    assert f"run directory not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    assert main(["plot", png, str(tmp_path / "empty_run")]) == 2
    assert f"no metrics.jsonl in {tmp_path / 'empty_run'}" in capsys.readouterr().err
    assert not (tmp_path / "cmp.png").exists()


def test_plot_keeps_runs_that_share_a_name(tmp_path, monkeypatch):
    import papo_fast.metrics as metrics

    rows = '{"step": 0, "accuracy": 0.5, "zero_adv_frac": 0.1}\n'
    runs = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    for run in runs:
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(rows)
    seen, original = {}, metrics.plot_comparison

    def spy(named_runs, png):
        seen.update(named_runs)
        return original(named_runs, png)

    monkeypatch.setattr(metrics, "plot_comparison", spy)
    assert main(["plot", str(tmp_path / "cmp.png"), *map(str, runs)]) == 0
    assert sorted(seen.values()) == [r / "metrics.jsonl" for r in runs]  # one line per run


def test_yaml_syntax_error_through_the_command(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: [1,\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("papo-fast: error: ") and f"{cfg}, line " in err


def test_numbers_as_written_through_the_command(tmp_path, capsys):
    # The config is valid, so the command goes on to the data and stops there with a clean error.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  train_path: {tmp_path / 'none.jsonl'}\n")
    for value in ("4e-4", "1e-6", "1E-6", ".5"):
        assert main(["train", str(cfg), "--set", f"optim.lr={value}"]) == 2
        err = capsys.readouterr().err
        assert "dataset not found" in err and "optim.lr" not in err
    assert main(["train", str(cfg), "--set", "optim.lr=inf"]) == 2
    assert "config.optim.lr must be a finite number, got inf" in capsys.readouterr().err


def test_plot_output_in_a_missing_directory_or_onto_a_directory(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "accuracy": 0.5}\n')
    png = tmp_path / "nodir" / "cmp.png"
    assert main(["plot", str(png), str(run)]) == 2
    assert f"plot output directory not found: {png.parent}" in capsys.readouterr().err
    assert main(["plot", str(tmp_path), str(run)]) == 2
    assert f"plot output {tmp_path} is a directory; give a file name" in capsys.readouterr().err


def test_python_dash_m_runs_the_command():
    """`python -m papo_fast` is the papo-fast command (torchrun -m needs a module to run)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "papo_fast", "train", "no_such_config.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "papo-fast: error: config file not found: no_such_config.yaml" in done.stderr
