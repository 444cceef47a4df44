"""The rubric judge: an LLM scores each correct response's reasoning 0, 0.5 or 1.

    cfg = OpenAIJudgeConfig(base_url="http://127.0.0.1:8000/v1", model="judge")
    judge = RubricJudge(OpenAIChatBackend(cfg), on_unreachable="score", unreachable_score=1.0)
    scores = judge.score(problems, responses, answers)    # the rewards.Judge interface
    judge.take_metrics()    # {"judge_requests": .., "judge_parse_fail": .., ...}, then reset

In a config: ``reward.judge: "papo_fast.judge:openai_rubric_judge"`` builds the OpenAI-compatible
judge from PAPO_JUDGE_* environment variables (see ``openai_rubric_judge``).

Choices:
1. The prompt is ours (``RUBRIC_PROMPT``): the paper's three tiers, the problem, the reference
   answer (and a reference solution when the caller passes one), and the student's solution with
   its reasoning blocks (<think>...</think>) removed. The judge is told the answer was already
   verified correct: it grades the process only. Fields are substituted by name ({problem},
   {answer}, {reference}, {response}); other braces (\\boxed{}) are left alone.
2. The score is the last \\boxed{} of the judge's answer, after its own reasoning blocks are
   removed; failing that, the last "score: X" (``fallback_pattern``). 1, 1.0, 0.5, .5, 1/2,
   \\frac{1}{2}, 0 are read; anything else is a parse failure: score 0, counted.
3. Failures count per response. Unreachable (every retry failed): ``on_unreachable="raise"``
   (default) leaves that response without a score, and the trainer's reward.on_invalid policy
   decides (rewards.py: scored 0 and counted, or training stops); ``on_unreachable="score"`` gives
   it ``unreachable_score`` (the paper: 1.0) and counts it. A request the server refuses (HTTP 400,
   413, 422...: a prompt over the judge's context) leaves that response without a score under
   either policy (counted as ``judge_rejected``): it is no outage. The responses without a score
   come back as a JudgeUnreachable or JudgeRequestError holding the others' scores, so one failed
   request never costs the batch its scores.
4. Configuration errors stop the run: a refused key (HTTP 401/403), an unknown model or path
   (404), a URL that is no chat-completions endpoint (405, redirects) raise JudgeConfigError,
   which the reward step never turns into scores of 0 (that would silently train ORM). Settings
   are checked when the client is built: the base URL must be http(s)://host[:port]/..., the
   numbers finite and in range, and every PAPO_JUDGE_* variable is named with its bad value.
5. The OpenAI-compatible client sends one chat-completion per response, at most
   ``max_concurrency`` in flight, each with its own timeout; timeouts, connection errors, 408,
   409, 429 and 5xx are retried ``max_retries`` times with exponential backoff and jitter. The API
   key is read from the environment variable named by ``api_key_env`` when a request is built and
   is never stored in the config, logged or put in an error message (a server's message that
   echoes it has it masked).
"""

from __future__ import annotations

import math
import os
import random
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

from papo_fast.rewards import TIERS, Judge, JudgeConfigError, JudgePartialFailure
from papo_fast.verify import last_boxed, strip_reasoning

Messages = list[dict]  # [{"role": "system" | "user" | "assistant", "content": str}, ...]

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
    """Some responses got no answer after every retry and the policy is "raise" (choice 3):
    ``scores`` holds the others' scores, None for those."""


class JudgeRequestError(JudgePartialFailure):
    """The judge server refused some requests (HTTP 400, 413, 422...; choice 3): ``scores`` holds
    the others' scores, None for those."""


