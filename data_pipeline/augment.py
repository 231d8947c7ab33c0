"""The batched colour stage of multi-crop, run on the training device (or on the CPU alone).

Takes a batch of ``uint8`` crops ``(B, 3, H, W)`` and applies, with independent random
parameters per sample, what SwAV/SEER/MoCo v3 apply per image with PIL/torchvision:

- colour jitter (brightness, contrast, saturation, hue) with probability ``jitter_p``, the four
  ops in a random order per sample, each clamped to the valid range as torchvision's
  ``ColorJitter`` does; hue is shifted in HSV space like torchvision's ``adjust_hue``;
- grayscale with probability ``grayscale_p`` (ITU-R 601 luma, as torchvision);
- Gaussian blur with probability ``blur_p`` and sigma uniform in ``blur_sigma`` (separable
  kernel of radius ``ceil(3 * sigma)``, reflect padding, as torchvision's ``gaussian_blur``);
- solarize (threshold 0.5) with probability ``solarize_p``;
- normalisation by mean/std, returning contiguous float32.

All random parameters are drawn first, on the CPU, from one ``torch.Generator``
(:func:`sample_color_params`), so a batch's augmentation is a pure function of its seed
whatever the device. Two executions of the same parameters (equal up to float rounding):
``batched`` (masked batch ops: few kernel launches, for GPUs) and ``per_sample`` (a loop over
samples with scalar parameters, numpy on cache-resident planes: several times faster on a CPU).
Pixel values are kept in [0, 255] throughout; the 1/255 is folded into the normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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

    jitter: torch.Tensor  # bool: colour jitter applied
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


def blur_radius(sigma: float, height: int, width: int) -> int:
    return min(int(math.ceil(3.0 * sigma)), (min(height, width) - 1) // 2)


def gaussian_kernel(sigma: float, radius: int) -> list[float]:
    weights = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]
    total = sum(weights)
    return [w / total for w in weights]


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


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float | None = None) -> torch.Tensor:
    """Blur each image of ``x`` with its own sigma: a separable kernel of radius ``ceil(3 sigma)``
    (zero weights beyond a sample's own radius), reflect padding. ``max_sigma`` is ignored
    (kept for callers of the old signature)."""
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
    """(scale, shift) with ``x/255 - mean) / std == x * scale - shift``, shaped (3, 1, 1)."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in spec.std], device=device).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(spec.mean, spec.std)], device=device).view(3, 1, 1)
    return scale, shift


def _apply_batched(images: torch.Tensor, spec: ColorAugmentSpec, p: ColorParams) -> torch.Tensor:
    device = images.device
    x = images.float()
    jitter, factors, order = p.jitter.to(device), p.factors.to(device), p.order.to(device)
    for position in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            idx = torch.nonzero(jitter & (order[:, position] == op_index)).flatten()
            if idx.numel():
                x[idx] = op(x[idx], factors[idx, op_index], 255.0)
    gray = p.gray.to(device)
    if bool(p.gray.any()):
        x[gray] = _gray(x[gray]).expand(-1, 3, -1, -1)
    if bool(p.blur.any()):
        blur = p.blur.to(device)
        x[blur] = gaussian_blur(x[blur], p.sigma[p.blur])
    if bool(p.solarize.any()):
        solarize = p.solarize.to(device)
        s = x[solarize]
        x[solarize] = torch.where(s >= 127.5, 255.0 - s, s)
    scale, shift = _normaliser(spec, device)
    return (x * scale - shift).contiguous()


# -- per-sample execution on the CPU: numpy ops with scalar parameters on cache-resident planes
# (numpy's comparisons, selects and per-call overhead are several times cheaper than torch's
# on one CPU thread; the blur uses torch's fused multiply-add on the same memory). Processing
# several small crops at once with broadcast parameters was tried: no faster.

_LUMA_NP = np.array(_LUMA, dtype=np.float32)
_RAMP_CENTRES = np.array([3.0, 2.0, 4.0], dtype=np.float32).reshape(3, 1, 1)
try:  # the clip ufunc itself: one pass, where np.maximum/np.minimum with a scalar bound run
    from numpy._core.umath import clip as _clip  # unvectorised (~8x slower than an array op)
