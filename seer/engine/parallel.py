"""How a plain method module is spread over ranks and made fast; each concern is one small function.

``parallelize(model, info, cfg.parallel, precision, compile_mode=, memory_format=)`` applies, in
this order, and returns the model with its :class:`Precision` (autocast or not, the loss scaler):

1. ``convert_syncbn``: BatchNorm -> group SyncBatchNorm over ``syncbn_group_size`` ranks
   (``seer.engine.syncbn``, works on gloo and nccl).
2. ``compile_blocks`` (``train.compile``): ``blocks`` compiles the forward of every backbone
   block and every head on its own (``seer.engine.compiling``: in place, a block that cannot
   compile falls back to eager with one warning); ``full`` compiles the whole method's forward.
3. ``checkpoint_blocks``: non-reentrant activation checkpointing of every block of the chosen
   backbone stages (torch's ``checkpoint_wrapper``; state-dict keys are unchanged); the
   recomputation in backward leaves BatchNorm running statistics alone. It wraps the compiled
   blocks (torchtitan's order: compile per block, AC around, FSDP around both).
4. ``shard_fsdp2``: PyTorch FSDP2 ``fully_shard`` on every backbone block, on every head, then
   on the root; full sharding over all ranks, or hybrid (shard inside groups of
   ``shard_group_size`` ranks, replicate across groups) through a 2-D device mesh; mixed
   precision through ``MixedPrecisionPolicy`` (bf16 or fp16 parameters, fp32 reductions).
   BatchNorm weights are gathered with their block and enter the op as fp32
   (``seer.engine.syncbn.keep_batchnorm_params_fp32``); its statistics and master weights stay
   fp32. ``strategy: ddp`` uses DistributedDataParallel instead (mixed precision through autocast).
5. ``apply_memory_format`` (``train.memory_format``, :func:`resolve_memory_format`: the backbone's
   preferred layout per device type, e.g. channels_last for RegNets on CUDA) on unsharded models.

A single process gets 1, 2, 3 and 5. fairscale is not used: it is archived, and FSDP lives on
in PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from seer.config import ParallelConfig
from seer.engine.compiling import compile_forward, prepare_dynamo
from seer.engine.distributed import DistInfo
from seer.engine.meta_init import is_on_meta, materialize
from seer.engine.syncbn import keep_batchnorm_params_fp32, running_stats_frozen_in_recompute

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


def compile_blocks(model: nn.Module, mode: str, *, deterministic: bool = False) -> int:
    """``train.compile``: ``off``; ``blocks``: the forward of every backbone block and every head
    compiled on its own (fullgraph, static shapes); ``full``: the whole method's forward as one
    ``torch.compile`` (graph breaks allowed). Returns how many forwards were compiled."""
    if mode == "off":
        return 0
    if mode not in ("blocks", "full"):
        raise ValueError(f"train.compile must be off, blocks or full, got {mode!r}")
    prepare_dynamo(deterministic)
    if mode == "full":
        compile_forward(model, type(model).__name__, fullgraph=False)
        return 1
    blocks, heads = units(model)
    names = {id(m): n for n, m in model.named_modules()}
    for module in blocks + heads:
        compile_forward(module, names[id(module)] or type(module).__name__)
    return len(blocks) + len(heads)


def units(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(every block of every backbone, every other child of the method with parameters): what
    FSDP2 shards as units and ``train.compile=blocks`` compiles, one by one."""
    found = backbones(model)
    blocks = [block for backbone in found for stage in stages_of(backbone) for block in stage]
    inside = {id(m) for backbone in found for m in backbone.modules()}
    heads = [c for c in model.children() if id(c) not in inside and any(True for _ in c.parameters())]
    return blocks, heads


def resolve_memory_format(setting: str, backbone: nn.Module, device: torch.device) -> torch.memory_format:
    """``train.memory_format``: ``channels_last``, ``contiguous``, or ``auto``: the backbone's
    ``preferred_memory_format`` for this device type (``seer.models``; contiguous without one)."""
    if setting == "auto":
        setting = getattr(backbone, "preferred_memory_format", {}).get(torch.device(device).type, "contiguous")
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    if setting not in formats:
        raise ValueError(f"train.memory_format must be auto, channels_last or contiguous, got {setting!r}")
    return formats[setting]


def apply_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """4-D weights (convolutions) in ``memory_format``, in place (the input views come in it too:
    the batch source makes them so). FSDP2 gathers its shards contiguous, so sharded models keep
    only the views' layout, which is what the convolutions pick their kernels by."""
    if memory_format != torch.contiguous_format:
        model.to(memory_format=memory_format)
    return model


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
        # BatchNorm weights are gathered in bf16/fp16 with their block and enter the op in fp32,
        # beside its fp32 statistics (not one fp32 FSDP unit per BatchNorm: hundreds of tiny units)
        keep_batchnorm_params_fp32(model)
    blocks, heads = units(model)
    for unit in blocks + heads:  # one unit per block, one per head; the root holds the rest
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


def parallelize(
    model: nn.Module, info: DistInfo, cfg: ParallelConfig, precision: str = "fp32", *, seed: int = 0,
    compile_mode: str = "off", memory_format: torch.memory_format = torch.contiguous_format,
    deterministic: bool = False,
) -> tuple[nn.Module, Precision]:
    """The model spread over the ranks, and the :class:`Precision` the loop uses with it.

    A model built on the meta device is materialised after wrapping (``seer.engine.meta_init``:
    each rank allocates and initialises only its shards, from ``seed``). ``compile_mode`` is
    ``train.compile``, ``memory_format`` the resolved ``train.memory_format``."""
    model = _spread(model, info, cfg, precision, seed, compile_mode, deterministic)
    if not is_fsdp(model):
        apply_memory_format(model, memory_format)
    return model, Precision.for_model(model, precision, info.device)


def _spread(model: nn.Module, info: DistInfo, cfg: ParallelConfig, precision: str, seed: int, compile_mode: str,
            deterministic: bool) -> nn.Module:
    on_meta = is_on_meta(model)
    if not on_meta:
        model.to(info.device)
    model = convert_syncbn(model, cfg.syncbn_group_size, info.world_size)
    compiled = compile_blocks(model, compile_mode, deterministic=deterministic)
    if compiled:
        log.info("torch.compile (%s) on %d forward(s)", compile_mode, compiled)
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


@dataclass
class Precision:
    """What the loop needs of ``train.precision``, read once by :func:`parallelize`: whether to
    run the forward under autocast (plain/DDP models; FSDP2 casts through its
    ``MixedPrecisionPolicy`` instead) and the loss scaler (dynamic for fp16, a sharded-aware one
    under FSDP2; disabled otherwise: steps whose scaled gradients overflow are skipped while the
    scale backs off from ``init_scale``)."""

    name: str
    device: torch.device
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    @classmethod
    def for_model(cls, model: nn.Module, name: str, device: torch.device, init_scale: float = 2.0**16) -> "Precision":
        autocast_dtype = None if name == "fp32" or is_fsdp(model) else DTYPES[name]
        if name == "fp16" and is_fsdp(model):
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler(device=device.type, init_scale=init_scale)
        else:
            scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=name == "fp16")
        return cls(name, device, autocast_dtype, scaler)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)