class Rejected(NamedTuple):
    """A backend's answer to a request the server refused (choice 3): no score for that one."""

    status: int  # HTTP status
    detail: str  # the server's message, shortened, the key masked


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
    """The tier in the judge's answer (choice 2): 0.0, 0.5, 1.0, or None when unparseable."""
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
    """The judge's user message (choice 1): named fields substituted, other braces untouched."""
    reference = REFERENCE_BLOCK.replace("{solution}", solution.strip()) if solution else ""
    fields = {
        "{problem}": problem.strip(),
        "{answer}": str(answer).strip(),
        "{reference}": reference,
        "{response}": strip_reasoning(response),
    }
    return re.sub("|".join(map(re.escape, fields)), lambda m: fields[m[0]], template)


# ----------------------------------------------------------------------------- backends


class JudgeBackend(ABC):
    """Interface: one answer text per conversation, in order; None: unreachable after retries;
    a Rejected: the server refused that request. A configuration error raises JudgeConfigError."""

    @abstractmethod
    def complete(self, conversations: list[Messages]) -> list[str | None | Rejected]:
        """One answer text (or None, or Rejected) per conversation."""

    def take_metrics(self) -> dict[str, float]:
        return {}


class CallableBackend(JudgeBackend):
    """A Python function ``fn(messages) -> str`` (a local model, a rule, a test double)."""

    def __init__(self, fn: Callable[[Messages], str]):
        self.fn = fn

    def complete(self, conversations):
        return [self.fn(msgs) for msgs in conversations]


@dataclass
class OpenAIJudgeConfig:
    """The OpenAI-compatible client's settings, checked when OpenAIChatBackend is built."""

    base_url: str = "http://127.0.0.1:8000/v1"  # an OpenAI-compatible server (vllm serve, ...)
    model: str = ""  # the served model name
    api_key_env: str = "PAPO_JUDGE_API_KEY"  # NAME of the variable holding the key (optional)
    temperature: float = 0.0
    max_tokens: int = 1024
    max_concurrency: int = 32  # requests in flight
    timeout: float = 120.0  # seconds per request
    max_retries: int = 3  # after the first attempt
    backoff: float = 1.0  # seconds before the first retry, doubled each time, +-50% jitter
    backoff_max: float = 30.0
    extra_body: dict = field(default_factory=dict)  # e.g. {"chat_template_kwargs": {...}}


# OpenAIJudgeConfig's numbers: field -> (type, lowest allowed value, whether that value is allowed)
LIMITS = {
    "temperature": (float, 0, True),
    "max_tokens": (int, 1, True),
    "max_concurrency": (int, 1, True),
    "timeout": (float, 0, False),
    "max_retries": (int, 0, True),
    "backoff": (float, 0, True),
    "backoff_max": (float, 0, True),
}
URL_FORM = (
    "http://host:port/v1 (the server's OpenAI-compatible root, e.g. http://127.0.0.1:8000/v1)"
)


