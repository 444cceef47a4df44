"""Many processes on the CPU (torchrun, gloo, FSDP2): the same run as one process, and resumable.

The runs use the demo's model (its architecture, untrained) and the example config, with a
verifier that gives an untrained model a signal (tiny_run.ParityVerifier), for 3 steps.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from launch import EXAMPLE, as_sets, assert_close, command, environment, metrics, train
from safetensors.torch import load_file

from papo_fast.tasks import arith
from papo_fast.tasks.demo import WarmupConfig

pytestmark = pytest.mark.serial  # torchrun: two processes of its own, run alone

STEPS = 3


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_assets")
    wc = WarmupConfig()
    tok = arith.build_tokenizer()
    tok.save_pretrained(root / "model")
    arith.build_model(tok, wc.hidden_size, wc.layers, wc.seed).save_pretrained(root / "model")
    arith.write_jsonl(arith.make_split(0, 64, *wc.train_ops), root / "train.jsonl")
    arith.write_jsonl(arith.make_split(1, 8, *wc.heldout_ops), root / "heldout.jsonl")
    return root


def settings(assets, out, **extra):
    return as_sets(
        {
            "model.path": assets / "model",
            "data.train_path": assets / "train.jsonl",
            "data.eval_path": "",
            "reward.verifier": "tiny_run:ParityVerifier",
            "train.out_dir": out,
            "train.steps": STEPS,
            "train.save_every": 1,
            "train.progress": "false",
            "train.threads": 1,
            **extra,
        }
    )


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def assert_weights_close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name].double() - b[name].double()).norm()
        assert diff <= rel * a[name].double().norm(), f"{name}: |diff| {diff:.3g}"


@pytest.fixture(scope="module")
def runs(demo_assets, tmp_path_factory):
    """The same run on 1 process and on 2."""
    root = tmp_path_factory.mktemp("runs")
    for n in (1, 2):
        train(n, settings(demo_assets, root / f"n{n}"))
    return root


def test_two_ranks_match_one(runs):
    one, two = metrics(runs / "n1"), metrics(runs / "n2")
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    first, second = one[0], two[0]
    assert first["grad_norm"] > 0 and 0 < first["accuracy"] < 1  # the update had a signal
    for key in ("loss", "grad_norm"):
        assert_close(first[key], second[key], 1e-5, key)
    for key in ("accuracy", "response_len", "zero_adv_frac"):  # the same samples, reduced
        assert first[key] == second[key], key
    assert_weights_close(final_weights(runs / "n1"), final_weights(runs / "n2"), 1e-4)


# Small mini-batches and a token budget: the ranks need different numbers of micro-batches, and at
# the first step some mini-batch holds no sample of one rank (a filler micro-batch); a KL term
# brings in the sharded reference model; padded micro-batches and gradient checkpointing, the
# settings the other runs leave at their defaults; and held-out evaluation, each rank a share.
UNEVEN = {
    "train.eval_prompts": 5,  # 10 requests: 5 a rank
    "train.eval_k": 2,
    "train.prompts_per_step": 4,
    "train.mini_batches": 16,
    "train.micro_batch_tokens": 60,
    "loss.beta": 0.04,
    "model.packed": "false",
    "model.gradient_checkpointing": "true",
    "train.steps": 2,
}


def test_uneven_micro_batches_and_a_reference_model_match_one_rank(demo_assets, tmp_path):
    from papo_fast.trainer import request_seed
    from papo_fast.update import StepShard, own_minibatches

    n = UNEVEN["train.prompts_per_step"] * 8  # the example's group size
    seed = request_seed(0, 0, -1)
    empty = [
        len(rows) == 0
        for first in (0, n // 2)
        for rows in own_minibatches(StepShard(first, n), n // 2, UNEVEN["train.mini_batches"], seed)
    ]
    assert any(empty), "no filler micro-batch at the first step: choose other settings"
    heldout = {"data.eval_path": demo_assets / "heldout.jsonl"}
    for nproc in (1, 2):
        train(nproc, settings(demo_assets, tmp_path / f"n{nproc}", **UNEVEN, **heldout))
    one, two = metrics(tmp_path / "n1"), metrics(tmp_path / "n2")
    for a, b in zip(one, two, strict=True):  # step 0 (before training) and the last step
        if "eval_accuracy" in a:
            assert a["eval_accuracy"] == b["eval_accuracy"], a["step"]
            assert a["eval_response_len"] == b["eval_response_len"], a["step"]
    assert "eval_accuracy" in two[-1]
    one, two = [m for m in one if m["step"] > 0], [m for m in two if m["step"] > 0]
    assert one[0]["kl"] >= 0 and one[0]["grad_norm"] > 0
    for key in ("loss", "grad_norm", "kl"):
        assert_close(one[0][key], two[0][key], 1e-5, key)
    assert_weights_close(final_weights(tmp_path / "n1"), final_weights(tmp_path / "n2"), 1e-4)


def test_only_rank_zero_writes_the_run_files(runs):
    out = runs / "n2"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoints", "final"} <= names
    shards = sorted(p.name for p in (out / "checkpoints" / "step_000003" / "state").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank


def test_a_two_rank_checkpoint_resumes_on_one(runs, demo_assets, tmp_path):
    from papo_fast.config import load_config
    from papo_fast.trainer import Trainer

    out = tmp_path / "resumed"
    shutil.copytree(runs / "n2", out)
    args = settings(demo_assets, out)
    cfg = load_config(str(EXAMPLE), args[1::2])
    trainer = Trainer(cfg, resume=True)
    try:
        assert trainer.step == STEPS
        saved = final_weights(runs / "n2")  # the export of the same step
        state = trainer.model.state_dict()
        for name, weight in saved.items():  # the tied LM head is saved once, as the embeddings
            assert torch.equal(state[name], weight), name
        adam = trainer.opt.state[next(trainer.model.parameters())]
        assert float(adam["step"]) == STEPS * cfg.train.mini_batches
        assert adam["exp_avg_sq"].abs().sum() > 0
    finally:
        trainer.close()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_killing_a_rank_then_resuming_on_two_continues(runs, demo_assets, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        command(2, settings(demo_assets, out)),
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not (latest.is_file() and latest.read_text().strip() == "step_000001"):
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint of step 1 in time"
        time.sleep(0.05)
    ranks = _children(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)  # one rank dies; torchrun stops the other
    assert proc.wait(timeout=300) != 0
    proc.stderr.close()
    done = [m["step"] for m in metrics(out)]
    assert done and done[-1] < STEPS, done  # it did not finish
    train(2, [*settings(demo_assets, out), "--resume"])
    assert [m["step"] for m in metrics(out)] == list(range(1, STEPS + 1))
    assert_weights_close(final_weights(runs / "n2"), final_weights(out), 1e-6)
