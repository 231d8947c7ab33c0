"""How a plain method module is spread over ranks; each concern is one small function.

``parallelize(model, info, cfg.parallel, precision)`` applies, in this order:

1. ``convert_syncbn``: BatchNorm -> group SyncBatchNorm over ``syncbn_group_size`` ranks
   (``seer.engine.syncbn``, works on gloo and nccl).
2. ``checkpoint_blocks``: non-reentrant activation checkpointing of every block of the chosen
   backbone stages (torch's ``checkpoint_wrapper``; state-dict keys are unchanged); the
   recomputation in backward leaves BatchNorm running statistics alone.
3. ``shard_fsdp2``: PyTorch FSDP2 ``fully_shard`` on every backbone block, on every head, then
   on the root; full sharding over all ranks, or hybrid (shard inside groups of
   ``shard_group_size`` ranks, replicate across groups) through a 2-D device mesh; mixed
   precision through ``MixedPrecisionPolicy`` (bf16 or fp16 parameters, fp32 reductions), with
   every affine BatchNorm its own fp32 unit first. ``strategy: ddp`` uses
   DistributedDataParallel instead (mixed precision through autocast).

A single process gets 1 and 2 only. fairscale is not used: it is archived, and FSDP lives on
in PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from seer.config import ParallelConfig
from seer.engine.distributed import DistInfo
from seer.engine.meta_init import is_on_meta, materialize
from seer.engine.syncbn import running_stats_frozen_in_recompute

log = logging.getLogger(__name__)

try:  # public since torch 2.6
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older layouts
    from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def backbones(model: nn.Module) -> list[nn.Module]:
    """Every backbone inside the method (MoCo v3 has two): modules with a callable ``blocks``."""
    return [m for m in model.modules() if callable(getattr(m, "blocks", None)) and not isinstance(m, nn.ModuleList)]


def stages_of(backbone: nn.Module) -> list[list[nn.Module]]:
    if callable(getattr(backbone, "stages", None)):
        return [list(stage.children()) for stage in backbone.stages()]
    return [list(backbone.blocks())]  # a ViT is one stage of blocks


def convert_syncbn(model: nn.Module, group_size: int, world_size: int) -> nn.Module:
    if group_size == 0 or world_size == 1:
        return model
    from seer.engine.syncbn import convert_group_sync_batchnorm, syncbn_process_group

    group = syncbn_process_group(world_size if group_size < 0 else group_size)
    return convert_group_sync_batchnorm(model, group)


def checkpoint_blocks(model: nn.Module, stages: list[int] | None) -> int:
    """Wrap the blocks of the chosen stages (all when None) for non-reentrant checkpointing."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    chosen: set[int] = set()
    for backbone in backbones(model):
        per_stage = stages_of(backbone)
        wanted = range(len(per_stage)) if stages is None else stages
        for index in wanted:
            if not 0 <= index < len(per_stage):
                raise ValueError(f"parallel.checkpoint_stages: stage {index} does not exist ({len(per_stage)} stages)")
            chosen.update(id(block) for block in per_stage[index])
    def wrapper(block: nn.Module) -> nn.Module:
        # the recomputation in backward must not update BatchNorm running statistics a second time
        contexts = functools.partial(running_stats_frozen_in_recompute, block)
        return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, context_fn=contexts)

    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: id(m) in chosen)
    return len(chosen)


def device_mesh(cfg: ParallelConfig, info: DistInfo):
    from torch.distributed.device_mesh import init_device_mesh

    if cfg.sharding == "full":
        return init_device_mesh(info.device.type, (info.world_size,))
    shard = cfg.shard_group_size or int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    if info.world_size % shard:
        raise ValueError(f"parallel.shard_group_size {shard} does not divide world size {info.world_size}")
    return init_device_mesh(info.device.type, (info.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def shard_fsdp2(model: nn.Module, mesh, cfg: ParallelConfig, precision: str) -> nn.Module:
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[precision] if precision != "fp32" else None,
        reduce_dtype=torch.float32 if cfg.reduce_fp32 else None,
    )
    options = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward, "mp_policy": policy}
    if precision != "fp32":
        # BatchNorm weights stay fp32 like its running statistics (bf16/fp16 inputs are fine):
        # each affine BatchNorm is its own unit with an fp32 policy (torchtitan issue 674)
        fp32 = {**options, "mp_policy": MixedPrecisionPolicy()}
        for module in model.modules():
            if isinstance(module, _BatchNorm) and module.affine:
                fully_shard(module, **fp32)
    in_backbone: set[int] = set()
    for backbone in backbones(model):
        for stage in stages_of(backbone):
            for block in stage:
                fully_shard(block, **options)
        in_backbone.update(id(m) for m in backbone.modules())
    for child in model.children():  # heads: one unit each
        if id(child) not in in_backbone and any(True for _ in child.parameters()):
            fully_shard(child, **options)
    fully_shard(model, **options)
    return model


def parallelize(
    model: nn.Module, info: DistInfo, cfg: ParallelConfig, precision: str = "fp32", *, seed: int = 0
) -> nn.Module:
    """A model built on the meta device is materialised after wrapping (``seer.engine.meta_init``:
    each rank allocates and initialises only its shards, from ``seed``)."""
    on_meta = is_on_meta(model)
    if not on_meta:
        model.to(info.device)
    model = convert_syncbn(model, cfg.syncbn_group_size, info.world_size)
    if cfg.activation_checkpointing:
        count = checkpoint_blocks(model, cfg.checkpoint_stages)
        log.info("activation checkpointing on %d blocks", count)
    if info.world_size == 1 or cfg.strategy == "ddp":
        if on_meta:
            materialize(model, info.device, seed)
        if info.world_size == 1:
            return model
    if cfg.strategy == "ddp":
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        # per-rank buffers (SwAV's queue) must stay per rank: no buffer broadcast
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    model = shard_fsdp2(model, device_mesh(cfg, info), cfg, precision)
    return materialize(model, info.device, seed) if on_meta else model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def autocast_context(precision: str, device: torch.device, model: nn.Module):
    """Autocast for plain/DDP models; FSDP2 casts through its MixedPrecisionPolicy instead."""
    if precision == "fp32" or is_fsdp(model):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device, model: nn.Module, init_scale: float = 2.0**16):
    """Dynamic loss scaling for fp16 (V100); a sharded-aware scaler under FSDP2. Steps whose
    scaled gradients overflow are skipped while the scale backs off from ``init_scale``."""
    enabled = precision == "fp16"
    if enabled and is_fsdp(model):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device.type, init_scale=init_scale)
    return torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=enabled)
