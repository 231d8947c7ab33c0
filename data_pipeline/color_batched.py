"""The color stage for accelerators: every view in a fixed, small number of whole-batch kernels.

``apply_batched(images, spec, params)`` does what ``data_pipeline.augment`` describes (jitter in a
random order per sample, grayscale, blur, solarize, normalisation) with no per-sample branch and
no indexing by data: every per-sample choice becomes a column of ONE float32 table built on the
host from the already-drawn parameters (:func:`parameter_table`, numpy, one copy to the device),
and every op runs on the whole batch, a sample that skips an op getting that op's identity:

- jitter: three "blend" slots before the hue and three after it; a slot is
  ``clamp(lerp(other, x, f), 0, 255)`` with ``other`` 0 (brightness), the image's mean luma
  (contrast) or its luma (saturation), and ``f = 1, other = 0`` (exactly ``x``) where the sample
  has no op in that slot. Each sample's ops fill the slots in its own order, so the order per
  sample is kept. The hue slot rotates hue in HSV (exact ramps) and is selected per sample
  with ``lerp(x, hued, on)`` (``on`` 0 or 1: exactly one or the other);
- grayscale: ``lerp(x, luma, on)``; blur: a separable kernel of fixed radius
  ``ceil(3 * max sigma)`` per view, each sample's own taps zero-padded to it (a one-tap identity
  kernel where unblurred), reflect padding, two grouped convolutions; solarize: a per-sample
  threshold (255 is never reached where off); normalisation: one fused multiply-add, written in
  the requested memory format.

That is about 70 kernels per view whatever the batch size (the earlier masked-index version
launched 400-520 and waited for the device at every boolean index); ``compiled=True`` runs the
same function under ``torch.compile`` (one graph per view shape and spec: a few fused kernels).
Also the blur kernel's definition (:func:`blur_radius`, :func:`gaussian_kernel`), shared with the
CPU path.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_BLEND_SLOTS = 6  # 3 before the hue, 3 after
_HUE, _GRAY, _SOLARIZE = 3 * _BLEND_SLOTS, 3 * _BLEND_SLOTS + 2, 3 * _BLEND_SLOTS + 3
_TAPS = 3 * _BLEND_SLOTS + 4  # first blur tap column
_constants: dict = {}


def blur_radius(sigma: float, height: int, width: int) -> int:
    return min(int(math.ceil(3.0 * sigma)), (min(height, width) - 1) // 2)


def gaussian_kernel(sigma: float, radius: int) -> list[float]:
    weights = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def _jitter_columns(table: np.ndarray, params) -> None:
    """Blend slots (f, contrast?, saturation?) x 6 and the hue (on, 6 * shift + 6) per sample."""
    n = table.shape[0]
    jitter, factors, order = params.jitter.numpy(), params.factors.numpy(), params.order.numpy()
    blend = np.zeros((n, _BLEND_SLOTS, 3), dtype=np.float32)
    blend[:, :, 0] = 1.0  # identity where a sample has no op in a slot
    hue_at = np.argmax(order == 3, axis=1)
    rows = np.arange(n)
    for position in range(4):
        op = order[:, position]
        slot = np.where(position < hue_at, position, 3 + position - hue_at - 1)
        active = jitter & (op != 3)
        r, s, o = rows[active], slot[active], op[active]
        blend[r, s, 0] = factors[r, o]
        blend[r, s, 1] = o == 1
        blend[r, s, 2] = o == 2
    table[:, :_HUE] = blend.reshape(n, 3 * _BLEND_SLOTS)
    table[:, _HUE] = jitter
    table[:, _HUE + 1] = np.where(jitter, 6.0 * factors[:, 3] + 6.0, 0.0)


def parameter_table(params, spec, height: int, width: int) -> tuple[np.ndarray, int]:
    """(B, 22 + 2R + 1) float32 table of every per-sample choice, and the blur radius R."""
    n = len(params.jitter)
    radius = blur_radius(spec.blur_sigma[1], height, width) if spec.blur_p > 0 else 0
    table = np.zeros((n, _TAPS + 2 * radius + 1), dtype=np.float32)
    _jitter_columns(table, params)
    table[:, _GRAY] = params.gray.numpy()
    table[:, _SOLARIZE] = np.where(params.solarize.numpy(), 127.5, np.inf)
    table[:, _TAPS + radius] = 1.0  # identity kernel
    if radius >= 1:
        sigmas = params.sigma.numpy()
        for i in np.flatnonzero(params.blur.numpy()):
            sigma = float(sigmas[i])
            own = blur_radius(sigma, height, width)
            if own >= 1:
                taps = np.array(gaussian_kernel(sigma, own), dtype=np.float64).astype(np.float32)
                table[i, _TAPS:] = 0.0
                table[i, _TAPS + radius - own:_TAPS + radius + own + 1] = taps
    return table, radius


def _device_constants(device: torch.device, spec) -> dict[str, torch.Tensor]:
    """Small constant tensors made once per device and spec (not a kernel per call)."""
    key = (str(device), spec.mean, spec.std)
    if key not in _constants:
        def const(values, shape):
            return torch.tensor(values, dtype=torch.float32, device=device).view(shape)

        _constants[key] = {
            "luma": const(LUMA, (1, 3, 1, 1)),
            "centres": const([3.0, 2.0, 4.0], (1, 3, 1, 1)),
            "ramp_scale": const([1.0, -1.0, -1.0], (1, 3, 1, 1)),
            "ramp_shift": const([-1.0, 2.0, 2.0], (1, 3, 1, 1)),
            "scale": const([1.0 / (255.0 * s) for s in spec.std], (1, 3, 1, 1)),
            "neg_shift": const([-m / s for m, s in zip(spec.mean, spec.std)], (1, 3, 1, 1)),
        }
    return _constants[key]


def _column(table: torch.Tensor, index: int) -> torch.Tensor:
    return table[:, index, None, None, None]  # (B, 1, 1, 1), a view


def _luma(x: torch.Tensor, c: dict) -> torch.Tensor:
    return (x * c["luma"]).sum(1, keepdim=True)


def _blend(x: torch.Tensor, table: torch.Tensor, slot: int, c: dict) -> torch.Tensor:
    f, contrast, saturation = (_column(table, 3 * slot + k) for k in range(3))
    gray = _luma(x, c)
    other = torch.addcmul(contrast * gray.mean((2, 3), keepdim=True), saturation, gray)
    return torch.lerp(other, x, f).clamp_(0.0, 255.0)


def _hue(x: torch.Tensor, table: torch.Tensor, c: dict) -> torch.Tensor:
    """HSV hue rotation of the samples whose hue column is on (exact ramps, torchvision's ties)."""
    top, argmax = x.max(1, keepdim=True)  # ties: red, then green (torchvision's order)
    low = x.amin(1, keepdim=True)
    chroma = top - low
    spans = x.roll(-1, 1) - x.roll(-2, 1)  # g - b, b - r, r - g
    base = torch.add(_column(table, _HUE + 1), argmax, alpha=2)  # sextant offset + 6 * shift + 6
    hue6 = torch.addcdiv(base, spans.gather(1, argmax), chroma + 1e-30).remainder_(6.0)  # chroma 0: span 0
    ramps = torch.addcmul(c["ramp_shift"], c["ramp_scale"], (hue6 - c["centres"]).abs_()).clamp_(0.0, 1.0)
    return torch.lerp(x, torch.addcmul(low, chroma, ramps), _column(table, _HUE))


def _blur(x: torch.Tensor, table: torch.Tensor, radius: int) -> torch.Tensor:
    b, ch, h, w = x.shape
    taps = table[:, _TAPS:].repeat_interleave(ch, 0)  # (B * C, 2R + 1)
    flat = x.reshape(1, b * ch, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), taps.view(b * ch, 1, 1, -1), groups=b * ch)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), taps.view(b * ch, 1, -1, 1), groups=b * ch)
    return flat.view(b, ch, h, w)


