"""The judge's backends: the OpenAI-compatible client (retries, timeouts, failures per response,
configuration errors that stop the run, settings checked when built) over a fake transport and a
real local HTTP server."""

import threading
import time

import pytest

from papo_fast.rewards import JudgeError, compute_rewards, load_judge
from papo_fast.rewards.judge import (
    JudgeConfigError,
    JudgeRequestError,
    JudgeUnreachable,
    OpenAIChatBackend,
    OpenAIJudgeConfig,
    RubricJudge,
    openai_rubric_judge,
)
from papo_fast.rewards.verify import MathVerifier

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
    with pytest.raises(JudgeConfigError, match="404"):
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
    t = FakeTransport([(401, {"error": "bad key sk-secret-456"})])  # a server echoing the key
    b, _ = backend(t)
    with pytest.raises(JudgeConfigError) as err:
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
    judge = load_judge("papo_fast.rewards.judge:openai_rubric_judge")
    assert isinstance(judge, RubricJudge) and judge.on_unreachable == "score"
    assert judge.backend.cfg.model == "gpt-oss-20b"


# ----------------------------------------------------------------------------- judge failures


class ByContent:
    """A fake transport that answers by the response in the prompt: ``rules`` maps a marker
    (e.g. "[too long]") to a (status, body) pair or an exception to raise; else \\boxed{1}."""

    def __init__(self, rules):
        self.rules, self.calls = rules, 0
        self.lock = threading.Lock()

    def __call__(self, url, headers, payload, timeout):
        with self.lock:
            self.calls += 1
        user = payload["messages"][-1]["content"]
        step = next((v for k, v in self.rules.items() if k in user), ok(r"\boxed{1}"))
        if isinstance(step, Exception):
            raise step
        return step


TOO_LONG = (400, {"object": "error", "message": "maximum context length is 8192", "code": 400})
NINE = [r"\boxed{4}"] * 4 + [r"[too long] \boxed{4}"] + [r"\boxed{4}"] * 4


@pytest.mark.parametrize("on_invalid", ["zero", "error"])
@pytest.mark.parametrize(
    "status, body, hint",
    [
        (401, {"error": {"message": "invalid api key"}}, "PAPO_JUDGE_API_KEY"),
        (403, {"error": {"message": "forbidden"}}, "PAPO_JUDGE_API_KEY"),
        (404, {"error": {"message": "The model `judge` does not exist."}}, "does not exist"),
    ],
)
def test_refused_key_or_unknown_model_stops_the_reward_step(status, body, hint, on_invalid):
    """Configuration errors are never scored 0 and counted: PAPO would silently become ORM."""
    t = FakeTransport([(status, body)])
    b, _ = backend(t, max_retries=3)
    judge = RubricJudge(b, on_unreachable="score")  # not an outage: the policy does not apply
    with pytest.raises(JudgeConfigError, match=f"HTTP {status}") as err:
        compute_rewards(
            MathVerifier(), judge, ["2+2"] * 3, [r"\boxed{4}"] * 3, ["4"] * 3, on_invalid
        )
    assert hint in str(err.value) and "'judge'" in str(err.value)  # the model's name
    assert isinstance(err.value, ValueError)  # the command line's clean error path


def test_url_credentials_never_in_error_messages():
    t = FakeTransport([(401, {"error": {"message": "invalid api key"}})])
    cfg = OpenAIJudgeConfig(base_url="https://me:pw-secret@judge.example.com/v1", model="judge")
    with pytest.raises(JudgeConfigError, match="https://judge.example.com/v1") as err:
        OpenAIChatBackend(cfg, transport=t).complete([[{"role": "user", "content": "x"}]])
    assert "pw-secret" not in str(err.value)


def test_one_rejected_request_invalidates_only_its_response():
    t = ByContent({"[too long]": TOO_LONG})
    b, _ = backend(t)
    judge = RubricJudge(b)
    rw = compute_rewards(MathVerifier(), judge, ["2+2"] * 9, NINE, ["4"] * 9)
    assert rw.process == [1.0] * 4 + [0.0] + [1.0] * 4
    assert (rw.judge_calls, rw.judge_invalid) == (9, 1)
    assert t.calls == 9  # not retried
    m = judge.take_metrics()
    assert m["judge_rejected"] == 1 and m["judge_scored"] == 8 and m["judge_unreachable"] == 0
    with pytest.raises(JudgeError, match=r"response 4: HTTP 400 \(maximum context length"):
        compute_rewards(MathVerifier(), judge, ["2+2"] * 9, NINE, ["4"] * 9, "error")
    with pytest.raises(JudgeRequestError) as err:  # the judge alone: its partial scores
        judge.score(["2+2"] * 9, NINE, ["4"] * 9)
    assert err.value.scores == [1.0] * 4 + [None] + [1.0] * 4 and list(err.value.failures) == [4]


def test_rejected_request_is_not_an_outage_under_the_score_policy():
    t = ByContent({"[too long]": TOO_LONG})
    b, _ = backend(t)
    judge = RubricJudge(b, on_unreachable="score", unreachable_score=1.0)
    rw = compute_rewards(MathVerifier(), judge, ["2+2"] * 9, NINE, ["4"] * 9)
    assert rw.process[4] == 0.0 and rw.judge_invalid == 1  # not given the unreachable score


