"""The rubric judge: an LLM scores each correct response's reasoning 0, 0.5 or 1.

    cfg = OpenAIJudgeConfig(base_url="http://127.0.0.1:8000/v1", model="judge")
    judge = RubricJudge(OpenAIChatBackend(cfg), on_unreachable="score", unreachable_score=1.0)
    scores = judge.score(problems, responses, answers)    # the rewards.Judge interface
    judge.take_metrics()    # {"judge_requests": .., "judge_parse_fail": .., ...}, then reset

In a config: ``reward.judge: "papo_fast.rewards.judge:openai_rubric_judge"`` builds the
OpenAI-compatible judge from PAPO_JUDGE_* environment variables (see ``openai_rubric_judge``).

Choices:
1. **Our prompt.** ``RUBRIC_PROMPT`` holds the paper's three tiers, the problem, the reference
   answer (and a reference solution when the caller passes one), and the student's solution with
   its reasoning blocks (<think>...</think>) removed. The judge is told the answer was already
   verified correct: it grades the process only. Fields are substituted by name ({problem},
   {answer}, {reference}, {response}); other braces (\\boxed{}) are left alone.
2. **Parsing.** The score is the last \\boxed{} of the judge's answer, after its own reasoning
   blocks are removed; failing that, the last "score: X" (``fallback_pattern``). 1, 1.0, 0.5, .5,
   1/2, \\frac{1}{2}, 0 are read; anything else is a parse failure: score 0, counted.
3. **Failures per response.** Unreachable (every retry failed): ``on_unreachable="raise"``
   (default) leaves that response without a score, and the trainer's reward.on_invalid policy
   decides (rewards/base.py, choice "Invalid judge output": scored 0 and counted, or training
   stops); ``on_unreachable="score"`` gives it ``unreachable_score`` (the paper: 1.0) and counts
   it. A request the server refuses (HTTP 400, 413, 422...: a prompt over the judge's context)
   leaves that response without a score under either policy (counted as ``judge_rejected``): it
   is no outage. The responses without a score come back as a JudgeUnreachable or
   JudgeRequestError holding the others' scores, so one failed request never costs the batch its
   scores.
4. **Configuration errors.** They stop the run: a refused key (HTTP 401/403), an unknown model or
   path (404), a URL that is no chat-completions endpoint (405, redirects) raise
   JudgeConfigError, which the reward step never turns into scores of 0 (that would silently train
   ORM). Settings are checked when the client is built: the base URL must be
   http(s)://host[:port]/..., the numbers finite and in range, and every PAPO_JUDGE_* variable is
   named with its bad value.
5. **OpenAI-compatible client.** It sends one chat-completion per response, at most
   ``max_concurrency`` in flight, each with its own timeout; timeouts, connection errors, 408,
   409, 429 and 5xx are retried ``max_retries`` times with exponential backoff and jitter. The API
   key is read from the environment variable named by ``api_key_env`` when a request is built and
   is never stored in the config, logged or put in an error message (a server's message that
   echoes it has it masked).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

from papo_fast.rewards.base import TIERS, Judge, JudgeConfigError, JudgePartialFailure
from papo_fast.rewards.judge_backends import (
    LIMITS,
    CallableBackend,
    HFJudgeBackend,
    HttpxTransport,
    JudgeBackend,
    Messages,
    OpenAIChatBackend,
    OpenAIJudgeConfig,
    Rejected,
    check_base_url,
    check_choice,
    check_number,
)
from papo_fast.rewards.verify import last_boxed, strip_reasoning

__all__ = [  # the judge and, for one import line, the backends it is built with
    "RUBRIC_PROMPT",
    "CallableBackend",
    "HFJudgeBackend",
    "HttpxTransport",
    "JudgeBackend",
    "JudgeConfigError",
    "JudgeRequestError",
    "JudgeUnreachable",
    "OpenAIChatBackend",
    "OpenAIJudgeConfig",
    "Rejected",
    "RubricJudge",
    "build_prompt",
    "openai_rubric_judge",
    "parse_score",
]

RUBRIC_PROMPT = "\n".join(
    [
        "You are grading the reasoning of a student's solution to a math problem. The final answer "
        "has already been checked and is correct; judge only the process that leads to it.",
        "",
        "Problem:",
        "{problem}",
        "",
        "Reference answer: {answer}",
        "",
        "{reference}Student's solution:",
        "{response}",
        "",
        "Rubric (three tiers):",
        "1: completely correct. Every step needed to reach the answer is executed correctly and "
        "shown.",
        "0.5: generally correct. The approach is right, but some details are omitted or there are "
        "minor errors that do not invalidate the solution.",
        "0: the solution does not address the problem, contains a fatal error, or has severe "
        "omissions (for example, the answer appears without a valid derivation).",
        "",
        "Explain your grading briefly, then give the score, one of 0, 0.5 or 1, alone in "
        "\\boxed{}, e.g. \\boxed{0.5}.",
    ]
)

REFERENCE_BLOCK = "Reference solution:\n{solution}\n\n"
FALLBACK_PATTERN = r"(?i)score\s*(?:is|of|:|=)?\s*\**\s*(1\.0|0\.5|0\.0|\.5|1/2|1|0)\b"


UNREACHABLE_POLICIES = ("raise", "score")


class JudgeUnreachable(JudgePartialFailure):
    """Some responses got no answer after every retry and the policy is "raise" (choice
    "Failures per response"): ``scores`` holds the others' scores, None for those."""


