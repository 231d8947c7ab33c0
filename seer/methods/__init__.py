"""SSL methods: one file per method, each a :class:`seer.methods.base.Method` around a backbone
(the interface the engine knows). ``build_method(cfg)`` looks the method up by
``method.name`` in :data:`METHODS` and lets it build itself from its config section."""

from __future__ import annotations

from seer import models
from seer.config import SeerConfig
from seer.methods.base import Method
from seer.methods.mocov3 import MoCoV3
from seer.methods.swav import SwAV

METHODS: dict[str, type[Method]] = {"swav": SwAV, "mocov3": MoCoV3}


def build_method(cfg: SeerConfig) -> Method:
    if cfg.method.name not in METHODS:
        raise ValueError(f"unknown method.name {cfg.method.name!r} (known: {', '.join(METHODS)})")
    backbone = models.create(cfg.model.backbone, **cfg.model.kwargs)
    return METHODS[cfg.method.name].from_config(backbone, cfg)