except ImportError:  # numpy < 2, or a layout without it: np.clip is correct, only slower
    try:
        from numpy.core.umath import clip as _clip
    except ImportError:
        _clip = np.clip


def _luma_np(x: np.ndarray) -> np.ndarray:
    return (_LUMA_NP @ x.reshape(3, -1)).reshape(x.shape[1:])


def _hue_np(x: np.ndarray, shift: float) -> None:
    """In place: rotate the hue of a (3, H, W) [0, 255] image by ``shift`` turns (exact HSV).

    The sextant is chosen by multiplying with disjoint 0/1 masks, as torchvision does (exact):
    numpy's masked copies (``copyto(where=)``, ``where``) branch per pixel and cost ~30 plain passes.
    """
    r, g, b = x
    top = np.maximum(r, g)
    np.maximum(top, b, out=top)
    low = np.minimum(r, g)
    np.minimum(low, b, out=low)
    chroma = np.subtract(top, low)
    # Where chroma is 0 all channels are equal, so the numerator below is 0 and any finite hue
    # will do; a nonzero chroma is far above 1e-30 (or so small that its hue cannot matter).
    denominator = np.add(chroma, 1e-30)
    red_max = np.equal(top, r)  # red wins ties, then green, as in torchvision
    green_max = np.equal(top, g)
    np.greater(green_max, red_max, out=green_max)  # green and not red
    blue_max = np.logical_or(red_max, green_max)
    np.logical_not(blue_max, out=blue_max)
    hue = np.subtract(g, b)
    np.multiply(hue, red_max, out=hue)
    other = np.subtract(b, r)
    np.multiply(other, green_max, out=other)
    hue += other
    np.subtract(r, g, out=other)
    np.multiply(other, blue_max, out=other)
    hue += other
    hue /= denominator
    sextant = green_max.view(np.uint8)  # 0 red, 1 green, 2 blue: hue offset 2 * sextant
    sextant += blue_max.view(np.uint8)
    sextant += blue_max.view(np.uint8)
    np.multiply(sextant, np.float32(2.0), out=other)
    hue += other
    hue += 6.0 * shift + 12.0  # now in (4, 18): wrap to [0, 6) with a floor
    np.multiply(hue, 1.0 / 6.0, out=other)
    np.floor(other, out=other)
    other *= 6.0
    hue -= other
    # HSV -> RGB with ramps: R = low + chroma * clip(|h - 3| - 1, 0, 1), G and B = top - chroma *
    # clip(|h - c| - 1, 0, 1) with c = 2, 4 (= low + chroma * clip(2 - |h - c|, 0, 1)).
    np.subtract(hue, _RAMP_CENTRES, out=x)
    np.abs(x, out=x)
    x -= 1.0
    _clip(x, 0.0, 1.0, out=x)  # the ufunc: np.clip's Python wrapper costs more than the work here
    x *= chroma
    r += low
    np.subtract(top, x[1:], out=x[1:])


def _jitter_np(x: np.ndarray, op: int, f: float) -> None:
    """In place: one ColorJitter op with factor ``f`` on a (3, H, W) [0, 255] image."""
    if op == 3:
        if f != 0.0:
            _hue_np(x, f)
        return
    if f == 1.0:
        return
    if op == 0:
        x *= f
    elif op == 1:
        # mean of the luma image (torch's float32 mean is ~2x faster than numpy's on one thread)
        mean = float(_LUMA_NP @ torch.from_numpy(x).view(3, -1).mean(1).numpy())
        x *= f
        x += (1.0 - f) * mean
    else:
        gray = ((1.0 - f) * _LUMA_NP) @ x.reshape(3, -1)  # (1 - f) * luma, one pass
        x *= f
        x += gray.reshape(x.shape[1:])
    if f > 1.0:  # blends with f < 1 stay in range
        _clip(x, 0.0, 255.0, out=x)


