"""The demo task: problems, traces, the rubric and the verifier on hand-written responses."""

import random

import pytest

from papo_fast.rewards import AnswerLineVerifier
from papo_fast.tasks import arith

# 17+25-8+31: running totals 42, 34, 65
PROBLEM = "17+25-8+31"
FULL = "17+25=42\n42-8=34\n34+31=65\nAnswer: 65"


@pytest.mark.parametrize(
    "response, score",
    [
        (FULL, 1.0),  # every step written and right
        ("17+25=42\n42-8=34\n34+31=65\nAnswer:65", 1.0),  # spacing after "Answer:" is free
        ("17+25-8=34\n34+31=65\nAnswer: 65", 0.5),  # two operations merged: a step skipped
        ("17+25=43\n42-8=34\n34+31=65\nAnswer: 65", 0.5),  # a slip (43) that still ends right
        ("17+25=42\n34+31=65\nAnswer: 65", 0.5),  # a step missing
        ("Answer: 65", 0.5),  # no steps at all, right answer
        ("17+25=42\n42+8=50\n50+31=81\nAnswer: 65", 0.5),  # wrong operator, right answer
        ("17+25=42\n42-8=34\n34+31=66\nAnswer: 66", 0.0),  # wrong answer
        ("17+25=42\n42-8=34\n34+31=65", 0.0),  # no answer line
    ],
)
def test_rubric_on_hand_written_traces(response, score):
    assert arith.rubric_score(PROBLEM, response) == score


@pytest.mark.parametrize(
    "response, correct",
    [
        (FULL, True),
        ("17+25-8=34\n34+31=65\nAnswer: 65\n", True),  # trailing newline
        ("Answer: 64", False),
        ("Answer: 65 ", True),
        ("The answer is 65", False),  # no "Answer:" line
        ("Answer: 65\n34+31=65", False),  # the answer must be the last line
        ("", False),
    ],
)
def test_verifier_on_hand_written_traces(response, correct):
    (out,) = AnswerLineVerifier().verify([PROBLEM], [response], ["65"])
    assert out.correct is correct
    assert out.reward == float(correct)


def test_generated_traces_score_as_labelled():
    rng = random.Random(0)
    for _ in range(200):
        p = arith.make_problem(rng, rng.randint(2, 5))
        assert all(0 <= t <= arith.MAX_VALUE for t in p.totals())
        assert arith.parse_problem(arith.prompt_text(p)) == p
        assert arith.rubric_score(p.text, arith.full_trace(p)) == 1.0
        assert arith.rubric_score(p.text, arith.skip_trace(p, rng)) == 0.5
        assert arith.rubric_score(p.text, arith.slip_trace(p, rng)) == 0.5


def test_splits_are_seeded_and_heldout_is_longer():
    a = arith.make_split(1, 50, 2, 4)
    assert a == arith.make_split(1, 50, 2, 4)
    assert a != arith.make_split(2, 50, 2, 4)
    lengths = {len(arith.parse_problem(r["problem"]).ops) for r in arith.make_split(3, 200, 2, 5)}
    assert lengths == {2, 3, 4, 5}


def test_warmup_mix_has_every_quality():
    traces = arith.warmup_traces(0, 300, 2, 4)
    scores = [arith.rubric_score(p, r) for p, r in traces]
    assert scores.count(1.0) > 100 and scores.count(0.5) > 100 and 0.0 not in scores


def test_tokenizer_and_model_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = arith.build_tokenizer()
    arith.build_model(built, hidden_size=64, layers=1).save_pretrained(tmp_path)
    built.save_pretrained(tmp_path)  # beside a Qwen2 config.json, as in every checkpoint
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "17+25=?\n17+25=42\nAnswer: 42"
    ids = tok(text)["input_ids"]
    assert ids == built(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, newline and space included
    assert tok.decode(ids) == text
    assert len(tok) == len(built) and tok.eos_token_id == built.eos_token_id
    assert tok.pad_token_id not in (None, tok.eos_token_id)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    cfg = model.config
    assert cfg.hidden_size // cfg.num_attention_heads == 32 and cfg.model_type == "qwen2"
    assert cfg.vocab_size == len(tok)
