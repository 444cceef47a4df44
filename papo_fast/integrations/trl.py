"""PAPO in TRL: ``PAPOTrainer``, a GRPOTrainer whose advantages are ``papo_advantages``.

    trainer = PAPOTrainer(model, outcome_reward=verifier_or_fn, process_reward=judge_or_fn,
                          args=GRPOConfig(...), train_dataset=ds, processing_class=tok,
                          advantage=AdvantageConfig(mode="papo"), fused_loss=False)

TRL 1.16 computes its advantages inline in ``_generate_and_score_completions``, with no hook.
The narrowest pieces are overridden; everything else is TRL's own (generation, old and reference
log-probs, logging, the loss unless ``fused_loss=True``):

1. **Three reward columns.** TRL is given three reward functions: ``outcome``, ``process`` and
   ``correct`` (1 / 0). It calls them in that order, gathers the table across processes and logs
   each column's mean (``rewards/correct/mean`` is the accuracy). ``_calculate_rewards`` keeps the
   GATHERED table: a prompt group can span processes, so PAPO normalizes the whole table, then
   ``_generate_and_score_completions`` replaces TRL's advantages by this process's slice of it
   (TRL's own slicing: rank r holds rows [r * n, (r + 1) * n)). Groups are TRL's: every
   ``num_generations`` consecutive rows of the table.
2. **Correctness.** A papo_fast ``Verifier`` gives it (``Outcome.correct``: shaping the reward
   leaves it alone); a plain reward function's response is correct when its reward equals 1 (the
   default of ``papo_advantages``).
3. **The judge sees correct responses only.** A papo_fast ``Judge`` is called through
   ``compute_rewards`` (its ``on_invalid`` policy: an invalid score counts 0, or raises); a plain
   process function is called on the correct rows only (prompts, completions, completion_ids and
   every per-row dataset column cut to them). Wrong responses get process 0 without a call.
4. **None.** A process score of None (or NaN) from a plain function means *not judged*: that
   response leaves the set the process part is normalized over in "papo" mode (its process
   advantage is 0); the modes that normalize the process score over all responses ("prm",
   "fullnorm", "mult") read it as 0, the score of a wrong response. An outcome of None (or NaN) is
   an error naming the function and the row. It is raised after the gather, on every process at
   once, so that no process waits forever in a collective that another has left.
5. **TRL settings PAPO replaces.** ``reward_weights`` and ``multi_objective_aggregation`` are not
   used (PAPO's weight is ``advantage.lam``), so a ``reward_weights`` given is refused; the logged
   ``reward`` is the outcome reward. ``scale_rewards`` names an estimator and must agree with
   ``advantage.estimator``: "group" with grpo, "none" with drgrpo (or ``scale_by_std=False``),
   "batch" with batch_std; rloo and reinforce_pp replace TRL's formula whatever it says. PAPO's
   eps (1e-6, also a std threshold) replaces TRL's 1e-4.
6. **Logged.** Beside TRL's metrics: ``papo/zero_adv_frac`` (responses with advantage exactly 0)
   and ``papo/proc_active_frac`` (groups whose process part is active), the signals the PAPO paper
   follows, and ``papo/not_judged_frac`` (correct responses whose process score was None).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import trl
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import is_async_callable

from papo_fast.config import AdvantageConfig
from papo_fast.integrations.trl_loss import FusedPolicyLoss
from papo_fast.kernels.advantages import MODES, papo_advantages
from papo_fast.rewards.base import Outcome, Verifier, compute_rewards

# The overridden methods are TRL internals: the tested release line only.
SUPPORTED_TRL = "1.16."
if not trl.__version__.startswith(SUPPORTED_TRL):
    raise ImportError(f"papo_fast.integrations.trl supports trl {SUPPORTED_TRL}x, found "
                      f"{trl.__version__}: pip install 'papo_fast[trl]'")  # fmt: skip

COLUMNS = ("outcome", "process", "correct")  # the reward table's columns, in TRL's call order
_CONTROL = ("trainer_state", "log_extra", "log_metric", "environments")  # TRL's non-row kwargs


def _text(x: Any) -> str:
    """A prompt or completion as text: a string as is, a conversation's last message's content."""
    return x if isinstance(x, str) else str(x[-1]["content"])


class _Known(Verifier):
    """The verifier compute_rewards is given once the outcomes are known (no second call)."""

    def __init__(self, outcomes: list[Outcome]):
        self.outcomes = outcomes

    def verify(self, problems, responses, answers):
        return self.outcomes


class PAPORewards:
    """The three reward functions TRL calls for one batch, sharing the outcome's correctness.

    Args:
        outcome: a papo_fast ``Verifier`` or a TRL reward function (None for a row is an error).
        process: a papo_fast ``Judge`` or a TRL reward function (None for a row: not judged).
        answer_key: the dataset column holding the reference answer (Verifier / Judge only).
        solution_key: the column of reference solutions for a Judge that takes them, or None.
        on_invalid: a Judge's invalid-score policy, as in ``compute_rewards``.
    """

    def __init__(self, outcome, process, answer_key="answer", solution_key=None, on_invalid="zero"):
        for name, f, kind in (
            ("outcome_reward", outcome, "verify"),
            ("process_reward", process, "score"),
        ):
            if not (_has(f, kind) or callable(f)):
                raise TypeError(f"{name} must have {kind}() or be a callable, got {f!r}")
            if not _has(f, kind) and is_async_callable(f):
                raise TypeError(
                    f"{name} must be synchronous: the process score waits for the outcome"
                )
        self.outcome_fn, self.process_fn = outcome, process
        self.answer_key, self.solution_key, self.on_invalid = answer_key, solution_key, on_invalid
        self.names = {"outcome": _name(outcome), "process": _name(process)}
        self._batch: tuple[int, list[Outcome]] | None = None  # (id of completions, outcomes)

    def functions(self) -> list:
        """The reward functions TRL is given, named as COLUMNS (TRL logs rewards/<name>/mean)."""
        return [getattr(self, column) for column in COLUMNS]

    def _answers(self, kwargs: dict, key: str | None) -> list | None:
        if key is None:
            return None
        if key not in kwargs:
            columns = sorted(k for k in kwargs if k not in _CONTROL)
            raise KeyError(f"the dataset has no column {key!r} (answer_key / solution_key); "
                           f"it has {columns}")  # fmt: skip
        return kwargs[key]

    def outcome(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        if _has(self.outcome_fn, "verify"):
            answers = self._answers(kwargs, self.answer_key)
            outs = list(self.outcome_fn.verify(
                [_text(p) for p in prompts], [_text(c) for c in completions], answers
            ))  # fmt: skip
            if len(outs) != len(prompts):
                raise ValueError(f"verifier {self.names['outcome']} returned {len(outs)} results "
                                 f"for {len(prompts)} responses")  # fmt: skip
        else:
            rewards = self.outcome_fn(prompts=prompts, completions=completions,
                                   completion_ids=completion_ids, **kwargs)  # fmt: skip
            outs = [Outcome(math.nan if r is None else float(r), r is not None and float(r) == 1.0)
                    for r in rewards]  # fmt: skip
        self._batch = (id(completions), outs)
        return [o.reward for o in outs]

    def _outcomes_of(self, completions) -> list[Outcome]:
        if self._batch is None or self._batch[0] != id(completions):
            raise RuntimeError("the process reward ran before the outcome reward of its batch: "
                               "keep TRL's reward functions in PAPORewards' order")  # fmt: skip
        return self._batch[1]

    def process(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        outs = self._outcomes_of(completions)
        if _has(self.process_fn, "score"):
            solutions = self._answers(kwargs, self.solution_key)
            return compute_rewards(
                _Known(outs), self.process_fn, [_text(p) for p in prompts],
                [_text(c) for c in completions], self._answers(kwargs, self.answer_key),
                self.on_invalid, solutions,
            ).process  # fmt: skip
        idx = [i for i, o in enumerate(outs) if o.correct]
        scores = [0.0] * len(outs)
        if not idx:
            return scores
        n = len(outs)
        cut = lambda v: [v[i] for i in idx] if isinstance(v, list) and len(v) == n else v  # noqa: E731
        row_kwargs = {k: v if k in _CONTROL else cut(v) for k, v in kwargs.items()}
        got = list(self.process_fn(prompts=cut(prompts), completions=cut(completions),
                                completion_ids=cut(completion_ids), **row_kwargs))  # fmt: skip
        if len(got) != len(idx):
            raise ValueError(f"process reward {self.names['process']} returned {len(got)} scores "
                             f"for the {len(idx)} correct responses it was given")  # fmt: skip
        for i, s in zip(idx, got, strict=True):
            scores[i] = math.nan if s is None else float(s)
        return scores

    def correct(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [float(o.correct) for o in self._outcomes_of(completions)]


def _has(f, method: str) -> bool:
    """A papo_fast Verifier (``verify``) or Judge (``score``), subclass or duck-typed."""
    return callable(getattr(f, method, None))


def _name(f) -> str:
    return getattr(f, "__name__", type(f).__name__)


def table_advantages(
    table: torch.Tensor, group_size: int, rows_per_process: int, cfg: AdvantageConfig, names: dict
):
    """PAPO advantages of the gathered reward table [N, 3] (COLUMNS), groups of ``group_size``
    consecutive rows, ``rows_per_process`` rows from each process in turn. Returns
    papo_advantages' output and the share of correct responses whose process score is missing
    (choice "None")."""
    outcome, process, correct = table.double().unbind(1)
    bad = torch.isnan(outcome)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        rank, local = divmod(row, rows_per_process)
        raise ValueError(
            f"outcome reward {names['outcome']!r} returned None (or NaN) for row {row} of the "
            f"gathered batch (process {rank}, its row {local}; {int(bad.sum())} such rows): an "
            "outcome reward must score every response"
        )
    if table.shape[0] % group_size:
        raise ValueError(f"{table.shape[0]} responses do not split into groups of {group_size}")
    correct = correct > 0.5
    judged = ~torch.isnan(process)
    offsets = torch.arange(0, table.shape[0] + 1, group_size, device=table.device)
    adv = papo_advantages(
        outcome, process.nan_to_num(0.0), group_offsets=offsets, correct=correct & judged,
        mode=cfg.mode, lam=cfg.lam, eps=cfg.eps, scale_by_std=cfg.scale_by_std,
        estimator=cfg.estimator,
    )  # fmt: skip
    not_judged = (correct & ~judged).sum() / correct.sum().clamp(min=1)
    return adv, not_judged


def _check_args(args: GRPOConfig, cfg: AdvantageConfig) -> None:
    if cfg.mode not in MODES:
        raise ValueError(f"advantage.mode must be one of {sorted(MODES)}, got {cfg.mode!r}")
    if args.reward_weights is not None:
        raise ValueError("PAPOTrainer does not use GRPOConfig.reward_weights (PAPO weighs its "
                         "process part by advantage.lam): leave reward_weights unset")  # fmt: skip
    # TRL's scale_rewards names one of the estimators; the others replace TRL's whole formula
    named = {"group": "grpo", "none": "drgrpo", "batch": "batch_std"}
    ours = "drgrpo" if cfg.estimator == "grpo" and not cfg.scale_by_std else cfg.estimator
    if ours in named.values() and named.get(args.scale_rewards) != ours:
        raise ValueError(
            f"GRPOConfig.scale_rewards={args.scale_rewards!r} disagrees with "
            f"advantage.estimator={ours!r}: use scale_rewards 'group' with grpo, 'none' with "
            "drgrpo (or scale_by_std=False), 'batch' with batch_std"
        )


class PAPOTrainer(GRPOTrainer):
    """GRPOTrainer with PAPO's advantages (see the module docstring for every choice).

    Args:
        model, args, train_dataset, processing_class, **kwargs: GRPOTrainer's.
        outcome_reward: a papo_fast ``Verifier`` or a TRL reward function.
        process_reward: a papo_fast ``Judge`` or a TRL reward function.
        advantage: the advantage settings (papo_fast.config.AdvantageConfig: mode, lam, eps,
            scale_by_std); None: PAPO's defaults.
        answer_key, solution_key, on_invalid: as in ``PAPORewards``.
        fused_loss: compute the policy loss with ``fused_linear_policy_loss`` from the LM head
            (no [tokens x vocab] logits); see integrations/trl_loss.py for what it supports.
    """

    def __init__(
        self,
        model,
        outcome_reward,
        process_reward,
        args: GRPOConfig | None = None,
        *,
        advantage: AdvantageConfig | None = None,
        answer_key: str = "answer",
        solution_key: str | None = None,
        on_invalid: str = "zero",
        fused_loss: bool = False,
        **kwargs,
    ):
        if "reward_funcs" in kwargs:
            raise TypeError("PAPOTrainer takes outcome_reward and process_reward, not reward_funcs")
        self.advantage = advantage if advantage is not None else AdvantageConfig()
        if args is not None:
            _check_args(args, self.advantage)
        self.papo_rewards = PAPORewards(outcome_reward, process_reward, answer_key, solution_key,
                                        on_invalid)  # fmt: skip
        super().__init__(model, reward_funcs=self.papo_rewards.functions(), args=args, **kwargs)
        if args is None:
            _check_args(self.args, self.advantage)
        if len(self.reward_funcs) != len(COLUMNS):
            raise ValueError("PAPOTrainer reads exactly the columns outcome, process, correct; an "
                             "environment's reward adds another (environment_factory)")  # fmt: skip
        self.reward_weights = torch.tensor([1.0, 0.0, 0.0])  # the logged "reward": the outcome
        self.fused_loss = FusedPolicyLoss(self) if fused_loss else None
        self._papo_table: torch.Tensor | None = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._papo_table = super()._calculate_rewards(inputs, prompts, completions,
                                                      completion_ids_list)  # fmt: skip
        return self._papo_table

    def _generate_and_score_completions(self, inputs):
        self._papo_table = None
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        n = output["advantages"].numel()  # this process's rows
        adv, not_judged = table_advantages(self._papo_table, group, n, self.advantage,
                                           self.papo_rewards.names)  # fmt: skip
        rank = self.accelerator.process_index
        output["advantages"] = adv.advantages[rank * n : (rank + 1) * n].to(output["advantages"])
        logged = self._logs["advantages"]  # TRL's own advantages of this batch: replaced
        for _ in range(min(adv.advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(adv.advantages.tolist())
        metrics = self._metrics[mode]
        metrics["papo/zero_adv_frac"].append(float(adv.stats["zero_adv_frac"]))
        metrics["papo/proc_active_frac"].append(float(adv.stats["proc_active_frac"]))
        metrics["papo/not_judged_frac"].append(float(not_judged))
        self._papo_table = None
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if return_outputs:
            raise ValueError("PAPOTrainer does not support returning outputs")
        return self.fused_loss(model, inputs)