def check_base_url(url, name: str) -> None:
    """JudgeConfigError naming ``name`` unless ``url`` is http(s)://host[:port][/...] (choice 4)."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        ok = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)
        ok = ok and (parts.port is None or parts.port > 0)  # .port raises when out of range
    except ValueError:
        ok = False
    if not ok:
        raise JudgeConfigError(
            f"{name}={url!r} is not an http(s) URL with a host: expected the form {URL_FORM}"
        )


def check_number(name: str, value, field: str, shown=None) -> None:
    """JudgeConfigError naming ``name`` unless ``value`` fits ``LIMITS[field]`` (choice 4)."""
    kind, low, inclusive = LIMITS[field]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    number = number and (kind is float or isinstance(value, int)) and math.isfinite(value)
    if not (number and (value >= low if inclusive else value > low)):
        what = "an integer" if kind is int else "a finite number"
        shown = value if shown is None else shown
        raise JudgeConfigError(
            f"{name}={shown!r} must be {what} {'>=' if inclusive else '>'} {low}"
        )


def _check_choice(name: str, value, allowed: tuple, shown=None) -> None:
    if value not in allowed:
        shown = value if shown is None else shown
        raise JudgeConfigError(f"{name}={shown!r} must be one of {', '.join(map(repr, allowed))}")


# transport(url, headers, payload, timeout) -> (HTTP status, decoded JSON body or None)
Transport = Callable[[str, dict, dict, float], tuple[int, dict | None]]
RETRY_STATUS = {408, 409, 429}  # and 5xx: transient, retried
CONFIG_STATUS = {401, 403, 404, 405}  # and 3xx: the key, the model or the URL is wrong (choice 4)


class HttpxTransport:
    """POST with one pooled httpx.Client (thread-safe, keep-alive across requests)."""

    def __init__(self, max_connections: int):
        import httpx

        limits = httpx.Limits(max_connections=max_connections)
        self.client = httpx.Client(limits=limits)

    def __call__(self, url: str, headers: dict, payload: dict, timeout: float):
        r = self.client.post(url, headers=headers, json=payload, timeout=timeout)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, None


class OpenAIChatBackend(JudgeBackend):
    """Chat completions against an OpenAI-compatible endpoint (choices 3 to 5).

    Args:
        cfg: endpoint, model, sampling and client limits.
        transport: replaces the HTTP layer (tests pass a fake one); default: httpx.
        sleep: replaces time.sleep for the backoff (tests).
    """

    def __init__(
        self,
        cfg: OpenAIJudgeConfig,
        transport: Transport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not cfg.model:
            raise JudgeConfigError("OpenAIJudgeConfig.model is empty: name the served judge model")
        check_base_url(cfg.base_url, "OpenAIJudgeConfig.base_url")
        for name in LIMITS:
            check_number(f"OpenAIJudgeConfig.{name}", getattr(cfg, name), name)
        self.cfg, self.sleep = cfg, sleep
        self.transport = transport or HttpxTransport(cfg.max_concurrency)
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.pool = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="judge")
        self._lock = threading.Lock()
        self._metrics = {"judge_requests": 0, "judge_retries": 0, "judge_request_s": 0.0}

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _detail(self, body) -> str:
        """The server's error message, on one line, the key masked, at most 200 characters."""
        err = body.get("error") if isinstance(body, dict) else None
        msg = err.get("message") if isinstance(err, dict) else err
        if msg is None and isinstance(body, dict):
            msg = body.get("message") or body.get("detail")
        text = " ".join(str(msg).split()) if msg else ""
        key = os.environ.get(self.cfg.api_key_env)
        return (text.replace(key, "***") if key else text)[:200]

    def _config_error(self, status: int, body) -> JudgeConfigError:
        c, detail = self.cfg, self._detail(body)
        parts = urlsplit(c.base_url)  # user:password@ left out of the message
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        head = f"judge server {url} answered HTTP {status} for model {c.model!r}"
        head += f" ({detail})" if detail else ""
        if status in (401, 403):
            state = "set" if os.environ.get(c.api_key_env) else "not set"
            fix = f"the API key was refused: put it in the environment variable {c.api_key_env}"
            fix += f" ({state} now)"
        elif status == 404:
            fix = (
                "no such model or path: check the served model name (OpenAIJudgeConfig.model, "
                "PAPO_JUDGE_MODEL) and the base URL (OpenAIJudgeConfig.base_url, "
                f"PAPO_JUDGE_BASE_URL), of the form {URL_FORM}"
            )
        else:
            fix = (
                "the base URL (OpenAIJudgeConfig.base_url, PAPO_JUDGE_BASE_URL) leads to no "
                f"chat-completions endpoint: expected the form {URL_FORM}"
            )
        return JudgeConfigError(f"{head}: {fix}")

    def _count(self, key: str, value: float = 1) -> None:
        with self._lock:
            self._metrics[key] += value

    def _one(self, messages: Messages) -> str | None | Rejected:
        c = self.cfg
        payload = {
            "model": c.model,
            "messages": messages,
            "temperature": c.temperature,
            "max_tokens": c.max_tokens,
            **c.extra_body,
        }
        for attempt in range(c.max_retries + 1):
            if attempt:
                self._count("judge_retries")
                delay = min(c.backoff * 2 ** (attempt - 1), c.backoff_max)
                self.sleep(delay * random.uniform(0.5, 1.5))
            t0 = time.perf_counter()
            try:
                status, body = self.transport(self.url, self._headers(), payload, c.timeout)
            except Exception:  # timeout, refused or reset connection: retried
                continue
            finally:
                self._count("judge_requests")
                self._count("judge_request_s", time.perf_counter() - t0)
            if status == 200:
                try:
                    return body["choices"][0]["message"]["content"] or ""
                except (KeyError, IndexError, TypeError):
                    return ""  # a malformed answer: a parse failure, not an outage
            if status in RETRY_STATUS or status >= 500:
                continue
            if status in CONFIG_STATUS or 300 <= status < 400:
                raise self._config_error(status, body)
            return Rejected(status, self._detail(body))  # this request only (choice 3)
        return None

    def complete(self, conversations):
        return list(self.pool.map(self._one, conversations))

    def close(self) -> None:
        """Stop the worker threads and close the HTTP connections."""
        self.pool.shutdown()
        client = getattr(self.transport, "client", None)
        if client is not None:
            client.close()

    def take_metrics(self):
        with self._lock:
            out = dict(self._metrics)
            self._metrics = dict.fromkeys(self._metrics, 0)
        return out


