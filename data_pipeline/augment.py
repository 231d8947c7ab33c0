"""The color stage of multi-crop, run on whole batches on the training device (or on the CPU).

Takes a batch of ``uint8`` crops ``(B, 3, H, W)`` and applies, with independent random
parameters per sample, what SwAV/SEER/MoCo v3 apply per image with PIL/torchvision:

- color jitter (brightness, contrast, saturation, hue) with probability ``jitter_p``, the four
  ops in a random order per sample, each clamped to the valid range as torchvision's
  ``ColorJitter`` does; hue is shifted in HSV space like torchvision's ``adjust_hue``;
- grayscale with probability ``grayscale_p`` (ITU-R 601 luma, as torchvision);
- Gaussian blur with probability ``blur_p`` and sigma uniform in ``blur_sigma`` (separable
  kernel of radius ``ceil(3 * sigma)``, reflect padding, as torchvision's ``gaussian_blur``);
- solarize (threshold 0.5) with probability ``solarize_p``;
- normalisation by mean/std, returning contiguous float32.

All random parameters are drawn first, on the CPU, from one ``torch.Generator``
(:func:`sample_color_params`), so a batch's augmentation is a pure function of its seed
whatever the device. Executions of the same parameters (equal up to float rounding):
``batched`` (``data_pipeline.color_batched``: whole-batch ops with a per-sample parameter table,
about 70 kernels per view and no wait for the device, for GPUs), ``compiled`` (the same under
``torch.compile``: a few fused kernels) and ``per_sample`` (``data_pipeline.color_cpu``: a loop
over samples with scalar parameters, numba-fused kernels or numpy ops: several times faster on a
CPU). This module keeps the spec, the parameter draws, the :func:`color_augment` entry point and
the per-op batched functions (``adjust_*``, :func:`gaussian_blur`), the reference the tests hold
the executions to. Pixel values are kept in [0, 255] throughout; the 1/255 is folded into the
normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data_pipeline.color_batched import LUMA as _LUMA  # torchvision's rgb_to_grayscale weights
from data_pipeline.color_batched import apply_batched, blur_radius, gaussian_kernel  # noqa: F401 (re-exported)
from data_pipeline.color_cpu import apply_per_sample, normaliser


@dataclass(frozen=True)
class ColorAugmentSpec:
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"ColorAugmentSpec.{name} must be a probability, got {getattr(self, name)}")
        if min(self.jitter[:3]) < 0 or not 0 <= self.jitter[3] <= 0.5:
            raise ValueError(f"ColorAugmentSpec.jitter must be 3 factors >= 0 and a hue in [0, 0.5], got {self.jitter}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"ColorAugmentSpec.blur_sigma must be (min, max) with 0 < min <= max, got {self.blur_sigma}")
        if min(self.std) <= 0:
            raise ValueError(f"ColorAugmentSpec.std must be > 0, got {self.std}")


@dataclass
class ColorParams:
    """Per-sample random parameters of one batch (CPU tensors of length B)."""

    jitter: torch.Tensor  # bool: color jitter applied
    factors: torch.Tensor  # (B, 4): brightness, contrast, saturation factors and hue shift
    order: torch.Tensor  # (B, 4): op indices (0 brightness .. 3 hue) in the order applied
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # float
    solarize: torch.Tensor  # bool


def sample_color_params(n: int, spec: ColorAugmentSpec, gen: torch.Generator) -> ColorParams:
    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(n).uniform_(low, high, generator=gen)

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) < p

    bri, con, sat, hue = spec.jitter
    factors = torch.stack((uniform(max(0.0, 1 - bri), 1 + bri), uniform(max(0.0, 1 - con), 1 + con),
                           uniform(max(0.0, 1 - sat), 1 + sat), uniform(-hue, hue)), 1)
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)
    jitter = coin(spec.jitter_p)
    gray = coin(spec.grayscale_p)
    blur = coin(spec.blur_p)
    sigma = uniform(spec.blur_sigma[0], spec.blur_sigma[1])
    solarize = coin(spec.solarize_p)
    return ColorParams(jitter, factors, order, gray, blur, sigma, solarize)


# -- batched ops on (B, 3, H, W) float tensors (per-sample factors of shape (B,)) ---------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor, bound: float) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, bound)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, bound)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor, bound)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    return _blend(x, _gray(x), factor, bound)


def _hue_sextant(x: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hue * 6 in [0, 6), max, chroma) of RGB along ``channel_dim``; hue 0 where chroma is 0."""
    r, g, b = x.unbind(channel_dim)
    top, low = x.amax(channel_dim), x.amin(channel_dim)
    chroma = top - low
    inv = torch.where(chroma > 0, chroma, torch.ones_like(chroma)).reciprocal_()
    hue = torch.where(top == r, (g - b).mul_(inv),
                      torch.where(top == g, (b - r).mul_(inv).add_(2.0), (r - g).mul_(inv).add_(4.0)))
    return hue.remainder_(6.0), top, chroma