def test_partial_outage_keeps_the_answered_scores():
    t = ByContent({"[lost]": ConnectionResetError("reset by peer")})
    b, _ = backend(t, max_retries=1)
    responses = [r"\boxed{4}", r"[lost] \boxed{4}", r"\boxed{4}"]
    rw = compute_rewards(MathVerifier(), RubricJudge(b), ["2+2"] * 3, responses, ["4"] * 3)
    assert rw.process == [1.0, 0.0, 1.0] and rw.judge_invalid == 1
    with pytest.raises(JudgeError, match="response 1: unreachable"):
        compute_rewards(MathVerifier(), RubricJudge(b), ["2+2"] * 3, responses, ["4"] * 3, "error")


@pytest.mark.parametrize(
    "url",
    [
        "localhost:8000/v1",
        "127.0.0.1:8000",
        "ftp://127.0.0.1:8000/v1",
        "http://",
        "http://127.0.0.1:99999/v1",  # port out of range
        "",
    ],
)
def test_base_url_without_scheme_or_host_is_rejected_when_built(url, monkeypatch):
    with pytest.raises(JudgeConfigError, match=r"OpenAIJudgeConfig\.base_url") as err:
        OpenAIChatBackend(
            OpenAIJudgeConfig(base_url=url, model="judge"), transport=FakeTransport([ok("")])
        )
    assert "http://host:port/v1" in str(err.value) and repr(url) in str(err.value)
    monkeypatch.setenv("PAPO_JUDGE_MODEL", "judge")
    monkeypatch.setenv("PAPO_JUDGE_BASE_URL", url)
    with pytest.raises(JudgeConfigError, match="PAPO_JUDGE_BASE_URL") as err:
        openai_rubric_judge()
    assert "http://host:port/v1" in str(err.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "https://api.example.com/v1/"])
def test_http_and_https_base_urls_are_accepted(url):
    b = OpenAIChatBackend(
        OpenAIJudgeConfig(base_url=url, model="judge"), transport=FakeTransport([ok("")])
    )
    assert b.url == url.rstrip("/") + "/chat/completions"


@pytest.mark.parametrize(
    "var, value",
    [
        ("PAPO_JUDGE_TIMEOUT", "abc"),
        ("PAPO_JUDGE_TIMEOUT", "nan"),
        ("PAPO_JUDGE_TIMEOUT", "inf"),
        ("PAPO_JUDGE_TIMEOUT", "0"),
        ("PAPO_JUDGE_TIMEOUT", "-5"),
        ("PAPO_JUDGE_TIMEOUT", ""),
        ("PAPO_JUDGE_CONCURRENCY", "many"),
        ("PAPO_JUDGE_CONCURRENCY", "0"),
        ("PAPO_JUDGE_CONCURRENCY", "2.5"),
        ("PAPO_JUDGE_RETRIES", "x"),
        ("PAPO_JUDGE_RETRIES", "-1"),
        ("PAPO_JUDGE_MAX_TOKENS", "ten"),
        ("PAPO_JUDGE_MAX_TOKENS", "0"),
        ("PAPO_JUDGE_UNREACHABLE_SCORE", "abc"),
        ("PAPO_JUDGE_UNREACHABLE_SCORE", "0.7"),
        ("PAPO_JUDGE_UNREACHABLE_SCORE", "nan"),
        ("PAPO_JUDGE_ON_UNREACHABLE", "ignore"),
    ],
)
def test_bad_environment_variable_is_named_with_its_value(var, value, monkeypatch):
    monkeypatch.setenv("PAPO_JUDGE_MODEL", "judge")
    monkeypatch.setenv(var, value)
    with pytest.raises(JudgeConfigError) as err:
        load_judge("papo_fast.rewards.judge:openai_rubric_judge")
    assert f"{var}={value!r}" in str(err.value)


def test_missing_model_variable_is_named(monkeypatch):
    monkeypatch.delenv("PAPO_JUDGE_MODEL", raising=False)
    with pytest.raises(JudgeConfigError, match="PAPO_JUDGE_MODEL"):
        openai_rubric_judge()


@pytest.mark.parametrize(
    "field, value",
    [
        ("timeout", float("nan")),
        ("timeout", float("inf")),
        ("timeout", 0.0),
        ("max_concurrency", 0),
        ("max_retries", -1),
        ("max_tokens", 0),
        ("backoff", float("nan")),
        ("temperature", -0.5),
    ],
)
def test_bad_client_setting_is_named_when_built(field, value):
    with pytest.raises(JudgeConfigError, match=rf"OpenAIJudgeConfig\.{field}="):
        OpenAIChatBackend(
            OpenAIJudgeConfig(model="judge", **{field: value}), transport=FakeTransport([ok("")])
        )


def test_only_network_failures_are_retried():
    """A payload that cannot be sent (here: extra_body that is no JSON) is an error at once, not
    an outage retried and then scored by the unreachable policy."""

    def broken(url, headers, payload, timeout):
        raise TypeError("Object of type set is not JSON serializable")

    b = OpenAIChatBackend(OpenAIJudgeConfig(model="m", max_retries=3), transport=broken)
    judge = RubricJudge(b, on_unreachable="score", unreachable_score=1.0)
    with pytest.raises(TypeError, match="not JSON serializable"):
        judge.score(["q"], ["r"], ["a"])
    assert b.take_metrics()["judge_retries"] == 0
