"""SSL methods: one file per method, each an ``nn.Module`` around a backbone.

The engine knows only this interface:
- ``forward(views: list[Tensor]) -> dict`` with ``loss`` plus scalars to log;
- ``on_after_backward(step)``: gradient edits before the optimizer (SwAV freezes prototypes);
- ``after_step(step)``: what happens after the optimizer (MoCo v3's momentum update);
- optional ``check_collapse(loss, step) -> str | None``: a warning to log loudly.
"""

from __future__ import annotations

from torch import nn

from seer import models
from seer.config import SeerConfig


def build_method(cfg: SeerConfig) -> nn.Module:
    backbone = models.create(cfg.model.backbone, **cfg.model.kwargs)
    if cfg.method.name == "swav":
        from seer.methods.swav import SwAV

        s = cfg.method.swav
        return SwAV(
            backbone,
            head_hidden=s.head_hidden,
            head_out=s.head_out,
            head_bn=s.head_bn,
            n_prototypes=s.n_prototypes,
            temperature=s.temperature,
            epsilon=s.epsilon,
            sinkhorn_iterations=s.sinkhorn_iterations,
            crops_for_assign=tuple(s.crops_for_assign),
            freeze_prototypes_steps=s.freeze_prototypes_steps,
            queue_length=s.queue_length,
            queue_start_step=s.queue_start_step,
            collapse_patience=s.collapse_patience,
        )
    if cfg.method.name == "mocov3":
        from seer.methods.mocov3 import build_mocov3

        return build_mocov3(backbone, cfg.method.mocov3, cfg.train.max_steps)
    raise ValueError(f"unknown method.name {cfg.method.name!r}")
