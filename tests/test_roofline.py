"""benchmarks/roofline.py: its byte and FLOP counts against counts made by hand from the kernels,
and its sizes and chunking against the suites and the kernel they describe."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from papo_fast.kernels.fused_linear_logprobs import chunk_rows

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "roofline.py"


@pytest.fixture(scope="module")
def roofline():
    spec = importlib.util.spec_from_file_location("roofline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["roofline"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["roofline"]


def test_policy_loss_bytes_match_a_hand_count(roofline):
    # 1M tokens in rows of 1024: 1024 sequences, 1024 programs of 1024 tokens.
    # Forward kernel: reads logp 4 + old_logp 4 + mask 1 per token and 4 per sequence (the
    # advantage), writes the gradient 4 per token and 14 float32 sums in its row of 16 per program.
    # Finalize: reads the rows (64 B) and their min / max slots again (8 B). Backward with local
    # counts: reads the saved gradient and writes it scaled, 8 per token, so 21 per token, 13 of
    # them the minimum. With the counts as numbers the forward stored the gradient divided by D
    # and the backward touches no token: 13 per token, the minimum.
    n, b, programs = 1 << 20, 1024, 1024
    rows = programs * (56 + 64 + 8)
    local, numbers = (roofline.policy_loss(n, counts=c) for c in ("local", "numbers"))
    for r in (local, numbers):
        assert r.total("minimum", "bytes") == 13 * n + 4 * b
        assert r.floor_s("minimum") == pytest.approx((13 * n + 4 * b) / 4.8e12)
    assert local.total("ours", "bytes") == 21 * n + 4 * b + rows
    assert numbers.total("ours", "bytes") == 13 * n + 4 * b + rows
    with pytest.raises(ValueError, match="counts"):
        roofline.policy_loss(n, counts="tensors")


def test_fused_linear_counts_match_a_hand_count(roofline):
    # H200 size: T = 16384, chunks of 1024 rows (1 GiB / (4 B x V) rounded down to a power of
    # two), so 16 chunks. Three products of 2·T·H·V FLOPs; the fp32 grad_weight is read and written
    # once per chunk by its accumulating product: 16 x 8·V·H bytes.
    T, H, V = 16 * 1024, 4096, 151936
    r = roofline.fused_linear(16, 1024, H, V)
    assert r.total("ours", "flops") == r.total("minimum", "flops") == 3 * 2 * T * H * V
    (acc,) = [s for s in r.ours if s.name.startswith("grad_weight +=")]
    assert acc.times == 16
    assert acc.read * acc.times == 16 * (2 * (1024 * V + 1024 * H) + 4 * V * H)
    assert acc.write * acc.times == 16 * 4 * V * H
    # the minimum: bf16 hidden and weight read once, their gradients written once, plus the
    # per-token inputs (int64 targets, fp32 old_logp, bool mask) and one fp32 advantage per row
    assert r.total("minimum", "bytes") == 2 * 2 * (T * H + V * H) + 13 * T + 4 * 16


def test_advantages_minimum_is_inputs_and_outputs(roofline):
    n = 128 * 8  # fp32 outcome, fp32 process, int64 ids in; three fp32 advantages out
    assert roofline.advantages(128).total("minimum", "bytes") == n * (4 + 4 + 8 + 3 * 4)


@pytest.mark.parametrize("tokens", [1, 100, 4096, 16384, 10**6])
@pytest.mark.parametrize("vocab", [64, 32000, 151936, 262144])
@pytest.mark.parametrize("dev", ["cpu", "cuda"])
def test_chunk_rows_is_the_kernels(roofline, tokens, vocab, dev):
    # torch.device("cuda") builds without a GPU: chunk_rows reads only its type
    expected = chunk_rows(tokens, vocab, torch.device(dev))
    assert roofline.chunk_rows(tokens, vocab, cuda=dev == "cuda") == expected


def test_sizes_are_read_from_the_suites(roofline):
    assert roofline.bench_sizes("bench_advantages.py") == [128, 1024, 8192]
    assert roofline.bench_sizes("bench_policy_loss.py") == [16_384, 131_072, 1_048_576]
    assert roofline.bench_sizes("bench_fused_linear.py") == [
        (8, 512, 512, 32000),
        (16, 1024, 4096, 151936),
    ]


def test_markdown_has_a_row_per_gpu_size(roofline):
    table = roofline.markdown().splitlines()
    # header, separator, then the sizes of the three suites (policy_loss's twice: local counts
    # and counts as numbers)
    assert len(table) == 2 + 3 + 2 * 3 + 1
    assert all(line.count("|") == 9 for line in table)


def test_stat_row_widths_are_the_kernels(roofline):
    from papo_fast.kernels import policy_loss_torch

    assert roofline.NUM_STATS == policy_loss_torch.NUM_STATS
    assert roofline.NUM_METRICS == policy_loss_torch.NUM_METRICS
