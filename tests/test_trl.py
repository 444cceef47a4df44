"""PAPOTrainer (papo_fast.integrations.trl) against TRL 1.16 itself, on the arithmetic task's tiny
model: PAPO's advantages from TRL's reward table, the fused loss's gradient against TRL's own loss,
and two processes (accelerate, gloo) against one. The runs are tests/trl_run.py's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
if not trl.__version__.startswith("1.16."):  # the release line the integration supports
    pytest.skip(f"papo_fast.integrations.trl supports trl 1.16.x, found {trl.__version__}",
                allow_module_level=True)  # fmt: skip

import trl_run  # noqa: E402
from helpers import assert_close_to_ref  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from papo_fast.integrations.trl import PAPORewards  # noqa: E402
from papo_fast.kernels.advantages import papo_advantages_ref  # noqa: E402
from papo_fast.rewards import AnswerLineVerifier, compute_rewards  # noqa: E402
from papo_fast.tasks.arith import ArithRubricJudge, full_trace, parse_problem  # noqa: E402

TESTS = Path(__file__).resolve().parent


def _record(t):
    """Keep every batch TRL's trainer returns from _generate_and_score_completions."""
    seen, inner = [], t._generate_and_score_completions

    def generate_and_score(inputs):
        out = inner(inputs)
        seen.append(out)
        return out

    t._generate_and_score_completions = generate_and_score
    return seen