class JudgeRequestError(JudgePartialFailure):
    """The judge server refused some requests (HTTP 400, 413, 422...; choice
    "Failures per response"): ``scores`` holds the others' scores, None for those."""


# ----------------------------------------------------------------------------- parsing

_FRAC = re.compile(r"\\[dt]?frac\{?(\d+)\}?\{?(\d+)\}?")
_TIER_TEXT = {"1": 1.0, "1.0": 1.0, "0.5": 0.5, ".5": 0.5, "1/2": 0.5, "0": 0.0, "0.0": 0.0}


def _tier(text: str) -> float | None:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", text).strip().strip("$").replace(" ", "")
    m = _FRAC.fullmatch(s)
    if m:
        s = f"{m[1]}/{m[2]}"
    return _TIER_TEXT.get(s)


def parse_score(answer: str, fallback_pattern: str | None = FALLBACK_PATTERN) -> float | None:
    """The tier in the judge's answer (choice "Parsing"): 0.0, 0.5, 1.0, or None when
    unparseable."""
    text = strip_reasoning(answer)
    boxed = last_boxed(text)
    if boxed is not None:
        return _tier(boxed)
    if fallback_pattern:
        hits = re.findall(fallback_pattern, text)
        if hits:
            return _tier(hits[-1])
    return None


def build_prompt(
    template: str, problem: str, response: str, answer: str, solution: str | None = None
) -> str:
    """The judge's user message (choice "Our prompt"): named fields substituted, other braces
    untouched."""
    reference = REFERENCE_BLOCK.replace("{solution}", solution.strip()) if solution else ""
    fields = {
        "{problem}": problem.strip(),
        "{answer}": str(answer).strip(),
        "{reference}": reference,
        "{response}": strip_reasoning(response),
    }
    return re.sub("|".join(map(re.escape, fields)), lambda m: fields[m[0]], template)


# ----------------------------------------------------------------------------- the judge


class RubricJudge(Judge):
    """3-tier rubric scores from an LLM for correct responses (the module docstring's choices).

    Args:
        backend: a JudgeBackend, or a callable ``fn(messages) -> str``.
        template: the user prompt with {problem}, {answer}, {reference}, {response}.
        system: an optional system message.
        fallback_pattern: regex whose last match's group 1 is the score when there is no \\boxed{}
            (None: \\boxed{} only).
        on_unreachable: "raise" (no score: JudgeUnreachable) or "score" (``unreachable_score``,
            counted); choice "Failures per response".
        unreachable_score: 0, 0.5 or 1; the paper uses 1.0.
    """

    def __init__(
        self,
        backend: JudgeBackend | Callable[[Messages], str],
        template: str = RUBRIC_PROMPT,
        system: str | None = None,
        fallback_pattern: str | None = FALLBACK_PATTERN,
        on_unreachable: str = "raise",
        unreachable_score: float = 1.0,
    ):
        check_choice("on_unreachable", on_unreachable, UNREACHABLE_POLICIES)
        check_choice("unreachable_score", unreachable_score, TIERS)
        if "{response}" not in template:
            raise JudgeConfigError("the judge template must contain {response}")
        self.backend = backend if isinstance(backend, JudgeBackend) else CallableBackend(backend)
        self.template, self.system, self.fallback_pattern = template, system, fallback_pattern
        self.on_unreachable, self.unreachable_score = on_unreachable, float(unreachable_score)
        self._metrics = dict.fromkeys(
            ("judge_scored", "judge_parse_fail", "judge_unreachable", "judge_rejected"), 0
        )

    def messages(self, problem: str, response: str, answer: str, solution: str | None = None):
        user = build_prompt(self.template, problem, response, answer, solution)
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": user}]

    def score(
        self,
        problems: list[str],
        responses: list[str],
        answers: list[str],
        solutions: Sequence[str | None] | None = None,
    ) -> list[float]:
        """One tier per response; every response passed is assumed correct (rewards/base.py).

        Raises:
            JudgeUnreachable, JudgeRequestError: some responses have no score (choice
                "Failures per response"); the exception holds every score, None for those, and
                why each one failed.
            JudgeConfigError: the key, the model or the URL is wrong (choice
                "Configuration errors").
        """
        solutions = solutions if solutions is not None else [None] * len(responses)
        convs = [
            self.messages(p, r, a, s)
            for p, r, a, s in zip(problems, responses, answers, solutions, strict=True)
        ]
        replies = self.backend.complete(convs) if convs else []
        scores: list[float | None] = []
        failures: dict[int, str] = {}  # position -> why it has no score
        for k, reply in enumerate(replies):
            if isinstance(reply, Rejected):
                self._metrics["judge_rejected"] += 1
                detail = f" ({reply.detail})" if reply.detail else ""
                failures[k] = f"HTTP {reply.status}{detail}"
                scores.append(None)
            elif reply is None:
                self._metrics["judge_unreachable"] += 1
                if self.on_unreachable == "raise":
                    failures[k] = "unreachable after every retry"
                scores.append(None if self.on_unreachable == "raise" else self.unreachable_score)
            else:
                tier = parse_score(reply, self.fallback_pattern)
                if tier is None:
                    self._metrics["judge_parse_fail"] += 1
                scores.append(0.0 if tier is None else tier)
        self._metrics["judge_scored"] += len(scores) - len(failures)
        if failures:
            rejected = any(isinstance(r, Rejected) for r in replies)
            shown = "; ".join(f"response {k}: {why}" for k, why in list(failures.items())[:3])
            more = ", ..." if len(failures) > 3 else ""
            raise (JudgeRequestError if rejected else JudgeUnreachable)(
                f"the judge failed on {len(failures)} of {len(scores)} responses ({shown}{more})",
                scores,
                failures,
            )
        return scores

    def take_metrics(self) -> dict[str, float]:
        """Counters since the last call (judge's and backend's), then reset."""
        out = {**self._metrics, **self.backend.take_metrics()}
        self._metrics = dict.fromkeys(self._metrics, 0)
        return out


