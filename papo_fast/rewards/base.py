"""Outcome verifiers and process judges, and how the trainer calls them.

A ``Verifier`` turns each response into an outcome reward and a correctness flag; a ``Judge``
gives each CORRECT response a 3-tier process score (0, 0.5, 1). Wrong responses are never sent to
the judge and get process 0 (docs/design.md, "PAPO advantages": the judge sees correct responses
only).

Choices:
1. **Invalid judge output.** The policy is per response. A score outside {0, 0.5, 1} (including
   NaN, None, a response the judge failed on, named by a JudgePartialFailure, or every response of
   a batch when the judge raised anything else) is counted in ``RewardResult.judge_invalid`` and
   replaced by 0 under ``on_invalid="zero"`` (the default: the paper counts a judge parse failure
   as 0), or raises a JudgeError naming the response under ``on_invalid="error"``. The other
   responses keep their scores. Training never sees a value outside the three tiers. A
   JudgeConfigError (a refused key, an unknown model, a wrong URL) is no invalid output: it stops
   the run under either policy, since scoring every response 0 would silently turn PAPO into ORM.
2. **Outcome reward.** It is the correctness by default; shaping (e.g. an overlong penalty) goes
   in the verifier's reward while ``correct`` stays the binary flag that selects the judge's
   inputs.
3. **Names in the config.** Judges and verifiers are named in the config: a registered name
   ("answer_line", "none", and those a task registers, e.g. "arith_rubric") or
   "package.module:attr" for one of your own (a class or a factory called with no arguments,
   whose result has verify() / score()).
4. **Reference solutions.** When the data maps a solution field, the solutions of the judged
   responses go to the judge as ``solutions=`` (one per response, None where the record has
   none), but only to a judge whose ``score`` takes that argument (or **kwargs): the interface
   stays three lists for judges that do not use them.
5. **Counters.** A verifier or judge may report its own (parse failures, requests, seconds...)
   with ``take_metrics()``, counts since the last call; the trainer merges them into each step's
   metrics (``collect_metrics``). The interfaces' default reports nothing, and duck-typed
   verifiers and judges need not define it.
"""

from __future__ import annotations

import importlib
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

TIERS = (0.0, 0.5, 1.0)


class JudgeError(ValueError):
    """The judge returned something outside {0, 0.5, 1} and the policy is "error"."""


class JudgeConfigError(ValueError):
    """The judge cannot work as configured (a refused key, an unknown model, a wrong URL, a bad
    setting): the run stops, whatever ``on_invalid`` says (choice "Invalid judge output")."""


class JudgePartialFailure(RuntimeError):
    """The judge failed on some of the responses it was given, and scored the others.

    Args:
        message: what failed, for people.
        scores: one per response: the score, or None where the judge failed.
        failures: position in ``scores`` -> why that response has no score.
    """

    def __init__(self, message: str, scores: list[float | None], failures: dict[int, str]):
        super().__init__(message)
        self.scores, self.failures = scores, failures


class Outcome(NamedTuple):
    reward: float  # may be shaped
    correct: bool  # binary; selects the responses the judge sees


class Verifier(ABC):
    """Interface: outcome reward and correctness for each response."""

    @abstractmethod
    def verify(
        self, problems: list[str], responses: list[str], answers: list[str]
    ) -> list[Outcome]:
        """One Outcome per response."""

    def take_metrics(self) -> dict[str, float]:
        """Counters since the last call, then reset (choice "Counters"); none by default."""
        return {}


class Judge(ABC):
    """Interface: a process score in {0, 0.5, 1} per response (only correct ones are passed).

    ``score`` may also take ``solutions``: the reference solutions of those responses, None where
    there is none (choice "Reference solutions"; the rubric judge uses them, the arithmetic
    rubric does not).
    """

    @abstractmethod
    def score(self, problems: list[str], responses: list[str], answers: list[str]) -> list[float]:
        """One score in {0, 0.5, 1} per (correct) response."""

    def take_metrics(self) -> dict[str, float]:
        """Counters since the last call, then reset (choice "Counters"); none by default."""
        return {}


def collect_metrics(*parts) -> dict[str, float]:
    """The ``take_metrics()`` counters of every verifier / judge that has them (choice
    "Counters")."""
    out: dict[str, float] = {}
    for part in parts:
        take = getattr(part, "take_metrics", None)
        if take is not None:
            out |= {k: float(v) for k, v in take().items()}
    return out


def takes_solutions(judge) -> bool:
    """Whether ``judge.score`` accepts ``solutions=`` (choice "Reference solutions")."""
    try:
        params = inspect.signature(judge.score).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass nothing extra
        return False
    return any(p.name == "solutions" or p.kind is p.VAR_KEYWORD for p in params)


def parse_answer_line(response: str) -> str | None:
    """The text after "Answer:" on the last non-empty line, stripped; None when absent."""
    lines = [ln for ln in response.strip().split("\n") if ln.strip()]
    if not lines or not lines[-1].strip().startswith("Answer:"):
        return None
    return lines[-1].strip()[len("Answer:") :].strip()


