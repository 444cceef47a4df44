"""The main job: ORM vs PAPO on a tiny model that learns multi-step arithmetic, on the CPU.

    papo-fast demo --out runs/demo                       # about 8 minutes on 2 CPU cores
    papo-fast demo --out runs/d --seeds 3 --lrs 2e-4,4e-4

1. **Data.** Seeded train / held-out splits as JSONL files. Training chains have 2-4 operations;
   the held-out set has the same number of chains of each length from 2 to 6 (5 and 6 are longer
   than any in training), and its accuracy is also reported per length.
2. **Model.** A character tokenizer made with `tokenizers` and a tiny Qwen2, saved with
   save_pretrained and loaded back through the Auto classes, like any local model.
3. **Warm-up.** Supervised training on traces of mixed process quality (full / skipped step /
   slip that still ends right), so that groups hold correct answers of different rubric scores.
4. **RL, a sweep.** For each learning rate and each seed, ORM and PAPO: the same Trainer, config,
   seed and warm-up checkpoint; only advantage.mode differs ("orm" vs "papo").
5. **Report** (demo_report.py). Per-seed rows, then mean and standard error per method and
   learning rate; OUT/summary.json (every run's figures and the aggregates); OUT/sweep.png;
   each run's metrics.jsonl and curves.png.

The settings were fixed before any sweep ran: the learning rates double from 2e-4, the demo's
single rate before the sweep existed (2e-4, 4e-4, 8e-4: how each method holds up as the step
grows), two seeds, and as many steps as fit the 10-minute budget of ``make demo`` on 2 cores.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from papo_fast.batching import pad_ids
from papo_fast.config import Config, config_from_dict
from papo_fast.kernels.fused_linear_logprobs import fused_linear_logprobs
from papo_fast.metrics import plot_run
from papo_fast.run_dir import RunLock
from papo_fast.tasks import arith
from papo_fast.tasks.demo_report import aggregate, format_tables, lr_key, plot_sweep, run_summary


@dataclass
class WarmupConfig:
    seed: int = 0
    hidden_size: int = 64  # 2 heads of head_dim 32
    layers: int = 2
    steps: int = 600
    batch_size: int = 64
    lr: float = 4e-3
    num_train: int = 4000  # RL prompts
    heldout_per_length: int = 20  # held-out chains of each length
    train_ops: tuple[int, int] = (2, 4)
    heldout_ops: tuple[int, int] = (2, 6)
    threads: int = 1  # tiny matrices: one thread per process beats two (and shares the CPU)


DEMO_LRS = (2e-4, 4e-4, 8e-4)
DEMO_SEEDS = 2
MODES = ("orm", "papo")

# The RL settings of the demo (every key can be overridden with --set section.key=value); the loss
# keeps PolicyLossConfig's defaults, the paper's recipe (clip 0.2 / 0.28, no KL, token-mean).
DEMO_RL = {
    "data": {"eval_group_field": "ops"},
    "rollout": {"group_size": 8, "temperature": 1.0, "max_new_tokens": 64},
    "optim": {"grad_clip": 1.0},
    "train": {
        "steps": 120,
        "prompts_per_step": 16,
        "mini_batches": 2,
        "micro_batch_size": 64,
        "eval_every": 60,
        "eval_prompts": 100,
        "eval_k": 4,
        "eval_temperature": 1.0,
        "progress": True,
        "threads": 1,
    },
}


def warmup(wc: WarmupConfig, out: Path) -> Path:
    """Build tokenizer + model, train on mixed-quality traces, save to ``out`` (save_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(wc.threads)
    init = out / "init"
    arith.build_tokenizer().save_pretrained(init)
    tok = AutoTokenizer.from_pretrained(init)
    arith.build_model(tok, wc.hidden_size, wc.layers, wc.seed).save_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, attn_implementation="sdpa")
    model.train()
    lo, hi = wc.train_ops
    traces = arith.warmup_traces(wc.seed + 1, wc.steps * wc.batch_size, lo, hi)
    opt = torch.optim.AdamW(model.parameters(), lr=wc.lr, weight_decay=0.0)
    head = model.get_output_embeddings()
    t0 = time.perf_counter()
    for step in range(wc.steps):
        batch = traces[step * wc.batch_size : (step + 1) * wc.batch_size]
        ids, attn, mask = _sft_batch(tok, batch)
        h = model.base_model(input_ids=ids, attention_mask=attn)
        logp, _ = fused_linear_logprobs(h.last_hidden_state[:, :-1], head.weight, ids[:, 1:])
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:  # linear decay to 10%
            g["lr"] = wc.lr * (1.0 - 0.9 * step / max(1, wc.steps - 1))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == wc.steps - 1:
            print(
                f"warm-up step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f}s"
            )
    path = out / "warmup"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _sft_batch(tok, pairs):
    """Right-padded prompt+response+EOS ids and attention mask [B, L], target mask [B, L-1]."""
    seqs, starts = [], []
    for prompt, resp in pairs:
        p = tok(prompt)["input_ids"]
        seqs.append(p + tok(resp)["input_ids"] + [tok.eos_token_id])
        starts.append(len(p))
    ids, attn, mask = pad_ids(seqs, tok.pad_token_id, response_starts=starts)
    return ids, attn, mask[:, 1:].float()


