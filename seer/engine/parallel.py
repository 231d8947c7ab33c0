"""How a plain model is spread over ranks: data parallel for now.

One process: the model as it is. Several: ``DistributedDataParallel`` with
``broadcast_buffers=False`` (per-rank buffers such as SwAV's queue must stay per rank).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from seer.engine.distributed import DistInfo


def parallelize(model: nn.Module, info: DistInfo) -> nn.Module:
    model.to(info.device)
    if info.world_size == 1:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