def fused_colors(images: torch.Tensor, table: torch.Tensor, c: dict, radius: int, stages: tuple[bool, ...],
                 memory_format: torch.memory_format) -> torch.Tensor:
    """The device side: uint8 images and the parameter table -> normalised float32 views."""
    jitter, gray, solarize = stages
    x = images.float()
    if jitter:
        for slot in range(3):
            x = _blend(x, table, slot, c)
        x = _hue(x, table, c)
        for slot in range(3, _BLEND_SLOTS):
            x = _blend(x, table, slot, c)
    if gray:
        x = torch.lerp(x, _luma(x, c).expand_as(x), _column(table, _GRAY))
    if radius >= 1:
        x = _blur(x, table, radius)
    if solarize:
        x = torch.where(x >= _column(table, _SOLARIZE), 255.0 - x, x)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=memory_format)
    return torch.addcmul(c["neg_shift"], x, c["scale"], out=out)


_compiled_colors = None


def apply_batched(images: torch.Tensor, spec, params, *, memory_format: torch.memory_format = torch.contiguous_format,
                  compiled: bool = False) -> torch.Tensor:
    """The whole view on ``images.device`` (see the module doc); ``params`` from
    ``sample_color_params``."""
    global _compiled_colors
    _, _, h, w = images.shape
    table, radius = parameter_table(params, spec, h, w)
    table = torch.from_numpy(table)
    if images.device.type == "cuda":
        table = table.pin_memory()  # an asynchronous copy: no wait for the device
    table = table.to(images.device, non_blocking=True)
    stages = (spec.jitter_p > 0, spec.grayscale_p > 0, spec.solarize_p > 0)
    run = fused_colors
    if compiled:
        if _compiled_colors is None:
            _compiled_colors = torch.compile(fused_colors, fullgraph=True, dynamic=False)
        run = _compiled_colors
    return run(images, table, _device_constants(images.device, spec), radius, stages, memory_format)
