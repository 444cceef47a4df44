"""The Hugging Face generate backend: per-request seeds, EOS handling, greedy."""

import sys

import pytest
import torch

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


class _FakeEngine:
    """vllm.LLM's surface that VLLMRollout uses, recording the calls in order."""

    calls: list = []

    def __init__(self, model, **options):
        self.options = options
        _FakeEngine.calls = [("init", options.get("enable_sleep_mode", False))]

    def generate(self, prompts, sampling, use_tqdm=False):
        from types import SimpleNamespace as NS

        _FakeEngine.calls.append(("generate",))
        out = NS(index=0, token_ids=[7], logprobs=[{7: NS(logprob=-0.5)}], finish_reason="stop")
        return [NS(outputs=[out]) for _ in prompts]

    def sleep(self, level):
        _FakeEngine.calls.append(("sleep", level))

    def wake_up(self):
        _FakeEngine.calls.append(("wake_up",))

    def collective_rpc(self, name, kwargs):
        _FakeEngine.calls.append((name,))

    def reset_prefix_cache(self):
        _FakeEngine.calls.append(("reset_prefix_cache",))


@pytest.fixture
def fake_vllm(monkeypatch):
    from types import ModuleType

    vllm, inputs = ModuleType("vllm"), ModuleType("vllm.inputs")
    vllm.LLM, vllm.SamplingParams, vllm.inputs = _FakeEngine, lambda **kw: kw, inputs
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return _FakeEngine


@pytest.mark.parametrize("level", [0, 1, 2])
def test_vllm_sleep_mode_between_rollouts(fake_vllm, level):
    from papo_fast.rollout.vllm import VLLMRollout

    backend = VLLMRollout("model", sleep_level=level)
    model = torch.nn.Linear(2, 2)
    reqs, params = [Request([1, 2], 0)], SamplingParams()
    backend.generate(reqs, params)  # rollout, then sleep
    backend.sync_weights(model)  # wake, then the new weights
    backend.generate(reqs, params)
    slept = [("sleep", level)] if level else []
    woke = [("wake_up",)] if level else []
    assert fake_vllm.calls == [
        ("init", level > 0),
        ("generate",), *slept,
        *woke, ("reload_weights",), ("reset_prefix_cache",),
        ("generate",), *slept,
    ]  # fmt: skip
    if level == 2:  # the weights are gone: no rollout before new ones arrive
        with pytest.raises(RuntimeError, match="call sync_weights"):
            backend.generate(reqs, params)
