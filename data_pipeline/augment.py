"""The batched colour stage of multi-crop, run on the training device (CPU tensors in tests).

Takes a batch of ``uint8`` crops ``(B, 3, H, W)`` and applies, with independent random
parameters per sample, what SwAV/SEER/MoCo v3 apply per image with PIL:

- colour jitter (brightness, contrast, saturation, hue) with probability ``jitter_p``, the four
  ops in a random order per sample, each clamped to [0, 1] as torchvision's ``ColorJitter``
  does; hue is shifted in HSV space like torchvision's ``adjust_hue``;
- grayscale with probability ``grayscale_p`` (ITU-R 601 luma, as torchvision);
- Gaussian blur with probability ``blur_p`` and sigma uniform in ``blur_sigma`` (a separable
  kernel of radius ``ceil(3 * sigma_max)``, reflect padding);
- solarize (threshold 0.5) with probability ``solarize_p``;
- normalisation by mean/std, returning float32.

All randomness comes from one ``torch.Generator`` so a batch's augmentation is a pure function
of its seed (exact resume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


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


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = torch.stack(
        (
            torch.stack((v, q, p, p, t, v), 1),
            torch.stack((t, v, v, q, p, p), 1),
            torch.stack((p, p, t, v, v, q), 1),
        ),
        1,
    )  # (B, 3, 6, H, W)
    index = i.unsqueeze(1).unsqueeze(2).expand(-1, 3, 1, -1, -1)
    return choices.gather(2, index).squeeze(2)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    hue = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), 1)).clamp_(0, 1)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each image of ``x`` with its own sigma (separable, reflect padding)."""
    b, c, h, w = x.shape
    radius = min(int(math.ceil(3.0 * max_sigma)), (min(h, w) - 1) // 2)
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(b * c, 1, 1, -1), groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(b * c, 1, -1, 1), groups=b * c)
    return flat.view(b, c, h, w)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=gen)


def color_augment(images: torch.Tensor, spec: ColorAugmentSpec, gen: torch.Generator) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` on any device -> normalised float32, per-sample random colour work.

    Random parameters are drawn on the CPU from ``gen`` (cheap: a few numbers per sample) and
    moved to the images' device, so results do not depend on the device's RNG.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"color_augment expects uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    device = images.device
    x = images.float().div_(255.0)
    n = x.shape[0]

    def coin(p: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) < p).to(device)

    bri, con, sat, hue = spec.jitter
    factors = torch.stack(
        (
            _uniform(n, max(0.0, 1 - bri), 1 + bri, gen),
            _uniform(n, max(0.0, 1 - con), 1 + con, gen),
            _uniform(n, max(0.0, 1 - sat), 1 + sat, gen),
            _uniform(n, -hue, hue, gen),
        ),
        1,
    ).to(device)
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1).to(device)
    jitter = coin(spec.jitter_p)
    for position in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            idx = torch.nonzero(jitter & (order[:, position] == op_index)).flatten()
            if idx.numel():
                x[idx] = op(x[idx], factors[idx, op_index])
    gray = coin(spec.grayscale_p)
    if gray.any():
        x[gray] = _gray(x[gray]).expand(-1, 3, -1, -1)
    blur = coin(spec.blur_p)
    sigma = _uniform(n, spec.blur_sigma[0], spec.blur_sigma[1], gen).to(device)
    if blur.any():
        x[blur] = gaussian_blur(x[blur], sigma[blur], spec.blur_sigma[1])
    solarize = coin(spec.solarize_p)
    if solarize.any():
        s = x[solarize]
        x[solarize] = torch.where(s >= 0.5, 1.0 - s, s)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std
