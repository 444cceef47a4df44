"""A two-step PAPOTrainer run on the arithmetic task's tiny model, the same on any number of
processes: test_trl.py runs it in its own process and, as a script, under
``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPUs).

    accelerate launch --multi_gpu --num_processes 2 tests/trl_run.py OUT grpo:trl dapo:fused

Completions come from a rollout function that reads no random state: response k of a prompt's
group is a fixed function of (prompt, k). So the data of a step are the same whatever the
number of processes and the model's dtype, and the runs can be compared parameter by parameter.
Writes, per variant and rank, the world size and the parameters after the two steps.
"""

from __future__ import annotations

import os
import sys
import zlib

import torch
from datasets import Dataset
from trl import GRPOConfig

from papo_fast.integrations.trl import PAPOTrainer
from papo_fast.tasks.arith import build_model, build_tokenizer, make_split

GROUP = 4  # num_generations
BATCH = 12  # responses per step, all processes together: 3 groups, one split across 2 processes
DIGITS = "0123456789"


def outcome_reward(prompts, completions, completion_ids, **kwargs):
    """1 for an even token sum, 0 otherwise (a stand-in verifier with varied groups)."""
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


def process_reward(prompts, completions, completion_ids, **kwargs):
    """A 3-tier score from the token sum; None (not judged) when the sum is a multiple of 4."""
    return [None if sum(ids) % 4 == 0 else (sum(ids) % 3) / 2 for ids in completion_ids]


def rollout(prompts, trainer):
    """Response k of each group: digits fixed by (prompt, k), 1 to 6 of them, then end of text."""
    tok = trainer.processing_class
    first = trainer.accelerator.process_index * len(prompts)  # TRL's row of prompts[0]
    prompt_ids, completion_ids = [], []
    for i, prompt in enumerate(prompts):
        k = (first + i) % trainer.num_generations
        h = zlib.crc32(f"{prompt}|{k}".encode())
        text = "".join(DIGITS[(h >> (3 * j)) % 10] for j in range(1 + h % 6))
        prompt_ids.append(tok.encode(prompt))
        completion_ids.append(tok.encode(text) + [tok.eos_token_id])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def dataset() -> Dataset:
    recs = make_split(0, 16, 1, 2)
    return Dataset.from_list(
        [{"prompt": r["problem"] + "=?\n", "answer": r["answer"]} for r in recs]
    )


def trainer(out: str, loss_type: str, fused: bool, processes: int = 1, dtype=torch.float32,
            steps: int = 2, outcome=outcome_reward, process=process_reward,
            rollout_func=None, **settings) -> PAPOTrainer:  # fmt: skip
    """The run's trainer: plain SGD and no gradient clipping, so that the parameters after two
    steps are a sum of gradients whose float error the test can bound."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=64, layers=1).to(dtype)
    if settings.get("beta", 0.0) != 0.0:  # TRL loads its reference model from the policy's path
        model.save_pretrained(f"{out}/policy")
        model = f"{out}/policy"
        settings["model_init_kwargs"] = {"dtype": dtype}
    settings = {"max_completion_length": 8, **settings}
    args = GRPOConfig(
        output_dir=out, per_device_train_batch_size=BATCH // processes, num_generations=GROUP,
        max_steps=steps, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=1, learning_rate=0.5, optim="sgd", max_grad_norm=0.0,
        seed=0, bf16=False, loss_type=loss_type, shuffle_dataset=False, **settings,
    )  # fmt: skip
    return PAPOTrainer(
        model, outcome, process, args=args, train_dataset=dataset(),
        processing_class=tok, rollout_func=rollout_func or rollout, fused_loss=fused,
    )  # fmt: skip


def final_params(t: PAPOTrainer) -> dict[str, torch.Tensor]:
    model = t.accelerator.unwrap_model(t.model)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def main(out: str, *variants: str) -> None:
    """Each variant "LOSS_TYPE:trl" or "LOSS_TYPE:fused" trains from the same start; writes
    OUT/<variant>-rank<r>.pt with the world size and the final parameters."""
    for variant in variants:
        loss_type, kind = variant.split(":")
        t = trainer(out, loss_type, kind == "fused", processes=int(os.environ["WORLD_SIZE"]))
        t.train()
        state = {"world": t.accelerator.num_processes, "params": final_params(t)}
        torch.save(state, f"{out}/{loss_type}-{kind}-rank{t.accelerator.process_index}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