def _train_one(cfg: Config, position: int) -> None:
    """One RL run (in a worker process when the runs go side by side)."""
    from transformers.utils import logging as hf_logging

    from papo_fast.trainer import Trainer

    hf_logging.disable_progress_bar()
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    Trainer(cfg).train(bar_position=position)


def run_demo(
    out: str | Path,
    overrides: list[str] = (),
    seeds: int = DEMO_SEEDS,
    lrs: tuple[float, ...] = DEMO_LRS,
    wc=None,
    workers: int = 0,
) -> dict:
    """Everything under ``out``; returns the summary written to out/summary.json.

    ``workers``: RL runs at once, one process each (0: one per CPU core).
    """
    out, wc = Path(out), wc or WarmupConfig()
    t0 = time.perf_counter()
    # Check the settings first: a bad --set, --seeds or --lrs fails before the warm-up starts.
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"demo --seeds must be >= 1, got {seeds!r}")
    lrs = tuple(lrs)
    if not lrs or any(
        isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf
        for lr in lrs
    ):
        raise ValueError(f"demo --lrs must be positive finite learning rates, got {lrs!r}")
    if len({lr_key(lr) for lr in lrs}) != len(lrs):
        raise ValueError(f"demo --lrs holds a learning rate twice, got {lrs!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"demo --out {out} exists and is not a directory")
    base = config_from_dict(DEMO_RL, overrides)  # a bad setting is named first
    if any(o.split("=", 1)[0].strip() == "optim.lr" for o in overrides):
        raise ValueError("demo sets optim.lr per run: give the learning rates with --lrs")
    from papo_fast.data import load_prompts  # noqa: F401  (fail early without `datasets`)

    runs = {  # run name -> (advantage.mode, learning rate, seed offset)
        f"{mode}_lr{lr_key(lr)}_seed{seed}": (mode, lr, seed)
        for lr in lrs
        for seed in range(seeds)
        for mode in MODES
    }
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)  # two demos on one --out would replace each other's runs
    lock.acquire()
    try:
        # The demo owns the runs it makes: a new demo replaces them (a training run, by contrast,
        # never overwrites another one). Nothing else under --out is touched.
        for name in runs:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        return _run(out, wc, base, runs, workers, t0)
    finally:
        lock.release()


def heldout_split(wc: WarmupConfig) -> list[dict]:
    """``heldout_per_length`` chains of each length in ``heldout_ops``, seeded."""
    lo, hi = wc.heldout_ops
    return [
        row
        for ops in range(lo, hi + 1)
        for row in arith.make_split(wc.seed + 20 + ops, wc.heldout_per_length, ops, ops)
    ]


def _run(out: Path, wc: WarmupConfig, base: Config, runs: dict, workers: int, t0: float) -> dict:
    train_path = arith.write_jsonl(
        arith.make_split(wc.seed + 10, wc.num_train, *wc.train_ops), out / "data" / "train.jsonl"
    )
    heldout_path = arith.write_jsonl(heldout_split(wc), out / "data" / "heldout.jsonl")
    warm = warmup(wc, out)
    t_warm = time.perf_counter() - t0
    jobs: dict[str, Config] = {}
    for name, (mode, lr, seed) in runs.items():
        jobs[name] = replace(
            base,
            model=replace(base.model, path=str(warm)),
            data=replace(base.data, train_path=str(train_path), eval_path=str(heldout_path)),
            advantage=replace(base.advantage, mode=mode),
            optim=replace(base.optim, lr=lr),
            train=replace(base.train, out_dir=str(out / name), seed=base.train.seed + seed),
        )
    # The runs are independent: side by side, one process each, as many as there are cores.
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        for cfg in jobs.values():
            _train_one(cfg, 0)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [
                pool.submit(_train_one, cfg, i % workers) for i, cfg in enumerate(jobs.values())
            ]
            for f in futures:
                f.result()
    t_rl = time.perf_counter() - t0 - t_warm
    metrics = {name: out / name / "metrics.jsonl" for name in jobs}
    per_run = {name: run_summary(metrics[name], *runs[name]) for name in jobs}
    for name in jobs:
        plot_run(metrics[name], out / name / "curves.png")
    agg = aggregate(per_run)
    plot_sweep(per_run, agg, metrics, out / "sweep.png")
    summary = {
        "settings": {
            "learning_rates": sorted({lr for _, lr, _ in runs.values()}),
            "seeds": len({seed for _, _, seed in runs.values()}),
            "steps": base.train.steps,
            "warmup_steps": wc.steps,
        },
        "runs": per_run,
        "aggregate": agg,
    }
    summary["timing"] = {"warmup_s": t_warm, "rl_s": t_rl, "total_s": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print()
    print(format_tables(per_run, agg))
    print(f"\nwall time {summary['timing']['total_s']:.0f}s (warm-up {t_warm:.0f}s); wrote {out}")
    return summary
