"""The color stage on the CPU: ``color_augment(method="per_sample")`` (what ``auto`` runs on a
CPU), a loop over the samples of a view batch with each sample's scalar parameters.

Two executions of the same ops (those of :mod:`data_pipeline.augment`, whose module doc lists
them), equal up to float32 rounding; ``BACKEND`` says which one this process runs:

- ``numba`` (where numba is installed; it is in the ``fast`` and ``dev`` extras): the fused
  kernels of :mod:`data_pipeline.color_jit`, at most four row-by-row passes per sample for the
  whole chain, the batch in one call (~4x faster than numpy on SEER's views);
- ``numpy`` (fallback): numpy ops with scalar parameters on cache-resident planes, one whole-plane
  pass per ufunc call: ~45 for a hue shift, 2 per blur tap (numpy's comparisons, selects and
  per-call overhead are several times cheaper than torch's on one CPU thread; the blur uses
  torch's fused multiply-add on the same memory). Processing several small crops at once with
  broadcast parameters was tried: no faster.

Pixel values are kept in [0, 255] throughout; the 1/255 is folded into the normalisation.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.color_batched import LUMA as _LUMA  # torchvision's rgb_to_grayscale weights
from data_pipeline.color_batched import blur_radius, gaussian_kernel


# "numba" where numba is installed, else "numpy"; a module attribute, so tests and benchmarks can pick
BACKEND = "numba" if importlib.util.find_spec("numba") is not None else "numpy"


def normaliser(spec) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), float32 of shape (3,), with ``(x / 255 - mean) / std == x * scale - shift``."""
    scale = np.array([1.0 / (255.0 * s) for s in spec.std], dtype=np.float32)
    shift = np.array([m / s for m, s in zip(spec.mean, spec.std)], dtype=np.float32)
    return scale, shift


def apply_per_sample(images: torch.Tensor, spec, p) -> torch.Tensor:
    """uint8 (B, 3, H, W) on the CPU -> normalised contiguous float32, with ``BACKEND``; ``spec``
    and ``p`` are ``data_pipeline.augment``'s ColorAugmentSpec and ColorParams (not imported here:
    augment imports this module)."""
    if images.device.type != "cpu":
        raise ValueError(f"the per_sample color method runs on the CPU, the images are on {images.device}")
    if BACKEND == "numba":
        out = _apply_fused(images, spec, p)
        if out is not None:
            return out
    return _apply_numpy(images, spec, p)


def fused_kernels():
    """:mod:`data_pipeline.color_jit`, imported on first use (its kernels are compiled on their first
    call, a few seconds, and cached in data_pipeline/__pycache__: ~0.4 s in later processes).
    None, with a warning and ``BACKEND`` switched to numpy, where numba is there but fails."""
    global BACKEND
    try:
        from data_pipeline import color_jit
    except Exception as err:  # noqa: BLE001 - e.g. a numba release that refuses this numpy
        warnings.warn(f"the fused color kernels do not load ({type(err).__name__}: {err}); using numpy", stacklevel=2)
        BACKEND = "numpy"
        return None
    return color_jit


def _apply_fused(images: torch.Tensor, spec, p) -> torch.Tensor | None:
    kernels = fused_kernels()
    if kernels is None:
        return None
    pixels = np.ascontiguousarray(images.numpy())  # a copy only for channels-last batches
    out = torch.empty(pixels.shape, dtype=torch.float32)
    scale, shift = normaliser(spec)
    kernels.color_batch(pixels, out.numpy(), p.jitter.numpy(), p.order.numpy(), p.factors.numpy(), p.gray.numpy(),
                        p.blur.numpy(), p.sigma.numpy(), p.solarize.numpy(), scale, shift)
    return out


# -- the numpy path ----------------------------------------------------------------------------

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


def _apply_numpy(images: torch.Tensor, spec, p) -> torch.Tensor:
    n, _, h, w = images.shape
    out = torch.empty((n, 3, h, w), dtype=torch.float32)
    out_np = out.numpy()
    scale, shift = (a.reshape(3, 1, 1) for a in normaliser(spec))
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
