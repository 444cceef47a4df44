"""The run directory: the lock, atomic saves, and refusing what is unsafe to load."""

import errno
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from papo_fast import checkpoint
from papo_fast.checkpoint import STATE_FILE, latest_checkpoint, load_state, save_checkpoint
from papo_fast.tasks import arith

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRA = {"sampler": {"position": 4, "seed": 0, "n": 24}, "config": {"train": {"seed": 0}}}


@pytest.fixture(scope="module")
def tiny():
    """A tiny policy and its optimizer, one update in (the optimizer state is not empty)."""
    model = arith.build_model(arith.build_tokenizer(), hidden_size=64, layers=1, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def save(root, step, tiny, keep=2):
    model, opt = tiny
    return save_checkpoint(root, step, model, None, opt, EXTRA, keep=keep)


class WritesAMarker:
    """Unpickling it opens (creates) ``path``: what a crafted trainer_state.pt could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_state_with_a_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "marker"
    ckpt = tmp_path / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    torch.save({"step": 1, **EXTRA, "payload": WritesAMarker(marker)}, ckpt / STATE_FILE)
    with pytest.raises(ValueError, match=r"refusing to load .*trainer_state.pt.*would run code"):
        load_state(ckpt)
    assert not marker.exists()


def test_saved_state_loads_as_tensors_and_plain_types(tmp_path, tiny):
    path = save(tmp_path, 3, tiny)
    state = load_state(path)  # weights_only=True
    assert state["step"] == 3 and state["sampler"] == EXTRA["sampler"]
    assert state["rng"]["torch"].dtype == torch.uint8
    assert isinstance(state["rng"]["python"], tuple)


def test_shards_load_into_a_fresh_model_and_optimizer(tmp_path, tiny):
    path = save(tmp_path, 3, tiny)
    model = arith.build_model(arith.build_tokenizer(), hidden_size=64, layers=1, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpoint.load_shards(path, model, opt)
    for (name, p), q in zip(model.named_parameters(), tiny[0].parameters(), strict=True):
        assert torch.equal(p, q), name
        assert torch.equal(opt.state[p]["exp_avg"], tiny[1].state[q]["exp_avg"]), name
    assert opt.state[next(model.parameters())]["step"] == 1


def test_a_shards_index_with_a_pickle_payload_is_refused(tmp_path, tiny):
    import pickle

    path = save(tmp_path, 1, tiny)
    marker = tmp_path / "marker"
    (path / "state" / ".metadata").write_bytes(pickle.dumps(WritesAMarker(marker)))
    with pytest.raises(ValueError, match=r"refusing to load .*\.metadata.*could run code"):
        checkpoint.load_shards(path, *tiny)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["dotdot", "absolute", "not_a_step_name", "symlink"])
def test_latest_pointing_outside_checkpoints_is_refused(tmp_path, tiny, where):
    root = tmp_path / "run" / "checkpoints"
    save(root, 1, tiny)
    outside = tmp_path / "elsewhere"  # a complete-looking checkpoint outside the run
    save(outside, 9, tiny)
    target = outside / "step_000009"
    pointer = {
        "dotdot": "../../elsewhere/step_000009",
        "absolute": str(target),
        "not_a_step_name": "step_9",
        "symlink": "step_000009",
    }[where]
    if where == "symlink":
        (root / "step_000009").symlink_to(target, target_is_directory=True)
    (root / "latest").write_text(pointer + "\n")
    with pytest.raises(ValueError, match="refusing to resume"):
        latest_checkpoint(root)


def test_resave_killed_between_renames_keeps_a_checkpoint(tmp_path, tiny, monkeypatch):
    root = tmp_path / "checkpoints"
    save(root, 1, tiny)
    rename = os.rename

    def killed_before_the_new_one_is_in(src, dst):
        if os.path.basename(src).startswith(".tmp-step_"):
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", killed_before_the_new_one_is_in)
    with pytest.raises(KeyboardInterrupt):
        save(root, 1, tiny)
    monkeypatch.undo()
    path = latest_checkpoint(root)
    assert path == root / "step_000001"
    assert load_state(path)["step"] == 1 and (path / "state" / ".metadata").is_file()
    save(root, 1, tiny)  # and the next save goes through
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]


TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        RuntimeError(TORCH_FULL_DISK),  # what torch.save raises when the disk fills up
    ],
    ids=["oserror", "torch"],
)
def test_full_disk_on_save_keeps_the_previous_checkpoint(tmp_path, tiny, monkeypatch, error):
    root = tmp_path / "checkpoints"
    save(root, 1, tiny)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(ValueError, match="disk is full") as info:
        save(root, 2, tiny)
    monkeypatch.undo()
    message = str(info.value)
    assert str(root) in message and "step_000001 is intact" in message
    assert "inline_container" not in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
    assert load_state(latest_checkpoint(root))["step"] == 1


def test_full_disk_in_the_shards_names_the_disk(tmp_path, tiny, monkeypatch):
    model, opt = tiny

    def full(*args, **kwargs):  # a shard's write hits ENOSPC
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.FileSystemWriter, "write_data", full)
    with pytest.raises(ValueError, match=r"step_000001 in .*checkpoints: the disk is full"):
        save_checkpoint(tmp_path / "checkpoints", 1, model, None, opt, EXTRA)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_export_replaces_the_final_model_only_once_written(tmp_path, tiny, monkeypatch):
    """OUT/final is replaced only by a complete export; a full disk names it and keeps the old."""
    model, _ = tiny
    final = checkpoint.export_model(tmp_path / "final", model, None)
    assert (final / "model.safetensors").is_file()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(
        ValueError, match=r"could not export the model to .*final: the disk is full"
    ):
        checkpoint.export_model(tmp_path / "final", model, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (final / "model.safetensors").is_file()


def test_keep_prunes_the_oldest_by_step_number(tmp_path, tiny):
    root = tmp_path / "checkpoints"
    for step in (999_999, 1_000_000, 1_000_001):  # seven digits sort before six as text
        save(root, step, tiny, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1000000", "step_1000001"]


HOLDER = textwrap.dedent(
    """
    import sys, time
    from papo_fast.run_dir import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    from papo_fast.run_dir import RunLock

    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"pid {proc.pid} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()  # no clean-up runs: the kernel drops the lock
        proc.wait()
    lock = RunLock(tmp_path)
    lock.acquire()
    assert (tmp_path / "run.lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    lock.release()
