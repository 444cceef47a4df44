"""The run directory: one run at a time, never overwritten, files replaced atomically.

    OUT/run.lock          flock-ed by the process training in OUT (rank 0); holds "pid N on HOST"
    OUT/config.json       the run's settings (rank 0)
    OUT/metrics.jsonl     one line per step (rank 0)
    OUT/checkpoints/      checkpoint.py
    OUT/final/            the trained model alone (save_pretrained), when a run finishes

Choices:
1. **One run per directory.** RunLock takes an exclusive flock on OUT/run.lock without waiting. The
   kernel drops it when the holder exits, killed or not, so a crash never leaves a stale lock.
2. **No overwrite.** A run never overwrites another: a new run refuses a directory that holds
   metrics or checkpoints (check_new_run); a resume needs a checkpoint, and refuses a configuration
   that differs from the saved one outside the keys the trainer names resumable
   (checkpoint.resume_point, with config_changes).
3. **Atomic files.** A file is written beside its place and os.replace-d in (write_text_atomic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_FILE = "run.lock"


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


# ----------------------------------------------------------------------------- the run directory


class NoLock:
    """What the processes of a run other than rank 0 hold: rank 0 holds the directory's lock."""

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

    def abandon(self) -> None:
        pass


def open_run_dir(out: Path, resume: bool, owner: bool = True) -> RunLock | NoLock:
    """Create ``out`` (train.out_dir) for a new run and lock it; RunDirError when it cannot be.
    Not the ``owner`` (a rank other than 0): the checks only, and a NoLock."""
    if resume and not out.exists():
        raise RunDirError(f"nothing to resume: train.out_dir {out} does not exist")
    if not owner:
        return NoLock()
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