class HFJudgeBackend(JudgeBackend):
    """An in-process Hugging Face causal LM as the judge (greedy, chat template when it has one).

    Args:
        model: a model or a local path loaded with from_pretrained.
        tokenizer: its tokenizer (loaded from ``model`` when it is a path).
        max_new_tokens: length of the judge's answer.
        batch_size: conversations per generate call.
    """

    def __init__(self, model, tokenizer=None, max_new_tokens: int = 512, batch_size: int = 8):
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model)
        if tokenizer is None:
            raise ValueError("HFJudgeBackend needs the tokenizer of the model")
        self.model, self.tok = model.eval(), tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def _text(self, messages: Messages) -> str:
        if self.tok.chat_template:
            return self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    def complete(self, conversations):
        import torch

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        out: list[str | None] = []
        for s in range(0, len(conversations), self.batch_size):
            ids = [
                self.tok(self._text(m))["input_ids"] for m in conversations[s : s + self.batch_size]
            ]
            width = max(map(len, ids))
            x = torch.full((len(ids), width), pad, dtype=torch.long)
            attn = torch.zeros_like(x)
            for i, row in enumerate(ids):  # left padding
                x[i, width - len(row) :] = torch.tensor(row)
                attn[i, width - len(row) :] = 1
            with torch.no_grad():
                seq = self.model.generate(
                    input_ids=x,
                    attention_mask=attn,
                    do_sample=False,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=pad,
                )
            out += self.tok.batch_decode(seq[:, width:], skip_special_tokens=True)
        return out


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
            counted); choice 3.
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
        _check_choice("on_unreachable", on_unreachable, UNREACHABLE_POLICIES)
        _check_choice("unreachable_score", unreachable_score, TIERS)
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
        """One tier per response; every response passed is assumed correct (rewards.py).

        Raises:
            JudgeUnreachable, JudgeRequestError: some responses have no score (choice 3); the
                exception holds every score, None for those, and why each one failed.
            JudgeConfigError: the key, the model or the URL is wrong (choice 4).
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
    _check_choice("PAPO_JUDGE_ON_UNREACHABLE", on_unreachable, UNREACHABLE_POLICIES)
    unreachable_score = _env_float("PAPO_JUDGE_UNREACHABLE_SCORE", 1.0)
    shown = env("PAPO_JUDGE_UNREACHABLE_SCORE")
    _check_choice("PAPO_JUDGE_UNREACHABLE_SCORE", unreachable_score, TIERS, shown)
    cfg = OpenAIJudgeConfig(base_url=base_url, model=model, **numbers)
    return RubricJudge(
        OpenAIChatBackend(cfg), on_unreachable=on_unreachable, unreachable_score=unreachable_score
    )
