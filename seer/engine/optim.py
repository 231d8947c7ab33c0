"""Optimizers and learning-rate schedules: parameter groups (what decays, what LARS adapts),
LARS (SwAV/VISSL style, works on FSDP2 DTensor shards), SGD/AdamW construction with the linear
LR scaling rule, and the two schedules (cosine for a fixed dataset, halve-on-plateau for an
online stream) with the state a checkpoint needs.

Every LR that leaves this module is ABSOLUTE: the per-256-images numbers in the config
(``optim.lr``, ``schedule.start_lr``, ``schedule.final_lr``, ``schedule.min_lr``) are multiplied
by ``global_batch / 256`` here, once.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from seer.config import OptimConfig, ScheduleConfig
from seer.collectives import full_norms, local_part

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, GroupSyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
NO_DECAY_NAME_PARTS = ("pos_embed", "cls_token")


# ---------------------------------------------------------------------------------------------
# parameter groups


def _is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith(
        ("Norm", "Norm1d", "Norm2d", "Norm3d")
    )


def no_decay_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the parameters that get no weight decay:
    every parameter of a norm layer (by module type), biases, 0-/1-D tensors, and names
    containing ``pos_embed`` or ``cls_token``."""
    names = set()
    for module_name, module in model.named_modules():
        if _is_norm_module(module):
            for param_name, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    for name, param in model.named_parameters():
        last = name.rsplit(".", 1)[-1]
        if last == "bias" or param.ndim <= 1 or any(part in name for part in NO_DECAY_NAME_PARTS):
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float, *, exclude_from_adaptation: bool) -> list[dict]:
    """Two optimizer groups from ``model.named_parameters()`` (trainable parameters only):

    - ``group_name="decay"``: ``weight_decay`` and LARS adaptation;
    - ``group_name="no_decay"``: norm parameters, biases, pos_embed, cls_token: weight decay 0,
      and ``lars_exclude=exclude_from_adaptation`` (True: plain SGD+momentum under LARS).

    Works unchanged on FSDP2-sharded models (names are kept, parameters are DTensors).
    Empty groups are left out.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    excluded = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name in excluded else decay).append(param)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimise")
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False, "group_name": "decay"},
        {
            "params": no_decay,
            "weight_decay": 0.0,
            "lars_exclude": exclude_from_adaptation,
            "group_name": "no_decay",
        },
    ]
    return [group for group in groups if group["params"]]


# ---------------------------------------------------------------------------------------------
# LARS


class LARS(torch.optim.Optimizer):
    """SGD with momentum, weight decay and the LARS trust ratio, as SwAV/VISSL use it
    (apex LARC with ``clip=False``)::

        d     = (g + wd * w) * trust_coefficient * ||w|| / (||g|| + wd * ||w|| + eps)
        buf   = momentum * buf + d
        w     = w - lr * buf

    where ``||w|| = 0`` or ``||g|| = 0`` (a zero-initialised layer, a gradient zeroed while frozen)
    gives ``d = g``: no decay and no trust ratio, as in LARC. Groups with ``lars_exclude=True`` skip the trust ratio (plain SGD + momentum with the
    group's weight decay, which :func:`param_groups` sets to 0). Norms are of the full tensor
    even when parameters and gradients are FSDP2 DTensor shards: the per-tensor norms come from
    batched (foreach) kernels and ONE all-reduce per group for all sharded tensors, so every
    rank must call ``step`` together. Momentum buffers have the parameter's type
    (DTensor for a shard), so distributed checkpointing saves them sharded.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ):
        if lr < 0:
            raise ValueError(f"LARS lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS trust_coefficient must be > 0, got {trust_coefficient}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")
            weights = [local_part(p) for p in params]
            grads = [local_part(p.grad) for p in params]
            updates = self._updates(group, params, weights, grads)
            if group["momentum"] != 0:
                for param in params:
                    if "momentum_buffer" not in self.state[param]:
                        self.state[param]["momentum_buffer"] = torch.zeros_like(param)
                buffers = [local_part(self.state[p]["momentum_buffer"]) for p in params]
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, updates)
                updates = buffers
            torch._foreach_add_(weights, updates, alpha=-group["lr"])
        return loss

    @staticmethod
    def _updates(group: dict, params: list, weights: list, grads: list) -> list[torch.Tensor]:
        """``d`` of every parameter of ``group`` (see the class doc), with batched kernels: the
        norms of all weights and gradients come from :func:`full_norms` in one reduction."""
        weight_decay = group["weight_decay"]
        if group["lars_exclude"]:
            if weight_decay == 0:
                return grads
            return torch._foreach_add(grads, weights, alpha=weight_decay)
        norms = full_norms([*params, *[p.grad for p in params]])
        weight_norm, grad_norm = norms[: len(params)], norms[len(params):]
        active = (weight_norm > 0) & (grad_norm > 0)  # as apex LARC: else no decay, no trust ratio
        ratio = group["trust_coefficient"] * weight_norm / (grad_norm + weight_decay * weight_norm + group["eps"])
        trust = torch.where(active, ratio, torch.ones_like(ratio))
        decay = torch.where(active, torch.full_like(ratio, weight_decay), torch.zeros_like(ratio))
        device = grads[0].device
        trusts = [t.to(device=device, dtype=g.dtype) for t, g in zip(trust.to(device).unbind(), grads)]
        decays = [d.to(device=device, dtype=g.dtype) for d, g in zip(decay.to(device).unbind(), grads)]
        updates = torch._foreach_add(grads, torch._foreach_mul(weights, decays))
        torch._foreach_mul_(updates, trusts)
        return updates


