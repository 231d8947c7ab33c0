"""The CPU-worker stage of multi-crop: crop boxes, a decode at the smallest useful scale, resize
and flip, uint8 views out.

Colour work (jitter, grayscale, blur, solarize, normalisation) is *not* done here: it runs on
whole batches on the training device (:mod:`data_pipeline.augment`).

Per image (``MultiCrop.from_bytes``):

1. The crop boxes are drawn first, on the image's full size read from the header, with the
   algorithm of ``torchvision.transforms.RandomResizedCrop.get_params`` (10 tries of area
   scale and log-uniform aspect ratio, then the centre-crop fallback) from an explicit
   ``torch.Generator``: a sample's crops are a pure function of its seed (exact resume), and
   their area/aspect distribution is RandomResizedCrop's.
2. A JPEG is decoded with DCT-domain downscaling by the largest factor 1, 2, 4 or 8 that still
   leaves every box at least its output size on both sides: no crop is ever upsampled because
   of the reduction. The decoder is simplejpeg when it is installed (optional; straight into an
   array, strict mode: a damaged file raises) for JPEGs without EXIF rotation and within
   ``max_pixels``, else Pillow's draft mode via :func:`data_pipeline.decode.decode_image`
   (which does all the safety checks, and has the last word on any file simplejpeg refuses).
   Other formats decode at full size. (The two decoders wrap different libjpeg-turbo builds:
   pixels may differ by a level or so; a run's stream is reproducible in one environment.)
3. Each box, scaled to the decoded image, is resized with antialiased bilinear interpolation on
   uint8, flipped with probability ``flip_p``, and returned as a contiguous (planar)
   ``(3, S, S)`` uint8 tensor. The
   resizer (``RESIZER``, chosen once per process) is Pillow-SIMD's ``Image.resize(box=...)``
   where the imported PIL is Pillow-SIMD (its AVX2 resize beats torch's; a simplejpeg decode is
   then asked for RGBX pixels, which PIL maps without a copy), else torch's ``F.interpolate``
   (what RandomResizedCrop does on tensors; AVX2 code on x86; plain Pillow's resize is ~4x
   slower). Same algorithm; PIL also reads the pixels just outside a box as filter support
   where torch repeats the edge, so border pixels may differ by a few levels.

``decoder_info()`` says which PIL, decoder and resizer this process uses (``seer inspect --env``).
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.decode import decode_image, pil_build

try:  # optional: decodes JPEGs straight into an array, faster than Pillow (DCT scaling too)
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

# "pil" on Pillow-SIMD, "torch" otherwise; a module attribute so that benchmarks and tests can pick
RESIZER = "pil" if pil_build()["name"] == "pillow-simd" else "torch"
_BILINEAR = Image.Resampling.BILINEAR
_DCT_FACTORS = (8, 4, 2)
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class CropSpec:
    """``count`` crops of ``size`` x ``size`` covering ``scale`` of the image area."""

    size: int
    count: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self):
        if self.size < 1 or self.count < 1:
            raise ValueError(f"crop size and count must be >= 1, got size {self.size} count {self.count}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scale must be (min, max) with 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"crop ratio must be (min, max) with 0 < min <= max, got {self.ratio}")


class CropBox(NamedTuple):
    """One crop in full-image pixels: ``(top, left, height, width)``, output size, flip."""

    top: int
    left: int
    height: int
    width: int
    size: int
    flip: bool


@functools.lru_cache(maxsize=64)
def _log_ratio(ratio: tuple[float, float]) -> torch.Tensor:
    return torch.log(torch.tensor(ratio))


def sample_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) exactly as RandomResizedCrop.get_params draws them, from ``gen``."""
    area = height * width
    log_ratio = _log_ratio(tuple(ratio))
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
    """Shortest image side that serves a typical smallest crop of every spec without upsampling.

    A crop covering the smallest area fraction ``s`` of an image with short side ``L`` spans
    about ``sqrt(s) * L`` pixels; it should hold ``size`` pixels, so ``L >= size / sqrt(s)``.
    (Decoding itself picks its scale per image from the boxes actually drawn.)
    """
    return max(int(math.ceil(spec.size / math.sqrt(spec.scale[0]))) for spec in specs)


