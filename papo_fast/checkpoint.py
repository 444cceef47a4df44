"""The run directory: one run at a time, atomic checkpoints, and a safe way back in.

    OUT/run.lock                   flock-ed by the process training in OUT; holds "pid N on HOST"
    OUT/checkpoints/step_000040/   model.safetensors, config.json, tokenizer files (save_pretrained)
                                   trainer_state.pt (optimizer, RNG states, sampler, step, config)
    OUT/checkpoints/latest         the name of the last complete checkpoint, one line
    OUT/final/                     the trained model alone (save_pretrained), when a run finishes

Choices:
1. **Atomic saves.** A save writes everything into a hidden temporary directory, renames it into
   place (atomic on one filesystem) and only then rewrites ``latest`` through os.replace. A kill at
   any moment leaves ``latest`` naming a complete checkpoint; the next save removes leftover
   temporary directories. Re-saving a step that exists moves the old directory aside
   (``.replaced-step_N``) and removes it only once the new one is in place; after a kill between the
   two renames, the next save or latest_checkpoint moves the old one back. Old checkpoints are
   pruned the same way: renamed out of sight first, then removed.
2. **Nothing executed.** Nothing in a run directory is run as code. trainer_state.pt holds tensors
   and plain types only (the torch RNG state is a uint8 tensor, the Python one a tuple of ints) and
   is read with ``torch.load(weights_only=True)``. ``latest`` must name a ``step_NNNNNN`` directory
   that resolves inside checkpoints/ (no ``..``, no absolute path, no symlink out of it).
3. **One run per directory.** RunLock takes an exclusive flock on OUT/run.lock without waiting. The
   kernel drops it when the holder exits, killed or not, so a crash never leaves a stale lock.
4. **Failed writes.** A failed write (a full disk, a quota) is a RunDirError that says so and where;
   the temporary directory goes, the previous checkpoint and ``latest`` stay as they were.
5. **No overwrite.** A run never overwrites another: a new run refuses a directory that holds
   metrics or checkpoints (check_new_run); a resume needs a checkpoint, and refuses a configuration
   that differs from the saved one outside the keys the trainer names resumable (resume_point).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import pickle
import random
import re
import shutil
import socket
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

STATE_FILE = "trainer_state.pt"
POINTER = "latest"
LOCK_FILE = "run.lock"
STEP_NAME = re.compile(r"step_\d{6,}")
ASIDE = ".replaced-"  # prefix of a checkpoint directory being replaced (choice "Atomic saves")


class RunDirError(ValueError):
    """A run directory or checkpoint that cannot be used: busy, unwritable, or unsafe to read."""


# ----------------------------------------------------------------------------- the lock


class RunLock:
    """Exclusive, non-blocking lock on ``out_dir/run.lock`` (choice "One run per directory")."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_FILE
        self._file = None
        self.made_dir = False  # open_run_dir created the directory for this run

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        """Take the lock (no-op when held); RunDirError naming the holder when another has it.
        OSError when the directory is not writable."""
        if self._file is not None:
            return
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its pid yet"
            f.close()
            raise RunDirError(
                f"{self.path.parent} is in use by another run ({holder}, {self.path})"
            ) from None
        except BaseException:
            f.close()
            raise
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def abandon(self) -> None:
        """Release after a run that never started: a directory open_run_dir made for it goes
        again, unless something else was written there."""
        if self.made_dir and self._file is not None:
            self.path.unlink(missing_ok=True)
        self.release()
        if self.made_dir:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """torch (uint8 tensor), Python (a tuple of ints) and CUDA (uint8 tensors) RNG states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    try:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise RunDirError(f"the checkpoint's RNG state cannot be restored: {err}") from err
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- saving


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then os.replace it in."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def _finish_replacement(root: Path) -> None:
    """Complete or undo a replacement a kill interrupted (choice "Atomic saves")."""
    for aside in root.glob(ASIDE + "step_*"):
        final = root / aside.name[len(ASIDE) :]
        if final.is_dir():  # the new one made it in: the old one goes
            shutil.rmtree(aside, ignore_errors=True)
        else:  # killed between the two renames: the old one comes back
            os.rename(aside, final)


def _move_into_place(tmp: Path, final: Path) -> None:
    aside = final.with_name(ASIDE + final.name)
    if final.exists():
        os.rename(final, aside)
    os.rename(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def _read_pointer(root: Path) -> str | None:
    try:
        return (root / POINTER).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _prune(root: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints, never the one ``latest`` names."""
    named = _read_pointer(root)
    done = [p for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and p.is_dir()]
    done.sort(key=lambda p: int(p.name[len("step_") :]))
    for old in done[: max(0, len(done) - keep)]:
        if old.name == named:
            continue
        trash = root / f".tmp-pruned-{old.name}-{os.getpid()}"
        try:
            os.rename(old, trash)
        except OSError as err:
            warnings.warn(f"could not remove the old checkpoint {old}: {err}", stacklevel=3)
            continue
        shutil.rmtree(trash, ignore_errors=True)


