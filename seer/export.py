"""Export: a checkpoint's backbone as a safetensors file that torchvision/timm load directly.

seer's backbones keep their reference implementation's state-dict keys (torchvision's RegNet,
timm's VisionTransformer), so export is consolidation, not renaming: the DCP checkpoint is
loaded into a single-process model built from the run's own config, and the backbone's state
dict is written with ``safetensors``. ``num_classes > 0`` adds a freshly initialised classifier
(``fc`` for RegNet as torchvision initialises it, ``head`` for ViT) so that
``torchvision.models.regnet_y_400mf().load_state_dict(..., strict=True)`` works as is;
``num_classes=0`` writes the backbone alone (load into a model whose ``fc`` is ``Identity``,
or timm's ``num_classes=0``). A JSON sidecar records architecture, input size, mean/std, step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_pipeline.shards import atomic_write_bytes
from seer.config import config_from_yaml_text
from seer.engine.checkpoint import load_model_weights, load_extra, resolve_checkpoint
from seer.methods import build_method
from seer.models.regnet import TORCHVISION_NAMES


def _classifier(backbone_name: str, num_features: int, num_classes: int) -> dict[str, torch.Tensor]:
    weight = torch.empty(num_classes, num_features)
    if backbone_name.startswith("regnet"):
        torch.nn.init.normal_(weight, mean=0.0, std=0.01)  # torchvision's RegNet fc init
        prefix = "fc"
    else:
        torch.nn.init.trunc_normal_(weight, std=0.02)  # timm's head init
        prefix = "head"
    return {f"{prefix}.weight": weight, f"{prefix}.bias": torch.zeros(num_classes)}


def export_backbone(source: str | Path, out: str | Path, *, num_classes: int = 1000) -> dict:
    checkpoint = resolve_checkpoint(Path(source))
    shared = load_extra(checkpoint, 0)
    if "config" not in shared:
        raise ValueError(f"{checkpoint} has no run config in extra_rank0.pt; was it written by seer?")
    cfg = config_from_yaml_text(shared["config"])
    method = build_method(cfg)
    load_model_weights(checkpoint, method)
    backbone = method.backbone
    state = {k: v.detach().contiguous().clone() for k, v in backbone.state_dict().items()}
    if num_classes > 0:
        state.update(_classifier(cfg.model.backbone, backbone.num_features, num_classes))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sidecar = {
        "architecture": cfg.model.backbone,
        "torchvision_name": TORCHVISION_NAMES.get(cfg.model.backbone),
        "num_features": backbone.num_features,
        "num_classes": num_classes,
        "classifier": "freshly initialised, untrained" if num_classes > 0 else None,
        "input_size": max(g.size for g in cfg.augment.crops),
        "mean": list(cfg.augment.mean),
        "std": list(cfg.augment.std),
        "step": int(shared.get("step", -1)),
        "method": cfg.method.name,
        "checkpoint": str(checkpoint),
    }
    tmp = out.with_name(f".tmp-{out.name}")
    save_file(state, str(tmp), metadata={"seer": json.dumps(sidecar)})
    os.replace(tmp, out)
    side_path = out.with_suffix(".json")
    atomic_write_bytes(side_path, (json.dumps(sidecar, indent=2) + "\n").encode())
    return {"out": str(out), "sidecar": str(side_path), "tensors": len(state), **sidecar}
