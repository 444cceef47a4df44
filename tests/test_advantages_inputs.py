"""papo_advantages and token_advantages on bad, empty and unrepresentable inputs: each a named
error (or the documented empty result), on both backends."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close

from papo_fast import papo_advantages, token_advantages

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    empty = torch.zeros(0)
    for kwargs in (
        {"group_ids": torch.zeros(0, dtype=torch.long)},
        {"group_offsets": torch.tensor([0])},
    ):
        res = papo_advantages(empty, empty, backend=backend, **kwargs)
        assert res.advantages.shape == (0,) and res.process_adv.shape == (0,)
        assert math.isnan(res.stats["correct_adv_mean"].item())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"outcome": torch.tensor([1.0, float("nan"), 0.0])}, r"outcome .*index 1"),
        ({"process": torch.tensor([1.0, 0.0, float("inf")])}, r"process .*index 2"),
        ({"process": torch.ones(4)}, "process has 4 elements"),
        ({"group_ids": None}, "exactly one of group_ids"),
        ({"group_offsets": torch.tensor([0, 3])}, "exactly one of group_ids"),
        ({"group_ids": None, "group_offsets": torch.tensor([0, 2, 2, 3])}, "group 1 is empty"),
        ({"group_ids": None, "group_offsets": torch.tensor([0, 2])}, "end at N = 3"),
        ({"group_ids": None, "group_offsets": torch.tensor([1, 3])}, "start at 0"),
        ({"group_ids": torch.tensor([0.0, 0.0, 1.0])}, "integer"),
        ({"group_ids": torch.tensor([0, 1])}, "group_ids has 2 elements"),
        ({"mode": "grpo"}, "mode must be one of"),
        ({"process": None}, "needs process"),
        ({"correct": torch.tensor([1, 0, 1])}, "bool"),
        ({"outcome": torch.ones(3, 1)}, "1-D"),
        ({"backend": "cuda"}, "backend must be"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_bad_input(kwargs, match):
    args = {
        "outcome": torch.tensor([1.0, 0.0, 1.0]),
        "process": torch.tensor([1.0, 0.0, 0.5]),
        "group_ids": torch.tensor([0, 0, 0]),
    } | kwargs
    with pytest.raises(ValueError, match=match):
        papo_advantages(args.pop("outcome"), args.pop("process"), **args)


# the kernel runs on the refused values before the one check after it: the interpreter warns
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change, match",
    [
        # float64 rewards beyond float32's range: the advantages are float32 (and the kernel's
        # math is), so both backends refuse them by name and position
        ({"outcome": torch.tensor([1.0, 1e300, 0.0], dtype=torch.float64)}, r"outcome.*index 1"),
        ({"process": torch.tensor([1.0, 0.0, -1e39], dtype=torch.float64)}, r"process.*index 2"),
        # a product that float32 cannot hold
        (
            {
                "outcome": torch.tensor([1e30, 0.0, 1.0]),
                "process": torch.tensor([1e30, 0.0, 1.0]),
                "mode": "mult",
            },
            r"outcome \* process.*index 0",
        ),  # fmt: skip
        # centred advantages beyond float32: 3.4e38 - mean(3.4e38, -3.4e38, -3.4e38) = 4.5e38
        (
            {"outcome": torch.tensor([3.4e38, -3.4e38, -3.4e38]), "scale_by_std": False},
            r"advantages.*overflow.*index 0",
        ),  # fmt: skip
        # lam * A_proc beyond float32
        (
            {
                "lam": 3e38,
                "process": torch.tensor([1.0, 0.0, 0.0]),
                "outcome": torch.tensor([1.0, 1.0, 1.0]),
            },
            r"advantages.*overflow",
        ),  # fmt: skip
    ],
)
def test_unrepresentable_advantages_raise_on_both_backends(backend, change, match):
    args = {
        "outcome": torch.tensor([1.0, 0.0, 1.0]),
        "process": torch.tensor([1.0, 0.0, 0.5]),
        "group_ids": torch.tensor([0, 0, 0]),
        "backend": backend,
    } | change
    with pytest.raises(ValueError, match=match):
        papo_advantages(args.pop("outcome"), args.pop("process"), **args)


def test_token_advantages_both_layouts():
    adv = torch.tensor([1.5, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    padded = token_advantages(adv, mask=mask)
    assert_close(padded, torch.tensor([[1.5, 1.5, 0, 0], [-0.5] * 4, [2.0, 0, 0, 0]]), atol=0)
    packed = token_advantages(adv, cu_seqlens=torch.tensor([0, 2, 6, 7]))
    assert_close(packed, padded[mask], atol=0)
    with pytest.raises(ValueError, match="exactly one of mask"):
        token_advantages(adv)
    with pytest.raises(ValueError, match="mask must be"):
        token_advantages(adv, mask=mask[:2])


def test_the_result_is_an_advantages_output():
    import papo_fast

    res = papo_advantages(torch.tensor([1.0, 0.0]), group_offsets=torch.tensor([0, 2]), mode="orm")
    assert type(res) is papo_fast.AdvantagesOutput and type(res).__name__ == "AdvantagesOutput"
    assert papo_fast.Advantages is papo_fast.AdvantagesOutput  # the old name, kept for a release
    assert {"AdvantagesOutput", "Advantages"} <= set(papo_fast.__all__)
