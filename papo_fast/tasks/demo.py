"""The main job: ORM vs PAPO on a tiny model that learns multi-step arithmetic, on the CPU.

    papo-fast demo --out runs/demo              # about 2 minutes on 2 CPU cores
    papo-fast demo --out runs/demo3 --seeds 3   # the 3-seed comparison (3x the RL time)

1. **Data.** Seeded train / held-out splits (held-out has longer chains) as JSONL files.
2. **Model.** A character tokenizer made with `tokenizers` and a tiny Qwen2, saved with
   save_pretrained and loaded back through the Auto classes, like any local model.
3. **Warm-up.** Supervised training on traces of mixed process quality (full / skipped step /
   slip that still ends right), so that groups hold correct answers of different rubric scores.
4. **RL.** The same Trainer, config and seed, from the same warm-up checkpoint; only
   advantage.mode differs ("orm" vs "papo").
5. **Report.** A comparison table, OUT/summary.json {"orm": {...}, "papo": {...}}, PNG plots.
"""

from __future__ import annotations

import json
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
from papo_fast.metrics import plot_comparison, plot_run, read_metrics
from papo_fast.run_dir import RunLock
from papo_fast.tasks import arith


@dataclass
class WarmupConfig:
    seed: int = 0
    hidden_size: int = 64  # 2 heads of head_dim 32
    layers: int = 2
    steps: int = 600
    batch_size: int = 64
    lr: float = 4e-3
    num_train: int = 4000  # RL prompts
    num_heldout: int = 64
    train_ops: tuple[int, int] = (2, 4)
    heldout_ops: tuple[int, int] = (2, 5)
    threads: int = 1  # tiny matrices: one thread per process beats two (and shares the CPU)


# The RL settings of the demo (every key can be overridden with --set section.key=value); the loss
# keeps PolicyLossConfig's defaults, the paper's recipe (clip 0.2 / 0.28, no KL, token-mean).
DEMO_RL = {
    "rollout": {"group_size": 8, "temperature": 1.0, "max_new_tokens": 64},
    "optim": {"lr": 2e-4, "grad_clip": 1.0},
    "train": {
        "steps": 150,
        "prompts_per_step": 16,
        "mini_batches": 2,
        "micro_batch_size": 64,
        "eval_every": 25,
        "eval_prompts": 64,
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


def _run_summary(metrics_path: Path) -> dict:
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "zero_adv_frac" in r]
    evals = [r for r in rows if "eval_accuracy" in r]

    def mean(key):
        vals = [r[key] for r in train if r.get(key) == r.get(key)]  # drop NaN
        return sum(vals) / len(vals) if vals else float("nan")

    last = evals[-1] if evals else {}
    return {
        "heldout_accuracy": last.get("eval_accuracy", float("nan")),
        "heldout_process_mean": last.get("eval_process_mean", float("nan")),
        "heldout_accuracy_start": evals[0]["eval_accuracy"] if evals else float("nan"),
        "zero_adv_frac": mean("zero_adv_frac"),
        "process_active_frac": mean("proc_active_frac"),
        "mean_response_len": mean("response_len"),
        "train_accuracy": mean("accuracy"),
        "step_time_s": mean("t_step"),
        "steps": len(train),
    }


COLUMNS = [
    ("heldout_accuracy", "held-out acc"),
    ("zero_adv_frac", "zero-adv frac"),
    ("process_active_frac", "proc-active frac"),
    ("mean_response_len", "resp len"),
    ("heldout_process_mean", "held-out rubric"),
]


def format_table(summary: dict) -> str:
    lines = [f"{'run':<12}" + "".join(f"{title:>18}" for _, title in COLUMNS)]
    for name, s in summary.items():
        lines.append(f"{name:<12}" + "".join(f"{s[key]:>18.3f}" for key, _ in COLUMNS))
    return "\n".join(lines)


def _train_one(cfg: Config, position: int) -> None:
    """One RL run (in a worker process when the runs go side by side)."""
    from transformers.utils import logging as hf_logging

    from papo_fast.trainer import Trainer

    hf_logging.disable_progress_bar()
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    Trainer(cfg).train(bar_position=position)


def run_demo(
    out: str | Path, overrides: list[str] = (), seeds: int = 1, wc=None, workers: int = 0
) -> dict:
    """Everything under ``out``; returns the summary written to out/summary.json.

    ``workers``: RL runs at once, one process each (0: one per CPU core).
    """
    out, wc = Path(out), wc or WarmupConfig()
    t0 = time.perf_counter()
    # Check the settings first: a bad --set or --seeds fails before the warm-up starts.
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"demo --seeds must be >= 1, got {seeds!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"demo --out {out} exists and is not a directory")
    base = config_from_dict(DEMO_RL, overrides)
    from papo_fast.data import load_prompts  # noqa: F401  (fail early without `datasets`)

    runs = {  # run name -> (advantage.mode, seed offset)
        (mode if seeds == 1 else f"{mode}_seed{seed}"): (mode, seed)
        for seed in range(seeds)
        for mode in ("orm", "papo")
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


def _run(out: Path, wc: WarmupConfig, base: Config, runs: dict, workers: int, t0: float) -> dict:
    train_path = arith.write_jsonl(
        arith.make_split(wc.seed + 10, wc.num_train, *wc.train_ops), out / "data" / "train.jsonl"
    )
    heldout_path = arith.write_jsonl(
        arith.make_split(wc.seed + 20, wc.num_heldout, *wc.heldout_ops),
        out / "data" / "heldout.jsonl",
    )
    warm = warmup(wc, out)
    t_warm = time.perf_counter() - t0
    jobs: dict[str, Config] = {}
    for name, (mode, seed) in runs.items():
        jobs[name] = replace(
            base,
            model=replace(base.model, path=str(warm)),
            data=replace(base.data, train_path=str(train_path), eval_path=str(heldout_path)),
            advantage=replace(base.advantage, mode=mode),
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
    summary, metrics = {}, {}
    for name in jobs:
        metrics[name] = out / name / "metrics.jsonl"
        summary[name] = _run_summary(metrics[name])
        plot_run(metrics[name], out / name / "curves.png")
    plot_comparison(metrics, out / "comparison.png")
    if len(runs) > 2:
        for mode in ("orm", "papo"):
            group = [s for n, s in summary.items() if n.startswith(mode + "_")]
            summary[mode] = {k: sum(g[k] for g in group) / len(group) for k in group[0]}
    summary["timing"] = {"warmup_s": t_warm, "total_s": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print()
    print(format_table({k: v for k, v in summary.items() if k != "timing"}))
    print(f"\nwall time {summary['timing']['total_s']:.0f}s (warm-up {t_warm:.0f}s); wrote {out}")
    return summary
