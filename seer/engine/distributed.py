"""Process-group setup, the device a rank runs on, and decisions every rank must share: the one
home for "all ranks must agree" code. Tensor reductions and gathers (and the DTensor shim) are
``seer.collectives``', one layer below, so that methods need nothing from the engine.

Ranks come from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or, when
those are absent, from Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master address
must then be exported by the launcher, as ``cluster/`` does). One process without either runs
with no process group at all. CPU uses gloo, CUDA uses nccl.

Agreement: a decision that must be the same on every rank is either made once and broadcast
(:func:`decide_on_main`: rank 0 reads the ``latest`` pointer, pins the corpus, ...) or computed
from globally reduced values (:func:`agree_any`). Every helper is a no-op without a process
group, so single-process code calls them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from seer.collectives import is_distributed

T = TypeVar("T")
CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for deterministic results (CUDA docs)
BACKGROUND_TIMEOUT_S = 1800.0  # collectives of background work (asynchronous checkpoint writes)


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


def init_distributed(device_kind: str = "auto", *, deterministic: bool = False, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by the environment (or run alone). ``timeout_s`` bounds
    every collective until :func:`set_timeout` changes it (the failure watchdog does, by phase)."""
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
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _collective_device() -> torch.device:
    """Where small agreement tensors live: nccl only reduces CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_any(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (one all-reduce): "stop", "skip",
    "this rank saw a non-finite value". Every rank must call it at the same point."""
    if not is_distributed():
        return bool(flag)
    votes = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(votes)
    return bool(votes.item() > 0)


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


_background_groups: list = []  # groups of background work (asynchronous checkpoint writes): timeouts left alone


def background_group(backend: str = "gloo"):
    """A new process group for work in a background thread (an asynchronous checkpoint write):
    it keeps the slow timeout whatever :func:`set_timeout` does to the training's groups."""
    group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=BACKGROUND_TIMEOUT_S))
    _background_groups.append(group)
    return group


def set_timeout(seconds: float) -> None:
    """The timeout of every later collective on the training's process groups (all but the
    background ones): gloo raises after it; nccl's watchdog aborts the process. A no-op without a
    process group."""
    if not is_distributed():
        return
    timeout = datetime.timedelta(seconds=seconds)
    setter = getattr(dist, "set_timeout", None)  # torch >= 2.10; older: the private one
    if setter is None:
        from torch.distributed.distributed_c10d import _set_pg_timeout as setter
    groups = list(getattr(dist.distributed_c10d._world, "pg_map", {}) or [None])
    for group in groups:
        if any(group is background for background in _background_groups):
            continue
        try:
            setter(timeout, group)
        except (RuntimeError, ValueError):  # a group this rank is not in, or a backend that cannot
            continue


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