def test_advantages_equal_papo_advantages_of_the_reward_table(tmp_path, one_thread):
    judged = []  # the (token sum, outcome) of every response the process reward was called on

    def process(prompts, completions, completion_ids, **kwargs):
        judged.extend((sum(ids), trl_run.outcome_reward(None, None, [ids])[0])
                      for ids in completion_ids)  # fmt: skip
        return trl_run.process_reward(prompts, completions, completion_ids)

    t = trl_run.trainer(str(tmp_path), "grpo", fused=False, process=process)
    seen = _record(t)
    t.train()
    assert len(seen) == 2
    for step, out in enumerate(seen):
        sums = (out["completion_ids"] * out["completion_mask"]).sum(1).tolist()
        outcome = torch.tensor([float(s % 2 == 0) for s in sums])
        proc = [None if s % 4 == 0 else (s % 3) / 2 for s in sums]
        # the module's rule for None: a correct response without a score leaves C
        correct = (outcome == 1) & torch.tensor([p is not None for p in proc])
        process_t = torch.tensor([0.0 if p is None else p for p in proc])
        kw = dict(group_ids=torch.arange(len(sums)) // trl_run.GROUP, correct=correct)
        ref64 = papo_advantages_ref(outcome, process_t, **kw)
        ref32 = papo_advantages_ref(outcome, process_t, dtype=torch.float32, **kw)
        assert_close_to_ref(out["advantages"], ref64.advantages, ref32.advantages,
                            msg=f"step {step}")  # fmt: skip
        assert t.state.log_history[step]["papo/proc_active_frac"] == pytest.approx(
            float(ref64.stats["proc_active_frac"])
        )
        zero = float((ref64.advantages == 0).double().mean())
        assert t.state.log_history[step]["papo/zero_adv_frac"] == pytest.approx(zero)
    # The judge saw the correct responses only, and all of them.
    assert judged and all(o == 1.0 for _, o in judged)
    sums = [s for out in seen for s in (out["completion_ids"] * out["completion_mask"]).sum(1)]
    assert len(judged) == sum(int(s) % 2 == 0 for s in sums)


def _arith_rollout(prompts, trainer):
    """Response k of a group: the full trace (k = 0, 3: rubric 1), the answer alone (k = 1:
    rubric 0.5), a wrong answer (k = 2: not judged)."""
    tok = trainer.processing_class
    first = trainer.accelerator.process_index * len(prompts)
    completion_ids = []
    for i, prompt in enumerate(prompts):
        p = parse_problem(prompt)
        k = (first + i) % trainer.num_generations
        text = [full_trace(p), f"Answer: {p.answer}", f"Answer: {p.answer + 1}", full_trace(p)][k]
        completion_ids.append(tok.encode(text) + [tok.eos_token_id])
    return {"prompt_ids": [tok.encode(p) for p in prompts], "completion_ids": completion_ids,
            "logprobs": None}  # fmt: skip


class _RecordingJudge(ArithRubricJudge):
    def __init__(self):
        self.seen: list[str] = []

    def score(self, problems, responses, answers):
        self.seen += responses
        return super().score(problems, responses, answers)


def test_papo_fast_verifier_and_judge_as_rewards(tmp_path, one_thread):
    judge = _RecordingJudge()
    t = trl_run.trainer(
        str(tmp_path), "grpo", fused=False, outcome=AnswerLineVerifier(), process=judge,
        rollout_func=_arith_rollout, max_completion_length=64, steps=1,
    )  # fmt: skip
    seen = _record(t)
    t.train()
    (out,) = seen

    def decode(ids, mask):
        return t.processing_class.decode(ids[mask.bool()], skip_special_tokens=True)

    texts = [decode(*x) for x in zip(out["completion_ids"], out["completion_mask"], strict=True)]
    prompts = [decode(*x) for x in zip(out["prompt_ids"], out["prompt_mask"], strict=True)]
    answers = [str(parse_problem(x).answer) for x in prompts]
    expected = compute_rewards(AnswerLineVerifier(), ArithRubricJudge(), prompts, texts, answers)
    # the judge saw exactly the correct responses
    assert sorted(judge.seen) == sorted(
        x for x, c in zip(texts, expected.correct, strict=True) if c
    )
    assert sorted(set(expected.process)) == [0.0, 0.5, 1.0]
    kw = dict(group_ids=torch.arange(len(texts)) // trl_run.GROUP,
              correct=torch.tensor(expected.correct))  # fmt: skip
    outcome, process = torch.tensor(expected.outcome), torch.tensor(expected.process)
    ref64 = papo_advantages_ref(outcome, process, **kw)
    ref32 = papo_advantages_ref(outcome, process, dtype=torch.float32, **kw)
    assert_close_to_ref(out["advantages"], ref64.advantages, ref32.advantages)
    assert t.state.log_history[0]["rewards/correct/mean"] == pytest.approx(0.75)


def test_outcome_none_is_an_error_naming_the_function_and_the_row(tmp_path):
    def spotty_outcome(prompts, completions, completion_ids, **kwargs):
        return [None if i == 5 else 1.0 for i in range(len(completions))]

    t = trl_run.trainer(str(tmp_path), "grpo", fused=False, outcome=spotty_outcome, steps=1)
    with pytest.raises(
        ValueError, match=r"'spotty_outcome' returned None .* row 5 .*process 0, its row 5"
    ):
        t.train()


async def _async_reward(prompts, completions, completion_ids, **kwargs):
    return [1.0] * len(completions)


@pytest.mark.parametrize(
    "rewards, message",
    [
        ((42, trl_run.process_reward), "outcome_reward must have verify.. or be a callable"),
        ((trl_run.outcome_reward, "judge"), "process_reward must have score.. or be a callable"),
        ((_async_reward, trl_run.process_reward), "outcome_reward must be synchronous"),
    ],
)
def test_rewards_that_are_neither_functions_nor_verifiers_are_refused(rewards, message):
    with pytest.raises(TypeError, match=message):
        PAPORewards(*rewards)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"reward_weights": [1.0, 1.0, 0.0]}, "reward_weights"),
        ({"scale_rewards": "batch"}, "scale_rewards='batch'"),
        ({"scale_rewards": "none"}, "estimator='grpo'"),
    ],
)
def test_trl_settings_papo_replaces_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        trl_run.trainer(str(tmp_path), "grpo", fused=False, **settings)


@pytest.mark.parametrize(
    "scale_rewards, estimator, ok",
    [("group", "grpo", True), ("none", "drgrpo", True), ("batch", "batch_std", True),
     ("batch", "rloo", True), ("group", "batch_std", False), ("none", "grpo", False)],
)  # fmt: skip
def test_scale_rewards_names_the_estimator(tmp_path, scale_rewards, estimator, ok):
    from trl import GRPOConfig

    from papo_fast.config import AdvantageConfig
    from papo_fast.integrations.trl import _check_args

    args = GRPOConfig(output_dir=str(tmp_path), scale_rewards=scale_rewards, report_to="none",
                      use_cpu=True, bf16=False)  # fmt: skip
    cfg = AdvantageConfig(estimator=estimator)
    if ok:
        _check_args(args, cfg)
    else:
        with pytest.raises(ValueError, match=f"scale_rewards='{scale_rewards}' disagrees"):
            _check_args(args, cfg)


