"""Math outcome verification: \\boxed{} extraction, reference answers of real datasets, equivalence
through math-verify, the per-comparison time limit."""

import threading
import time

import pytest

from papo_fast.rewards import verify
from papo_fast.rewards.verify import (
    MathVerifier,
    last_boxed,
    normalize,
    reference_answer,
    strip_reasoning,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"first \boxed{1} then \boxed{2}", "2"),  # the LAST box counts
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\fbox{7}", "7"),
        (r"$\boxed 5$", "5"),  # TeX form without braces
        (r"\boxed{x", None),  # unclosed
        (r"\boxed{3} and \boxed{4", "3"),  # an unclosed last box falls back to the previous one
        ("The answer is 5", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_strip_reasoning():
    assert strip_reasoning(r"<think>maybe \boxed{1}</think>so \boxed{2}") == r"so \boxed{2}"
    # the opening tag was in the prompt (Qwen3-style templates): everything before </think> goes
    assert strip_reasoning(r"hmm \boxed{1}</think> \boxed{2}") == r"\boxed{2}"
    assert strip_reasoning(r"intro <think>never closed \boxed{1}") == "intro"
    assert strip_reasoning("plain") == "plain"


@pytest.mark.parametrize(
    "record, expected",
    [
        # GSM8K: worked solution then "#### N" (thousands separators dropped)
        ({"question": "q", "answer": "3 * 4 = <<3*4=12>>12\n#### 1,200"}, "1200"),
        # MATH (hendrycks): the solution holds the boxed answer
        ({"problem": "p", "solution": r"So $x=\boxed{\dfrac{3}{4}}$."}, r"\dfrac{3}{4}"),
        # MATH-500 / NuminaMath with an explicit answer field: kept verbatim (commas too)
        ({"problem": "p", "solution": r"\boxed{9}", "answer": "(1, 2)"}, "(1, 2)"),
        ({"problem": "p", "answer": r"\boxed{5}"}, "5"),
        ({"problem": "p"}, None),
    ],
)
def test_reference_answer(record, expected):
    assert reference_answer(record) == expected


def test_normalize():
    assert normalize(r"$\dfrac{1}{2}$") == r"\frac{1}{2}"
    assert normalize("1,000") == normalize("1000.0") == "1000"
    assert normalize(r"10^\circ") == "10"
    assert normalize(r"\text{(B)}") == "(B)"
    assert normalize("0.50") == "1/2"


# (response, gold, correct)
CASES = [
    (r"... so the answer is \boxed{72}.", "72", True),
    (r"\boxed{72.0}", "72", True),
    (r"\boxed{1,200}", "1200", True),
    (r"\boxed{\frac12}", "0.5", True),  # math-verify: numeric equivalence
    (r"\boxed{\dfrac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", True),  # symbolic equivalence
    (r"\boxed{(1,2)}", "(1, 2)", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{71}", "72", False),
    (r"\boxed{2}", r"\frac{1}{2}", False),
    ("The answer is 72", "72", False),  # no box: wrong (choice "Predicted answer")
    (r"<think>\boxed{72}</think>The answer is \boxed{71}", "72", False),
    (r"<think>\boxed{71}</think>The answer is \boxed{72}", "72", True),
]


def test_math_verifier_cases():
    v = MathVerifier(time_limit=5.0)
    if not v.use_math_verify:
        pytest.skip("math-verify is not installed (extra: math)")
    responses, golds, expected = zip(*CASES, strict=True)
    out = v.verify([""] * len(CASES), list(responses), list(golds))
    assert [o.correct for o in out] == list(expected)
    assert [o.reward for o in out] == [float(e) for e in expected]
    assert v.stats["no_answer"] == 1


def test_string_only_fallback():
    v = MathVerifier(use_math_verify=False)
    out = v.verify(
        ["", "", ""], [r"\boxed{1,200}", r"\boxed{\frac12}", r"\boxed{0.5}"], ["1200"] * 3
    )
    assert [o.correct for o in out] == [True, False, False]


def test_time_limit_counts_a_timeout(monkeypatch):
    def slow(gold, pred):
        time.sleep(5)
        return True

    monkeypatch.setattr(verify, "_math_verify_equal", slow)
    v = MathVerifier(time_limit=0.2, use_math_verify=True)
    t0 = time.perf_counter()
    out = v.verify([""], [r"\boxed{2}"], ["3"])
    assert time.perf_counter() - t0 < 2.0
    assert out[0].correct is False and v.stats["timeouts"] == 1


def test_off_main_thread_runs_without_limit(monkeypatch):
    monkeypatch.setattr(verify, "_math_verify_equal", lambda g, p: True)
    v = MathVerifier(time_limit=0.2, use_math_verify=True)
    res = []
    t = threading.Thread(target=lambda: res.append(v.verify([""], [r"\boxed{2}"], ["3"])))
    t.start()
    t.join()
    assert res[0][0].correct and v.stats["unlimited"] == 1


def test_parser_error_is_wrong_and_counted(monkeypatch):
    def boom(gold, pred):
        raise RuntimeError("sympy fell over")

    monkeypatch.setattr(verify, "_math_verify_equal", boom)
    v = MathVerifier(use_math_verify=True)
    assert v.verify([""], [r"\boxed{2}"], ["3"])[0].correct is False
    assert v.stats["errors"] == 1


def test_loadable_from_config_spec():
    from papo_fast.rewards import load_verifier

    assert isinstance(load_verifier("papo_fast.rewards.verify:MathVerifier"), MathVerifier)
