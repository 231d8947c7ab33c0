"""Tensor collectives over the default process group, and the DTensor shim: what methods, the
optimizer and the guard reduce or gather. Every helper also works in one process without a
process group (then it is the identity), so callers use them unconditionally.

This module sits below both ``seer/methods/`` and ``seer/engine/``: SwAV's Sinkhorn sums and
MoCo v3's key gather come from here, not from the engine. Process-group setup and decisions
all ranks must share (``decide_on_main``, ``agree_any``) are ``seer.engine.distributed``'s.

DTensor shim: ``DTensor`` (None when torch has no distributed tensor), :func:`local_part`,
:func:`full_value` and :func:`full_norms` work on plain tensors and FSDP2 shards alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(tensor: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """In-place all-reduce (SUM unless ``op``) over ``group``; returns ``tensor``; a no-op alone."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return tensor


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``value`` summed over ranks."""
    return all_reduce_(value.detach().clone())


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, without gradient;
    ``tensor`` itself in one process."""
    _, world = rank_and_world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


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