def dct_factor(boxes: list[CropBox]) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) leaving every box >= its output size on both sides."""
    room = min(min(box.width, box.height) / box.size for box in boxes)
    return next((f for f in _DCT_FACTORS if f <= room), 1)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` uint8 tensor viewing the pixels (channels-last strides)."""
    with warnings.catch_warnings():  # the array is read-only; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


def _planar(pixels: np.ndarray, flip: bool) -> torch.Tensor:
    """``(H, W, 3 or 4)`` uint8 -> contiguous ``(3, H, W)`` tensor (a 4th channel dropped), mirrored
    left-right if ``flip``: one copy. Planar views stack into a batch with plain copies and feed the
    color stage without strided reads (stacking channels-last views cost ~0.4 ms per image)."""
    if flip:
        pixels = pixels[:, ::-1]
    return torch.from_numpy(pixels.transpose(2, 0, 1)[:3].copy())


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation) of a JPEG from its header; None for anything else.

    Only the header is parsed; ``decode_image`` or simplejpeg's strict decoder check the rest.
    """
    if data[:2] != b"\xff\xd8":
        return None
    if simplejpeg is not None and b"Exif\x00\x00" not in data[:65536]:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return width, height, 1
        except ValueError:
            pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("JPEG", "MPO"):
                return None
            width, height = img.size
            return width, height, int(img.getexif().get(0x0112, 1))
    except Exception:
        return None


class MultiCrop:
    """Turns one image into the list of uint8 crops of every spec, in spec order."""

    def __init__(self, specs: list[CropSpec], flip_p: float = 0.5):
        if not specs:
            raise ValueError("MultiCrop needs at least one crop spec")
        if not 0 <= flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.specs = list(specs)
        self.flip_p = flip_p
        self.decode_side = min_decode_side(self.specs)

    def sample_boxes(self, width: int, height: int, gen: torch.Generator) -> list[CropBox]:
        """Every crop's box and flip, drawn from ``gen`` (box, then flip coin, crop by crop)."""
        boxes = []
        for spec in self.specs:
            for _ in range(spec.count):
                top, left, h, w = sample_crop_box(width, height, spec.scale, spec.ratio, gen)
                flip = torch.rand(1, generator=gen).item() < self.flip_p
                boxes.append(CropBox(top, left, h, w, spec.size, flip))
        return boxes

    def crop(self, pixels: torch.Tensor, boxes: list[CropBox], full_size: tuple[int, int]) -> list[torch.Tensor]:
        """Cut ``boxes`` (full-image coordinates of an image of ``full_size`` = (W, H)) out of
        ``pixels``, a ``(3, h, w)`` uint8 decode of that image at any scale (torch's resize)."""
        _, height, width = pixels.shape
        batch = pixels.unsqueeze(0)
        views = []
        for box, (x0, y0, x1, y1) in zip(boxes, _scaled_boxes(boxes, full_size, width, height)):
            region = batch[:, :, y0:y1, x0:x1]
            if region.shape[-2:] != (box.size, box.size):
                # uint8 channels-last input takes torch's vectorised antialiased kernel
                region = region.contiguous(memory_format=torch.channels_last)
                region = F.interpolate(region, size=(box.size, box.size), mode="bilinear",
                                       antialias=True, align_corners=False)
            views.append(_planar(region[0].permute(1, 2, 0).numpy(), box.flip))
        return views

    def crop_pil(self, image: Image.Image, boxes: list[CropBox], full_size: tuple[int, int]) -> list[torch.Tensor]:
        """``crop`` on a decoded RGB or RGBX PIL image with PIL's resize (Pillow-SIMD's SIMD code)."""
        views = []
        for box, region in zip(boxes, _scaled_boxes(boxes, full_size, image.width, image.height)):
            if region[2] - region[0] == box.size and region[3] - region[1] == box.size:
                view = image.crop(region)
            else:
                view = image.resize((box.size, box.size), _BILINEAR, box=region)
            views.append(_planar(np.asarray(view), box.flip))
        return views

    def __call__(self, image: Image.Image, gen: torch.Generator) -> list[torch.Tensor]:
        """Crops of an already decoded RGB image."""
        if image.mode != "RGB":
            raise ValueError(f"MultiCrop expects an RGB image, got mode {image.mode}")
        boxes = self.sample_boxes(image.width, image.height, gen)
        if RESIZER == "pil":
            return self.crop_pil(image, boxes, image.size)
        return self.crop(image_to_tensor(image), boxes, image.size)

    def from_bytes(self, data: bytes, gen: torch.Generator, *, max_pixels: int = 100_000_000) -> list[torch.Tensor]:
        """Crops of encoded image bytes, decoded at the smallest scale that serves every crop.

        Raises ``DecodeError`` (from ``decode_image``) for bytes that are not a usable image.
        """
        header = _jpeg_header(data)
        if header is None:
            return self(decode_image(data, max_pixels=max_pixels, min_side=1), gen)
        width, height, orientation = header
        if orientation in _ROTATED_ORIENTATIONS:
            width, height = height, width
        boxes = self.sample_boxes(width, height, gen)
        factor = dct_factor(boxes)
        if simplejpeg is not None and orientation == 1 and 0 < width * height <= max_pixels:
            views = self._crops_simplejpeg(data, boxes, (width, height), factor)
            if views is not None:
                return views
        draft = (math.ceil(width / factor), math.ceil(height / factor)) if factor > 1 else None
        image = decode_image(data, max_pixels=max_pixels, min_side=1, draft_size=draft)
        if RESIZER == "pil":
            return self.crop_pil(image, boxes, (width, height))
        return self.crop(image_to_tensor(image), boxes, (width, height))

    def _crops_simplejpeg(self, data: bytes, boxes: list[CropBox], full_size: tuple[int, int],
                          factor: int) -> list[torch.Tensor] | None:
        """Crops of a simplejpeg decode at 1/``factor``; None where simplejpeg refuses the file."""
        min_size = {"min_width": math.ceil(full_size[0] / factor), "min_height": math.ceil(full_size[1] / factor)}
        try:  # strict: a damaged or CMYK file raises, and decode_image has the last word
            if RESIZER == "pil":  # RGBX rows are PIL's own layout: mapped, not copied
                array = simplejpeg.decode_jpeg(data, colorspace="RGBX", **min_size)
                image = Image.frombuffer("RGBX", (array.shape[1], array.shape[0]), array, "raw", "RGBX", 0, 1)
                return self.crop_pil(image, boxes, full_size)
            array = simplejpeg.decode_jpeg(data, colorspace="RGB", **min_size)
        except ValueError:
            return None
        return self.crop(torch.from_numpy(array).permute(2, 0, 1), boxes, full_size)


