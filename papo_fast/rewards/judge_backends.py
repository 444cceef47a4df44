"""Where the rubric judge's prompts go: an OpenAI-compatible server, a local Hugging Face model, or
any Python callable, behind ``JudgeBackend.complete`` (conversations in, answer texts out).

rewards/judge.py's docstring gives the choices these follow: "Failures per response",
"Configuration errors" (they stop the run) and "OpenAI-compatible client" (retries with backoff,
the API key never stored or shown).
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

from papo_fast.rewards.base import JudgeConfigError

Messages = list[dict]  # [{"role": "system" | "user" | "assistant", "content": str}, ...]


class Rejected(NamedTuple):
    """A backend's answer to a request the server refused: no score for that one
    (rewards/judge.py, choice "Failures per response")."""

    status: int  # HTTP status
    detail: str  # the server's message, shortened, the key masked


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
    """JudgeConfigError naming ``name`` unless ``url`` is http(s)://host[:port][/...]
    (rewards/judge.py, choice "Configuration errors")."""
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
    """JudgeConfigError naming ``name`` unless ``value`` fits ``LIMITS[field]``
    (rewards/judge.py, choice "Configuration errors")."""
    kind, low, inclusive = LIMITS[field]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    number = number and (kind is float or isinstance(value, int)) and math.isfinite(value)
    if not (number and (value >= low if inclusive else value > low)):
        what = "an integer" if kind is int else "a finite number"
        shown = value if shown is None else shown
        raise JudgeConfigError(
            f"{name}={shown!r} must be {what} {'>=' if inclusive else '>'} {low}"
        )


def check_choice(name: str, value, allowed: tuple, shown=None) -> None:
    if value not in allowed:
        shown = value if shown is None else shown
        raise JudgeConfigError(f"{name}={shown!r} must be one of {', '.join(map(repr, allowed))}")


# transport(url, headers, payload, timeout) -> (HTTP status, decoded JSON body or None)
Transport = Callable[[str, dict, dict, float], tuple[int, dict | None]]
# rewards/judge.py, choices "OpenAI-compatible client" (retries) and "Configuration errors":
RETRY_STATUS = {408, 409, 429}  # and 5xx: transient, retried
CONFIG_STATUS = {401, 403, 404, 405}  # and 3xx: the key, the model or the URL is wrong


class HttpxTransport:
    """POST with one pooled httpx.Client (thread-safe, keep-alive across requests)."""

    def __init__(self, max_connections: int):
        import httpx

        limits = httpx.Limits(max_connections=max_connections)
        self.client = httpx.Client(limits=limits)

    def __call__(self, url: str, headers: dict, payload: dict, timeout: float):
        """(status, JSON body or None). A timeout or a broken connection is an OSError
        (TimeoutError, ConnectionError): the only failures the client retries."""
        import httpx

        try:
            r = self.client.post(url, headers=headers, json=payload, timeout=timeout)
        except httpx.TimeoutException as err:
            raise TimeoutError(f"{type(err).__name__}: {err}") from None
        except httpx.TransportError as err:
            raise ConnectionError(f"{type(err).__name__}: {err}") from None
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, None


class OpenAIChatBackend(JudgeBackend):
    """Chat completions against an OpenAI-compatible endpoint (rewards/judge.py, choices
    "Failures per response", "Configuration errors" and "OpenAI-compatible client").

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
            except OSError:  # timeout, refused or reset connection: retried. Anything else (a
                continue  # payload that is no JSON, a bug) is no outage and propagates.
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
            return Rejected(status, self._detail(body))  # this request only (see Rejected)
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

        from papo_fast.batching import pad_ids

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        out: list[str | None] = []
        for s in range(0, len(conversations), self.batch_size):
            ids = [
                self.tok(self._text(m))["input_ids"] for m in conversations[s : s + self.batch_size]
            ]
            x, attn, _ = pad_ids(ids, pad, left=True)
            width = x.shape[1]
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
