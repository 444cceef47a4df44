"""The loop on a tiny model: one step, log-probs vs a forward, resume after a kill, bad input."""

import dataclasses
import errno
import json
import math
import os
import shutil
import socket

import pytest
import torch

from papo_fast.config import ConfigError, config_from_dict
from papo_fast.metrics import read_metrics
from papo_fast.policy import pad_rollout_logprobs, pad_samples, sequence_logprobs
from papo_fast.rewards import Outcome, Verifier
from papo_fast.rollout import Request, RolloutBackend, Sample, SamplingParams
from papo_fast.tasks import arith
from papo_fast.trainer import Trainer

TIMING = ("t_", "rollout_tok_s", "update_tok_s")


pytestmark = pytest.mark.usefixtures("one_thread")


class ParityVerifier(Verifier):
    """Correct when the response has an even number of characters: a reward an untrained model
    gets half the time, so groups have a signal (the arithmetic verifier would give all zeros)."""

    def verify(self, problems, responses, answers):
        return [Outcome(float(len(r) % 2 == 0), len(r) % 2 == 0) for r in responses]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    tok = arith.build_tokenizer()
    tok.save_pretrained(root / "model")
    arith.build_model(tok, hidden_size=64, layers=1, seed=0).save_pretrained(root / "model")
    arith.write_jsonl(arith.make_split(0, 24, 2, 3), root / "train.jsonl")
    arith.write_jsonl(arith.make_split(1, 4, 2, 4), root / "heldout.jsonl")
    return root


def make_config(assets, out, **train):
    return config_from_dict(
        {
            "model": {"path": str(assets / "model")},
            "data": {
                "train_path": str(assets / "train.jsonl"),
                "eval_path": str(assets / "heldout.jsonl"),
            },
            "rollout": {"group_size": 4, "max_new_tokens": 12},
            "optim": {"lr": 1e-3},
            "train": {
                "out_dir": str(out),
                "steps": 1,
                "prompts_per_step": 4,
                "mini_batches": 2,
                "micro_batch_size": 4,
                "eval_prompts": 4,
                "eval_k": 2,
                "progress": False,
                **train,
            },
        }
    )


def make_trainer(cfg, resume=False):
    trainer = Trainer(cfg, resume=resume)
    trainer.verifier = ParityVerifier()
    return trainer


