"""Packed micro-batches: the same log-probs, loss and gradients as padded rows, no sequence
attending to another, token-budget micro-batches with the global counts, and their settings."""

import copy
import dataclasses

import pytest
import torch
from helpers import assert_close_to_ref, data_scale
from tiny_run import build_assets, make_config, make_trainer

from papo_fast.config import ConfigError, config_from_dict
from papo_fast.kernels.fused_linear_policy_loss import PAPOLoss
from papo_fast.kernels.loss_config import PolicyLossConfig
from papo_fast.packing import (
    check_packed_attention,
    micro_batch,
    micro_batch_loss,
    micro_batches,
    split_further,
    split_rows,
    step_batch,
    step_counts,
    step_logprobs,
)
from papo_fast.rollout import RolloutBackend, Sample
from papo_fast.tasks import arith
from papo_fast.trainer import RESUMABLE

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPERATURE = 0.8
# prompt and response lengths of the ragged batch: a one-token response, an empty one, long and
# short rows side by side, so that the padded layout has much padding to trim
PROMPTS = [3, 7, 2, 5, 4, 6]
RESPONSES = [9, 1, 14, 0, 5, 11]


@pytest.fixture(scope="module")
def tok():
    return arith.build_tokenizer()


def tiny_model(tok, impl="sdpa"):
    model = arith.build_model(tok, hidden_size=64, layers=2, seed=0)
    model.set_attn_implementation(impl)
    return model


