"""Meta-device construction: a method built on the meta device, spread over ranks (FSDP2 shards
it while it holds no memory), then materialised so that every rank allocates and initialises
ONLY its own shards. No rank ever holds the full fp32 model (RegNetY-10B is 37 GB in fp32).

``materialize(model, device, seed)``:

1. ``model.to_empty(device=device)``: storage for what this rank keeps (FSDP2: its shard of
   each parameter; buffers and unsharded models: everything).
2. Module by module, in ``named_modules`` order: a full-size CPU copy of the module's OWN tensors
   (never its children's), zero-filled, then initialised with the CPU random generator seeded
   from ``(seed, module name)`` by the module's ``reset_parameters`` (PyTorch's default, as at
   construction) and then the enclosing backbone's ``init_module`` (its recipe: torchvision's
   RegNet init, MoCo v3's ViT init); this rank's part of each tensor is copied into the model.
   Buffers without a rule (SwAV's queue) stay zero, as the constructors make them.
3. Method invariants the constructor established: MoCo v3's momentum encoder starts as an exact
   copy of the base encoder.

At most one full tensor exists at a time. Values depend on the seed and the module names only
(activation-checkpoint wrappers are left out of the names), so the initial full weights are the
same at any world size, sharding strategy or device.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from data_pipeline.seeding import derive_seed
from seer.collectives import is_dtensor, local_part

_WRAPPER_PART = "_checkpoint_wrapped_module."  # torch's activation-checkpoint wrapper


def is_on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def canonical_name(name: str) -> str:
    """A module's name without activation-checkpoint wrappers (what state-dict keys use)."""
    return name.replace(_WRAPPER_PART, "").replace("_checkpoint_wrapped_module", "").rstrip(".")


def _init_rules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(canonical name, module) of every module with an ``init_module`` recipe (the backbones),
    longest name first so that the innermost one wins."""
    owners = [(canonical_name(n), m) for n, m in model.named_modules() if callable(getattr(m, "init_module", None))]
    return sorted(owners, key=lambda item: -len(item[0]))


def _owner(name: str, owners: list[tuple[str, nn.Module]]) -> tuple[nn.Module, str] | None:
    for prefix, owner in owners:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            relative = name[len(prefix):].lstrip(".") if prefix else name
            return owner, relative
    return None


def _full_size_copy(module: nn.Module) -> nn.Module:
    """The same module object type and attributes, with zero-filled full-size CPU copies of its
    own parameters and buffers and no children (so init rules touch this module's only)."""
    shell = object.__new__(type(module))  # not type(module)(): FSDP2's classes re-run __init__
    shell.__dict__ = dict(module.__dict__)
    shell._parameters = {
        k: None if p is None else nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for k, p in module._parameters.items()
    }
    shell._buffers = {k: None if b is None else torch.zeros(b.shape, dtype=b.dtype) for k, b in module._buffers.items()}
    shell._modules = {}
    return shell


def _local_piece(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` for ``target`` (a DTensor shard, or a plain tensor: all)."""
    if not is_dtensor(target):
        return full
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - other layouts: distribute (a collective) instead
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(target.device), target.device_mesh, target.placements).to_local()
    shape, offset = compute_local_shape_and_global_offset(full.shape, target.device_mesh, target.placements)
    piece = full
    for dim, (start, size) in enumerate(zip(offset, shape)):
        piece = piece.narrow(dim, start, size)
    return piece


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate and initialise a model built on the meta device (see the module doc); in place."""
    model.to_empty(device=device)
    owners = _init_rules(model)
    for name, module in model.named_modules():
        if not (module._parameters or module._buffers):
            continue
        name = canonical_name(name)
        shell = _full_size_copy(module)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "init", name))
            if callable(getattr(shell, "reset_parameters", None)):
                shell.reset_parameters()
            owner = _owner(name, owners)
            if owner is not None:
                owner[0].init_module(owner[1], shell)
        for kind in ("_parameters", "_buffers"):
            for key, full in getattr(shell, kind).items():
                target = getattr(module, kind)[key]
                if target is not None:
                    local_part(target).copy_(_local_piece(full, target))
    copy_momentum_encoder = getattr(model, "update_momentum_encoder", None)
    if callable(copy_momentum_encoder):
        copy_momentum_encoder(0.0)  # momentum 0: the key encoder becomes the query encoder
    return model
