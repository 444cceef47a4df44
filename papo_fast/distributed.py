"""Many processes: torchrun, FSDP2, and the few collectives the trainer needs.

    world = init_world(device)          # from torchrun's WORLD_SIZE, RANK, LOCAL_RANK; or one
    runner = PolicyRunner(model)        # runner(fn, *args) = fn(model, *args), inside the root
    shard_policy(runner, device)        # FSDP2 on each decoder layer and on the root (world > 1)
    total = all_reduce([tokens, seqs], "sum")
    weights = full_state_dict(model)    # plain full tensors on every rank, for export and rollouts

Choices:
1. **One process is N = 1.** The trainer runs the same code on any number of processes: it
   splits its data by rank, reduces its counts and metrics, and writes from rank 0. With one
   process every collective here is the identity (no process group is made) and the model is
   not sharded: FSDP over one process shards nothing and would only add DTensor costs. A process
   group is created when torchrun's environment says WORLD_SIZE > 1 (nccl on GPUs, gloo on
   CPUs), or used as it is when the caller made one.
2. **Inside the root's forward.** FSDP2 gathers a module's parameters in its forward and frees
   them after. The fused loss reads the LM-head weight directly, next to the model body, which
   outside the root's forward would mix sharded and plain tensors. So every use of the model
   runs as ``fn(model, ...)`` inside ``PolicyRunner.forward``, the sharded root, where the
   root's parameters (embeddings, final norm, LM head) are whole.
3. **Sum of gradients.** Each rank's loss is its share of the global loss (the counts of the
   whole optimizer step, docs/design.md "Global counts"), so the gradient is the sum over ranks,
   not their mean: every FSDP module gets a gradient divide factor of 1.0, and sum reductions are
   forced for the communications (gloo has no pre-scaled sum).
4. **Mixed precision.** On GPUs the sharded model computes in bfloat16 and reduces gradients in
   float32, its master weights kept in model.dtype; on CPUs everything stays in float32. Forward
   inputs are never cast: log-probs and advantages keep their float32.
5. **Lockstep.** Every forward and backward of a sharded model is a collective, so all ranks run
   the same number of micro-batches: the counts are max-reduced, a rank splits its sequences
   further to reach them, and runs a zero-weight micro-batch where it has no sequence left
   (trainer's "lockstep" micro-batches).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist


class World(NamedTuple):
    rank: int
    size: int

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run directory's files."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (n // size each when it divides)."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"the environment variable {name}={value!r} is not an integer") from None


def launched_size() -> int:
    """The world size torchrun (or the caller's process group) gives this process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 for one process)."""
    return _env_int("LOCAL_RANK", 0)


def init_world(device: torch.device) -> World:
    """The process group of this run (choice "One process is N = 1"): nccl when the model is on a
    GPU, gloo on the CPU; none for one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    size = launched_size()
    if size == 1:
        return World(0, 1)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={size}, but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def end_world() -> None:
    """Tear down the process group init_world made (after the last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Rank 0, or the only process."""
    return not is_distributed() or dist.get_rank() == 0


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """``values`` summed (``op="sum"``), maxed or mined over the ranks, in float64; NaN is
    ignored by "max" and "min" unless every rank has it (NaN enters as the op's identity, -inf
    or +inf, and that identity comes back as NaN: the reduced values are finite or NaN). The
    identity in one process."""
    if not is_distributed() or not values:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    reduce = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    if op == "sum":
        dist.all_reduce(t, op=reduce)
        return t.cpu().tolist()
    none = -float("inf") if op == "max" else float("inf")
    t = t.masked_fill(t.isnan(), none)
    dist.all_reduce(t, op=reduce)
    return t.masked_fill(t == none, float("nan")).cpu().tolist()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (pickled; small host-side values), in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_dicts(parts: list[dict]) -> dict:
    """Sum per key of ``parts``: counters of several ranks (a key some lack counts 0 there)."""
    keys = list(dict.fromkeys(k for part in parts for k in part))
    return {k: sum(float(part.get(k, 0.0)) for part in parts) for k in keys}


class PolicyRunner(torch.nn.Module):
    """The policy as FSDP's root module: ``runner(fn, *args)`` runs ``fn(model, *args)`` inside
    its forward (choice "Inside the root's forward")."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules a Hugging Face model names in ``_no_split_modules`` (its decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"cannot shard {type(model).__name__}: it names no decoder layer class in "
            "_no_split_modules, and FSDP needs one unit per layer"
        )
    return layers


def shard_policy(runner: PolicyRunner, device: torch.device) -> None:
    """FSDP2 on each decoder layer and on ``runner`` (the root), gradients summed over ranks
    (choices "Sum of gradients", "Mixed precision"). Nothing in one process."""
    if not is_distributed():
        return
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if device.type == "cuda":
        mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False)
    else:
        mp = MixedPrecisionPolicy(cast_forward_inputs=False)
    for layer in decoder_layers(runner.model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(runner, mp_policy=mp)
    for module in runner.modules():
        if isinstance(module, FSDPModule):  # per module: the setting is not inherited
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as plain full tensors on every rank (a collective when sharded);
    tied weights stay one tensor under their several names. The model's own tensors in one
    process."""
    seen: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen[id(t)] = _full(t)
        out[name] = seen[id(t)]
    return out


def total_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (a replicated DTensor when sharded)."""
    return _full(norm)
