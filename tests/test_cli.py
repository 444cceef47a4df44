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
