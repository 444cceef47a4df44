"""The Hugging Face generate backend: per-request seeds, EOS handling, greedy."""

import pytest

from papo_fast.rollout import HFGenerateBackend, Request, SamplingParams
from papo_fast.tasks import arith

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backend():
    tok = arith.build_tokenizer()
    return HFGenerateBackend(arith.build_model(tok, hidden_size=64, layers=1), tok), tok


def test_per_request_seeds_do_not_depend_on_the_batch(backend):
    be, tok = backend
    ids = tok(["12+3=?\n", "40-7+2=?\n"])["input_ids"]
    params = SamplingParams(1.0, 1.0, 16)
    batch = be.generate([Request(ids[0], 5), Request(ids[1], 6), Request(ids[0], 7)], params)
    alone = be.generate([Request(ids[1], 6)], params)
    assert batch[1] == alone[0]  # same request, same tokens, whatever else is in the batch
    assert batch[0].response_ids != batch[2].response_ids  # another seed, another sample
    for s in batch:
        assert s.finished == (tok.eos_token_id in s.response_ids)
        assert not s.finished or s.response_ids.index(tok.eos_token_id) == len(s.response_ids) - 1
        assert len(s.response_ids) <= 16


def test_greedy_is_the_argmax(backend):
    be, tok = backend
    ids = tok(["12+3=?\n"])["input_ids"][0]
    a = be.generate([Request(ids, 1)], SamplingParams(0.0, 1.0, 8))
    b = be.generate([Request(ids, 2)], SamplingParams(0.0, 1.0, 8))
    assert a == b  # seeds do not matter without noise
