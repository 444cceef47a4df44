"""The PAPO trainer: one short loop, readable top to bottom.

    cfg = load_config("examples/arith_papo.yaml", ["train.steps=50"])
    Trainer(cfg).train()   # = papo-fast train examples/arith_papo.yaml --set train.steps=50

One step: prompts -> G responses each (rollout) -> outcome reward and correctness (verifier) ->
process score of the correct ones (judge) -> papo_advantages -> old log-probs (no grad) -> one PPO
epoch in ``mini_batches`` optimizer steps, each accumulated over micro-batches.

Choices, and where this departs from a textbook GRPO loop:
1. **No logits.** The logits are never built. The model body (``model.base_model``) gives hidden
   states; they go with ``lm_head.weight`` into ``fused_linear_logprobs`` (old and reference
   log-probs, no grad) and ``fused_linear_policy_loss`` (the loss and its gradient, chunk by chunk).
2. **Global counts.** Each optimizer step's loss is normalized by the valid tokens / sequences /
   longest response of its whole mini-batch, passed to every micro-batch, so the summed
   micro-batch gradients equal the full mini-batch gradient for every aggregation mode.
3. **Sampling temperature.** Log-probs are taken at the sampling temperature (the distribution the
   rollout actually sampled from).
4. **No filtering.** Zero-advantage groups are kept and there is no dynamic sampling: the
   zero-advantage fraction is a metric to watch (the paper's ORM-vs-PAPO signal), not something
   the loop hides.
5. **Determinism.** Every random draw is seeded from (train.seed, step, index): rollout seeds per
   request, the data order per epoch, the mini-batch shuffle per step. With the checkpoint's
   weights, optimizer and data position, a resumed CPU run reproduces the uninterrupted metrics.
6. **On-policy shortcut.** With train.mini_batches == 1 the single update is on-policy: old
   log-probs are not computed (old_logp=None: ratio exp(logp - logp.detach()) = 1 with the right
   gradient), saving a forward.
7. **Fixed evaluation.** Held-out evaluation uses the same requests (prompts and seeds) every
   time: avg@k moves only because the policy does.
8. **Fixed rewards.** Rewards never change inside a step; a judge output outside {0, 0.5, 1} is
   counted (``judge_invalid``) and handled by ``reward.on_invalid`` (rewards/base.py, choice
   "Invalid judge output").
9. **Rollout correction.** When the backend returns the sampler's log-probs (vLLM: another engine,
   other kernels, maybe another dtype), each token's loss is weighted by the truncated importance
   weight min(exp(old_logp - rollout_logp), loss.is_cap), old_logp being the trainer's log-prob at
   sampling time (the current one when the step is on-policy). The weight's mean and max before
   truncation are logged (``is_weight_mean``, ``is_weight_max``). The HF backend samples from the
   trained module itself: no sampler log-probs, no weight.
10. **Reward counters.** The verifier's and judge's own counters (``take_metrics``: parse
    failures, requests, retries, seconds...) go into the step's metrics as they report them, those
    of held-out evaluation with an ``eval_`` prefix (rewards/base.py, choice "Counters"). With
    data.solution_field, the reference solutions reach a judge whose ``score`` takes
    ``solutions=`` (the rubric judge does; rewards/base.py, choice "Reference solutions").
11. **Run directory.** The run directory (run_dir.py) is locked from construction until
    train() returns or raises (or close()): one run per train.out_dir. A new run refuses a
    directory that holds metrics or checkpoints; a resume needs a checkpoint and refuses changed
    settings that define the run (all but RESUMABLE), so config.json never lies. All of it, and
    model.device, is checked before the model loads. A finished run also leaves the trained model
    alone in OUT/final/, a plain Hugging Face directory.
12. **Finished steps saved.** A step that finished is never lost: when evaluation, logging or the
    ``on_step`` hook fails with an error, the step's metrics are logged (without the evaluation)
    and it is saved before the error propagates. A failure inside a step saves nothing (half an
    update is no state to resume from), nor does KeyboardInterrupt: a stop resumes from the last
    checkpoint.
13. **Packed micro-batches.** With model.packed (the default) a micro-batch's sequences run back
    to back (in rows as long as its longest sequence), position ids restarting at 0 in each and no
    attention mask: transformers builds the block-diagonal causal mask from the position ids, next
    to no padding is computed, and the loss gets the response tokens in its packed layout
    (packing.py, choice "Rows as long as the longest sequence"). The model is checked
    to keep packed sequences apart before training (a ConfigError if not). With
    train.micro_batch_tokens > 0, micro-batches take whole sequences in the mini-batch's order up
    to that many tokens (a longer one alone); either way the loss is the same (choice "Global
    counts"): only the speed and memory change.
14. **Many processes.** Under ``torchrun`` each rank takes a contiguous share of the step's
    prompt groups (train.prompts_per_step must divide by the world size), samples them with the
    seeds a one-process run gives them, scores them and computes their advantages (groups never
    straddle ranks). The model is sharded with FSDP2 and every use of it runs inside the sharded
    root (distributed.py); the epoch's counts and metrics are reduced over the ranks
    (update.py), so the update is the one-process update. Evaluation splits its requests the
    same way. Rank 0 alone writes config.json, metrics.jsonl and the progress bar; every rank
    writes its shards of each checkpoint. A failure on one rank is not caught up by the others:
    torchrun stops them all, and the run resumes from its last checkpoint (the finished step of
    choice "Finished steps saved" is kept in one process only).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path

import torch

from papo_fast import tasks  # noqa: F401  (registers the built-in task's reward names)
from papo_fast.checkpoint import (
    export_model,
    load_shards,
    resume_point,
    save_checkpoint,
    set_rng_state,
)
from papo_fast.config import Config, ConfigError
from papo_fast.data import PromptSampler, load_prompts
from papo_fast.distributed import (
    PolicyRunner,
    all_reduce,
    barrier,
    gather_objects,
    init_world,
    launched_size,
    shard_policy,
    sum_dicts,
)
from papo_fast.kernels.advantages import papo_advantages
from papo_fast.kernels.fused_linear_policy_loss import PAPOLoss
from papo_fast.metrics import (
    MetricsLogger,
    ProgressBar,
    group_accuracy,
    read_metrics,
    rollout_metrics,
)
from papo_fast.packing import check_packed_attention, micro_batches, step_batch, step_logprobs
from papo_fast.policy import load_model, model_device
from papo_fast.rewards import collect_metrics, compute_rewards, load_judge, load_verifier
from papo_fast.rollout import Request, SamplingParams, make_backend
from papo_fast.run_dir import RunDirError, check_new_run, open_run_dir, write_text_atomic
from papo_fast.update import StepShard, lockstep_count, ppo_epoch

# Settings a resumed run may change (choice "Run directory"): how long it runs, when it
# evaluates, saves and reports, and where and in what pieces it computes the same thing. Every
# other setting defines the run (its data, model, sampling, rewards, loss, optimizer, seed) and
# must stay as saved.
RESUMABLE = frozenset(
    {
        "train.steps",
        "train.eval_every",
        "train.save_every",
        "train.keep_checkpoints",
        "train.progress",
        "train.threads",
        "train.out_dir",
        "train.micro_batch_size",
        "train.micro_batch_tokens",
        "model.device",
        "model.attn_implementation",
        "model.packed",
        "model.gradient_checkpointing",
        "rollout.batch_size",
    }
)


def request_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of response ``index`` at ``step`` (step -1: held-out evaluation)."""
    return ((seed * 1_000_003 + step + 1) * 1_000_033 + index) % (2**63)


