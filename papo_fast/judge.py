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
3. Unreachable judge (every retry failed): ``on_unreachable="raise"`` (default) raises
   JudgeUnreachable, and the trainer's reward.on_invalid policy decides (rewards.py: the batch is
   scored 0 and counted, or training stops); ``on_unreachable="score"`` gives that response
   ``unreachable_score`` (the paper: 1.0) and counts it. Client errors (HTTP 400/401/403/404: a
   wrong model name or key) always raise: they are configuration errors, not outages.
4. The OpenAI-compatible client sends one chat-completion per response, at most
   ``max_concurrency`` in flight, each with its own timeout; timeouts, connection errors, 408,
   409, 429 and 5xx are retried ``max_retries`` times with exponential backoff and jitter. The API
   key is read from the environment variable named by ``api_key_env`` when a request is built and
   is never stored in the config, logged or put in an error message.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from papo_fast.rewards import Judge
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


class JudgeUnreachable(RuntimeError):
    """The judge gave no answer after every retry, and the policy is "raise"."""


class JudgeRequestError(RuntimeError):
    """The judge server rejected a request (HTTP 4xx other than 408/409/429): a config error."""


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
    """Interface: one answer text per conversation, in order; None: unreachable after retries."""

    @abstractmethod
    def complete(self, conversations: list[Messages]) -> list[str | None]:
        """One answer text per conversation."""

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


# transport(url, headers, payload, timeout) -> (HTTP status, decoded JSON body or None)
Transport = Callable[[str, dict, dict, float], tuple[int, dict | None]]
RETRY_STATUS = {408, 409, 429}


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
    """Chat completions against an OpenAI-compatible endpoint (choice 4).

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
            raise ValueError("OpenAIJudgeConfig.model is empty: name the served judge model")
        if cfg.max_concurrency < 1 or cfg.timeout <= 0 or cfg.max_retries < 0:
            raise ValueError("max_concurrency >= 1, timeout > 0 and max_retries >= 0 are required")
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

    def _count(self, key: str, value: float = 1) -> None:
        with self._lock:
            self._metrics[key] += value

    def _one(self, messages: Messages) -> str | None:
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
            raise JudgeRequestError(f"judge server answered HTTP {status} for model {c.model!r}")
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
        on_unreachable: "raise" (JudgeUnreachable) or "score" (``unreachable_score``, counted).
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
        if on_unreachable not in ("raise", "score"):
            raise ValueError(f"on_unreachable must be 'raise' or 'score', got {on_unreachable!r}")
        if unreachable_score not in (0.0, 0.5, 1.0):
            raise ValueError(f"unreachable_score must be 0, 0.5 or 1, got {unreachable_score!r}")
        if "{response}" not in template:
            raise ValueError("the judge template must contain {response}")
        self.backend = backend if isinstance(backend, JudgeBackend) else CallableBackend(backend)
        self.template, self.system, self.fallback_pattern = template, system, fallback_pattern
        self.on_unreachable, self.unreachable_score = on_unreachable, float(unreachable_score)
        self._metrics = {"judge_scored": 0, "judge_parse_fail": 0, "judge_unreachable": 0}

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
        """One tier per response; every response passed is assumed correct (rewards.py)."""
        solutions = solutions if solutions is not None else [None] * len(responses)
        convs = [
            self.messages(p, r, a, s)
            for p, r, a, s in zip(problems, responses, answers, solutions, strict=True)
        ]
        replies = self.backend.complete(convs) if convs else []
        scores = []
        for reply in replies:
            if reply is None:
                self._metrics["judge_unreachable"] += 1
                if self.on_unreachable == "raise":
                    raise JudgeUnreachable("the judge did not answer after every retry")
                scores.append(self.unreachable_score)
                continue
            tier = parse_score(reply, self.fallback_pattern)
            if tier is None:
                self._metrics["judge_parse_fail"] += 1
            scores.append(0.0 if tier is None else tier)
        self._metrics["judge_scored"] += len(scores)
        return scores

    def take_metrics(self) -> dict[str, float]:
        """Counters since the last call (judge's and backend's), then reset."""
        out = {**self._metrics, **self.backend.take_metrics()}
        self._metrics = dict.fromkeys(self._metrics, 0)
        return out


def openai_rubric_judge() -> RubricJudge:
    """A RubricJudge over an OpenAI-compatible server, configured from the environment.

    PAPO_JUDGE_BASE_URL (default http://127.0.0.1:8000/v1), PAPO_JUDGE_MODEL (required),
    PAPO_JUDGE_API_KEY (the key, if the server wants one), PAPO_JUDGE_CONCURRENCY (32),
    PAPO_JUDGE_TIMEOUT (seconds, 120), PAPO_JUDGE_RETRIES (3), PAPO_JUDGE_MAX_TOKENS (1024),
    PAPO_JUDGE_ON_UNREACHABLE ("raise" | "score"), PAPO_JUDGE_UNREACHABLE_SCORE (1.0).
    """
    env = os.environ.get
    cfg = OpenAIJudgeConfig(
        base_url=env("PAPO_JUDGE_BASE_URL", OpenAIJudgeConfig.base_url),
        model=env("PAPO_JUDGE_MODEL", ""),
        max_concurrency=int(env("PAPO_JUDGE_CONCURRENCY", "32")),
        timeout=float(env("PAPO_JUDGE_TIMEOUT", "120")),
        max_retries=int(env("PAPO_JUDGE_RETRIES", "3")),
        max_tokens=int(env("PAPO_JUDGE_MAX_TOKENS", "1024")),
    )
    return RubricJudge(
        OpenAIChatBackend(cfg),
        on_unreachable=env("PAPO_JUDGE_ON_UNREACHABLE", "raise"),
        unreachable_score=float(env("PAPO_JUDGE_UNREACHABLE_SCORE", "1.0")),
    )