def ragged_samples(vocab: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [Sample(draw(p), draw(r), True) for p, r in zip(PROMPTS, RESPONSES, strict=True)]


def with_loss_inputs(batch, logp):
    """Old, reference and rollout log-probs near the model's own, and advantages of both signs:
    ratios on both clip edges, a non-zero KL."""
    g = torch.Generator().manual_seed(1)
    noise = lambda: 0.2 * torch.randn(logp.shape, generator=g, dtype=logp.dtype)  # noqa: E731
    m = batch.mask
    return batch._replace(
        old_logp=torch.where(m, logp + noise(), 0.0),
        ref_logp=torch.where(m, logp + noise(), 0.0),
        rollout_logp=torch.where(m, logp + noise(), 0.0),
        advantages=torch.randn(len(m), generator=g, dtype=logp.dtype),
    )


def in_dtype(batch, dtype):
    cast = lambda t: None if t is None or not t.is_floating_point() else t.to(dtype)  # noqa: E731
    fields = ("old_logp", "ref_logp", "rollout_logp", "advantages")
    return batch._replace(**{k: cast(getattr(batch, k)) for k in fields})


def checkpointing_on(model) -> bool:
    """transformers >= 5 names it activation checkpointing; 4.x gradient checkpointing."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return (
        model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing
    )


def all_rows(batch):
    return torch.arange(batch.ids.shape[0])


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_logprobs_match_padded_on_a_ragged_batch(tok, impl):
    model = tiny_model(tok, impl)
    model64 = copy.deepcopy(model).double()
    batch = step_batch(ragged_samples(len(tok)), tok.pad_token_id)
    rows = all_rows(batch)

    def logprobs(m, packed, max_tokens=0):
        parts = micro_batches(batch, rows, 4, max_tokens, packed)
        return step_logprobs(m, batch, parts, TEMPERATURE)[batch.mask]

    want = logprobs(model64, packed=False)  # float64: the reference
    same = logprobs(model, packed=False)  # float32, padded: today's path
    assert want.numel() == sum(RESPONSES)
    # log p = z - lse: a difference of terms as large as max |log p|; a few fp32 ulps of it
    for max_tokens in (0, 20):
        got = logprobs(model, packed=True, max_tokens=max_tokens)
        assert_close_to_ref(got, want, same, msg=f"packed log-probs, budget {max_tokens}")
    # and the float64 model agrees with itself across layouts (the layouts compute the same thing)
    assert_close_to_ref(logprobs(model64, packed=True), want, want, msg="float64 packed")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_packed_sequence_never_attends_to_another(tok, impl):
    """Changing any one sequence of a pack leaves every other sequence's log-probs bit for bit:
    the block-diagonal mask gives the other sequences' keys a weight of exactly 0 (the earlier
    sequences are the ones that causal attention alone would let through)."""
    model = tiny_model(tok, impl)
    samples = ragged_samples(len(tok))
    batch = step_batch(samples, tok.pad_token_id)
    mb = micro_batch(batch, all_rows(batch), packed=True)
    longest = max(p + r for p, r in zip(PROMPTS, RESPONSES, strict=True))
    assert mb.position_ids.shape == mb.ids.shape and mb.ids.shape[1] == longest
    assert mb.ids.shape[0] < len(samples)  # several sequences share a row
    base = step_logprobs(model, batch, [mb], TEMPERATURE)
    for k in range(len(samples)):
        changed = list(samples)
        s = samples[k]
        changed[k] = s._replace(
            prompt_ids=[(t + 1) % len(tok) for t in s.prompt_ids],
            response_ids=[(t + 3) % len(tok) for t in s.response_ids],
        )
        other = step_batch(changed, tok.pad_token_id)
        got = step_logprobs(model, other, [micro_batch(other, all_rows(other), True)], TEMPERATURE)
        keep = torch.arange(len(samples)) != k
        assert torch.equal(got[keep], base[keep]), f"sequence {k} reached another sequence"
        if RESPONSES[k] > 1:
            assert not torch.equal(got[k], base[k])  # the change did reach its own sequence


def test_check_packed_attention_refuses_a_model_that_mixes_sequences(tok, monkeypatch):
    model = tiny_model(tok)
    check_packed_attention(model)  # transformers keeps Qwen2's packed sequences apart
    # without the packed-sequence detection every token sees all earlier tokens of the row
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ConfigError, match=r"model\.packed.*Qwen2ForCausalLM.*'sdpa'"):
        check_packed_attention(model)


# ----------------------------------------------------------------------------- loss and gradients


def loss_and_grads(model, batch, parts, counts):
    model.zero_grad(set_to_none=True)
    loss_fn = PAPOLoss(PolicyLossConfig(beta=0.1), temperature=TEMPERATURE, return_entropy=True)
    loss = 0.0
    for mb in parts:
        out = micro_batch_loss(model, loss_fn, batch, mb, counts)
        out.loss.backward()
        loss = loss + out.loss.detach()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return loss, grads


def loss_setup(tok):
    model = tiny_model(tok)
    model64 = copy.deepcopy(model).double()
    batch = step_batch(ragged_samples(len(tok)), tok.pad_token_id)
    rows = all_rows(batch)
    logp = step_logprobs(model64, batch, micro_batches(batch, rows, 6, 0, False), TEMPERATURE)
    batch64 = with_loss_inputs(batch, logp)
    return model, model64, in_dtype(batch64, torch.float32), batch64, rows


def test_packed_and_padded_give_the_same_loss_and_gradients(tok):
    model, model64, batch, batch64, rows = loss_setup(tok)
    counts = step_counts(batch, rows)
    want_loss, want_grad = loss_and_grads(model64, batch64, micro_batches(batch64, rows, 3, 0,
                                          False), counts)  # fmt: skip
    same_loss, same_grad = loss_and_grads(model, batch, micro_batches(batch, rows, 3, 0, False),
                                          counts)  # fmt: skip
    got_loss, got_grad = loss_and_grads(
        model, batch, micro_batches(batch, rows, 3, 0, True), counts
    )
    assert want_grad.abs().max() > 0
    # the loss is a token mean of terms |A| * ratio (+ beta * KL): fp32 ulps at the advantages'
    # scale; the gradients at their own largest magnitude
    scale = data_scale(batch64.advantages)
    assert_close_to_ref(got_loss, want_loss, same_loss, scale=scale, msg="loss")
    assert_close_to_ref(got_grad, want_grad, same_grad, msg="parameter gradients")


def test_token_budget_micro_batches_sum_to_the_whole_mini_batch(tok):
    model, model64, batch, batch64, rows = loss_setup(tok)
    counts = step_counts(batch, rows)
    lengths = [p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)]  # 12 8 16 5 9 17
    budget = 16
    parts = micro_batches(batch, rows, 1, budget, packed=True)
    # greedy in order: [12] (12 + 8 > 16), [8] (8 + 16 > 16), [16], [5, 9], [17] (alone, longer)
    assert [mb.rows.tolist() for mb in parts] == [[0], [1], [2], [3, 4], [5]]
    for mb in parts:
        tokens = sum(lengths[i] for i in mb.rows.tolist())
        assert tokens <= budget or len(mb.rows) == 1
        longest = max(lengths[i] for i in mb.rows.tolist())
        assert mb.ids.shape[1] == longest and mb.ids.shape[0] <= len(mb.rows)
    one = micro_batches(batch, rows, len(rows), 0, packed=True)
    assert len(one) == 1
    want_loss, want_grad = loss_and_grads(model64, batch64, micro_batches(batch64, rows, 6, 0,
                                          True), counts)  # fmt: skip
    same_loss, same_grad = loss_and_grads(model, batch, one, counts)
    got_loss, got_grad = loss_and_grads(model, batch, parts, counts)
    scale = data_scale(batch64.advantages)  # as in the packed-vs-padded test
    assert_close_to_ref(got_loss, want_loss, same_loss, scale=scale, msg="summed loss")
    assert_close_to_ref(got_grad, want_grad, same_grad, msg="summed gradients")


def test_packed_rows_first_fit_with_restarting_positions():
    # sequences of 5, 9, 3, 4 and 2 tokens in rows of 9 (the longest), first fit in order:
    # row 0 [5 | 3 | free 1], row 1 [9], row 2 [4 | 2 | free 3]; a free tail counts from 0 too
    samples = [Sample([10 * k + j for j in range(n - 1)], [10 * k + n - 1], True)
               for k, n in enumerate([5, 9, 3, 4, 2])]  # fmt: skip
    batch = step_batch(samples, pad_id=99)
    mb = micro_batch(batch, all_rows(batch), packed=True)
    assert mb.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2, 0],
        [0, 1, 2, 3, 4, 5, 6, 7, 8],
        [0, 1, 2, 3, 0, 1, 0, 1, 2],
    ]
    assert mb.ids[0, :8].tolist() == [0, 1, 2, 3, 4, 20, 21, 22]
    assert mb.ids[2, :6].tolist() == [30, 31, 32, 33, 40, 41]
    # each response (its last token) is predicted by the position before it, in the flat rows
    assert mb.select.tolist() == [3, 9 + 7, 6, 18 + 2, 18 + 4]
    assert mb.cu_seqlens.tolist() == [0, 1, 2, 3, 4, 5]
    assert mb.take(batch.targets).tolist() == [4, 18, 22, 33, 41]


def test_split_rows_by_rows_or_by_tokens():
    order = torch.tensor([4, 0, 3, 1, 2])
    lengths = [5, 30, 7, 7, 2]  # of rows 4, 0, 3, 1, 2 in that order
    by_rows = split_rows(order, lengths, max_rows=2, max_tokens=0)
    assert [p.tolist() for p in by_rows] == [[4, 0], [3, 1], [2]]
    by_tokens = split_rows(order, lengths, max_rows=2, max_tokens=16)
    # the order is kept; 30 > 16 forms its own micro-batch; 7 + 7 + 2 = 16 fits exactly
    assert [p.tolist() for p in by_tokens] == [[4], [0], [3, 1, 2]]
    with pytest.raises(ValueError, match="lengths"):
        split_rows(order, lengths[:3], max_rows=2, max_tokens=16)


def test_split_further_halves_the_heaviest_part_until_k():
    lengths = [5, 30, 7, 7, 2, 9]  # tokens of sequences 0..5
    parts = [torch.tensor([0, 1]), torch.tensor([2, 3, 4, 5])]  # 35 and 25 tokens
    split = split_further(parts, lengths, 4)
    # [0, 1] (35) splits first; then [2, 3, 4, 5] (25) is the heaviest that can split
    assert [p.tolist() for p in split] == [[0], [1], [2, 3], [4, 5]]
    alone = split_further([torch.tensor([0]), torch.tensor([1])], lengths, 5)
    assert [p.tolist() for p in alone] == [[0], [1]]  # single sequences: no further


@pytest.mark.parametrize("packed", [False, True])
def test_lockstep_micro_batches_add_fillers_that_change_nothing(tok, packed):
    """A rank with fewer micro-batches than the others splits further, then runs fillers: the
    log-probs and the summed loss and gradients are those of its own micro-batches."""
    model, model64, batch, batch64, rows = loss_setup(tok)
    counts = step_counts(batch, rows)
    mine = rows[:2]
    parts = micro_batches(batch, mine, 6, 0, packed, count=lambda n: n + 3)
    assert len(parts) == 4 and [mb.filler for mb in parts] == [False, False, True, True]
    assert [mb.rows.tolist() for mb in parts[:2]] == [[0], [1]]
    plain = micro_batches(batch, mine, 1, 0, packed)  # the same real parts, no fillers
    want = step_logprobs(model, batch, plain, TEMPERATURE)
    assert torch.equal(step_logprobs(model, batch, parts, TEMPERATURE), want)
    none = micro_batches(batch, rows[:0], 6, 0, packed, count=lambda n: 2)  # no sample here
    assert len(none) == 2 and all(mb.filler for mb in none)

    def summed(parts):
        model.zero_grad(set_to_none=True)
        loss_fn = PAPOLoss(PolicyLossConfig(), temperature=TEMPERATURE)
        for mb in parts:  # as update.ppo_epoch runs them
            out = micro_batch_loss(model, loss_fn, batch, mb, counts)
            (out.loss * 0 if mb.filler else out.loss).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

    assert torch.equal(summed(parts), summed(plain))


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"))


class Replay(RolloutBackend):
    """Returns the samples another run drew: the float64 reference trains on the same tokens."""

    def __init__(self, samples):
        self.samples = samples

    def generate(self, requests, params):
        return self.samples


class Recording(RolloutBackend):
    def __init__(self, inner):
        self.inner, self.samples = inner, None

    def generate(self, requests, params):
        self.samples = self.inner.generate(requests, params)
        return self.samples


def test_a_trainer_step_packed_or_padded_gives_the_same_metrics(assets, tmp_path):
    def step(name, packed, tokens=0, float64_on=None):
        cfg = make_config(assets, tmp_path / name, micro_batch_tokens=tokens)
        cfg.model = dataclasses.replace(cfg.model, packed=packed)
        trainer = make_trainer(cfg)
        if float64_on is not None:
            trainer.model.double()
            trainer.backend = Replay(float64_on)
        else:
            trainer.backend = Recording(trainer.backend)
        metrics = trainer.train_step()
        trainer.close()
        return metrics, getattr(trainer.backend, "samples", None)

    padded, samples = step("padded", False)
    want, _ = step("float64", False, float64_on=samples)
    for name, packed, tokens in (("packed", True, 0), ("budget", True, 40)):
        got, got_samples = step(name, packed, tokens)
        assert got_samples == samples  # the rollout does not depend on the layout
        for key in ("reward", "accuracy", "process_mean", "zero_adv_frac", "response_len"):
            assert got[key] == padded[key] == want[key], key
        # the loss: a token mean of |A| * ratio terms, A normalized per group (scale 1); the
        # gradient norm at its own size
        assert_close_to_ref(got["loss"], want["loss"], padded["loss"], scale=1.0, msg="loss")
        assert_close_to_ref(got["grad_norm"], want["grad_norm"], padded["grad_norm"], msg="norm")


def test_gradient_checkpointing_is_enabled_and_changes_no_number(assets, tmp_path):
    def step(name, checkpointing):
        cfg = make_config(assets, tmp_path / name, mini_batches=1)
        cfg.model = dataclasses.replace(cfg.model, gradient_checkpointing=checkpointing)
        trainer = make_trainer(cfg)
        assert checkpointing_on(trainer.model) == checkpointing
        metrics = trainer.train_step()
        trainer.close()
        return metrics

    plain, recomputed = step("plain", False), step("ckpt", True)
    # the recomputed forward runs the same operations on the same inputs: the same numbers
    for key in ("loss", "grad_norm", "entropy", "reward"):
        assert recomputed[key] == plain[key], key


# ----------------------------------------------------------------------------- settings


def test_packing_settings_defaults_and_rules():
    cfg = config_from_dict({})
    assert (cfg.model.packed, cfg.model.gradient_checkpointing) == (True, False)
    assert cfg.train.micro_batch_tokens == 0
    assert config_from_dict({"train": {"micro_batch_tokens": "4_096"}}).train.micro_batch_tokens \
        == 4096  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"config\.train\.micro_batch_tokens must be >= 0, got -1"
    ):
        config_from_dict({}, ["train.micro_batch_tokens=-1"])
    with pytest.raises(ConfigError, match=r"config\.train\.micro_batch_tokens must be int"):
        config_from_dict({}, ["train.micro_batch_tokens=2.5"])
    for key in ("packed", "gradient_checkpointing"):
        with pytest.raises(ConfigError, match=rf"config\.model\.{key} must be bool, got 'yes'"):
            config_from_dict({"model": {key: "yes"}})


def test_packing_settings_are_resumable(assets, tmp_path):
    """They change how the same step is computed, not what it computes: a resumed run may change
    them (choice "Run directory")."""
    keys = {"train.micro_batch_tokens", "model.packed", "model.gradient_checkpointing"}
    assert keys <= RESUMABLE
    cfg = make_config(assets, tmp_path / "run")
    make_trainer(cfg).train()
    cfg.train.steps = 2
    cfg.train.micro_batch_tokens = 30
    cfg.model = dataclasses.replace(cfg.model, packed=False, gradient_checkpointing=True)
    resumed = make_trainer(cfg, resume=True)
    assert resumed.step == 1 and checkpointing_on(resumed.model)
    assert resumed.train()["step"] == 2
