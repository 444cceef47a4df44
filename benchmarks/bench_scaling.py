"""Trainer step time on 1 process against 2 (torchrun, gloo, FSDP2) on this machine's CPU.

The same run as bench_trainer.py's (the demo's tiny Qwen2 with random weights, full-length
responses, one optimizer step per generation batch), launched as a user would: ``python -m
papo_fast train`` for one process, ``torchrun --standalone --nproc-per-node 2 -m papo_fast train``
for two. Variants: 1 process on 1 thread, 1 process on 2 threads, 2 processes on 1 thread each.

The benchmark's own time is the whole command (start-up and imports included); ``extra_info``
holds what matters for training: the mean step time and its phases over the steps after the
first (a warm-up), from the run's metrics.jsonl (each phase the slowest rank's), and the load
average when the run ended.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# (hidden, layers, prompts, G, max tokens, steps): the demo's model, and a 4x wider, deeper one
SIZES = [(64, 2, 16, 8, 48, 5), (256, 4, 16, 8, 48, 5)]
SMOKE_SIZES = [(64, 1, 2, 4, 8, 2)]
VARIANTS = {"1proc-1thread": (1, 1), "1proc-2threads": (1, 2), "2procs-1thread": (2, 1)}
PHASES = ("t_step", "t_rollout", "t_logprobs", "t_update")


def make_run(root: Path, size) -> Path:
    """The model, data and config (JSON, which YAML reads) of a run under ``root``."""
    from papo_fast.tasks import arith

    hidden, layers, prompts, group, length, steps = size
    tok = arith.build_tokenizer()
    tok.save_pretrained(root / "model")
    arith.build_model(tok, hidden_size=hidden, layers=layers).save_pretrained(root / "model")
    arith.write_jsonl(arith.make_split(0, 16 * prompts, 2, 4), root / "train.jsonl")
    config = {
        "model": {"path": str(root / "model")},
        "data": {"train_path": str(root / "train.jsonl")},
        "rollout": {"group_size": group, "max_new_tokens": length},
        "optim": {"lr": 1e-4},
        "train": {
            "steps": steps,
            "prompts_per_step": prompts,
            "mini_batches": 1,
            "micro_batch_size": prompts * group,
            "progress": False,
            "save_every": 0,
            "keep_checkpoints": 1,
        },
    }
    path = root / "config.yaml"
    path.write_text(json.dumps(config))
    return path


def train(config: Path, out: Path, procs: int, threads: int) -> None:
    launcher = [sys.executable, "-m"]
    if procs > 1:
        launcher += ["torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m"]
    sets = [f"train.out_dir={out}", f"train.threads={threads}"]
    cmd = [*launcher, "papo_fast", "train", str(config), *(a for s in sets for a in ("--set", s))]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-6000:]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trainer_step_processes(benchmark, size, variant, tmp_path):
    procs, threads = VARIANTS[variant]
    config = make_run(tmp_path, size)
    out = tmp_path / "out"
    benchmark.pedantic(train, args=(config, out, procs, threads), rounds=1, iterations=1)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows  # after the warm-up step
    benchmark.extra_info.update(
        {key: sum(r[key] for r in timed) / len(timed) for key in PHASES}
        | {"processes": procs, "threads_per_process": threads, "load_avg": os.getloadavg()[0]}
    )
    assert (out / "final" / "model.safetensors").is_file()