def _hue_ramps(hue6: torch.Tensor, low: torch.Tensor, chroma: torch.Tensor, out: torch.Tensor, channel_dim: int) -> None:
    """Write ``low + chroma * ramp_c(hue)`` for c = R, G, B into ``out`` (HSV -> RGB, exact)."""
    r, g, b = out.unbind(channel_dim)
    torch.sub(hue6, 3.0, out=r).abs_().sub_(1.0).clamp_(0.0, 1.0)
    torch.sub(hue6, 2.0, out=g).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    torch.sub(hue6, 4.0, out=b).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    out.mul_(chroma.unsqueeze(channel_dim)).add_(low.unsqueeze(channel_dim))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn) per sample; value and saturation kept."""
    hue6, top, chroma = _hue_sextant(x, 1)
    hue6.add_(shift.view(-1, 1, 1) * 6.0 + 6.0).remainder_(6.0)
    out = torch.empty_like(x)
    _hue_ramps(hue6, top - chroma, chroma, out, 1)
    return out.clamp_(0, bound)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x`` with its own sigma: a separable kernel of radius ``ceil(3 sigma)``
    (zero weights beyond a sample's own radius), reflect padding."""
    b, c, h, w = x.shape
    radii = [blur_radius(float(s), h, w) for s in sigma.tolist()]
    radius = max(radii, default=0)
    if radius < 1:
        return x
    kernels = torch.zeros(b, 2 * radius + 1, dtype=torch.float64)
    for i, (s, r) in enumerate(zip(sigma.tolist(), radii)):
        if r >= 1:
            kernels[i, radius - r:radius + r + 1] = torch.tensor(gaussian_kernel(s, r), dtype=torch.float64)
        else:
            kernels[i, radius] = 1.0
    kernel = kernels.to(x.dtype).to(x.device).repeat_interleave(c, 0)  # (B*C, K)
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(b * c, 1, 1, -1), groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(b * c, 1, -1, 1), groups=b * c)
    return flat.view(b, c, h, w)


def _normaliser(spec: ColorAugmentSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``(x / 255 - mean) / std == x * scale - shift``, shaped (3, 1, 1)."""
    return tuple(torch.from_numpy(a).view(3, 1, 1).to(device) for a in normaliser(spec))


def color_augment(images: torch.Tensor, spec: ColorAugmentSpec, gen: torch.Generator, *, method: str = "auto",
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` on any device -> normalised float32, per-sample random color work.

    ``method``: ``auto`` (``per_sample`` on the CPU, ``batched`` elsewhere), ``batched``,
    ``compiled`` (``batched`` under ``torch.compile``) or ``per_sample``; all give the same
    result for the same generator state, up to float rounding. The output is in ``memory_format``
    (the model's: channels_last for a RegNet on CUDA).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"color_augment expects uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if method not in ("auto", "batched", "compiled", "per_sample"):
        raise ValueError(f"color_augment method must be auto, batched, compiled or per_sample, got {method!r}")
    params = sample_color_params(images.shape[0], spec, gen)
    if method == "auto":
        method = "per_sample" if images.device.type == "cpu" else "batched"
    if method == "per_sample":
        return apply_per_sample(images, spec, params).contiguous(memory_format=memory_format)
    return apply_batched(images, spec, params, memory_format=memory_format, compiled=method == "compiled")