def _disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "os error 28" in text


def _torch_write_failed(err: BaseException) -> bool:
    """torch.save's zip writer reports a short write (ENOSPC) with these words and no errno."""
    text = str(err)
    return "PytorchStreamWriter" in text or "unexpected pos" in text or "file write failed" in text


def _write_failure(root: Path, name: str, previous: str | None, err: BaseException) -> str:
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    if _disk_full(err):
        why = f"the disk is full ({free})"
    elif _torch_write_failed(err):
        why = f"writing {STATE_FILE} failed, most likely because the disk is full ({free})"
    else:
        why = f"{type(err).__name__}: {err} ({free})"
    if previous:
        kept = f"the previous checkpoint {previous} is intact and {root / POINTER} still names it"
    else:
        kept = "there is no earlier checkpoint"
    return f"could not write checkpoint {name} in {root}: {why}; {kept}"


def save_checkpoint(
    root: str | Path, step: int, model, tokenizer, optimizer, extra: dict, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the ``keep`` newest.

    ``extra`` (merged into trainer_state.pt) must hold tensors and plain types only (choice
    "Nothing executed"). A failed write is a RunDirError that names the directory and the reason
    (choice "Failed writes").
    """
    root = Path(root)
    name = step_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    previous = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        _finish_replacement(root)
        previous = _read_pointer(root)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), **extra}
        torch.save(state, tmp / STATE_FILE)
        _move_into_place(tmp, root / name)
        write_text_atomic(root / POINTER, name + "\n")
    except (OSError, RuntimeError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if root.is_dir():
            _finish_replacement(root)
        raise RunDirError(_write_failure(root, name, previous, err)) from err
    _prune(root, keep)
    return root / name


def export_model(path: str | Path, model, tokenizer) -> Path:
    """The model and its tokenizer as a plain Hugging Face directory at ``path`` (loadable with
    ``AutoModelForCausalLM.from_pretrained``), written aside and renamed into place (choice
    "Atomic saves"); a failed write is a RunDirError (choice "Failed writes")."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full" if _disk_full(err) else f"{type(err).__name__}: {err}"
        raise RunDirError(f"could not export the model to {path}: {why}") from err
    return path


# ----------------------------------------------------------------------------- loading


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory ``root/latest`` names, or None when there is no ``latest``.

    A ``latest`` that names anything but a complete ``step_NNNNNN`` directory inside ``root``
    is a RunDirError (choice "Nothing executed").
    """
    root = Path(root)
    pointer = root / POINTER
    if not (pointer.exists() or pointer.is_symlink()):
        return None
    _finish_replacement(root)
    name = _read_pointer(root)
    if name is None or not STEP_NAME.fullmatch(name):
        raise RunDirError(
            f"{pointer} must name a checkpoint directory step_NNNNNN of this run, "
            f"not {(name or '')[:100]!r}; refusing to resume from it"
        )
    path = root / name
    real = path.resolve()
    if real.parent != root.resolve():
        raise RunDirError(f"{path} resolves to {real}, outside {root}; refusing to resume from it")
    state = path / STATE_FILE
    if not state.is_file():
        raise RunDirError(f"{pointer} names {name}, but {path} holds no {STATE_FILE}")
    if state.resolve().parent != real:
        raise RunDirError(f"{state} is a link out of {path}; refusing to resume from it")
    return path


# key -> (type, what it is) of what a trainer_state.pt must hold
STATE_KEYS = {
    "step": (int, "the step"),
    "optimizer": (dict, "the optimizer state"),
    "rng": (dict, "the RNG states"),
    "sampler": (dict, "the data position"),
    "config": (dict, "the configuration"),
}


def load_state(path: str | Path) -> dict:
    """trainer_state.pt of a checkpoint (the weights load with from_pretrained(path)).

    Read with weights_only=True: a file holding anything but tensors and plain types is refused
    before any of it runs (choice "Nothing executed").
    """
    file = Path(path) / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise RunDirError(
            f"refusing to load {file}: it holds objects{what} beyond tensors and plain types, "
            "and loading them would run code; trainer states hold tensors and plain types only"
        ) from None
    except (OSError, RuntimeError, EOFError) as err:
        raise RunDirError(f"{file} cannot be read: {str(err).splitlines()[0]}") from err
    if not isinstance(state, dict):
        raise RunDirError(f"{file} holds a {type(state).__name__}, not a trainer state")
    for key, (kind, what) in STATE_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise RunDirError(f"{file} has no {what} ({key!r} is {state.get(key)!r:.60})")
    rng = state["rng"]
    if not isinstance(rng.get("torch"), torch.Tensor) or not isinstance(rng.get("python"), tuple):
        raise RunDirError(f"{file}: the RNG states are not a torch uint8 tensor and a tuple")
    if file.parent.name != step_name(state["step"]):
        raise RunDirError(f"{file} is the state of step {state['step']}, not of {file.parent.name}")
    return state


# ----------------------------------------------------------------------------- the run directory


def open_run_dir(out: Path, resume: bool) -> RunLock:
    """Create ``out`` (train.out_dir) for a new run and lock it; RunDirError when it cannot be."""
    if resume and not out.exists():
        raise RunDirError(f"nothing to resume: train.out_dir {out} does not exist")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"train.out_dir {out} exists and is not a directory") from None
    except OSError as err:
        raise RunDirError(f"train.out_dir {out} cannot be created: {err.strerror}") from None
    lock = RunLock(out)
    lock.made_dir = made
    try:
        lock.acquire()
    except RunDirError as err:
        raise RunDirError(
            f"train.out_dir {err}; wait for that run to end or use another train.out_dir"
        ) from None
    except OSError as err:
        raise RunDirError(f"train.out_dir {out} is not writable: {err.strerror}") from None
    return lock


def check_new_run(out: Path) -> None:
    """A new run never overwrites one: ``out`` may not hold metrics or checkpoints."""
    metrics, ckpts = out / "metrics.jsonl", out / "checkpoints"
    held = ["metrics.jsonl"] if metrics.is_file() and metrics.stat().st_size > 0 else []
    if ckpts.is_dir() and any(ckpts.iterdir()):
        held.append("checkpoints/")
    if held:
        raise RunDirError(
            f"train.out_dir {out} already holds a run ({', '.join(held)}); "
            "use --resume or another train.out_dir"
        )


def config_changes(saved: dict, cfg) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, value in the dataclass ``cfg``) of every setting that differs,
    in field order; a key the saved config lacks compares as its default."""
    out = []
    for f in dataclasses.fields(cfg):
        value, old = getattr(cfg, f.name), saved.get(f.name, dataclasses.MISSING)
        if dataclasses.is_dataclass(value):
            nested = config_changes(old if isinstance(old, dict) else {}, value)
            out += [(f"{f.name}.{k}", a, b) for k, a, b in nested]
            continue
        if old is dataclasses.MISSING:
            old = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if json.dumps(old, sort_keys=True) != json.dumps(value, sort_keys=True):
            out.append((f.name, old, value))
    return out


def resume_point(out: Path, cfg, resumable: frozenset[str]) -> tuple[Path, dict]:
    """The last checkpoint under ``out`` and its state, once its saved configuration differs
    from ``cfg`` in ``resumable`` keys only."""
    root = out / "checkpoints"
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        raise RunDirError(
            f"nothing to resume in train.out_dir {out}: no checkpoint in {root} (a run saves "
            "every train.save_every steps and at its end); to start over, remove that "
            "directory or use another train.out_dir"
        )
    state = load_state(ckpt)
    fixed = [x for x in config_changes(state["config"], cfg) if x[0] not in resumable]
    if fixed:
        lines = "\n".join(f"  {k}: {a!r} (checkpoint) -> {b!r}" for k, a, b in fixed)
        raise RunDirError(
            f"cannot resume train.out_dir {out} with these settings changed; they define the "
            f"run and must stay as saved in {ckpt}:\n{lines}\n"
            f"A resumed run may change only {', '.join(sorted(resumable))}; "
            "to change the others, start a new run in another train.out_dir"
        )
    return ckpt, state
