"""One RL step of the same tiny setup: papo_fast's Trainer against TRL's GRPOTrainer, on the CPU.

Same model (the demo's tiny Qwen2, random weights, saved and loaded back), same prompts, G, response
length (max_new_tokens; untrained models rarely stop early, so both generate full length), one
optimizer step per generation batch, clip 0.2 / 0.28, no KL, token-mean ("dapo") loss, fp32,
one CPU thread each.
TRL runs on-policy here (num_iterations=1: it skips the old log-probs); ours computes them anyway
(one no-grad forward) unless train.mini_batches == 1 makes the update on-policy too, which is the
setting used here (papo_fast/trainer.py, choice "On-policy shortcut").

Each variant runs in a fresh process (``python bench_trainer.py ours|trl H LAYERS P G LEN STEPS``)
that prints one JSON line: mean step time over the steps after the first (a warm-up: lazy imports,
allocator growth), per-phase times (ours), and the peak resident set during those steps minus the
resident set before them (VmHWM reset through /proc/self/clear_refs after the warm-up step).
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import in_fresh_process

SIZES = [(64, 2, 16, 8, 48, 4)]  # the demo: (hidden, layers, prompts, G, max tokens, steps)
SMOKE_SIZES = [(64, 1, 2, 4, 8, 2)]
PHASES = ("t_rollout", "t_reward", "t_logprobs", "t_update")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: VmHWM := VmRSS
        f.write("5")
    return _status_kib("VmRSS")


def make_assets(root: Path, hidden: int, layers: int, prompts: int) -> None:
    from papo_fast.tasks import arith

    tok = arith.build_tokenizer()
    tok.save_pretrained(root / "model")
    arith.build_model(tok, hidden_size=hidden, layers=layers).save_pretrained(root / "model")
    arith.write_jsonl(arith.make_split(0, 16 * prompts, 2, 4), root / "train.jsonl")


def run_ours(root: Path, prompts: int, group: int, length: int, steps: int) -> dict:
    from papo_fast.config import config_from_dict
    from papo_fast.trainer import Trainer

    cfg = config_from_dict(
        {
            "model": {"path": str(root / "model")},
            "data": {"train_path": str(root / "train.jsonl")},
            "rollout": {"group_size": group, "max_new_tokens": length},
            "optim": {"lr": 1e-4},
            "train": {
                "out_dir": str(root / "ours"),
                "steps": steps,
                "prompts_per_step": prompts,
                "mini_batches": 1,
                "micro_batch_size": prompts * group,
                "progress": False,
                "keep_checkpoints": 1,
            },
        }
    )
    trainer = Trainer(cfg)
    rows = [trainer.train_step()]  # warm-up: lazy imports, allocator growth
    base = _reset_peak()
    for _ in range(steps - 1):
        rows.append(trainer.train_step())
    peak = _status_kib("VmHWM") - base
    timed = rows[1:] or rows
    out = {"step_s": sum(r["t_step"] for r in timed) / len(timed), "peak_mib": peak / 1024}
    out.update({k: sum(r[k] for r in timed) / len(timed) for k in PHASES})
    return out


def run_trl(root: Path, prompts: int, group: int, length: int, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from papo_fast.rewards import parse_answer_line

    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": f"{r['problem']}=?\n", "answer": r["answer"]} for r in rows])

    def exact(completions, answer, **_):
        return [float(parse_answer_line(c) == a) for c, a in zip(completions, answer, strict=True)]

    times: list[float] = []
    base: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            if len(times) == 1:  # after the warm-up step, as for ours
                base.append(_reset_peak())

    args = GRPOConfig(
        output_dir=str(root / "trl"),
        per_device_train_batch_size=prompts * group,
        num_generations=group,
        max_completion_length=length,
        max_steps=steps,
        learning_rate=1e-4,
        temperature=1.0,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        num_iterations=1,
        gradient_accumulation_steps=1,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(root / "model", attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(root / "model")
    trainer = GRPOTrainer(
        model=model, reward_funcs=exact, args=args, train_dataset=ds, processing_class=tok
    )
    trainer.add_callback(Timer())
    trainer.train()
    peak = _status_kib("VmHWM") - base[0]
    timed = times[1:] or times
    return {"step_s": sum(timed) / len(timed), "peak_mib": peak / 1024}


@pytest.mark.parametrize("variant", ["ours", "trl"])
@pytest.mark.benchmark(group="trainer_step")
def test_trainer_step(benchmark, size, variant):
    if variant == "trl":
        pytest.importorskip("trl")
    if torch.cuda.is_available():
        pytest.skip("a CPU comparison (peak memory is the process's resident set)")
    result = benchmark.pedantic(
        in_fresh_process, args=(__file__, variant, *size), rounds=1, iterations=1
    )
    benchmark.extra_info.update(result)
    assert result["step_s"] > 0 and result["peak_mib"] >= 0


if __name__ == "__main__":
    variant, *nums = sys.argv[1:]
    hidden, layers, prompts, group, length, steps = map(int, nums)
    torch.set_num_threads(1)  # both variants: tiny matrices run best on one thread
    with tempfile.TemporaryDirectory() as tmp:
        make_assets(Path(tmp), hidden, layers, prompts)
        run = run_ours if variant == "ours" else run_trl
        print(json.dumps(run(Path(tmp), prompts, group, length, steps)))
