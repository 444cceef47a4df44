"""Dispatch: CPU tensors take the PyTorch path, and a forced Triton backend explains itself."""

import importlib
import sys

import pytest
import torch

from papo_fast.kernels import _backend
from papo_fast.kernels._backend import resolve_backend


def test_auto_picks_torch_on_cpu():
    assert resolve_backend("auto", torch.zeros(2), None) == "torch"


def test_forced_backends():
    assert resolve_backend("torch", torch.zeros(2)) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.zeros(2))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(2))


def test_the_old_module_path_is_the_moved_module(monkeypatch):
    # papo_fast._backend moved into the kernels; the old name imports the same module, warning.
    monkeypatch.delitem(sys.modules, "papo_fast._backend", raising=False)
    with pytest.warns(DeprecationWarning, match="papo_fast.kernels._backend"):
        old = importlib.import_module("papo_fast._backend")
    assert old is _backend


@pytest.mark.cuda
def test_auto_picks_triton_on_cuda():
    assert resolve_backend("auto", torch.zeros(2, device="cuda")) == "triton"


@pytest.mark.cuda
def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match="one device"):
        resolve_backend("auto", torch.zeros(2), torch.zeros(2, device="cuda"))
