"""Backbone registry: `create(name, **overrides)` over the RegNetY and ViT tables, and the
SSL heads (SwAV, MoCo v3) re-exported for convenience."""

from __future__ import annotations

import difflib
import inspect

from torch import nn

from seer.models.heads import MoCoPredictor, MoCoProjector, SwAVHead, build_mlp
from seer.models.regnet import REGNET_DESIGNS, TORCHVISION_NAMES, RegNetBackbone, build_regnet
from seer.models.vit import VIT_DESIGNS, VisionTransformer, build_vit

__all__ = [
    "MoCoPredictor",
    "MoCoProjector",
    "REGNET_DESIGNS",
    "RegNetBackbone",
    "SwAVHead",
    "TORCHVISION_NAMES",
    "VIT_DESIGNS",
    "VisionTransformer",
    "build_mlp",
    "create",
    "list_models",
]

# Overrides each family accepts (ViT: every constructor argument, design fields included).
_REGNET_OVERRIDES = frozenset({"norm_layer", "activation"})
_VIT_OVERRIDES = frozenset(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}


def list_models() -> list[str]:
    """Every backbone name `create` accepts, sorted."""
    return sorted([*REGNET_DESIGNS, *VIT_DESIGNS])


def create(name: str, **overrides) -> nn.Module:
    """Build a backbone by name. Its output is (B, model.num_features) features.

    RegNet overrides: norm_layer, activation. ViT overrides: img_size, stop_grad_conv1,
    global_pool, pos_embed, num_heads, drop_path_rate, ... (VisionTransformer's arguments).
    Unknown names raise ValueError with close matches; unknown overrides raise TypeError.
    """
    if name in REGNET_DESIGNS:
        allowed, builder = _REGNET_OVERRIDES, build_regnet
    elif name in VIT_DESIGNS:
        allowed, builder = _VIT_OVERRIDES, build_vit
    else:
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (known models: {', '.join(list_models())})")
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"model {name!r} does not accept override(s) {unknown}; accepted: {sorted(allowed)}")
    return builder(name, **overrides)
