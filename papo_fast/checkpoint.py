"""Atomic checkpoints: weights (safetensors), optimizer, RNG states, data position and step.

    OUT/checkpoints/step_000040/   model.safetensors, config.json, tokenizer files (save_pretrained)
                                   trainer_state.pt (optimizer, RNG states, sampler, step, extra)
    OUT/checkpoints/latest         the name of the last complete checkpoint, one line

A save writes everything into a hidden temporary directory, renames it into place (atomic on one
filesystem) and only then rewrites ``latest`` through os.replace. A kill at any moment leaves
``latest`` naming a complete checkpoint; the next save removes leftover temporary directories.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: str | Path, step: int, model, tokenizer, optimizer, extra: dict, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the ``keep`` newest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), **extra}
    torch.save(state, tmp / STATE_FILE)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _replace_text(root / "latest", name + "\n")
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory named by ``root/latest``, or None when there is no complete checkpoint."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text(encoding="utf-8").strip()
    return path if (path / STATE_FILE).is_file() else None


def load_state(path: str | Path) -> dict:
    """trainer_state.pt of a checkpoint (the weights load with from_pretrained(path))."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
