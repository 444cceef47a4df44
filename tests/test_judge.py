"""The rubric judge without a server: prompt, score parsing on canned answers, the callable and HF
backends, and the OpenAI client's retries, timeouts, concurrency and unreachable policy on a fake
transport."""

import json
import threading
import time

import pytest

from papo_fast.rewards import JudgeError, Outcome, Verifier, compute_rewards, load_judge
from papo_fast.rewards.judge import (
    RUBRIC_PROMPT,
    CallableBackend,
    JudgeConfigError,
    JudgeRequestError,
    JudgeUnreachable,
    OpenAIChatBackend,
    OpenAIJudgeConfig,
    RubricJudge,
    build_prompt,
    openai_rubric_judge,
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


# ----------------------------------------------------------------------------- a real HTTP server


class FakeOpenAIServer:
    """A local OpenAI-compatible chat endpoint: 401 unless the key is "sk-good", 404 for a model
    other than "judge", 400 for a prompt holding "[too long]", otherwise \\boxed{1}."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    status, out = 404, {"detail": "Not Found"}
                elif self.headers.get("Authorization") != "Bearer sk-good":
                    status, out = 401, {"error": {"message": "invalid api key"}}
                elif body["model"] != "judge":
                    status, out = 404, {"error": {"message": "The model does not exist."}}
                elif "[too long]" in body["messages"][-1]["content"]:
                    status, out = TOO_LONG
                else:
                    status, out = ok(r"\boxed{1}")
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge_env(monkeypatch):
    """The PAPO_JUDGE_* variables of a working judge on a fake local server."""
    pytest.importorskip("httpx")
    server = FakeOpenAIServer()
    for var, value in {
        "PAPO_JUDGE_BASE_URL": server.url,
        "PAPO_JUDGE_MODEL": "judge",
        "PAPO_JUDGE_API_KEY": "sk-good",
        "PAPO_JUDGE_RETRIES": "1",
    }.items():
        monkeypatch.setenv(var, value)
    yield server
    server.close()


def test_failures_over_http_from_the_environment(judge_env, monkeypatch):
    judge = openai_rubric_judge()
    rw = compute_rewards(MathVerifier(), judge, ["2+2"] * 9, NINE, ["4"] * 9)
    assert rw.process == [1.0] * 4 + [0.0] + [1.0] * 4 and rw.judge_invalid == 1
    monkeypatch.setenv("PAPO_JUDGE_API_KEY", "sk-wrong")
    with pytest.raises(JudgeConfigError, match="HTTP 401") as err:
        compute_rewards(MathVerifier(), judge, ["2+2"], [r"\boxed{4}"], ["4"])
    assert "sk-wrong" not in str(err.value)
    monkeypatch.setenv("PAPO_JUDGE_API_KEY", "sk-good")
    monkeypatch.setenv("PAPO_JUDGE_MODEL", "no-such-model")
    with pytest.raises(JudgeConfigError, match="HTTP 404.*'no-such-model'"):
        compute_rewards(MathVerifier(), openai_rubric_judge(), ["2+2"], [r"\boxed{4}"], ["4"])
    monkeypatch.setenv("PAPO_JUDGE_MODEL", "judge")
    monkeypatch.setenv("PAPO_JUDGE_BASE_URL", judge_env.url.removesuffix("/v1"))  # no /v1
    with pytest.raises(JudgeConfigError, match="HTTP 404.*PAPO_JUDGE_BASE_URL"):
        compute_rewards(MathVerifier(), openai_rubric_judge(), ["2+2"], [r"\boxed{4}"], ["4"])


class AlwaysRight(Verifier):
    """Every response correct: every one goes to the judge."""

    def verify(self, problems, responses, answers):
        return [Outcome(1.0, True) for _ in responses]


@pytest.mark.usefixtures("one_thread")
def test_training_run_stops_with_exit_code_2_on_a_refused_key(
    judge_env, monkeypatch, tmp_path, capsys
):
    """The whole command: a refused key ends `papo-fast train` with the reason, exit code 2,
    instead of a run whose process scores are all 0."""
    import yaml

    from papo_fast.cli import main
    from papo_fast.rewards import base as rewards
    from papo_fast.tasks import arith

    tok = arith.build_tokenizer()
    tok.save_pretrained(tmp_path / "model")
    arith.build_model(tok, hidden_size=64, layers=1, seed=0).save_pretrained(tmp_path / "model")
    arith.write_jsonl(arith.make_split(0, 8, 2, 3), tmp_path / "train.jsonl")
    monkeypatch.setitem(rewards.VERIFIERS, "always_right", AlwaysRight)
    config = {
        "model": {"path": str(tmp_path / "model")},
        "data": {"train_path": str(tmp_path / "train.jsonl")},
        "rollout": {"group_size": 2, "max_new_tokens": 4},
        "reward": {
            "verifier": "always_right",
            "judge": "papo_fast.rewards.judge:openai_rubric_judge",
        },
        "train": {
            "out_dir": str(tmp_path / "run"),
            "steps": 1,
            "prompts_per_step": 2,
            "mini_batches": 1,
            "micro_batch_size": 4,
            "progress": False,
        },
    }
    (tmp_path / "papo.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("PAPO_JUDGE_API_KEY", "sk-wrong")
    assert main(["train", str(tmp_path / "papo.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("papo-fast: error: ") and "HTTP 401" in err
    assert "PAPO_JUDGE_API_KEY" in err and "sk-wrong" not in err