class Trainer:
    """Builds everything from a Config; ``train()`` runs (or resumes) the loop."""

    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg, c = cfg, cfg
        if c.train.threads > 0:
            torch.set_num_threads(c.train.threads)
        # Everything that can fail on bad input fails here, before any training; the run
        # directory and the checkpoint are checked before the model loads (choice "Run directory").
        device, size = model_device(c), launched_size()
        if c.train.prompts_per_step % size:
            raise ConfigError(
                f"train.prompts_per_step ({c.train.prompts_per_step}) must divide by the number "
                f"of processes ({size}): each rank takes whole prompt groups"
            )
        self.world = init_world(device)
        self.verifier = load_verifier(c.reward.verifier)
        self.judge = load_judge(c.reward.judge)
        self.train_data = load_prompts(c.data.train_path, c.data)
        self.eval_data = None
        if c.data.eval_path:
            self.eval_data = load_prompts(c.data.eval_path, c.data, c.data.eval_group_field)
        self.out = Path(c.train.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.lock = open_run_dir(self.out, resume, owner=self.world.main)
        try:
            if not resume:
                check_new_run(self.out)  # on every rank, before rank 0 writes anything
            barrier()
            self._build(resume)
        except BaseException:
            self.lock.abandon()
            raise

    def _build(self, resume: bool) -> None:
        c = self.cfg
        ckpt, state = resume_point(self.out, c, RESUMABLE) if resume else (None, None)
        if resume and (self.out / "metrics.jsonl").is_file():
            read_metrics(self.out / "metrics.jsonl")  # a damaged file fails here, named
        self.sampler = PromptSampler(len(self.train_data), c.train.seed)
        if state is not None:
            self.sampler.load_state_dict(state["sampler"])
        # A checkpoint holds the architecture; its weights come from the shards below.
        path = str(ckpt) if ckpt is not None else c.model.path
        self.model, self.tok = load_model(path, c, weights=ckpt is None)
        self.ref = None
        if c.loss.beta > 0:
            self.ref, _ = load_model(c.model.ref_path or c.model.path, c, trainable=False)
        for model in (self.model, self.ref) if c.model.packed else ():
            if model is not None:  # choice "Packed micro-batches"
                check_packed_attention(model)
        sharded = self.world.size > 1
        # A sharded module cannot generate on its own: the HF backend samples from a plain copy.
        sampler_model = self.model
        if sharded and c.rollout.backend == "hf":
            sampler_model = copy.deepcopy(self.model).requires_grad_(False)
        self.runner = PolicyRunner(self.model)  # choice "Many processes"
        self.ref_runner = None if self.ref is None else PolicyRunner(self.ref)
        for runner in (self.runner, self.ref_runner):
            if runner is not None:
                shard_policy(runner, self.model.device)
        # The loss, built once from the loss: section (every setting, ratio_level included).
        self.loss_fn = PAPOLoss(c.loss, temperature=c.rollout.temperature, return_entropy=True)
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=c.optim.lr,
            betas=c.optim.betas,
            weight_decay=c.optim.weight_decay,
        )
        self.step = 0
        if state is not None:
            load_shards(ckpt, self.model, self.opt)
            set_rng_state(state["rng"])
            self.step = state["step"]
        self.backend = make_backend(
            c.rollout.backend,
            sampler_model,
            self.tok,
            c.rollout.batch_size,
            c.rollout.vllm.engine_options(),
            model_path=c.model.path,
        )
        if ckpt is not None:
            self.backend.sync_weights(self.model)
        self.sampling = SamplingParams(
            c.rollout.temperature, c.rollout.top_p, c.rollout.max_new_tokens
        )
        self.saved_step = self.step  # the last step with a checkpoint (0: the initial model)
        self.log = None
        if self.world.main:
            write_text_atomic(self.out / "config.json", json.dumps(c.to_dict(), indent=2))
            self.log = MetricsLogger(self.out / "metrics.jsonl", self.step if state else None)

    def close(self) -> None:
        """Free the run directory for another run (train() does it on its way out)."""
        self.lock.release()

    # ------------------------------------------------------------------------- the loop

    def train(self, on_step=None, bar_position: int = 0) -> dict:
        """Run to ``train.steps``; returns the last metrics. ``on_step(step, metrics)`` hook."""
        c = self.cfg.train
        self.lock.acquire()  # again, when an earlier train() freed it
        shown = c.progress and self.world.main
        bar = ProgressBar(c.steps, self.step, self.out.name, shown, bar_position)
        metrics: dict = {}
        try:
            if self.step == 0 and c.eval_every > 0 and self.eval_data is not None:
                self._write({"step": 0, **self.evaluate()})
            while self.step < c.steps:
                metrics = self.train_step()
                logged = False
                try:
                    last = self.step == c.steps
                    if self.eval_data is not None and (
                        last or (c.eval_every > 0 and self.step % c.eval_every == 0)
                    ):
                        metrics.update(self.evaluate())
                    self._write(metrics)
                    logged = True
                    bar.update(metrics)
                    if last or (c.save_every > 0 and self.step % c.save_every == 0):
                        self.save()
                    if on_step is not None:
                        on_step(self.step, metrics)
                except Exception as err:
                    keep = self.world.size == 1 and not isinstance(err, RunDirError)
                    if keep and self.saved_step != self.step:
                        self._keep_finished_step(metrics, logged)
                    raise
            export_model(self.out / "final", self.model, self.tok)  # the trained model alone
        finally:
            bar.close()
            self.close()
        return metrics

    def _write(self, metrics: dict) -> None:
        if self.log is not None:  # rank 0
            self.log.write(metrics)

    def _keep_finished_step(self, metrics: dict, logged: bool) -> None:
        """After a failure past a finished step: log what it measured, then save it (choice
        "Finished steps saved").
        A save that fails too raises its own error, the first one chained to it."""
        if not logged:
            with contextlib.suppress(Exception):  # the weights matter more than the line
                self._write(metrics)
        self.save()

    def train_step(self) -> dict:
        c, t0 = self.cfg, time.perf_counter()
        G, lr = c.rollout.group_size, self._lr()
        for group in self.opt.param_groups:
            group["lr"] = lr

        # 1. Rollout: G responses per prompt, one seed per response; this rank's prompt groups.
        chosen = [self.train_data[i] for i in self.sampler.take(c.train.prompts_per_step)]
        share = self.world.share(len(chosen))
        rows = chosen[share]
        first = share.start * G  # the step's index of this rank's first response
        problems = [r["problem"] for r in rows for _ in range(G)]
        answers = [r["answer"] for r in rows for _ in range(G)]
        prompt_ids = self._encode([r["problem"] for r in rows])
        requests = [
            Request(prompt_ids[k // G], request_seed(c.train.seed, self.step, first + k))
            for k in range(len(problems))
        ]
        samples = self.backend.generate(requests, self.sampling)
        t1 = time.perf_counter()

        # 2. Rewards: verifier on all, judge on the correct ones, then advantages per group.
        texts = self.tok.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        solutions = self._solutions(rows, G)
        rw = compute_rewards(
            self.verifier, self.judge, problems, texts, answers, c.reward.on_invalid, solutions
        )
        reward_counters = collect_metrics(self.verifier, self.judge)  # choice "Reward counters"
        adv = papo_advantages(
            torch.tensor(rw.outcome),
            torch.tensor(rw.process),
            group_ids=(group_ids := torch.arange(len(samples)) // G),
            correct=torch.tensor(rw.correct),
            mode=c.advantage.mode,
            lam=c.advantage.lam,
            eps=c.advantage.eps,
            scale_by_std=c.advantage.scale_by_std,
            estimator=c.advantage.estimator,
        )
        t2 = time.perf_counter()

        # 3. Old (and reference) log-probs of the sampled tokens, no grad, no logits; the
        # sampler's when it reports them (choice "Rollout correction").
        dev = self.model.device
        batch = step_batch(samples, self.tok.pad_token_id, dev)
        T = c.rollout.temperature
        on_policy = c.train.mini_batches == 1  # one update from these samples: ratio == 1
        old = ref = None
        if not on_policy or self.ref_runner is not None:
            parts = self._micro_batches(batch, torch.arange(len(samples)))
            old = None if on_policy else self.runner(step_logprobs, batch, parts, T)
            ref = self.ref_runner(step_logprobs, batch, parts, T) if self.ref_runner else None
        batch = batch._replace(old_logp=old, ref_logp=ref, advantages=adv.advantages.to(dev))
        t3 = time.perf_counter()

        # 4. One PPO epoch: mini_batches optimizer steps, micro-batches with global counts.
        shard = StepShard(first, len(chosen) * G)
        seed = request_seed(c.train.seed, self.step, -1)
        upd = ppo_epoch(self.runner, self.model, self.opt, self.loss_fn, batch, shard, c, seed)
        self.backend.sync_weights(self.model)
        t4 = time.perf_counter()

        self.step += 1
        times = all_reduce([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0], "max")  # the slowest
        gen, all_tokens = all_reduce(
            [sum(len(s.response_ids) for s in samples), sum(batch.lengths)], "sum"
        )
        return {
            "step": self.step,
            "lr": lr,
            **rollout_metrics(samples, rw, adv.stats, adv.advantages, group_ids),
            **sum_dicts(gather_objects(reward_counters)),
            **upd,
            "t_rollout": times[0],
            "t_reward": times[1],
            "t_logprobs": times[2],
            "t_update": times[3],
            "t_step": times[4],
            "rollout_tok_s": gen / max(times[0], 1e-9),
            "update_tok_s": all_tokens / max(times[3], 1e-9),
        }

    def _micro_batches(self, batch, rows):
        t, packed = self.cfg.train, self.cfg.model.packed
        return micro_batches(
            batch, rows, t.micro_batch_size, t.micro_batch_tokens, packed, count=lockstep_count
        )

    # ------------------------------------------------------------------------- helpers

    def _lr(self) -> float:
        w = self.cfg.optim.warmup_steps
        return self.cfg.optim.lr * (min(1.0, (self.step + 1) / w) if w > 0 else 1.0)

    def _solutions(self, rows: list[dict], k: int) -> list[str | None] | None:
        """Each row's reference solution, ``k`` times, when the data maps one (else None)."""
        if not self.cfg.data.solution_field:
            return None
        return [
            None if r["solution"] is None else str(r["solution"]) for r in rows for _ in range(k)
        ]

    def _encode(self, problems: list[str]) -> list[list[int]]:
        tpl = self.cfg.data.prompt_template
        return self.tok([tpl.format(problem=p) for p in problems])["input_ids"]

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out avg@k at train.eval_temperature on fixed prompts and seeds, each rank a
        share of the requests."""
        c, k = self.cfg.train, self.cfg.train.eval_k
        rows = [self.eval_data[i] for i in range(min(c.eval_prompts, len(self.eval_data)))]
        prompt_ids = self._encode([r["problem"] for r in rows])
        mine = range(len(rows) * k)[self.world.share(len(rows) * k)]
        reqs = [Request(prompt_ids[i // k], request_seed(c.seed, -1, i)) for i in mine]
        params = SamplingParams(c.eval_temperature, 1.0, self.cfg.rollout.max_new_tokens)
        samples = self.backend.generate(reqs, params)
        texts = self.tok.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        problems = [rows[i // k]["problem"] for i in mine]
        answers = [rows[i // k]["answer"] for i in mine]
        solutions = self._solutions(rows, k)
        solutions = None if solutions is None else [solutions[i] for i in mine]
        rw = compute_rewards(self.verifier, self.judge, problems, texts, answers, "zero", solutions)
        counters = sum_dicts(gather_objects(collect_metrics(self.verifier, self.judge)))
        field, groups = self.cfg.data.eval_group_field, [r.get("group") for r in rows]
        by_group = group_accuracy(field, groups, [groups[i // k] for i in mine], rw.correct)
        lengths = sum(len(s.response_ids) for s in samples)
        n, n_correct, process, lengths = all_reduce(
            [len(samples), sum(rw.correct), sum(rw.process), lengths], "sum"
        )
        return {
            "eval_accuracy": n_correct / n,
            "eval_process_mean": process / n_correct if n_correct else float("nan"),
            "eval_response_len": lengths / n,
            **by_group,
            **{f"eval_{k}": v for k, v in counters.items()},
        }

    def save(self) -> Path:
        path = save_checkpoint(
            self.ckpt_dir,
            self.step,
            self.model,
            self.tok,
            self.opt,
            {"sampler": self.sampler.state_dict(), "config": self.cfg.to_dict()},
            keep=self.cfg.train.keep_checkpoints,
        )
        self.saved_step = self.step
        return path
