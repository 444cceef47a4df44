"""Outcome verification for real math data: the last \\boxed{} of a response against a reference.

    verifier = MathVerifier(time_limit=5.0)     # config: "papo_fast.rewards.verify:MathVerifier"
    outcomes = verifier.verify(problems, responses, answers)    # [Outcome(reward, correct), ...]
    gold = reference_answer(record)    # GSM8K "#### 72", MATH / NuminaMath \\boxed{...}

Choices:
1. **Predicted answer.** It is the content of the LAST \\boxed{} (or \\fbox{}) of the response
   after reasoning blocks (<think>...</think>) are removed; a response without one is wrong. No
   "the answer is" fallback for the policy: the prompt asks for \\boxed{}, and rewarding other
   formats teaches the model that the instruction does not matter.
2. **Comparison.** Normalized string equality first (cheap, catches most hits), then math-verify
   (symbolic and numeric equivalence: 1/2 == 0.5 == \\frac{1}{2}, set and interval forms). Without
   math-verify installed (extra ``math``), only the normalized comparison runs.
3. **Time limit.** Each math-verify comparison runs under a SIGALRM interval timer of
   ``time_limit`` seconds (sympy can take minutes on adversarial expressions). A comparison that
   runs out of time is wrong and counted in ``stats["timeouts"]``. Signals only work on the main
   thread: called from another thread the comparison runs without a limit (counted in
   ``stats["unlimited"]``).
4. **Reference answers.** They come from the record, in this order: an explicit answer field;
   GSM8K's "#### N" line; the last \\boxed{} of the solution (MATH, NuminaMath).
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from contextlib import contextmanager
from fractions import Fraction

from papo_fast.rewards.base import Outcome, Verifier

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*([{ ])")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_reasoning(text: str) -> str:
    """Remove <think>...</think> blocks; text before a lone closing </think> is reasoning too."""
    text = _THINK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:  # an unclosed block: the answer never came
        text = text.split("<think>", 1)[0]
    return text.strip()


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} / \\fbox{...} (nested braces allowed), or None.

    ``\\boxed 5`` (no braces, the TeX form) yields "5". An unclosed brace yields None.
    """
    matches = list(_BOXED.finditer(text))
    for m in reversed(matches):
        start = m.end()
        if m.group(1) == " ":
            word = re.match(r"\s*([^\s$]+)", text[start:])
            if word:
                return word.group(1)
            continue
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def reference_answer(
    record: dict,
    answer_field: str = "answer",
    solution_field: str = "solution",
) -> str | None:
    """The gold answer of a GSM8K / MATH / NuminaMath-style record (choice "Reference answers")."""
    answer = record.get(answer_field)
    if answer is not None and str(answer).strip():
        answer = str(answer)
        if "####" in answer:  # GSM8K: worked solution, then "#### 1,000"
            return answer.rsplit("####", 1)[1].strip().replace(",", "")
        boxed = last_boxed(answer)
        return (boxed if boxed is not None else answer).strip()
    solution = record.get(solution_field)
    if solution:
        return last_boxed(str(solution))
    return None


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalize(ans: str) -> str:
    """A light canonical form: no $, spaces, \\left/\\right, text wrappers, thousands separators,
    trailing period or degree sign; ``\\dfrac`` -> ``\\frac``; integral floats as integers."""
    s = ans.strip().strip("$").strip()
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac")):
        s = s.replace(a, b)
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    try:
        f = Fraction(s)
        return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
    except (ValueError, ZeroDivisionError):
        return s


class ComparisonTimeout(Exception):
    """A math-verify comparison ran past its time limit."""


@contextmanager
def _time_limit(seconds: float):
    """SIGALRM after ``seconds`` on the main thread; yields False where no limit is possible."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield False
        return

    def on_alarm(signum, frame):
        raise ComparisonTimeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _NoTimeoutWarning(logging.Filter):
    """math-verify warns once that its own timeout is off: ours (``_time_limit``) is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())


def _math_verify_equal(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    p = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))


class MathVerifier(Verifier):
    """Reward 1 when the response's last \\boxed{} equals the reference answer, else 0.

    Args:
        time_limit: seconds per math-verify comparison (main thread only, choice "Time limit").
        use_math_verify: None: use math-verify when it is installed; False: normalized strings only.
    """

    def __init__(self, time_limit: float = 5.0, use_math_verify: bool | None = None):
        if use_math_verify is None:
            try:
                import math_verify  # noqa: F401

                use_math_verify = True
            except ImportError:
                use_math_verify = False
        self.time_limit, self.use_math_verify = time_limit, use_math_verify
        self.stats = {"no_answer": 0, "timeouts": 0, "unlimited": 0, "errors": 0}

    def equal(self, gold: str, pred: str) -> bool:
        """Normalized equality, then math-verify under the time limit (choices "Comparison" and
        "Time limit")."""
        if normalize(gold) == normalize(pred):
            return True
        if not self.use_math_verify:
            return False
        try:
            with _time_limit(self.time_limit) as limited:
                if not limited:
                    self.stats["unlimited"] += 1
                return _math_verify_equal(gold, pred)
        except ComparisonTimeout:
            self.stats["timeouts"] += 1
        except Exception:  # a parser bug on odd input is a wrong answer, counted
            self.stats["errors"] += 1
        return False

    def take_metrics(self) -> dict[str, float]:
        """``stats`` since the last call as ``verify_<name>``, then reset (rewards/base.py, choice
        "Counters")."""
        out = {f"verify_{k}": v for k, v in self.stats.items()}
        self.stats = dict.fromkeys(self.stats, 0)
        return out

    def verify(
        self, problems: list[str], responses: list[str], answers: list[str]
    ) -> list[Outcome]:
        out = []
        for resp, gold in zip(responses, answers, strict=True):
            pred = last_boxed(strip_reasoning(resp))
            if pred is None:
                self.stats["no_answer"] += 1
            ok = pred is not None and gold is not None and self.equal(str(gold), pred)
            out.append(Outcome(float(ok), ok))
        return out
