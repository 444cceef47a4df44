"""The demo task: multi-step integer arithmetic with its steps written out.

    prompt    "17+5-8+9=?\n"
    response  "17+5=22\n22-8=14\n14+9=23\nAnswer: 23"         every step written: rubric 1
              "17+5-8=14\n14+9=23\nAnswer: 23"                 a step skipped:      rubric 0.5
              "17+5=21\n22-8=14\n14+9=23\nAnswer: 23"         a slip, right end:   rubric 0.5
              anything whose answer is wrong or missing:        verifier 0, rubric not called

Everything is made here, offline and seeded: the problems (running totals stay in [0, MAX_VALUE];
the held-out split has longer chains than training), a character-level tokenizer built with the
`tokenizers` library and wrapped in a PreTrainedTokenizerFast, a tiny Qwen2 config (head_dim 32),
and the warm-up traces of mixed process quality. The verifier is the generic
``rewards.AnswerLineVerifier``; the rubric (``ArithRubricJudge``) recomputes the steps.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from papo_fast.rewards.base import Judge, parse_answer_line, register_judge

MAX_VALUE = 50  # running totals stay in [0, MAX_VALUE]
MAX_OPERAND = 9  # one-digit operands: a tiny model learns the steps in a minute
EOS, PAD = "<|endoftext|>", "<|pad|>"  # Qwen2's end-of-text name: no token added on load
SPECIALS = [EOS, PAD]
CHARS = list("0123456789+-=?\n :Answer")


# ----------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]  # first value, then one operand per operation
    ops: tuple[str, ...]  # "+" or "-", len(numbers) - 1

    @property
    def text(self) -> str:
        out = str(self.numbers[0])
        for op, n in zip(self.ops, self.numbers[1:], strict=True):
            out += f"{op}{n}"
        return out

    def totals(self) -> list[int]:
        """Running totals after each operation; the last one is the answer."""
        acc, out = self.numbers[0], []
        for op, n in zip(self.ops, self.numbers[1:], strict=True):
            acc = acc + n if op == "+" else acc - n
            out.append(acc)
        return out

    @property
    def answer(self) -> int:
        return self.totals()[-1]


def make_problem(rng: random.Random, num_ops: int) -> Problem:
    """A chain of ``num_ops`` operations whose running totals stay in [0, MAX_VALUE]."""
    acc = rng.randint(1, MAX_OPERAND)
    numbers, ops = [acc], []
    for _ in range(num_ops):
        choices = [op for op in "+-" if (acc + 1 <= MAX_VALUE if op == "+" else acc >= 1)]
        op = rng.choice(choices)
        hi = min(MAX_OPERAND, MAX_VALUE - acc) if op == "+" else min(MAX_OPERAND, acc)
        n = rng.randint(1, hi)
        acc = acc + n if op == "+" else acc - n
        numbers.append(n)
        ops.append(op)
    return Problem(tuple(numbers), tuple(ops))


def parse_problem(text: str) -> Problem:
    """Inverse of Problem.text (accepts the prompt form "...=?")."""
    text = text.strip().removesuffix("=?").strip()
    tokens = re.findall(r"[+-]|\d+", text)
    if not tokens or not tokens[0].isdigit():
        raise ValueError(f"not an arithmetic chain: {text!r}")
    return Problem(tuple(int(t) for t in tokens[0::2]), tuple(tokens[1::2]))


def prompt_text(p: Problem) -> str:
    return f"{p.text}=?\n"


def make_split(seed: int, n: int, min_ops: int, max_ops: int) -> list[dict]:
    """``n`` records {"problem", "answer", "ops"}; chain lengths (ops, the number of operations)
    uniform in [min_ops, max_ops]."""
    rng = random.Random(seed)
    probs = [make_problem(rng, rng.randint(min_ops, max_ops)) for _ in range(n)]
    return [{"problem": p.text, "answer": str(p.answer), "ops": len(p.ops)} for p in probs]


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- traces


def full_trace(p: Problem) -> str:
    lines, prev = [], p.numbers[0]
    for op, n, total in zip(p.ops, p.numbers[1:], p.totals(), strict=True):
        lines.append(f"{prev}{op}{n}={total}")
        prev = total
    return "\n".join(lines + [f"Answer: {p.answer}"])


def skip_trace(p: Problem, rng: random.Random) -> str:
    """Two consecutive operations written as one line (needs >= 2 operations)."""
    k = rng.randrange(len(p.ops) - 1)  # merge operations k and k+1
    totals, lines, prev, i = p.totals(), [], p.numbers[0], 0
    while i < len(p.ops):
        if i == k:
            expr = f"{prev}{p.ops[i]}{p.numbers[i + 1]}{p.ops[i + 1]}{p.numbers[i + 2]}"
            lines.append(f"{expr}={totals[i + 1]}")
            prev, i = totals[i + 1], i + 2
        else:
            lines.append(f"{prev}{p.ops[i]}{p.numbers[i + 1]}={totals[i]}")
            prev, i = totals[i], i + 1
    return "\n".join(lines + [f"Answer: {p.answer}"])


def slip_trace(p: Problem, rng: random.Random) -> str:
    """One intermediate result written wrong; the next line goes on from the right value."""
    k = rng.randrange(len(p.ops) - 1)  # never the last step: the trace still ends right
    lines, prev = [], p.numbers[0]
    for i, (op, n, total) in enumerate(zip(p.ops, p.numbers[1:], p.totals(), strict=True)):
        shown = total + rng.choice([-10, -2, -1, 1, 2, 10]) if i == k else total
        lines.append(f"{prev}{op}{n}={shown}")
        prev = total
    return "\n".join(lines + [f"Answer: {p.answer}"])


def warmup_traces(seed: int, n: int, min_ops: int, max_ops: int, mix=(0.5, 0.25, 0.25)):
    """``n`` (prompt, response) pairs: full / skip / slip traces in proportions ``mix``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = make_problem(rng, rng.randint(min_ops, max_ops))
        u = rng.random()
        if len(p.ops) < 2 or u < mix[0]:
            resp = full_trace(p)
        elif u < mix[0] + mix[1]:
            resp = skip_trace(p, rng)
        else:
            resp = slip_trace(p, rng)
        out.append((prompt_text(p), resp))
    return out