def test_one_training_step(assets, tmp_path):
    trainer = make_trainer(make_config(assets, tmp_path / "run"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    (m,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for key in ("reward", "accuracy", "zero_adv_frac", "proc_active_frac", "correct_adv_min",
                "response_len", "clip_frac_low", "clip_frac_high", "kl", "entropy", "grad_norm",
                "judge_calls", "t_rollout", "t_reward", "t_logprobs", "t_update", "update_tok_s",
                "eval_accuracy"):  # fmt: skip
        assert key in m, key
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and 0 < m["accuracy"] < 1
    assert m["judge_calls"] == round(m["accuracy"] * 16)
    assert "is_weight_mean" not in m  # the HF backend returns no log-probs: no correction
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no weight changed"
    assert (tmp_path / "run" / "checkpoints" / "step_000001" / "model.safetensors").is_file()


def test_logprobs_match_a_plain_forward(assets, tmp_path):
    trainer = make_trainer(make_config(assets, tmp_path / "run"))
    ids = trainer.tok(["12+3=?\n", "7-2+11=?\n"])["input_ids"]
    samples = trainer.backend.generate(
        [Request(ids[0], 1), Request(ids[1], 2)], SamplingParams(0.7, 1.0, 10)
    )
    input_ids, attn, targets, mask = pad_samples(samples, trainer.tok.pad_token_id)
    got = sequence_logprobs(trainer.model, input_ids, attn, targets, 0.7, rows=1)
    with torch.no_grad():
        logits = trainer.model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].double()
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None])[..., 0]
    assert mask.sum() > 0
    torch.testing.assert_close(got[mask].double(), want[mask], atol=2e-5, rtol=0)


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def test_resume_after_kill_reproduces_metrics(assets, tmp_path):
    full = make_config(assets, tmp_path / "full", steps=4, save_every=2, eval_every=2)
    make_trainer(full).train()

    cut = make_config(assets, tmp_path / "cut", steps=4, save_every=2, eval_every=2)

    def kill(step, metrics):  # dies after step 3 was logged, before the step-4 checkpoint
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_trainer(cut).train(on_step=kill)
    assert len(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == 4  # eval@0 + steps 1-3
    resumed = make_trainer(cut, resume=True)
    assert resumed.step == 2
    resumed.train()
    a = _comparable(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    b = _comparable(read_metrics(tmp_path / "cut" / "metrics.jsonl"))
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    assert json.dumps(a) == json.dumps(b)


def test_kill_during_save_keeps_the_last_checkpoint(assets, tmp_path, monkeypatch):
    cfg = make_config(assets, tmp_path / "run", steps=2, save_every=1)
    trainer = make_trainer(cfg)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    trainer.train_step()
    trainer.save()
    trainer.train_step()
    monkeypatch.setattr("papo_fast.checkpoint.torch.save", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    trainer.close()  # frees the run directory (train() does it on its way out)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert make_trainer(cfg, resume=True).step == 1


def test_bad_input_fails_before_training(assets, tmp_path):
    cfg = make_config(assets, tmp_path / "run")
    cfg.model.path = str(tmp_path / "no_model")
    with pytest.raises(ConfigError, match="no_model"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()  # a construction that failed leaves no directory
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n')
    cfg = make_config(assets, tmp_path / "run")
    cfg.data.train_path = str(bad)
    with pytest.raises(ValueError, match=r"\['problem'\] not found.*question"):
        Trainer(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_reference_model_and_kl(assets, tmp_path):
    cfg = make_config(assets, tmp_path / "run", steps=1)
    cfg.loss = dataclasses.replace(cfg.loss, beta=0.1)
    trainer = make_trainer(cfg)
    assert trainer.ref is not None and not trainer.ref.training
    assert not any(p.requires_grad for p in trainer.ref.parameters())
    m = trainer.train_step()
    # the first mini-batch is on the reference policy (KL 0), the second one step away from it
    assert math.isfinite(m["kl"]) and m["kl"] > 0


def test_rollout_logprobs_align_with_the_response_targets():
    # prompt [5, 6, 7], response [8, 9]: targets are ids[1:] = [6, 7, 8, 9, pad], so the response
    # tokens 8 and 9 are targets 2 and 3; the second sample's response starts at target 0
    samples = [Sample([5, 6, 7], [8, 9], True, [-0.5, -0.25]), Sample([5], [4, 3, 2, 1], False,
               [-1.0, -2.0, -3.0, -4.0])]  # fmt: skip
    _, _, targets, mask = pad_samples(samples, pad_id=0)
    got = pad_rollout_logprobs(samples)
    assert got.shape == targets.shape == (2, 4)
    assert got.tolist() == [[0.0, 0.0, -0.5, -0.25], [-1.0, -2.0, -3.0, -4.0]]
    assert mask.tolist() == [[False, False, True, True], [True, True, True, True]]
    assert pad_rollout_logprobs([s._replace(logprobs=None) for s in samples]) is None
    with pytest.raises(ValueError, match="some samples only"):
        pad_rollout_logprobs([samples[0], samples[1]._replace(logprobs=None)])
    with pytest.raises(ValueError, match="2 log-probs for 3 tokens"):
        pad_rollout_logprobs([samples[0]._replace(response_ids=[8, 9, 1])])


class ShiftedLogprobBackend(RolloutBackend):
    """The HF backend's samples, plus "sampler" log-probs that are the trained model's own minus
    log(weight): every token's importance weight exp(old_logp - rollout_logp) is ``weight``."""

    def __init__(self, inner, model, pad_id, temperature, weight):
        self.inner, self.model, self.pad_id = inner, model, pad_id
        self.temperature, self.shift = temperature, math.log(weight)

    def generate(self, requests, params):
        samples = self.inner.generate(requests, params)
        ids, attn, targets, mask = pad_samples(samples, self.pad_id)
        logp = sequence_logprobs(self.model, ids, attn, targets, self.temperature, rows=16)
        out = []
        for s, row, m in zip(samples, logp, mask, strict=True):
            out.append(s._replace(logprobs=(row[m] - self.shift).tolist()))
        return out


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_rollout_correction_weights_the_loss(assets, tmp_path, mini_batches):
    """A sampler whose log-probs are the model's minus log 1.5: weight 1.5 on every token. With
    beta = 0 the first update's loss is linear in the weight: 1.5x the uncorrected loss, capped
    at loss.is_cap (1.2x), untruncated with is_cap None."""

    def run(name, weight=None, is_cap=None):
        cfg = make_config(assets, tmp_path / name, mini_batches=mini_batches)
        cfg.loss = dataclasses.replace(cfg.loss, is_cap=is_cap)
        trainer = make_trainer(cfg)
        if weight is not None:
            trainer.backend = ShiftedLogprobBackend(
                trainer.backend, trainer.model, trainer.tok.pad_token_id, 1.0, weight
            )
        return trainer.train_step()

    plain = run("plain")
    assert "is_weight_mean" not in plain
    full = run("full", weight=1.5)
    capped = run("capped", weight=1.5, is_cap=1.2)
    assert abs(plain["loss"]) > 1e-4
    for m in (full, capped):  # the weight is logged before truncation
        assert m["is_weight_mean"] == pytest.approx(1.5, rel=1e-4)
        assert m["is_weight_max"] == pytest.approx(1.5, rel=1e-4)
    if mini_batches == 1:  # one update: the whole loss is the first mini-batch's
        assert full["loss"] == pytest.approx(1.5 * plain["loss"], rel=1e-4)
        assert capped["loss"] == pytest.approx(1.2 * plain["loss"], rel=1e-4)


class CountingVerifier(ParityVerifier):
    """ParityVerifier that reports how many responses it checked since the last take."""

    def __init__(self):
        self.n = 0

    def verify(self, problems, responses, answers):
        self.n += len(responses)
        return super().verify(problems, responses, answers)

    def take_metrics(self):
        n, self.n = self.n, 0
        return {"verify_seen": n}


def test_verifier_and_judge_counters_in_the_metrics(assets, tmp_path):
    from papo_fast.rewards.judge import RubricJudge

    trainer = make_trainer(make_config(assets, tmp_path / "run"))
    trainer.verifier = CountingVerifier()
    trainer.judge = RubricJudge(lambda messages: "no box")  # every score a parse failure
    trainer.train()
    (m,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert m["verify_seen"] == 16 and m["eval_verify_seen"] == 8  # 4 x G=4; eval 4 x k=2
    assert m["judge_scored"] == m["judge_parse_fail"] == m["judge_calls"] > 0
    assert m["judge_unreachable"] == 0 and m["eval_judge_scored"] == m["eval_judge_parse_fail"]


def test_reference_solutions_reach_the_judge(assets, tmp_path):
    from papo_fast.rewards.judge import RubricJudge

    rows = arith.make_split(0, 8, 2, 3)
    path = arith.write_jsonl(
        [{**r, "worked": f"worked {r['problem']}"} for r in rows], tmp_path / "t.jsonl"
    )
    cfg = make_config(assets, tmp_path / "run")
    cfg.data.train_path, cfg.data.eval_path, cfg.data.solution_field = str(path), None, "worked"
    trainer = make_trainer(cfg)
    prompts = []
    trainer.judge = RubricJudge(lambda messages: prompts.append(messages[-1]["content"]) or "1")
    m = trainer.train_step()
    assert len(prompts) == m["judge_calls"] > 0
    for text in prompts:  # each judge prompt has its own problem's reference solution
        problem = text.split("Problem:\n", 1)[1].split("\n", 1)[0]
        assert f"Reference solution:\nworked {problem}\n" in text


# ----------------------------------------------------------------------------- the run directory


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
