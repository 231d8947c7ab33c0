"""BatchNorm synchronised over a group of ranks, on any backend (gloo/CPU and nccl/GPU).

``torch.nn.SyncBatchNorm`` refuses CPU tensors; :class:`GroupSyncBatchNorm` does the same job
everywhere: in training mode the forward pass and the backward pass both equal BatchNorm over
the concatenation of the group's batches (SEER synchronises in groups of 64 GPUs, see
:func:`syncbn_process_group`). Statistics are computed in fp32 whatever the input dtype; the
per-rank (count, mean, centred sum of squares) are gathered and combined with Chan's parallel
formula, which is as stable as a two-pass variance and needs one collective. Parameter
gradients stay local to each rank (the data-parallel gradient reduction sums/averages them),
exactly as with ``torch.nn.SyncBatchNorm``.

Also BatchNorm under activation checkpointing: :func:`running_stats_frozen_in_recompute` is the
``context_fn`` that keeps the recomputation of a checkpointed block (in the backward pass) from
updating running statistics a second time; the first forward's update is the only one, as
without checkpointing (fairscale patched BatchNorm for the same reason).

And BatchNorm under FSDP2 mixed precision: its weights are gathered in the compute dtype with
the rest of their block, and :func:`batch_norm_fp32_params` (``Fp32ParamsBatchNorm1d/2d``, and
``GroupSyncBatchNorm`` itself) hands them to the op as fp32, beside the fp32 running statistics
(a bf16 weight with fp32 statistics is refused by the op: torchtitan issue 674). The fp32 master
weights, the statistics and the normalisation's arithmetic stay fp32; no BatchNorm needs an FSDP
unit of its own.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _group_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    size = dist.get_world_size(group)
    if size < 1:
        raise ValueError(f"rank {dist.get_rank()} is not a member of GroupSyncBatchNorm's process group")
    return size


class _GroupBatchNormFunction(torch.autograd.Function):
    """BatchNorm over the concatenated batch of ``group``; returns the output and the group's
    mean and unbiased variance (for the running statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, world):  # type: ignore[override]
        dims = [0] + list(range(2, x.dim()))
        channels = x.size(1)
        x32 = x.float()
        local_count = x.numel() // channels
        if local_count > 0:
            var, mean = torch.var_mean(x32, dim=dims, correction=0)
        else:  # an empty local batch contributes nothing
            mean = var = torch.zeros(channels, device=x.device)
        count = torch.full((1,), float(local_count), device=x.device)
        stats = torch.cat([count, mean, var * local_count])  # [n, mean (C), M2 (C)]
        gathered = [torch.empty_like(stats) for _ in range(world)]
        dist.all_gather(gathered, stats, group=group)
        table = torch.stack(gathered)  # (world, 1 + 2C)
        counts, means, m2s = table[:, :1], table[:, 1 : 1 + channels], table[:, 1 + channels :]
        total = counts.sum()
        group_mean = (counts * means).sum(0) / total
        group_m2 = (m2s + counts * (means - group_mean) ** 2).sum(0)
        invstd = torch.rsqrt(group_m2 / total + eps)
        unbiased_var = group_m2 / (total - 1).clamp(min=1)  # no host sync to check total > 1
        shape = [1, channels] + [1] * (x.dim() - 2)
        out = (x32 - group_mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            out = out * weight.float().view(shape) + bias.float().view(shape)
        ctx.save_for_backward(x, weight, group_mean, invstd, total)
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.mark_non_differentiable(group_mean, unbiased_var)
        return out.to(x.dtype), group_mean, unbiased_var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):  # type: ignore[override]
        x, weight, mean, invstd, total = ctx.saved_tensors
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.size(1)] + [1] * (x.dim() - 2)
        dy = grad_out.float()
        xhat = (x.float() - mean.view(shape)) * invstd.view(shape)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            group_sum_dy, group_sum_dy_xhat = sums.chunk(2)
            scale = invstd if weight is None else invstd * weight.float()
            grad_x = (
                dy
                - (group_sum_dy / total).view(shape)
                - xhat * (group_sum_dy_xhat / total).view(shape)
            ) * scale.view(shape)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


class GroupSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics are those of the whole ``process_group``
    (``None``: the default group). Eval mode, an uninitialised process group or a group of one
    rank behave exactly like ``nn.BatchNorm1d``/``2d``. Inputs: (B, C), (B, C, L) or (B, C, H, W).
    State-dict keys are BatchNorm's (weight, bias, running_mean, running_var,
    num_batches_tracked). Every rank of the group must run the forward/backward together.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"GroupSyncBatchNorm expects a 2-D, 3-D or 4-D input, got {input.dim()}-D")
        if input.size(1) != self.num_features:
            raise ValueError(
                f"GroupSyncBatchNorm has {self.num_features} channels, input has {input.size(1)} (dim 1)"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        world = _group_size(self.process_group)
        if not self.training or world == 1:
            return batch_norm_fp32_params(self, input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        out, mean, var = _GroupBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, self.process_group, world
        )
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.to(self.running_var.dtype), alpha=factor)
        return out

    def __deepcopy__(self, memo: dict) -> "GroupSyncBatchNorm":
        # a copy (e.g. MoCo's momentum encoder) shares the process group, which cannot be copied
        memo[id(self.process_group)] = self.process_group
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    def extra_repr(self) -> str:
        size = _group_size(self.process_group)
        return super().extra_repr() + f", group_size={size}"


def batch_norm_fp32_params(bn: _BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """``_BatchNorm.forward`` with the affine weight and bias handed to the op in fp32.

    Under FSDP2 mixed precision they arrive in the compute dtype (gathered with their block);
    the op takes a bf16/fp16 input with fp32 weights and statistics and normalises in fp32.
    For fp32 weights this is exactly ``_BatchNorm.forward`` (``.float()`` is then the tensor itself).
    """
    bn._check_input_dim(input)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_stats = not bn.training or bn.track_running_stats
    weight = None if bn.weight is None else bn.weight.float()
    bias = None if bn.bias is None else bn.bias.float()
    return F.batch_norm(input, bn.running_mean if keep_stats else None, bn.running_var if keep_stats else None,
                        weight, bias, batch_stats, factor, bn.eps)


class Fp32ParamsBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` computing with fp32 weights (:func:`batch_norm_fp32_params`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return batch_norm_fp32_params(self, input)


class Fp32ParamsBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` computing with fp32 weights (:func:`batch_norm_fp32_params`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return batch_norm_fp32_params(self, input)


_FP32_PARAMS = {nn.BatchNorm1d: Fp32ParamsBatchNorm1d, nn.BatchNorm2d: Fp32ParamsBatchNorm2d}


def keep_batchnorm_params_fp32(model: nn.Module) -> int:
    """Make every affine ``BatchNorm1d/2d`` under ``model`` compute with fp32 weights, in place
    (the class only: parameters, buffers, state-dict keys and ``isinstance`` are unchanged;
    ``GroupSyncBatchNorm`` does it already). Returns how many were changed."""
    changed = 0
    for module in model.modules():
        target = _FP32_PARAMS.get(type(module))
        if target is not None and module.affine:
            module.__class__ = target
            changed += 1
    return changed


def convert_group_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every ``BatchNorm1d``/``BatchNorm2d`` under ``module`` (recursively, ``module``
    itself included) by a :class:`GroupSyncBatchNorm` on ``process_group`` with the same
    parameters, buffers, ``requires_grad`` and training mode; return the converted module."""
    converted = module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, GroupSyncBatchNorm):
        converted = GroupSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            process_group=process_group,
        )
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_group_sync_batchnorm(child, process_group))
    return converted


def syncbn_process_group(group_size: int) -> Any:
    """The process group of ``group_size`` consecutive ranks this rank belongs to.

    Every rank must call this (it creates every subgroup, in the same order, on every rank).
    ``group_size`` 0 or >= world size -> ``None`` (the default group: synchronise over all
    ranks); a world size not divisible by ``group_size`` -> ``ValueError``.
    """
    if group_size < 0:
        raise ValueError(f"SyncBatchNorm group size must be >= 0, got {group_size}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("syncbn_process_group needs an initialised torch.distributed process group")
    world, rank = dist.get_world_size(), dist.get_rank()
    if group_size == 0 or group_size >= world:
        return None
    if world % group_size != 0:
        raise ValueError(
            f"world size {world} is not divisible by the SyncBatchNorm group size {group_size}"
        )
    mine = None
    for start in range(0, world, group_size):
        ranks = list(range(start, start + group_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


@contextlib.contextmanager
def _no_running_stats_update(module: nn.Module) -> Iterator[None]:
    """Training-mode BatchNorms under ``module`` normalise with batch statistics as always, but
    ``running_mean``/``running_var``/``num_batches_tracked`` are put back afterwards as they
    were before: the recomputation runs exactly the first forward's code (so a compiled block
    needs no second graph and saves the same tensors), then its statistics update is undone.
    """
    frozen = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [[t.detach().clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if t is not None]
             for bn in frozen]
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, tensors in zip(frozen, saved):
                live = [t for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if t is not None]
                for current, before in zip(live, tensors):
                    current.copy_(before)


def running_stats_frozen_in_recompute(module: nn.Module) -> tuple[Any, Any]:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint`` of ``module``: the first
    forward runs as usual, the recomputation in backward does not touch running statistics."""
    return contextlib.nullcontext(), _no_running_stats_update(module)
