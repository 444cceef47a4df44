"""The rubric judge without a server: prompt, score parsing on canned answers, the callable and HF
backends, and the OpenAI client's retries, timeouts, concurrency and unreachable policy on a fake
transport."""

import threading
import time

import pytest

from papo_fast.judge import (
    RUBRIC_PROMPT,
    CallableBackend,
    JudgeRequestError,
    JudgeUnreachable,
    OpenAIChatBackend,
    OpenAIJudgeConfig,
    RubricJudge,
    build_prompt,
    parse_score,
)
from papo_fast.rewards import compute_rewards, load_judge
from papo_fast.verify import MathVerifier

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


# ----------------------------------------------------------------------------- the HTTP client


def ok(content):
    return 200, {"choices": [{"message": {"role": "assistant", "content": content}}]}


class FakeTransport:
    """Plays a script of outcomes per call: a (status, body) pair, or an exception to raise."""

    def __init__(self, script, delay=0.0):
        self.script, self.delay = list(script), delay
        self.calls, self.payloads, self.headers = 0, [], []
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()

    def __call__(self, url, headers, payload, timeout):
        with self.lock:
            self.calls += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            self.payloads.append(payload)
            self.headers.append(headers)
            step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        try:
            time.sleep(self.delay)
            if isinstance(step, Exception):
                raise step
            return step
        finally:
            with self.lock:
                self.inflight -= 1


def backend(transport, **kw):
    cfg = OpenAIJudgeConfig(model="judge", backoff=0.01, **kw)
    sleeps = []
    b = OpenAIChatBackend(cfg, transport=transport, sleep=sleeps.append)
    return b, sleeps


def test_retries_with_backoff_then_success():
    t = FakeTransport([TimeoutError("read timeout"), (503, None), (429, None), ok(r"\boxed{1}")])
    b, sleeps = backend(t, max_retries=3)
    judge = RubricJudge(b)
    assert judge.score(["q"], ["r"], ["a"]) == [1.0]
    assert t.calls == 4
    assert len(sleeps) == 3 and sleeps[0] < sleeps[2]  # exponential (jitter is +-50%)
    m = judge.take_metrics()
    assert m["judge_requests"] == 4 and m["judge_retries"] == 3 and m["judge_unreachable"] == 0


def test_unreachable_raise_policy():
    t = FakeTransport([ConnectionRefusedError("refused")])
    b, _ = backend(t, max_retries=2)
    judge = RubricJudge(b)  # default policy: raise
    with pytest.raises(JudgeUnreachable):
        judge.score(["q"], ["r"], ["a"])
    assert t.calls == 3
    # through the trainer's reward step: counted as invalid and scored 0 (on_invalid="zero")
    rw = compute_rewards(MathVerifier(), judge, ["q"], [r"\boxed{1}"], ["1"])
    assert rw.process == [0.0] and rw.judge_invalid == 1


def test_unreachable_score_policy_is_counted():
    t = FakeTransport([(500, None)])
    b, _ = backend(t, max_retries=1)
    judge = RubricJudge(b, on_unreachable="score", unreachable_score=1.0)
    assert judge.score(["q"] * 3, ["r"] * 3, ["a"] * 3) == [1.0, 1.0, 1.0]
    assert judge.take_metrics()["judge_unreachable"] == 3


def test_client_error_raises_without_retry():
    t = FakeTransport([(404, {"error": "model not found"})])
    b, _ = backend(t, max_retries=3)
    with pytest.raises(JudgeRequestError, match="404"):
        RubricJudge(b, on_unreachable="score").score(["q"], ["r"], ["a"])
    assert t.calls == 1


def test_malformed_body_is_a_parse_failure():
    t = FakeTransport([(200, {"unexpected": True})])
    b, _ = backend(t)
    judge = RubricJudge(b)
    assert judge.score(["q"], ["r"], ["a"]) == [0.0]
    assert judge.take_metrics()["judge_parse_fail"] == 1


def test_bounded_concurrency_and_order():
    t = FakeTransport([ok(r"\boxed{0.5}")], delay=0.05)
    b, _ = backend(t, max_concurrency=3)
    judge = RubricJudge(b)
    t0 = time.perf_counter()
    assert judge.score(["q"] * 12, ["r"] * 12, ["a"] * 12) == [0.5] * 12
    assert t.max_inflight == 3
    assert time.perf_counter() - t0 < 12 * 0.05  # ran concurrently
    b.close()


def test_payload_and_api_key_from_env(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    t = FakeTransport([ok(r"\boxed{1}")])
    b, _ = backend(t, api_key_env="MY_JUDGE_KEY", temperature=0.0, max_tokens=77)
    RubricJudge(b, system="sys").score(["q"], ["r"], ["a"])
    p = t.payloads[0]
    assert p["model"] == "judge" and p["temperature"] == 0.0 and p["max_tokens"] == 77
    assert [m["role"] for m in p["messages"]] == ["system", "user"]
    assert t.headers[0]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in repr(b.cfg)  # the config holds the variable's name only
    monkeypatch.delenv("MY_JUDGE_KEY")
    b.complete([[{"role": "user", "content": "x"}]])
    assert "Authorization" not in t.headers[-1]


def test_key_never_in_error_messages(monkeypatch):
    monkeypatch.setenv("PAPO_JUDGE_API_KEY", "sk-secret-456")
    t = FakeTransport([(401, {"error": "bad key"})])
    b, _ = backend(t)
    with pytest.raises(JudgeRequestError) as err:
        b.complete([[{"role": "user", "content": "x"}]])
    assert "sk-secret" not in str(err.value)


def test_per_request_timeout_against_a_silent_socket():
    """A real socket that accepts and never answers: the httpx transport times out, is retried,
    and the judge is then unreachable."""
    import socket

    pytest.importorskip("httpx")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        cfg = OpenAIJudgeConfig(
            base_url=f"http://127.0.0.1:{port}/v1",
            model="judge",
            timeout=0.3,
            max_retries=1,
            backoff=0.01,
        )
        judge = RubricJudge(OpenAIChatBackend(cfg), on_unreachable="score", unreachable_score=0.5)
        t0 = time.perf_counter()
        assert judge.score(["q"], ["r"], ["a"]) == [0.5]
        assert 0.5 < time.perf_counter() - t0 < 5.0  # two attempts of 0.3 s each
        m = judge.take_metrics()
        assert m["judge_requests"] == 2 and m["judge_unreachable"] == 1
    finally:
        srv.close()


def test_factory_from_env(monkeypatch):
    monkeypatch.setenv("PAPO_JUDGE_MODEL", "gpt-oss-20b")
    monkeypatch.setenv("PAPO_JUDGE_ON_UNREACHABLE", "score")
    judge = load_judge("papo_fast.judge:openai_rubric_judge")
    assert isinstance(judge, RubricJudge) and judge.on_unreachable == "score"
    assert judge.backend.cfg.model == "gpt-oss-20b"


# ----------------------------------------------------------------------------- HF backend


def test_hf_backend_runs_a_tiny_model():
    """An untrained tiny model as an in-process judge: it answers garbage, counted as parse
    failures (scored 0), through the same RubricJudge."""
    from papo_fast.arith import build_model, build_tokenizer
    from papo_fast.judge import HFJudgeBackend

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