class AnswerLineVerifier(Verifier):
    """Exact match of the final "Answer: X" line against the reference answer (1 or 0)."""

    def verify(self, problems, responses, answers):
        out = []
        for resp, ans in zip(responses, answers, strict=True):
            ok = parse_answer_line(resp) == str(ans).strip()
            out.append(Outcome(float(ok), ok))
        return out


@dataclass
class RewardResult:
    outcome: list[float]  # [N]
    correct: list[bool]  # [N]
    process: list[float]  # [N], 0 for wrong responses
    judge_calls: int  # responses sent to the judge
    judge_invalid: int  # judge outputs replaced under the invalid-output policy


def _valid_tier(x) -> bool:
    return isinstance(x, int | float) and not math.isnan(x) and float(x) in TIERS


def compute_rewards(
    verifier: Verifier,
    judge: Judge | None,
    problems: list[str],
    responses: list[str],
    answers: list[str],
    on_invalid: str = "zero",
    solutions: list[str | None] | None = None,
) -> RewardResult:
    """Verifier on every response, judge on the correct ones only (see the module docstring).

    ``solutions`` (one per response, or None) reach the judge when it takes them (choice
    "Reference solutions").
    """
    if on_invalid not in ("zero", "error"):
        raise ValueError(f"on_invalid must be 'zero' or 'error', got {on_invalid!r}")
    outcomes = verifier.verify(problems, responses, answers)
    if len(outcomes) != len(responses):
        raise ValueError(f"verifier returned {len(outcomes)} results for {len(responses)}")
    correct = [bool(o.correct) for o in outcomes]
    process = [0.0] * len(responses)
    idx = [i for i, c in enumerate(correct) if c]
    invalid = 0
    if judge is not None and idx:
        sub = ([problems[i] for i in idx], [responses[i] for i in idx], [answers[i] for i in idx])
        extra = {}
        if solutions is not None and takes_solutions(judge):
            extra["solutions"] = [solutions[i] for i in idx]
        failures: dict[int, str] = {}  # position among the judged -> why it has no score
        try:
            scores = list(judge.score(*sub, **extra))
        except JudgeConfigError:
            raise  # stops the run under either policy (choice "Invalid judge output")
        except JudgePartialFailure as err:  # only the failed responses are invalid (same choice)
            scores, failures = list(err.scores), err.failures
        except Exception as err:  # a judge call that failed as a whole: the batch is invalid
            if on_invalid == "error":
                raise JudgeError(f"judge raised on {len(idx)} responses: {err!r}") from err
            scores = [None] * len(idx)
        if len(scores) != len(idx):
            raise JudgeError(f"judge returned {len(scores)} scores for {len(idx)} responses")
        for k, (i, s) in enumerate(zip(idx, scores, strict=True)):
            if _valid_tier(s):
                process[i] = float(s)
                continue
            invalid += 1
            if on_invalid == "error":
                what = failures.get(k, f"returned {s!r} (allowed: {TIERS})")
                raise JudgeError(f"judge on response {i}: {what}: {responses[i]!r}")
    return RewardResult(
        outcome=[float(o.reward) for o in outcomes],
        correct=correct,
        process=process,
        judge_calls=len(idx) if judge is not None else 0,
        judge_invalid=invalid,
    )


# Registered names (choice "Names in the config"). Tasks add their own with register_verifier /
# register_judge when imported (papo_fast.tasks registers the arithmetic task's rubric as
# "arith_rubric").
VERIFIERS: dict[str, Callable[[], Verifier]] = {"answer_line": AnswerLineVerifier}
JUDGES: dict[str, Callable[[], Judge | None]] = {"none": lambda: None}


def register_verifier(name: str, factory: Callable[[], Verifier]) -> None:
    """Make ``reward.verifier: name`` build ``factory()``."""
    VERIFIERS[name] = factory


def register_judge(name: str, factory: Callable[[], Judge | None]) -> None:
    """Make ``reward.judge: name`` build ``factory()``."""
    JUDGES[name] = factory


def _load(spec: str, registry: dict, kind: str, method: str):
    """A registered name, or "package.module:attr" naming a class or a factory with no arguments;
    every failure a ValueError naming the spec."""
    if spec in registry:
        return registry[spec]()
    module, _, attr = spec.partition(":")
    if not (module and attr) or module.startswith("."):
        raise ValueError(
            f"unknown {kind} {spec!r}: use one of {sorted(registry)} or 'package.module:attr'"
        )
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"cannot load {kind} {spec!r}: {err}") from err
    if not callable(obj):
        raise ValueError(f"{kind} {spec!r} is a {type(obj).__name__}, not a class or a factory")
    made = obj()
    if not callable(getattr(made, method, None)):
        raise ValueError(f"{kind} {spec!r} built a {type(made).__name__}, which has no {method}()")
    return made


def load_verifier(spec: str) -> Verifier:
    return _load(spec, VERIFIERS, "verifier", "verify")


def load_judge(spec: str) -> Judge | None:
    return _load(spec, JUDGES, "judge", "score")  # "none" is registered: no judge