# ----------------------------------------------------------------------------- rubric

_STEP = re.compile(r"^(\d+)([+-])(\d+)=(-?\d+)$")


def rubric_score(problem: str | Problem, response: str) -> float:
    """The 3-tier process score of a response (called for correct answers only).

    1 = one line per operation, in order, each "prev op n = total" with prev the previous true
    total, then "Answer: N" right; 0.5 = right answer otherwise (a step skipped, merged, wrong or
    extra); 0 = wrong or missing answer (so a stray call on a wrong response is harmless).
    """
    p = parse_problem(problem) if isinstance(problem, str) else problem
    if parse_answer_line(response) != str(p.answer):
        return 0.0
    lines = [ln.strip() for ln in response.strip().split("\n")]
    steps = lines[:-1]
    if len(steps) != len(p.ops):
        return 0.5
    prev = p.numbers[0]
    for line, op, n, total in zip(steps, p.ops, p.numbers[1:], p.totals(), strict=True):
        m = _STEP.match(line)
        if m is None or (int(m[1]), m[2], int(m[3]), int(m[4])) != (prev, op, n, total):
            return 0.5
        prev = total
    return 1.0


class ArithRubricJudge(Judge):
    """Programmatic rubric judge for the demo task (``rubric_score`` per response)."""

    def score(self, problems: list[str], responses: list[str], answers: list[str]) -> list[float]:
        return [rubric_score(q, r) for q, r in zip(problems, responses, strict=True)]


# ----------------------------------------------------------------------------- model


register_judge("arith_rubric", ArithRubricJudge)  # reward.judge: arith_rubric


def _byte_char(c: str) -> str:
    """GPT-2 byte-level alphabet: printable ASCII as is, space -> "Ġ", newline -> "Ċ"."""
    return {" ": "\u0120", "\n": "\u010a"}.get(c, c)


def build_tokenizer():
    """A character-level tokenizer made with `tokenizers`, wrapped for transformers.

    It is byte-level BPE with no merges, with exactly the normalizer, pre-tokenizer and decoder of
    Qwen2's tokenizer: saved next to a Qwen2 config, AutoTokenizer loads it back as a
    Qwen2Tokenizer, and it must encode the same way there.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    chars = sorted({_byte_char(c) for c in CHARS})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))  # no merges: characters
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=EOS, bos_token=None
    )


def build_model(tokenizer, hidden_size=128, layers=3, seed=0, max_positions=256):
    """A tiny Qwen2 (head_dim 32, grouped-query attention) with tied embeddings, float32."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = hidden_size // 32
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)