def _scaled_boxes(boxes: list[CropBox], full_size: tuple[int, int], width: int, height: int) -> list[tuple]:
    """``boxes`` (full-image pixels) as (x0, y0, x1, y1) on a ``width`` x ``height`` decode of the
    image, rounded to whole pixels and at least one pixel wide and high."""
    sx, sy = width / full_size[0], height / full_size[1]
    out = []
    for box in boxes:
        x0 = min(int(round(box.left * sx)), width - 1)
        y0 = min(int(round(box.top * sy)), height - 1)
        x1 = max(int(round((box.left + box.width) * sx)), x0 + 1)
        y1 = max(int(round((box.top + box.height) * sy)), y0 + 1)
        out.append((x0, y0, x1, y1))
    return out


def decoder_info() -> dict:
    """What decodes and resizes crops in this process: ``{"pil": "pillow-simd 12.1.1.post0 (avx2)"
    | "pillow 13.0.0", "decoder": "simplejpeg" | "pil-draft", "resizer": "pillow-simd" | "torch"
    (| "pillow" where ``RESIZER`` was set to "pil" on plain Pillow),
    "simplejpeg": version or None, "libjpeg_turbo": PIL's libjpeg-turbo version or None}``.
    ("pil-draft": Pillow's DCT-scaled draft decode; simplejpeg also decodes at DCT scale.)"""
    build = pil_build()
    pil = f"{build['name']} {build['version']}" + (f" ({build['simd']})" if build["simd"] else "")
    return {"pil": pil, "decoder": "pil-draft" if simplejpeg is None else "simplejpeg",
            "resizer": build["name"] if RESIZER == "pil" else "torch",
            "simplejpeg": getattr(simplejpeg, "__version__", None), "libjpeg_turbo": build["libjpeg_turbo"]}
