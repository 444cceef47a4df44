"""Checkpoints: sharded, atomic, resumable on another number of processes, safe to read.

    OUT/checkpoints/step_000040/   state/: model and optimizer (torch.distributed.checkpoint, a
                                   file per rank and a .metadata index); config.json and the
                                   tokenizer files; trainer_state.pt (RNG states, sampler, step,
                                   config)
    OUT/checkpoints/latest         the name of the last complete checkpoint, one line
    OUT/final/                     export_model: the trained model alone (save_pretrained)

Choices:
1. **Atomic saves.** A save writes everything into a hidden temporary directory, renames it into
   place (atomic on one filesystem) and only then rewrites ``latest`` through os.replace. A kill at
   any moment leaves ``latest`` naming a complete checkpoint; the next save removes leftover
   temporary directories. Re-saving a step that exists moves the old directory aside
   (``.replaced-step_N``) and removes it only once the new one is in place; after a kill between the
   two renames, the next save or latest_checkpoint moves the old one back. Old checkpoints are
   pruned the same way: renamed out of sight first, then removed. With many processes every rank
   writes its shards into the same temporary directory (a filesystem all ranks share), and rank 0
   does the rest once all of them are written.
2. **Nothing executed.** Nothing in a run directory is run as code. trainer_state.pt holds tensors
   and plain types only (the torch RNG state is a uint8 tensor, the Python one a tuple of ints) and
   is read with ``torch.load(weights_only=True)``; so are the shards. The shards' index
   (state/.metadata, a pickle) is read by an unpickler that builds only the checkpoint format's
   own records, torch sizes, dtypes and layouts, and paths. ``latest`` must name a
   ``step_NNNNNN`` directory that resolves inside checkpoints/ (no ``..``, no absolute path, no
   symlink out of it).
3. **Any number of processes.** The model and optimizer states are saved by parameter name,
   each rank its own shards; a load reads whatever pieces its own layout needs, so a checkpoint of
   N processes resumes on M, one included. The RNG states are rank 0's, restored on every rank
   (the trainer's own draws are seeded by step and index).
4. **Failed writes.** A failed write (a full disk, a quota) is a RunDirError that says so and where;
   the temporary directory goes, the previous checkpoint and ``latest`` stay as they were.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from papo_fast.distributed import barrier, full_state_dict, is_distributed, is_main
from papo_fast.run_dir import RunDirError, config_changes, write_text_atomic

STATE_FILE = "trainer_state.pt"
SHARDS = "state"  # the model and optimizer, torch.distributed.checkpoint's layout
POINTER = "latest"
STEP_NAME = re.compile(r"step_\d{6,}")
ASIDE = ".replaced-"  # prefix of a checkpoint directory being replaced (choice "Atomic saves")


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """torch (uint8 tensor), Python (a tuple of ints) and, when this process uses CUDA, its
    current GPU's (uint8 tensor) RNG states. Only the process's own GPU: touching every GPU would
    open a context on each from every rank."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    try:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise RunDirError(f"the checkpoint's RNG state cannot be restored: {err}") from err
    if isinstance(state.get("cuda"), torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- saving


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


WRITE_ERRORS = (OSError, RuntimeError, SafetensorError, CheckpointException)


def _cause(err: BaseException) -> BaseException:
    """The first rank's own error inside torch.distributed.checkpoint's CheckpointException (it
    wraps everything, a KeyboardInterrupt included)."""
    if isinstance(err, CheckpointException) and err.failures:
        return next(iter(err.failures.values()))[0]
    return err


def save_checkpoint(
    root: str | Path, step: int, model, tokenizer, optimizer, extra: dict, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the ``keep`` newest. Every rank
    calls it (choice "Atomic saves").

    ``extra`` (merged into trainer_state.pt) must hold tensors and plain types only (choice
    "Nothing executed"). A failed write is a RunDirError that names the directory and the reason
    (choice "Failed writes").
    """
    root = Path(root)
    name = step_name(step)
    tmp = root / f".tmp-{name}"  # one name for every rank
    previous, main = None, is_main()
    try:
        if main:
            root.mkdir(parents=True, exist_ok=True)
            _finish_replacement(root)
            previous = _read_pointer(root)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        barrier()
        _save_shards(tmp / SHARDS, model, optimizer)
        if main:
            model.config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save({"step": step, "rng": rng_state(), **extra}, tmp / STATE_FILE)
            _move_into_place(tmp, root / name)
            write_text_atomic(root / POINTER, name + "\n")
    except WRITE_ERRORS as caught:
        err = _cause(caught)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            if root.is_dir():
                _finish_replacement(root)
        if isinstance(err, KeyboardInterrupt):
            raise err from None
        raise RunDirError(_write_failure(root, name, previous, err)) from err
    if main:
        _prune(root, keep)
    barrier()
    return root / name


@contextlib.contextmanager
def _one_process_quietly():
    """torch.distributed.checkpoint warns at every save and load in one process that it
    assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _save_shards(path: Path, model, optimizer) -> None:
    """The model and optimizer states by parameter name, each rank its shards (choice "Any
    number of processes")."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    writer = FileSystemWriter(path, single_file_per_rank=True)
    with _one_process_quietly():
        save(state, storage_writer=writer, no_dist=not is_distributed())


def export_model(path: str | Path, model, tokenizer) -> Path:
    """The model and its tokenizer as a plain Hugging Face directory at ``path`` (loadable with
    ``AutoModelForCausalLM.from_pretrained``), written aside by rank 0 and renamed into place
    (choice "Atomic saves"); a failed write is a RunDirError (choice "Failed writes"). Every rank
    calls it: a sharded model's weights are gathered first."""
    path = Path(path)
    weights = full_state_dict(model)
    if is_main():
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            _move_into_place(tmp, path)
        except WRITE_ERRORS as err:
            shutil.rmtree(tmp, ignore_errors=True)
            err = _cause(err)
            why = "the disk is full" if _disk_full(err) else f"{type(err).__name__}: {err}"
            raise RunDirError(f"could not export the model to {path}: {why}") from err
    barrier()
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
    if not (path / SHARDS / ".metadata").is_file():
        older = (
            " (a checkpoint of an earlier papo_fast)"
            if (path / "model.safetensors").exists()
            else ""
        )
        raise RunDirError(
            f"{path} holds no {SHARDS}/.metadata{older}: the model and optimizer states are not "
            "there, so it cannot be resumed"
        )
    return path


# key -> (type, what it is) of what a trainer_state.pt must hold
STATE_KEYS = {
    "step": (int, "the step"),
    "rng": (dict, "the RNG states"),
    "sampler": (dict, "the data position"),
    "config": (dict, "the configuration"),
}


def load_state(path: str | Path) -> dict:
    """trainer_state.pt of a checkpoint (the model and optimizer load with load_shards).

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


# What the shards' index may hold (choice "Nothing executed"): the format's records and the
# torch and pathlib types they use; every other global is refused.
_INDEX_RECORDS = "Metadata MetadataIndex StorageMeta TensorProperties TensorStorageMetadata"
_INDEX_RECORDS += " BytesStorageMetadata ChunkStorageMetadata _MEM_FORMAT_ENCODING"
_INDEX_CLASSES = {("torch.distributed.checkpoint.metadata", n) for n in _INDEX_RECORDS.split()} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        plain = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _INDEX_CLASSES or plain:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


class _SafeReader(FileSystemReader):
    """FileSystemReader whose index is read by _IndexUnpickler (the shards are already read
    with weights_only=True)."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _IndexUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise RunDirError(
                f"refusing to load {path}: {err}, and loading it could run code"
            ) from None
        except (OSError, EOFError, ValueError) as err:
            raise RunDirError(f"{path} cannot be read: {err}") from err
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_shards(path: str | Path, model, optimizer) -> None:
    """The model and optimizer states of checkpoint ``path`` into ``model`` and ``optimizer``,
    whatever the number of processes that wrote it (choice "Any number of processes"). Every
    rank calls it."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with _one_process_quietly():
            load(state, storage_reader=_SafeReader(path / SHARDS), no_dist=not is_distributed())
    except CheckpointException as err:
        for exc, _ in err.failures.values():
            if isinstance(exc, RunDirError):  # a refused index, on any rank
                raise exc from None
        first = next(iter(err.failures.values()))[0]
        raise RunDirError(
            f"the states in {path / SHARDS} cannot be loaded: {type(first).__name__}: {first}"
        ) from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


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
