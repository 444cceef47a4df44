"""The run directory: a step is never lost, a checkpoint never runs code, one run per directory,
a resume never lies about its settings, clear errors before the model loads."""

import errno
import json
import os
import shutil
import socket

import pytest
import torch
from tiny_run import build_assets, make_config, make_trainer

from papo_fast.config import ConfigError
from papo_fast.metrics import read_metrics
from papo_fast.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory):
    """A one-step run (eval at the end, checkpoint step_000001); tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    make_trainer(make_config(assets, out)).train()
    return out


def copy_run(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


@pytest.mark.parametrize("failing", ["evaluate", "log"])
def test_failure_after_a_step_still_saves_the_trained_weights(
    assets, tmp_path, monkeypatch, failing
):
    cfg = make_config(assets, tmp_path / "run", steps=1)  # evaluation and save at the last step
    trainer = make_trainer(cfg)

    def judge_down():
        raise RuntimeError("judge unreachable")

    def disk_full(record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failing == "evaluate":
        monkeypatch.setattr(trainer, "evaluate", judge_down)
    else:
        monkeypatch.setattr(trainer.log, "write", disk_full)
    with pytest.raises((RuntimeError, OSError)):
        trainer.train()
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000001"
    if failing == "evaluate":  # the step's own metrics are kept; the evaluation never happened
        (m,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
        assert m["step"] == 1 and "reward" in m and "eval_accuracy" not in m
    resumed = make_trainer(cfg, resume=True)
    assert resumed.step == 1
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, trained[n]), n


def test_failure_inside_a_step_saves_nothing(assets, tmp_path, monkeypatch):
    # half an update (one mini-batch of two applied) is not a state to resume from
    trainer = make_trainer(make_config(assets, tmp_path / "run", steps=1))
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return step(*args, **kwargs)

    step = trainer.opt.step
    monkeypatch.setattr(trainer.opt, "step", second_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_resume_refuses_a_state_file_that_would_run_code(assets, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path)
    marker = tmp_path / "marker"

    class WritesAMarker:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = out / "checkpoints" / "step_000001" / "trainer_state.pt"
    torch.save({"step": 1, "payload": WritesAMarker()}, state)
    with pytest.raises(ValueError, match="refusing to load .*trainer_state.pt"):
        make_trainer(make_config(assets, out), resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("pointer", ["../../elsewhere/step_000001", "absolute"])
def test_resume_refuses_a_latest_outside_the_run(assets, tmp_path, finished_run, pointer):
    out = copy_run(finished_run, tmp_path)
    elsewhere = shutil.copytree(out / "checkpoints", tmp_path / "elsewhere")
    if pointer == "absolute":
        pointer = str(elsewhere / "step_000001")
    (out / "checkpoints" / "latest").write_text(pointer + "\n")
    with pytest.raises(ValueError, match="refusing to resume"):
        make_trainer(make_config(assets, out), resume=True)


def test_resume_without_a_checkpoint_fails_and_keeps_the_metrics(assets, tmp_path):
    out = tmp_path / "run"  # killed before its first save
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    with pytest.raises(ValueError, match=rf"nothing to resume in train.out_dir {out}"):
        make_trainer(make_config(assets, out), resume=True)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "reward": 0.5}\n'
    missing = tmp_path / "never_ran"
    with pytest.raises(ValueError, match=rf"nothing to resume: train.out_dir {missing} does not"):
        make_trainer(make_config(assets, missing), resume=True)
    assert not missing.exists()


@pytest.mark.parametrize("holds", ["metrics", "checkpoints"])
def test_new_run_refuses_an_out_dir_that_holds_a_run(assets, tmp_path, finished_run, holds):
    out = copy_run(finished_run, tmp_path)
    if holds == "checkpoints":
        (out / "metrics.jsonl").unlink()
    else:
        shutil.rmtree(out / "checkpoints")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="use --resume or another train.out_dir"):
        make_trainer(make_config(assets, out))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_second_trainer_on_the_same_out_dir_fails_fast(assets, tmp_path):
    cfg = make_config(assets, tmp_path / "run")
    first = make_trainer(cfg)
    with pytest.raises(
        ValueError, match=rf"in use by .*pid {os.getpid()} on {socket.gethostname()}"
    ):
        make_trainer(cfg)
    first.train()  # releases the directory on its way out
    assert make_trainer(cfg, resume=True).step == 1


def no_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the configuration was checked")


@pytest.mark.parametrize("case", ["a_file", "under_a_file", "read_only"])
def test_unusable_out_dir_fails_before_the_model_loads(assets, tmp_path, monkeypatch, case):
    if case == "read_only" and os.geteuid() == 0:
        pytest.skip("root writes through permission bits")
    blocker = tmp_path / "blocker"
    out = {"a_file": blocker, "under_a_file": blocker / "run", "read_only": tmp_path / "ro"}[case]
    if case == "read_only":
        out.mkdir(mode=0o555)
    else:
        blocker.write_text("not a directory")
    monkeypatch.setattr("papo_fast.trainer.load_model", no_model_load)
    with pytest.raises(ValueError, match=rf"train.out_dir {out}"):
        make_trainer(make_config(assets, out))


@pytest.mark.parametrize("device, count", [("cuda", 0), ("cuda:2", 2)])
def test_cuda_device_without_it_fails_before_the_model_loads(
    assets, tmp_path, monkeypatch, device, count
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr("papo_fast.trainer.load_model", no_model_load)
    cfg = make_config(assets, tmp_path / "run")
    cfg.model.device = device
    with pytest.raises(ValueError, match=rf"model.device is '{device}'.* {count} CUDA device"):
        make_trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_settings_that_define_the_run(assets, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path)
    moved = shutil.copytree(assets / "model", tmp_path / "other_model")
    cfg = make_config(assets, out, seed=1)
    cfg.model.path = str(moved)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    with pytest.raises(ValueError, match="cannot resume") as info:
        make_trainer(cfg, resume=True)
    message = str(info.value)
    assert f"model.path: {str(assets / 'model')!r} (checkpoint) -> {str(moved)!r}" in message
    assert "train.seed: 0 (checkpoint) -> 1" in message
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == before  # config.json and metrics.jsonl untouched


def test_resume_applies_settings_that_may_change(assets, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path)
    cfg = make_config(assets, out, steps=2, eval_every=1, keep_checkpoints=1)
    trainer = make_trainer(cfg, resume=True)
    assert trainer.step == 1
    trainer.train()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    written = json.loads((out / "config.json").read_text())
    assert written["train"]["steps"] == 2 and written["train"]["keep_checkpoints"] == 1
    assert written["train"]["out_dir"] == str(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002"]


def test_full_disk_at_the_final_save_is_one_clear_error(assets, tmp_path, monkeypatch):
    trainer = make_trainer(make_config(assets, tmp_path / "run", steps=1))
    calls = []

    def full(*args, **kwargs):
        calls.append(1)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("papo_fast.checkpoint.torch.save", full)
    with pytest.raises(ValueError, match=r"checkpoint step_000001 in .*: the disk is full"):
        trainer.train()
    assert len(calls) == 1  # a failed save is not tried again on the way out
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_prompts_that_do_not_split_over_the_processes_are_refused(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets it
    cfg = make_config(assets, tmp_path / "run", prompts_per_step=3, mini_batches=1)
    with pytest.raises(
        ConfigError, match=r"prompts_per_step \(3\) must divide by the number of processes \(2\)"
    ):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()
