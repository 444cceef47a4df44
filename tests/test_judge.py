"""The rubric judge without a server: prompt, score parsing on canned answers, the callable and HF
backends."""

import pytest

from papo_fast.rewards import compute_rewards
from papo_fast.rewards.judge import (
    RUBRIC_PROMPT,
    CallableBackend,
    OpenAIChatBackend,
    OpenAIJudgeConfig,
    RubricJudge,
    build_prompt,
    parse_score,
)
from papo_fast.rewards.verify import MathVerifier

# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "answer, expected",
    [
        (r"All steps shown and right. \boxed{1}", 1.0),
        (r"A step is skipped. \boxed{0.5}", 0.5),
        (r"\boxed{.5}", 0.5),
        (r"\boxed{\frac{1}{2}}", 0.5),
        (r"\boxed{1/2}", 0.5),
        (r"\boxed{\text{0}}", 0.0),
        (r"$\boxed{1.0}$", 1.0),
        (r"Tier 1 would need \boxed{1}, but a detail is missing: \boxed{0.5}", 0.5),  # last box
        (r"<think>I think \boxed{0}</think>Final: \boxed{1}", 1.0),  # judge's reasoning ignored
        ("Score: 0.5", 0.5),  # fallback pattern
        ("The score is **1**.", 1.0),
        ("score 1 at first, but final score: 0", 0.0),  # last fallback match
        (r"\boxed{0.7}", None),  # outside the tiers
        (r"\boxed{high}", None),
        ("I cannot grade this.", None),  # garbled
        ("", None),
    ],
)
def test_parse_score(answer, expected):
    assert parse_score(answer) == expected


def test_parse_score_without_fallback():
    assert parse_score("Score: 1", fallback_pattern=None) is None


def test_prompt_has_rubric_fields_and_strips_reasoning():
    p = build_prompt(RUBRIC_PROMPT, "What is 2+2?", "<think>hmm 5?</think>2+2=4, \\boxed{4}", "4")
    assert "What is 2+2?" in p and "Reference answer: 4" in p and "2+2=4, \\boxed{4}" in p
    assert "hmm 5?" not in p and "Reference solution" not in p
    assert "\\boxed{0.5}" in p  # the template's own braces survive the substitution
    for tier in ("1:", "0.5:", "0:"):
        assert f"\n{tier}" in p
    with_ref = build_prompt(RUBRIC_PROMPT, "q", "r", "4", solution="2+2 is 4")
    assert "Reference solution:\n2+2 is 4" in with_ref


def test_custom_template_with_braces():
    p = build_prompt("{problem}|{response}|{x}|\\boxed{}", "P", "R", "A")
    assert p == "P|R|{x}|\\boxed{}"


# ----------------------------------------------------------------------------- RubricJudge


CANNED = {
    "right": r"Every step is shown. \boxed{1}",
    "minor": r"One step skipped. \boxed{0.5}",
    "wrong": r"Fatal error in step 2. \boxed{0}",
    "garbled": "asdf qwer",
    "several": r"First \boxed{0} ... on reflection \boxed{1}",
}


def canned(messages):
    user = messages[-1]["content"]
    return next(v for k, v in CANNED.items() if f"[{k}]" in user)


def test_rubric_judge_canned_answers():
    judge = RubricJudge(canned)
    responses = [f"[{k}] solution" for k in CANNED]
    scores = judge.score(["q"] * 5, responses, ["1"] * 5)
    assert scores == [1.0, 0.5, 0.0, 0.0, 1.0]
    m = judge.take_metrics()
    assert m["judge_scored"] == 5 and m["judge_parse_fail"] == 1 and m["judge_unreachable"] == 0
    assert judge.take_metrics()["judge_scored"] == 0  # reset


def test_judge_sees_only_correct_responses_through_compute_rewards():
    seen = []

    def fn(messages):
        seen.append(messages[-1]["content"])
        return r"\boxed{0.5}"

    responses = [r"\boxed{4}", r"\boxed{5}", r"<think>x</think>\boxed{4}", "no answer"]
    rw = compute_rewards(MathVerifier(), RubricJudge(fn), ["2+2"] * 4, responses, ["4"] * 4)
    assert rw.correct == [True, False, True, False]
    assert rw.process == [0.5, 0.0, 0.5, 0.0]
    assert rw.judge_calls == 2 and len(seen) == 2 and rw.judge_invalid == 0


def test_system_message_and_solutions():
    got = []
    judge = RubricJudge(lambda m: got.append(m) or r"\boxed{1}", system="You are strict.")
    judge.score(["q"], ["r"], ["a"], solutions=["the way"])
    assert got[0][0] == {"role": "system", "content": "You are strict."}
    assert "Reference solution:\nthe way" in got[0][1]["content"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_unreachable"):
        RubricJudge(canned, on_unreachable="ignore")
    with pytest.raises(ValueError, match="unreachable_score"):
        RubricJudge(canned, on_unreachable="score", unreachable_score=0.7)
    with pytest.raises(ValueError, match="response"):
        RubricJudge(canned, template="{problem}")
    with pytest.raises(ValueError, match="model"):
        OpenAIChatBackend(OpenAIJudgeConfig(model=""))


# ----------------------------------------------------------------------------- HF backend


def test_hf_backend_runs_a_tiny_model():
    """An untrained tiny model as an in-process judge: it answers garbage, counted as parse
    failures (scored 0), through the same RubricJudge."""
    from papo_fast.rewards.judge import HFJudgeBackend
    from papo_fast.tasks.arith import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=64, layers=1)
    b = HFJudgeBackend(model, tok, max_new_tokens=8, batch_size=2)
    judge = RubricJudge(b, template="{problem}=?\n{response}")
    scores = judge.score(["1+2", "3+4", "5+6"], ["Answer: 3", "Answer: 7", "Answer: 11"], ["0"] * 3)
    assert len(scores) == 3 and set(scores) <= {0.0, 0.5, 1.0}
    assert judge.take_metrics()["judge_scored"] == 3


def test_callable_backend_class():
    b = CallableBackend(lambda m: "Score: 1")
    assert RubricJudge(b).score(["q"], ["r"], ["a"]) == [1.0]
