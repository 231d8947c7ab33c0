"""The CPU-worker stage of multi-crop: crop boxes, resize and flip, uint8 views out.

Colour work (jitter, grayscale, blur, solarize, normalisation) is *not* done here: it runs on
whole batches on the training device (:mod:`data_pipeline.augment`). This stage only decides
where each crop lies, resizes it straight from the (DCT-downscaled) decoded image with PIL's
``resize(box=...)``, flips it, and returns ``uint8`` tensors of shape ``(3, S, S)``.

Crop boxes are sampled with the algorithm of ``torchvision.transforms.RandomResizedCrop``
(10 tries of area scale and log-uniform aspect ratio, then a centre-crop fallback), but from an
explicit ``torch.Generator`` so a sample's crops are a pure function of its seed: that is what
makes the stream resumable exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class CropSpec:
    """``count`` crops of ``size`` x ``size`` covering ``scale`` of the image area."""

    size: int
    count: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


def sample_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) exactly as RandomResizedCrop.get_params draws them, from ``gen``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def min_decode_side(specs: list[CropSpec]) -> int:
    """Shortest image side that still serves every crop without upsampling a typical crop.

    A crop covering the smallest area fraction ``s`` of an image with short side ``L`` spans
    about ``sqrt(s) * L`` pixels; it should hold ``size`` pixels, so ``L >= size / sqrt(s)``.
    """
    return max(int(math.ceil(spec.size / math.sqrt(spec.scale[0]))) for spec in specs)


class MultiCrop:
    """Turns one RGB PIL image into the list of uint8 crops of every spec, in spec order."""

    def __init__(self, specs: list[CropSpec], flip_p: float = 0.5):
        if not specs:
            raise ValueError("MultiCrop needs at least one crop spec")
        self.specs = list(specs)
        self.flip_p = flip_p
        self.decode_side = min_decode_side(self.specs)

    @property
    def num_crops(self) -> int:
        return sum(spec.count for spec in self.specs)

    def __call__(self, image: Image.Image, gen: torch.Generator) -> list[torch.Tensor]:
        if image.mode != "RGB":
            raise ValueError(f"MultiCrop expects an RGB image, got mode {image.mode}")
        width, height = image.size
        views = []
        for spec in self.specs:
            for _ in range(spec.count):
                top, left, h, w = sample_crop_box(width, height, spec.scale, spec.ratio, gen)
                view = image.resize(
                    (spec.size, spec.size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
                )
                if torch.rand(1, generator=gen).item() < self.flip_p:
                    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                views.append(torch.from_numpy(np.asarray(view).copy()).permute(2, 0, 1).contiguous())
        return views