def _blur_one(x: torch.Tensor, sigma: float) -> torch.Tensor:
    _, h, w = x.shape
    radius = blur_radius(sigma, h, w)
    if radius < 1:
        return x
    weights = gaussian_kernel(sigma, radius)
    padded = F.pad(x.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")[0]
    rows = torch.mul(padded[:, :, 0:w], weights[0])
    for k in range(1, 2 * radius + 1):
        rows.add_(padded[:, :, k:k + w], alpha=weights[k])
    out = torch.mul(rows[:, 0:h], weights[0])
    for k in range(1, 2 * radius + 1):
        out.add_(rows[:, k:k + h], alpha=weights[k])
    return out


def _blur_group(x: torch.Tensor, sigmas: list[float], radius: int) -> torch.Tensor:
    """Blur (k, 3, H, W) samples sharing one kernel radius, each with its own sigma."""
    _, _, h, w = x.shape
    taps = torch.tensor([gaussian_kernel(s, radius) for s in sigmas]).view(len(sigmas), -1, 1, 1, 1).unbind(1)
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    rows = torch.mul(padded[..., 0:w], taps[0])
    for k in range(1, 2 * radius + 1):
        rows.addcmul_(padded[..., k:k + w], taps[k])
    out = torch.mul(rows[..., 0:h, :], taps[0])
    for k in range(1, 2 * radius + 1):
        out.addcmul_(rows[..., k:k + h, :], taps[k])
    return out


_GROUP_BLUR_PIXELS = 128 * 128  # smaller crops are blurred together, grouped by kernel radius


def _apply_per_sample(images: torch.Tensor, spec: ColorAugmentSpec, p: ColorParams) -> torch.Tensor:
    if images.device.type != "cpu":
        raise ValueError(f"the per_sample colour method runs on the CPU, the images are on {images.device}")
    n, _, h, w = images.shape
    out = torch.empty((n, 3, h, w), dtype=torch.float32)
    out_np = out.numpy()
    scale, shift = (t.numpy() for t in _normaliser(spec, images.device))
    jitter, factors, order = p.jitter.tolist(), p.factors.tolist(), p.order.tolist()
    gray, blur, sigma, solarize = p.gray.tolist(), p.blur.tolist(), p.sigma.tolist(), p.solarize.tolist()
    grouped = h * w <= _GROUP_BLUR_PIXELS  # small crops: per-call overhead dominates the blur

    def finish(i: int, x: np.ndarray) -> None:
        if solarize[i]:
            np.subtract(255.0, x, out=x, where=x >= 127.5)
        np.multiply(x, scale, out=out_np[i])
        out_np[i] -= shift

    waiting: dict[int, list[int]] = {}  # kernel radius -> samples held in `out` until blurred
    for i in range(n):
        x = images[i].numpy().astype(np.float32, order="C")
        if jitter[i]:
            for op in order[i]:
                _jitter_np(x, op, factors[i][op])
        if gray[i]:  # one plane from here on: blur and solarize per plane, normalisation broadcasts
            x = _luma_np(x)[None]
        if blur[i] and grouped and blur_radius(sigma[i], h, w) >= 1:
            out_np[i] = x
            waiting.setdefault(blur_radius(sigma[i], h, w), []).append(i)
            continue
        if blur[i]:
            x = _blur_one(torch.from_numpy(x), sigma[i]).numpy()
        finish(i, x)
    for radius, members in waiting.items():
        blurred = _blur_group(out[members], [sigma[i] for i in members], radius).numpy()
        for j, i in enumerate(members):
            finish(i, blurred[j])
    return out


def color_augment(images: torch.Tensor, spec: ColorAugmentSpec, gen: torch.Generator, *, method: str = "auto") -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` on any device -> normalised float32, per-sample random colour work.

    ``method``: ``auto`` (``per_sample`` on the CPU, ``batched`` elsewhere), ``batched`` or
    ``per_sample``; both give the same result for the same generator state.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"color_augment expects uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if method not in ("auto", "batched", "per_sample"):
        raise ValueError(f"color_augment method must be auto, batched or per_sample, got {method!r}")
    params = sample_color_params(images.shape[0], spec, gen)
    if method == "auto":
        method = "per_sample" if images.device.type == "cpu" else "batched"
    if method == "per_sample":
        return _apply_per_sample(images, spec, params)
    return _apply_batched(images, spec, params)