# ---------------------------------------------------------------------------------------------
# construction


def scaled_lr(lr_per_256: float, global_batch: int) -> float:
    """The linear scaling rule: ``lr_per_256 * global_batch / 256``."""
    if global_batch <= 0:
        raise ValueError(f"global batch size must be > 0, got {global_batch}")
    return lr_per_256 * global_batch / 256


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    """``cfg.name`` in sgd / lars / adamw, initial LR ``scaled_lr(cfg.lr, global_batch)``; biases,
    norm parameters, pos_embed and cls_token get no weight decay (and no LARS adaptation)."""
    lr = scaled_lr(cfg.lr, global_batch)
    groups = param_groups(model, cfg.weight_decay, exclude_from_adaptation=cfg.name == "lars")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            trust_coefficient=cfg.trust_coefficient,
        )
    if cfg.name == "adamw":
        if len(cfg.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers, got {list(cfg.betas)}")
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name is {cfg.name!r}; expected one of sgd, lars, adamw")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's LR to ``lr`` (absolute)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------
# schedules


class _Schedule:
    """Linear warmup from ``start_lr`` to ``base_lr`` over ``warmup_steps``, plus a permanent
    ``scale`` (lowered by :meth:`scale_by` after a stability rollback)."""

    kind = ""

    def __init__(self, base_lr: float, warmup_steps: int, start_lr: float):
        if base_lr < 0 or start_lr < 0:
            raise ValueError(f"LRs must be >= 0, got base {base_lr}, start {start_lr}")
        if warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {warmup_steps}")
        self.base_lr, self.warmup_steps, self.start_lr = base_lr, warmup_steps, start_lr
        self.scale = 1.0

    def _warmup_lr(self, step: int) -> float:
        return self.start_lr + (self.base_lr - self.start_lr) * step / self.warmup_steps

    def scale_by(self, factor: float) -> None:
        """Multiply every future LR by ``factor`` (0 < factor)."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"LR scale factor must be finite and > 0, got {factor}")
        self.scale *= factor

    def observe(self, step: int, loss: float | torch.Tensor) -> str | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"LR schedule state is for {state.get('kind')!r}, this schedule is {self.kind!r}")
        self.scale = float(state["scale"])


class CosineSchedule(_Schedule):
    """Warmup, then cosine from ``base_lr`` to ``final_lr`` at ``total_steps`` (held after)."""

    kind = "cosine"

    def __init__(self, base_lr: float, total_steps: int, *, warmup_steps: int = 0, start_lr: float = 0.0,
                 final_lr: float = 0.0):
        super().__init__(base_lr, warmup_steps, start_lr)
        if total_steps <= 0:
            raise ValueError(f"cosine schedule total_steps must be > 0, got {total_steps}")
        if final_lr < 0:
            raise ValueError(f"schedule.final_lr must be >= 0, got {final_lr}")
        self.total_steps, self.final_lr = total_steps, final_lr

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self._warmup_lr(step) * self.scale
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, progress)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return (self.final_lr + (self.base_lr - self.final_lr) * cosine) * self.scale


class PlateauSchedule(_Schedule):
    """Warmup, then a fixed LR that is multiplied by ``factor`` (never below ``min_lr``)
    whenever an EMA of the loss (``smoothing``) has not improved by a relative ``threshold``
    within ``patience`` steps of the last improvement or LR change. Detection starts after
    warmup; non-finite losses are ignored. ``observe`` should see the same (globally reduced)
    loss on every rank so that all ranks change the LR at the same step."""

    kind = "plateau"

    def __init__(self, base_lr: float, *, warmup_steps: int = 0, start_lr: float = 0.0, patience: int = 1000,
                 threshold: float = 0.01, smoothing: float = 0.99, factor: float = 0.5, min_lr: float = 0.0):
        super().__init__(base_lr, warmup_steps, start_lr)
        checks = [
            (patience >= 1, "schedule.plateau_patience must be >= 1", patience),
            (threshold >= 0, "schedule.plateau_threshold must be >= 0", threshold),
            (0 <= smoothing < 1, "schedule.plateau_smoothing must be in [0, 1)", smoothing),
            (0 < factor < 1, "schedule.plateau_factor must be in (0, 1)", factor),
            (min_lr >= 0, "schedule.min_lr must be >= 0", min_lr),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ValueError(f"{message}, got {value}")
        self.patience, self.threshold, self.smoothing = patience, threshold, smoothing
        self.factor, self.min_lr = factor, min_lr
        self.level = base_lr  # LR after warmup, before `scale`
        self.ema: float | None = None
        self.best: float | None = None
        self.since: int | None = None  # step of the last improvement or LR change
        self.reductions = 0

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self._warmup_lr(step) * self.scale
        return self.level * self.scale

    def scale_by(self, factor: float) -> None:
        super().scale_by(factor)
        self.since = None  # an LR change: measure patience afresh from the next observation

    def observe(self, step: int, loss: float | torch.Tensor) -> str | None:
        value = float(loss)
        if not math.isfinite(value):
            return None
        s = self.smoothing
        self.ema = value if self.ema is None else s * self.ema + (1.0 - s) * value
        if step < self.warmup_steps:
            return None
        if self.best is None or self.since is None or step < self.since:
            self.best, self.since = self.ema, step
            return None
        if self.ema < self.best - self.threshold * abs(self.best):
            self.best, self.since = self.ema, step
            return None
        if step - self.since < self.patience:
            return None
        old = self.level
        self.best, self.since = self.ema, step
        new = max(old * self.factor, self.min_lr)
        if new >= old:
            return None
        self.level = new
        self.reductions += 1
        return (
            f"LR plateau at step {step}: smoothed loss {self.ema:.4f} did not improve by "
            f"{self.threshold:.1%} in {self.patience} steps; LR {old * self.scale:.4g} -> "
            f"{new * self.scale:.4g} (reduction {self.reductions})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "level": self.level, "ema": self.ema, "best": self.best,
                "since": self.since, "reductions": self.reductions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.level = float(state["level"])
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.best = None if state["best"] is None else float(state["best"])
        self.since = None if state["since"] is None else int(state["since"])
        self.reductions = int(state["reductions"])


Schedule = CosineSchedule | PlateauSchedule


def build_schedule(cfg: ScheduleConfig, optim_cfg: OptimConfig, global_batch: int, total_steps: int) -> Schedule:
    """The schedule of ``cfg.mode`` with every per-256 LR scaled to ``global_batch``."""
    base = scaled_lr(optim_cfg.lr, global_batch)
    start = scaled_lr(cfg.start_lr, global_batch)
    if cfg.mode == "cosine":
        final = scaled_lr(cfg.final_lr, global_batch)
        return CosineSchedule(base, total_steps, warmup_steps=cfg.warmup_steps, start_lr=start, final_lr=final)
    if cfg.mode == "plateau":
        return PlateauSchedule(
            base,
            warmup_steps=cfg.warmup_steps,
            start_lr=start,
            patience=cfg.plateau_patience,
            threshold=cfg.plateau_threshold,
            smoothing=cfg.plateau_smoothing,
            factor=cfg.plateau_factor,
            min_lr=scaled_lr(cfg.min_lr, global_batch),
        )
    raise ValueError(f"schedule.mode is {cfg.mode!r}; expected cosine or plateau")