@pytest.mark.parametrize(
    "loss_type, settings, message",
    [
        ("vespo", {}, "supports loss_type in .* got 'vespo'"),
        ("luspo", {"importance_sampling_level": "sequence"}, "got 'luspo'"),
        ("grpo", {"top_entropy_quantile": 0.5}, "top_entropy_quantile=0.5"),
        ("grpo", {"importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ("grpo", {"delta": 2.0}, "delta=2.0"),
        ("cispo", {"epsilon_high": 0.28}, "cispo with epsilon_high=0.28"),
    ],
)
def test_fused_loss_refuses_what_it_cannot_match(tmp_path, loss_type, settings, message):
    with pytest.raises(ValueError, match=message):
        trl_run.trainer(str(tmp_path), loss_type, fused=True, **settings)


def _batch(t, seed: int) -> dict:
    """One generation batch scored by the trainer, with old log-probs 0.3-sized noise away from
    the current ones, so that both clip sides and the unclipped region all occur."""
    _training(t)
    inputs = t._generate_and_score_completions(next(iter(t.get_train_dataloader())))
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logp, _, _ = t._get_per_token_logps_and_entropies(
            t.model, ids, mask, inputs["completion_ids"].shape[1]
        )
    g = torch.Generator().manual_seed(seed)
    inputs["old_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    ratio, adv = torch.exp(logp - inputs["old_per_token_logps"]), inputs["advantages"][:, None]
    valid = inputs["completion_mask"].bool()
    if t.loss_type == "cispo":  # TRL's cispo bounds the ratio at epsilon_high itself
        assert ((ratio > t.epsilon_high) & valid).any() and ((ratio < 1) & valid).any()
    else:
        assert ((ratio < 1 - t.epsilon_low) & (adv < 0) & valid).any()  # clipped below
        assert ((ratio > 1 + t.epsilon_high) & (adv > 0) & valid).any()  # clipped above
    if "ref_per_token_logps" in inputs:  # the reference is the initial policy: move it away too
        ref = inputs["ref_per_token_logps"]
        inputs["ref_per_token_logps"] = ref + 0.3 * torch.randn(ref.shape, generator=g)
    return inputs


def _training(t) -> None:
    """The state the training loop gives a micro-batch's loss: train mode, its accumulation."""
    t.model.train()
    t.current_gradient_accumulation_steps = t.args.gradient_accumulation_steps


def _trl_loss_ref(t, inputs) -> torch.Tensor:
    """TRL 1.16's ``_compute_loss`` for the six loss types it shares with the fused loss
    (token-level ratios, k3 KL with or without the bias correction, no masks or bonus), written
    out in the model's dtype with log-probs from the model's own logits: the float64 reference.
    (TRL's own log-probs accumulate in float32 whatever the model's dtype, so TRL run on a
    float64 model is no float64 reference.)
    """
    ids, mask = inputs["completion_ids"], inputs["completion_mask"]
    keep = ids.shape[1]
    full = torch.cat([inputs["prompt_ids"], ids], 1)
    attention = torch.cat([inputs["prompt_mask"], mask], 1)
    logits = t.model(input_ids=full, attention_mask=attention).logits[:, -keep - 1 : -1]
    logp = torch.log_softmax(logits / t.temperature, -1).gather(-1, ids[..., None])[..., 0]
    ratio = torch.exp(logp - inputs["old_per_token_logps"])
    adv = inputs["advantages"][:, None]
    if t.loss_type == "cispo":  # the ratio bounded above at epsilon_high, detached, times logp
        loss = -torch.clamp(ratio, max=t.epsilon_high).detach() * adv * logp
    elif t.loss_type == "sapo":  # a sigmoid gate of the ratio, its temperature by A's sign
        pos, neg = (adv.new_tensor(x) for x in (t.args.sapo_temperature_pos,
                                                  t.args.sapo_temperature_neg))  # fmt: skip
        tau = torch.where(adv > 0, pos, neg)  # two Python floats would make a float32 tau
        loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    else:
        clipped = torch.clamp(ratio, 1 - t.epsilon_low, 1 + t.epsilon_high)
        loss = -torch.min(ratio * adv, clipped * adv)
    if t.beta != 0.0:  # k3 against the reference, times the ratio with the bias correction
        delta = inputs["ref_per_token_logps"] - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + t.beta * (kl * ratio if t.args.use_bias_correction_kl else kl)
    loss = loss * mask  # [B, C]
    accumulation, b = t.current_gradient_accumulation_steps, ids.shape[0]
    if t.loss_type in ("grpo", "sapo"):
        return (loss.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if t.loss_type == "bnpo":
        return loss.sum() / mask.sum().clamp(min=1.0) / accumulation
    if t.loss_type == "dr_grpo":
        return loss.sum() / (b * t.max_completion_length) / accumulation
    tokens = inputs["num_items_in_batch"].clamp(min=1.0) / t.accelerator.num_processes
    return loss.sum() / (tokens * accumulation / t.args.steps_per_generation)  # dapo, cispo


def _grads(t, inputs, loss: str) -> dict[str, torch.Tensor]:
    """Parameter gradients of the "fused" loss (PAPOTrainer's), TRL's own ("trl") or "ref"."""
    _training(t)
    t.model.zero_grad(set_to_none=True)
    if loss == "fused":
        value = t.compute_loss(t.model, inputs)
    elif loss == "trl":
        value = GRPOTrainer.compute_loss(t, t.model, inputs)
    else:
        value = _trl_loss_ref(t, inputs)
    value.backward()
    return {k: p.grad.detach().clone() for k, p in t.model.named_parameters()}


@pytest.mark.parametrize(
    "loss_type, extra",
    [
        ("grpo", {}),
        ("bnpo", {}),
        ("dr_grpo", {}),
        ("dapo", {}),
        ("grpo", {"beta": 0.1, "use_bias_correction_kl": False}),
        ("grpo", {"beta": 0.1, "use_bias_correction_kl": True}),
        ("cispo", {"epsilon_high": 1.2}),
        ("sapo", {}),
    ],
)
def test_fused_loss_gradient_equals_trl_loss_gradient(tmp_path, loss_type, extra, one_thread):
    # two accumulation steps: every count of the mapping carries them
    settings = {"gradient_accumulation_steps": 2, **extra}
    t32 = trl_run.trainer(str(tmp_path), loss_type, fused=True, **settings)
    t64 = trl_run.trainer(
        str(tmp_path / "64"), loss_type, fused=True, dtype=torch.float64, **settings
    )
    inputs = _batch(t32, seed=1)
    inputs64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in inputs.items()}  # fmt: skip
    ref64, fused64 = _grads(t64, inputs64, "ref"), _grads(t64, inputs64, "fused")
    trl32, fused32 = _grads(t32, inputs, "trl"), _grads(t32, inputs, "fused")
    for name in ref64:
        assert ref64[name].abs().max() > 0, name  # a gradient that is all 0 would prove nothing
        # float64 against float64: the same loss by two routes (F64_ATOL in helpers.py)
        assert_close_to_ref(fused64[name], ref64[name], ref64[name], msg=f"{name} float64")
        # float32: within twice TRL's own float32 error (plus a few float32 ulps of the scale)
        assert_close_to_ref(fused32[name], ref64[name], trl32[name], msg=f"{name} float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VARIANTS = ("grpo:trl", "dapo:fused")


@pytest.mark.serial  # accelerate launch: two processes of its own, run alone
def test_two_processes_equal_one_process(tmp_path, one_thread):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(TESTS / "trl_run.py"), str(tmp_path),
        *VARIANTS,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    for variant in VARIANTS:
        loss_type, kind = variant.split(":")
        ranks = [torch.load(tmp_path / f"{loss_type}-{kind}-rank{r}.pt") for r in (0, 1)]
        # accelerate without --cpu and without a GPU falls back to one process: refuse that
        assert [r["world"] for r in ranks] == [2, 2], variant
        one = {}
        for dtype in (torch.float32, torch.float64):
            t = trl_run.trainer(str(tmp_path / "one"), loss_type, kind == "fused", dtype=dtype)
            t.train()
            one[dtype] = trl_run.final_params(t)
        for name, p0 in ranks[0]["params"].items():
            assert torch.equal(p0, ranks[1]["params"][name]), f"{variant} {name}: ranks differ"
            # The same data, the same sums of gradients in another order (each rank's half, then
            # DDP's mean): within twice the one-process float32 run's own error.
            assert_close_to_ref(p0, one[torch.float64][name], one[torch.float32][name],
                                msg=f"{variant} {name}")  # fmt: skip
