"""Export: a checkpoint's backbone as a safetensors file that torchvision/timm load directly.

The DCP checkpoint (sharded over any number of ranks) is loaded into a single-process model
built from the run's own config (:func:`seer.eval.features.backbone_from_checkpoint`), and the
backbone's state dict is written with ``safetensors`` in one of three key layouts
(:mod:`seer.export_layouts`): ``seer`` (seer's own keys: torchvision's for RegNetY, timm's for
ViT), ``torchvision`` (``torchvision.models.regnet_y_*`` / ``vit_*``) or ``timm``
(``timm.create_model("regnety_*" / "vit_*")``). MoCo v3 runs export the base (query) encoder
or, with ``encoder="momentum"``, the momentum encoder.

``num_classes > 0`` adds a classifier of that size (``fc``, ``head.fc``, ``head`` or
``heads.head`` as the target library names it), initialised as that library does but from a
generator seeded with ``seed``, so two exports of one checkpoint are byte-identical; load the
file with ``strict=True``. ``num_classes=0`` writes the backbone alone (a model whose
classifier is ``Identity``, or timm's ``num_classes=0``). A JSON sidecar (also stored in the
file's ``seer`` metadata) records architecture, layout, input size, mean/std, step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_pipeline.storage import atomic_write_bytes
from seer.export_layouts import check_format, classifier_prefix, family, to_format
from seer.models.regnet import TIMM_NAMES, TORCHVISION_NAMES


def _classifier(architecture: str, fmt: str, num_features: int, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if family(architecture) == "regnet":
        weight = torch.randn(num_classes, num_features, generator=gen) * 0.01  # torchvision's and timm's init
    else:
        weight = torch.nn.init.trunc_normal_(torch.empty(num_classes, num_features), std=0.02, generator=gen)
    prefix = classifier_prefix(architecture, fmt)
    return {f"{prefix}.weight": weight, f"{prefix}.bias": torch.zeros(num_classes)}


def export_backbone(source: str | Path, out: str | Path, *, num_classes: int = 1000, fmt: str = "seer",
                    encoder: str = "base", seed: int = 0) -> dict:
    from seer.eval.features import backbone_from_checkpoint

    backbone, cfg = backbone_from_checkpoint(Path(source), encoder)
    check_format(backbone.architecture, fmt, backbone.model_kwargs)
    model = backbone.model
    state = {
        to_format(backbone.architecture, fmt, k): v.detach().contiguous().clone()
        for k, v in model.state_dict().items()
    }
    if num_classes > 0:
        state.update(_classifier(backbone.architecture, fmt, model.num_features, num_classes, seed))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sidecar = {
        "architecture": backbone.architecture,
        "format": fmt,
        "torchvision_name": TORCHVISION_NAMES.get(backbone.architecture),
        "timm_name": TIMM_NAMES.get(backbone.architecture),
        "model_kwargs": backbone.model_kwargs,
        "num_features": model.num_features,
        "num_classes": num_classes,
        "classifier": f"freshly initialised (seed {seed}), untrained" if num_classes > 0 else None,
        "encoder": encoder,
        "input_size": backbone.input_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "step": backbone.step,
        "method": cfg.method.name,
        "checkpoint": backbone.source,
    }
    tmp = out.with_name(f".tmp-{out.name}")
    save_file(state, str(tmp), metadata={"seer": json.dumps(sidecar)})
    os.replace(tmp, out)
    side_path = out.with_suffix(".json")
    atomic_write_bytes(side_path, (json.dumps(sidecar, indent=2) + "\n").encode())
    return {"out": str(out), "sidecar": str(side_path), "tensors": len(state), **sidecar}
