"""Backbones for evaluation, and their features of labelled images, extracted once and cached.

:func:`load_backbone` accepts only what cannot run code when read: a ``.safetensors`` export
(its ``seer`` metadata names the architecture and layout) or a seer checkpoint (a run folder,
its ``checkpoints/`` or one ``step_*`` folder: DCP tensors plus extras read with
``weights_only=True``); anything else is refused with one line. :func:`extract_features` runs
the backbone in eval mode over resized, normalised images in batches (tqdm bar on a terminal)
and caches the (N, D) float32 matrix under ``cache_dir`` by content hashes of the weights and
images plus the preprocessing.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_pipeline.storage import atomic_write_bytes
from seer.eval.datasets import LabelledImages

DEFAULT_CACHE = Path.home() / ".cache" / "seer" / "features"


@dataclass
class Backbone:
    """A backbone ready for feature extraction and what is needed to feed it."""

    model: nn.Module
    architecture: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    run_dir: Path | None = None  # set when loaded from a run folder (its TensorBoard gets the numbers)
    step: int = -1
    source: str = ""
    model_kwargs: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps([self.architecture, self.model_kwargs], sort_keys=True).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:20]


def _refuse(path: Path) -> ValueError:
    return ValueError(
        f"refusing to load {path}: a backbone is read only from a .safetensors export or a seer checkpoint "
        "(run folder, checkpoints/ or step_* folder); pickled files (.pt, .pth, .bin, .ckpt) can run code"
    )


def _from_safetensors(path: Path) -> Backbone:
    from safetensors import safe_open

    from seer import models
    from seer.export_layouts import classifier_prefix, from_format

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("seer", "null") or "null")
        if not meta:
            raise ValueError(f"{path}: no 'seer' metadata; only exports written by `seer export` can be evaluated")
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    architecture, fmt = meta["architecture"], meta.get("format", "seer")
    kwargs = dict(meta.get("model_kwargs") or {})
    model = models.create(architecture, **kwargs)
    head = classifier_prefix(architecture, fmt) + "."
    state = {from_format(architecture, fmt, k): v for k, v in state.items() if not k.startswith(head)}
    model.load_state_dict(state, strict=True)
    return Backbone(model, architecture, int(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"]),
                    step=int(meta.get("step", -1)), source=str(path), model_kwargs=kwargs)


def backbone_from_checkpoint(path: Path, encoder: str = "base") -> tuple[Backbone, object]:
    """The backbone of a seer checkpoint (and the run's config). ``encoder``: MoCo v3's
    ``base`` (query) or ``momentum`` encoder; SwAV has only ``base``."""
    from seer.config import config_from_yaml_text
    from seer.engine.checkpoint import load_extra, load_model_weights, resolve_checkpoint
    from seer.methods import build_method

    checkpoint = resolve_checkpoint(path)
    shared = load_extra(checkpoint, 0)
    if "config" not in shared:
        raise ValueError(f"{checkpoint} has no run config in extra_rank0.pt; was it written by seer?")
    cfg = config_from_yaml_text(shared["config"])
    method = build_method(cfg)
    load_model_weights(checkpoint, method)
    if encoder == "base":
        model = method.backbone
    elif encoder == "momentum":
        momentum = getattr(method, "momentum_backbone", None)
        if momentum is None:
            raise ValueError(f"{cfg.method.name} has no momentum encoder; use encoder 'base'")
        model = momentum
    else:
        raise ValueError(f"encoder must be 'base' or 'momentum', got {encoder!r}")
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    backbone = Backbone(
        model, cfg.model.backbone, max(g.size for g in cfg.augment.crops), tuple(cfg.augment.mean),
        tuple(cfg.augment.std), run_dir=run_dir, step=int(shared.get("step", -1)), source=str(checkpoint),
        model_kwargs=dict(cfg.model.kwargs),
    )
    return backbone, cfg


def load_backbone(path: str | Path, encoder: str = "base") -> Backbone:
    """A backbone from a ``.safetensors`` export or a seer checkpoint; anything else is refused."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such backbone: {path}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise _refuse(path)
        if encoder != "base":
            raise ValueError("an export holds one encoder; choose it at `seer export --encoder`")
        return _from_safetensors(path)
    return backbone_from_checkpoint(path, encoder)[0]


def random_backbone(architecture: str, like: Backbone | None = None, seed: int = 0, **kwargs) -> Backbone:
    """The same architecture at its initialisation (the baseline a pretrained one must beat)."""
    from seer import models

    torch.manual_seed(seed)
    kwargs = dict(like.model_kwargs if like is not None else {}, **kwargs)
    model = models.create(architecture, **kwargs)
    size = like.input_size if like is not None else 224
    mean = like.mean if like is not None else (0.485, 0.456, 0.406)
    std = like.std if like is not None else (0.229, 0.224, 0.225)
    return Backbone(model, architecture, size, mean, std, source=f"random init (seed {seed})", model_kwargs=kwargs)


def image_batch(data: LabelledImages, indices, size: int) -> torch.Tensor:
    """uint8 (B, 3, size, size) of the images at ``indices``: shorter side resized to ``size``
    (antialiased), centre crop."""
    if data.pixels is not None:
        pixels = torch.from_numpy(np.ascontiguousarray(data.pixels[np.asarray(indices, dtype=np.int64)]))
        if pixels.ndim == 3:
            pixels = pixels[:, None].expand(-1, 3, -1, -1)
        else:
            pixels = pixels.permute(0, 3, 1, 2)
        return _resize_crop(pixels, size)
    images = []
    for i in indices:
        array = np.asarray(data.image(i), dtype=np.uint8)
        images.append(_resize_crop(torch.from_numpy(array).permute(2, 0, 1)[None], size)[0])
    return torch.stack(images)


def _resize_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    if images.shape[-2:] != (size, size):
        images = TF.center_crop(TF.resize(images, size, antialias=True), [size, size])
    return images.contiguous()


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std).view(1, 3, 1, 1) * 255.0
    return (images.float() - mean_t) / std_t


