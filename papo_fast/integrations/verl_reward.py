"""verl's ``compute_score`` for PAPO: the outcome, the correctness and the rubric score of one
response, from papo_fast's verifier and judge (papo_fast/rewards/) or your own.

    reward.custom_reward_function.path=pkg://papo_fast.integrations.verl_reward
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.judge=papo_fast.rewards.judge:openai_rubric_judge

or, in a file of your own named by ``custom_reward_function.path``:

    compute_score = make_compute_score(verifier=MyVerifier(), judge=MyJudge())

verl's reward manager calls ``compute_score(data_source, solution_str, ground_truth,
extra_info)`` once per response and stores the returned dict beside the score; the ``papo``
estimator reads ``"papo_process"`` and ``"acc"`` from there (verl_fields.py).

Choices:
1. **One response a call.** verl scores each response alone, so the judge gets one response a
   request (batching across responses is the judge server's: it serves concurrent requests).
   The judge is called only for a correct response, as in papo_fast's own trainer
   (``compute_rewards``); a wrong one gets process 0.
2. **The problem text.** The judge needs the problem: ``extra_info[problem_key]`` (verl's data
   preprocessing scripts store it as "question"); missing, it is an error that names the key,
   since the rubric judge cannot grade a solution to an unknown problem. A reference solution,
   when ``solution_key`` names one, goes to a judge that takes it.
3. **Time limit.** verl calls a synchronous ``compute_score`` from a thread pool, where the math
   verifier's SIGALRM time limit cannot run: its comparisons then run unlimited (counted in its
   ``stats["unlimited"]``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from papo_fast.integrations.verl_fields import CORRECT_KEY, PROCESS_KEY
from papo_fast.rewards.base import compute_rewards, load_judge, load_verifier

DEFAULT_VERIFIER = "papo_fast.rewards.verify:MathVerifier"
DEFAULT_JUDGE = "papo_fast.rewards.judge:openai_rubric_judge"


def _resolve(part: Any, load: Callable, method: str, what: str) -> Any:
    """A spec string through papo_fast's loaders, or an object with ``method`` as it is."""
    if part is None or isinstance(part, str):
        return None if part is None else load(part)
    if not callable(getattr(part, method, None)):
        raise ValueError(f"{what} must be a name, 'package.module:attr' or an object with "
                         f"{method}(), got a {type(part).__name__}")  # fmt: skip
    return part


def make_compute_score(
    verifier: Any = DEFAULT_VERIFIER,
    judge: Any = DEFAULT_JUDGE,
    *,
    problem_key: str = "question",
    solution_key: str | None = None,
    on_invalid: str = "zero",
) -> Callable[..., dict[str, float]]:
    """A verl ``compute_score`` returning ``{"score": outcome, "acc": correct, "papo_process":
    rubric score}``.

    Args:
        verifier: a papo_fast verifier name or "package.module:attr" (rewards/base.py, choice
            "Names in the config"), or an object with ``verify(problems, responses, answers)``.
        judge: the same for the rubric judge (``score(problems, responses, answers)``); None or
            "none": no judge, process 0 everywhere (the ORM baseline).
        problem_key: the ``extra_info`` key that holds the problem text (choice 2).
        solution_key: the ``extra_info`` key of a reference solution for the judge, or None.
        on_invalid: "zero" or "error", papo_fast's policy for a judge output outside the tiers.
    """
    v = _resolve(verifier, load_verifier, "verify", "verifier")
    j = _resolve(judge, load_judge, "score", "judge")
    if on_invalid not in ("zero", "error"):
        raise ValueError(f"on_invalid must be 'zero' or 'error', got {on_invalid!r}")

    def compute_score(
        data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
        **_: Any,
    ) -> dict[str, float]:  # fmt: skip
        info = extra_info or {}
        if j is not None and problem_key not in info:
            raise ValueError(
                f"extra_info has no {problem_key!r} (the problem text the judge grades against; "
                f"keys: {sorted(info)}): set problem_key to the key your data uses"
            )
        solutions = [info.get(solution_key)] if solution_key else None
        result = compute_rewards(
            v, j, [str(info.get(problem_key, ""))], [solution_str], [str(ground_truth)],
            on_invalid=on_invalid, solutions=solutions,
        )  # fmt: skip
        return {
            "score": result.outcome[0],
            CORRECT_KEY: float(result.correct[0]),
            PROCESS_KEY: result.process[0],
        }

    return compute_score


@functools.lru_cache(maxsize=8)
def _cached(verifier: str, judge: str, problem_key: str, solution_key, on_invalid: str):
    return make_compute_score(verifier, judge, problem_key=problem_key,
                              solution_key=solution_key, on_invalid=on_invalid)  # fmt: skip


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    *,
    verifier: str = DEFAULT_VERIFIER,
    judge: str = DEFAULT_JUDGE,
    problem_key: str = "question",
    solution_key: str | None = None,
    on_invalid: str = "zero",
    **kwargs: Any,
) -> dict[str, float]:
    """``make_compute_score`` with its settings from verl's
    ``reward.custom_reward_function.reward_kwargs`` (names, so the verifier and the judge are
    built once per process and reused)."""
    fn = _cached(verifier, judge, problem_key, solution_key, on_invalid)
    return fn(data_source, solution_str, ground_truth, extra_info, **kwargs)
