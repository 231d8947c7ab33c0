"""Process-group setup, the device a rank runs on, and every collective helper of seer: the one
home for "all ranks must agree" code (engine, methods and benchmarks import from here).

Ranks come from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or, when
those are absent, from Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master address
must then be exported by the launcher, as ``cluster/`` does). One process without either runs
with no process group at all. CPU uses gloo, CUDA uses nccl.

Agreement: a decision that must be the same on every rank is either made once and broadcast
(:func:`decide_on_main`: rank 0 reads the ``latest`` pointer, pins the corpus, ...) or computed
from globally reduced values (:func:`agree_any`, :func:`all_reduce_sum`). Every helper is a
no-op without a process group, so single-process code calls them unconditionally.

DTensor shim: ``DTensor`` (None when torch has no distributed tensor), :func:`local_part` and
:func:`full_value` work on plain tensors and FSDP2 shards alike.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]

T = TypeVar("T")
CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for deterministic results (CUDA docs)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name) not in (None, ""):
            return int(os.environ[name])
    return None


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a rank: ``local_rank`` when the process sees several GPUs (torchrun,
    one process per GPU of the node), 0 when it sees one (a scheduler bound one GPU per task)."""
    if visible < 1:
        raise RuntimeError("no CUDA device is visible; use train.device=cpu")
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise RuntimeError(f"LOCAL_RANK {local_rank} but this process sees only {visible} GPUs")
    return local_rank


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        index = cuda_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def prepare_determinism(device_kind: str) -> None:
    """Before CUDA initialises: cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, at its first handle, and
    ``torch.use_deterministic_algorithms`` raises on CUDA matmuls without it. Kept if already set."""
    if device_kind in ("auto", "cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def init_distributed(device_kind: str = "auto", *, deterministic: bool = False) -> DistInfo:
    """Join the process group described by the environment (or run alone)."""
    if deterministic:
        prepare_determinism(device_kind)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    device = resolve_device(device_kind, local_rank)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            raise RuntimeError("a multi-process run needs MASTER_PORT (torchrun and cluster/ set it)")
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=30),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    """Where small agreement tensors live: nccl only reduces CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# reductions


def all_reduce_(tensor: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """In-place all-reduce (SUM unless ``op``) over ``group``; returns ``tensor``; a no-op alone."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return tensor


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``value`` summed over ranks."""
    return all_reduce_(value.detach().clone())


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    value = all_reduce_sum(value)
    if is_distributed():
        value /= dist.get_world_size()
    return value


def agree_any(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (one all-reduce): "stop", "skip",
    "this rank saw a non-finite value". Every rank must call it at the same point."""
    if not is_distributed():
        return bool(flag)
    votes = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(votes)
    return bool(votes.item() > 0)


def agree_all(flag: bool) -> bool:
    """True on every rank only when ``flag`` is True on all of them."""
    return not agree_any(not flag)


# ---------------------------------------------------------------------------------------------
# one decision, made once


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def decide_on_main(decide: Callable[[], T]) -> T:
    """Run ``decide()`` on rank 0 only and return its result on every rank.

    For what ranks could otherwise see differently (a ``latest`` pointer on a network file
    system, the shards present when a corpus is pinned). An exception on rank 0 is raised on
    every rank (same type when it can be rebuilt from its message, else RuntimeError) instead
    of leaving the others waiting in the broadcast.
    """
    outcome: tuple[str, Any] = ("ok", None)
    if not is_distributed() or dist.get_rank() == 0:
        try:
            outcome = ("ok", decide())
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            if not is_distributed():
                raise
            outcome = ("error", (type(err), str(err)))
    kind, value = broadcast_object(outcome)
    if kind == "error":
        error_type, message = value
        try:
            error = error_type(message)
        except Exception:  # noqa: BLE001 - an exception type with another signature
            error = RuntimeError(f"{error_type.__name__}: {message}")
        raise error
    return value


def all_gather_objects(obj):
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# tensors that may be FSDP2 shards (DTensors)


def is_dtensor(tensor: Any) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's storage of ``tensor`` (an alias: in-place changes reach the DTensor)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value as a plain tensor: ``full_tensor()`` of a DTensor (a collective over its
    mesh, e.g. a norm whose placement is Partial; older torch returned only the local part when
    such a result was converted with ``float()``), the tensor itself otherwise."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def full_norms(tensors: list[torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """L2 norms of WHOLE tensors (plain or FSDP2 DTensor shards) as one plain vector.

    Local norms come from one batched (foreach) kernel; the squared norms of all sharded tensors
    that share a mesh are summed over its sharded dimensions in ONE all-reduce, not one per
    tensor. Every rank holding shards must call it with the same tensors in the same order.
    """
    if not tensors:
        return torch.zeros(0, dtype=dtype)
    local_norms = torch._foreach_norm([local_part(t) for t in tensors])
    squares = torch.stack([norm.to(dtype) for norm in local_norms]).square()
    sharded: dict[tuple, tuple[Any, list[int], list[int]]] = {}
    for index, tensor in enumerate(tensors):
        if is_dtensor(tensor):
            dims = [d for d, placement in enumerate(tensor.placements) if placement.is_shard()]
            if dims:
                key = (id(tensor.device_mesh), tuple(dims))
                sharded.setdefault(key, (tensor.device_mesh, dims, []))[2].append(index)
    for mesh, dims, indices in sharded.values():
        part = squares[indices]
        for dim in dims:
            dist.all_reduce(part, group=mesh.get_group(dim))
        squares[indices] = part
    return squares.sqrt()