# the environment variables of openai_rubric_judge -> OpenAIJudgeConfig's numbers
ENV_NUMBERS = {
    "PAPO_JUDGE_CONCURRENCY": "max_concurrency",
    "PAPO_JUDGE_TIMEOUT": "timeout",
    "PAPO_JUDGE_RETRIES": "max_retries",
    "PAPO_JUDGE_MAX_TOKENS": "max_tokens",
}


def _env_float(var: str, default: float) -> float:
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise JudgeConfigError(f"{var}={raw!r} is not a number") from None


def _env_number(var: str, field: str):
    """``var`` read as ``OpenAIJudgeConfig.<field>`` (its default when unset) and checked."""
    raw = os.environ.get(var)
    if raw is None:
        return getattr(OpenAIJudgeConfig, field)
    kind = LIMITS[field][0]
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise JudgeConfigError(f"{var}={raw!r} is not {what}") from None
    check_number(var, value, field, shown=raw)
    return value


def openai_rubric_judge() -> RubricJudge:
    """A RubricJudge over an OpenAI-compatible server, configured from the environment.

    PAPO_JUDGE_BASE_URL (default http://127.0.0.1:8000/v1), PAPO_JUDGE_MODEL (required),
    PAPO_JUDGE_API_KEY (the key, if the server wants one), PAPO_JUDGE_CONCURRENCY (32),
    PAPO_JUDGE_TIMEOUT (seconds, 120), PAPO_JUDGE_RETRIES (3), PAPO_JUDGE_MAX_TOKENS (1024),
    PAPO_JUDGE_ON_UNREACHABLE ("raise" | "score"), PAPO_JUDGE_UNREACHABLE_SCORE (1.0).

    Raises:
        JudgeConfigError: a variable is missing or bad; the message names it and its value.
    """
    env = os.environ.get
    base_url = env("PAPO_JUDGE_BASE_URL", OpenAIJudgeConfig.base_url)
    check_base_url(base_url, "PAPO_JUDGE_BASE_URL")
    model = env("PAPO_JUDGE_MODEL", "")
    if not model:
        raise JudgeConfigError(
            "PAPO_JUDGE_MODEL is not set: name the served judge model (vllm serve's "
            "--served-model-name)"
        )
    numbers = {field: _env_number(var, field) for var, field in ENV_NUMBERS.items()}
    on_unreachable = env("PAPO_JUDGE_ON_UNREACHABLE", "raise")
    check_choice("PAPO_JUDGE_ON_UNREACHABLE", on_unreachable, UNREACHABLE_POLICIES)
    unreachable_score = _env_float("PAPO_JUDGE_UNREACHABLE_SCORE", 1.0)
    shown = env("PAPO_JUDGE_UNREACHABLE_SCORE")
    check_choice("PAPO_JUDGE_UNREACHABLE_SCORE", unreachable_score, TIERS, shown)
    cfg = OpenAIJudgeConfig(base_url=base_url, model=model, **numbers)
    return RubricJudge(
        OpenAIChatBackend(cfg), on_unreachable=on_unreachable, unreachable_score=unreachable_score
    )