@torch.no_grad()
def compute_features(model: nn.Module, data: LabelledImages, size: int, mean, std, *, batch_size: int = 256,
                     device: torch.device | str = "cpu", indices=None, progress: bool = False) -> torch.Tensor:
    """(N, D) float32 features of ``data`` (or of the images at ``indices``), ``model`` in eval mode."""
    indices = np.arange(len(data)) if indices is None else np.asarray(indices, dtype=np.int64)
    was_training = model.training
    model.eval()
    outputs = []
    starts = range(0, len(indices), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="features", unit="batch", leave=False)
    try:
        for start in starts:
            batch = image_batch(data, indices[start:start + batch_size], size)
            outputs.append(model(normalise(batch, mean, std).to(device)).float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.zeros(0, 0)
    return torch.cat(outputs)


def extract_features(backbone: Backbone, data: LabelledImages, *, size: int | None = None, batch_size: int = 256,
                     cache_dir: Path | None = DEFAULT_CACHE) -> torch.Tensor:
    """Features of ``data``, from the cache when the same weights saw the same images before."""
    size = size or backbone.input_size
    cached = None
    if cache_dir is not None:
        key = f"{backbone.fingerprint()}-{data.fingerprint()}-{size}-{hashlib.sha256(repr((backbone.mean, backbone.std)).encode()).hexdigest()[:8]}"
        cached = Path(cache_dir) / f"{key}.npy"
        if cached.is_file():
            return torch.from_numpy(np.load(cached, allow_pickle=False))
    features = compute_features(backbone.model, data, size, backbone.mean, backbone.std, batch_size=batch_size,
                                progress=sys.stderr.isatty())
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, features.numpy(), allow_pickle=False)
        atomic_write_bytes(cached, buffer.getvalue())
    return features


def raw_pixel_features(data: LabelledImages, size: int) -> torch.Tensor:
    """Raw pixels in [0, 1] (grayscale when the images are), the baseline of no learned features."""
    out = []
    for start in range(0, len(data), 1024):
        batch = image_batch(data, np.arange(start, min(start + 1024, len(data))), size).float() / 255.0
        if data.pixels is not None and data.pixels.ndim == 3:
            batch = batch[:, :1]
        out.append(batch.flatten(1))
    return torch.cat(out)
