"""The loop on a tiny model: one step, log-probs vs a forward, resume after a kill, bad input."""

import dataclasses
import json
import math

import pytest
import torch
from tiny_run import ParityVerifier, build_assets, make_config, make_trainer

from papo_fast.config import ConfigError, load_config
from papo_fast.metrics import read_metrics
from papo_fast.packing import micro_batches, step_batch, step_logprobs
from papo_fast.policy import pad_rollout_logprobs, pad_samples
from papo_fast.rollout import Request, RolloutBackend, Sample, SamplingParams
from papo_fast.tasks import arith
from papo_fast.trainer import Trainer

TIMING = ("t_", "rollout_tok_s", "update_tok_s")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"))


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
    assert (tmp_path / "run" / "checkpoints" / "step_000001" / "state" / ".metadata").is_file()
    causes = ("zero_adv_all_correct_frac", "zero_adv_all_wrong_frac", "zero_adv_other_frac")
    assert sum(m[k] for k in causes) == pytest.approx(m["zero_adv_frac"], abs=1e-12)
    assert not any(k.startswith("eval_accuracy/") for k in m)  # no data.eval_group_field


def test_heldout_accuracy_per_group(assets, tmp_path):
    """data.eval_group_field: the held-out accuracy per value of a field (here the chain length),
    each the share of that value's responses that are correct."""
    cfg = make_config(assets, tmp_path / "run")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_group_field="ops"))
    trainer = make_trainer(cfg)
    trainer.train()
    (m,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    rows = [trainer.eval_data[i] for i in range(4)]
    lengths = sorted({r["group"] for r in rows}, key=int)
    keys = [f"eval_accuracy/ops={v}" for v in lengths]
    assert [k for k in m if k.startswith("eval_accuracy/")] == keys
    weights = [sum(r["group"] == v for r in rows) for v in lengths]
    total = sum(m[k] * w for k, w in zip(keys, weights, strict=True)) / sum(weights)
    assert total == pytest.approx(m["eval_accuracy"])  # every prompt has eval_k responses


def test_logprobs_match_a_plain_forward(assets, tmp_path):
    trainer = make_trainer(make_config(assets, tmp_path / "run"))
    ids = trainer.tok(["12+3=?\n", "7-2+11=?\n"])["input_ids"]
    samples = trainer.backend.generate(
        [Request(ids[0], 1), Request(ids[1], 2)], SamplingParams(0.7, 1.0, 10)
    )
    input_ids, attn, targets, mask = pad_samples(samples, trainer.tok.pad_token_id)
    batch = step_batch(samples, trainer.tok.pad_token_id)  # the trainer's path: packed
    parts = micro_batches(batch, torch.arange(2), 1, 0, packed=True)
    got = step_logprobs(trainer.model, batch, parts, 0.7)
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
        batch = step_batch(samples, self.pad_id)
        parts = micro_batches(batch, torch.arange(len(samples)), 16, 0, packed=False)
        logp = step_logprobs(self.model, batch, parts, self.temperature)
        out = []
        for s, row, m in zip(samples, logp, batch.mask, strict=True):
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


def test_every_loss_setting_reaches_the_loss_from_yaml(assets, tmp_path):
    """The loss: section is the ops' PolicyLossConfig: GSPO (ratio_level) and the rest are set
    from a YAML file, the trainer builds its loss once from it, and a sequence-level step runs."""
    import yaml

    base = json.loads(json.dumps(make_config(assets, tmp_path / "run").to_dict()))
    del base["loss"]
    path = tmp_path / "gspo.yaml"
    path.write_text(
        yaml.safe_dump(base) + "loss:\n  ratio_level: sequence\n  agg: seq-mean-token-mean\n"
        "  eps_low: 3.0e-4\n  eps_high: 4e-4\n  dual_clip: 3\n  is_cap: null\n"
    )
    cfg = load_config(path)
    trainer = make_trainer(cfg)
    assert trainer.loss_fn.config == cfg.loss
    assert (cfg.loss.ratio_level, cfg.loss.eps_low, cfg.loss.eps_high) == ("sequence", 3e-4, 4e-4)
    metrics = trainer.train()
    assert metrics["step"] == 1 and math.isfinite(metrics["loss"])


def test_a_finished_run_exports_the_model_for_from_pretrained(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = make_trainer(make_config(assets, tmp_path / "run", steps=1))
    trainer.train()
    final = tmp_path / "run" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert AutoTokenizer.from_pretrained(final).pad_token_id == trainer.tok.pad_token_id
    for (name, p), q in zip(trainer.model.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach()), name
    assert not any(p.name.startswith(".tmp-") for p in final.parent.iterdir())
