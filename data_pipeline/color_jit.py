"""Fused CPU kernels of the color stage, compiled by numba (optional: in the ``fast`` and ``dev``
extras). :mod:`data_pipeline.color_cpu` runs them where numba imports, its numpy ops elsewhere.

:func:`color_batch` does a whole view batch in one call. Per sample, the pixels are visited a
row at a time (each op's loop runs over one L1-resident row and vectorises), in at most four
passes where the numpy path makes one whole-image pass per ufunc call (~45 for a hue shift alone):

1. uint8 -> float32 and the jitter ops before the contrast op (the sample's own order; each op
   clamped to [0, 255] as torchvision's ColorJitter clamps to [0, 1]), summing the luma for the
   contrast mean where a contrast op follows;
2. with a contrast op: the contrast op and the ops after it;
3. and 4. with a blur: the row pass (symmetric taps, reflect borders) into a scratch plane, then
   the column pass back into the sample.

Grayscale is the last op of the last jitter pass (one plane from there on); solarize and the
normalisation run in whichever pass writes last. The math is that of the batched reference ops
(``data_pipeline.augment``) and torchvision (exact HSV hue with red, then green, winning max ties;
kernel radius ``ceil(3 sigma)``); only float32 rounding differs (sums in another order, fused
multiply-adds, a reciprocal for a division): <= ~1e-3 on the [0, 255] scale.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, uint64

from data_pipeline.color_batched import LUMA

_LR, _LG, _LB = (np.float32(v) for v in LUMA)
_ZERO, _ONE, _TOP = np.float32(0.0), np.float32(1.0), np.float32(255.0)
_FAST = {"nsz", "arcp", "contract"}  # rounding only: no assumption about NaN or infinities
_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath=_FAST)
_SUM = dict(_JIT, fastmath=_FAST | {"reassoc"})  # a vectorised (reordered) sum


@njit(**_JIT)
def _clamp(v):
    return min(max(v, _ZERO), _TOP)


# Row ops: row ``i`` of a (3, H, W) float32 image ``x`` in place. Indexing ``x[c, i, j]`` (no row
# views: each view costs reference counting) with indices numba can prove non-negative (else each
# access gets a wraparound branch and the loop does not vectorise).

@njit(**_JIT)
def _convert(src, x, i):
    for c in range(3):
        for j in range(x.shape[2]):
            x[c, i, j] = src[c, i, j]


@njit(**_JIT)
def _brightness(x, i, f):
    for c in range(3):
        for j in range(x.shape[2]):
            x[c, i, j] = _clamp(f * x[c, i, j])


@njit(**_JIT)
def _contrast(x, i, f, mean):
    other = (_ONE - f) * mean
    for c in range(3):
        for j in range(x.shape[2]):
            x[c, i, j] = _clamp(f * x[c, i, j] + other)


@njit(**_JIT)
def _saturation(x, i, f):
    rest = _ONE - f
    for j in range(x.shape[2]):
        gray = rest * (_LR * x[0, i, j] + _LG * x[1, i, j] + _LB * x[2, i, j])
        x[0, i, j] = _clamp(f * x[0, i, j] + gray)  # three statements, not a loop over c: this vectorises
        x[1, i, j] = _clamp(f * x[1, i, j] + gray)
        x[2, i, j] = _clamp(f * x[2, i, j] + gray)


@njit(**_JIT)
def _ramp(h, centre):
    return min(max(abs(h - centre) - _ONE, _ZERO), _ONE)


@njit(**_JIT)
def _hue(x, i, shift):
    """Rotate the hue by ``shift`` turns (HSV, value and saturation kept): R = low + chroma *
    ramp(h - 3), G and B = top - chroma * ramp(h - 2 or 4), ramp(t) = clip(|t| - 1, 0, 1)."""
    turn = np.float32(6.0 * shift + 12.0)  # + 12: positive before the wrap to [0, 6)
    for j in range(x.shape[2]):
        red, green, blue = x[0, i, j], x[1, i, j], x[2, i, j]
        top = max(red, max(green, blue))
        low = min(red, min(green, blue))
        chroma = top - low
        inv = _ONE / (chroma + np.float32(1e-30))  # chroma 0: the numerator is 0 too
        red_max = top == red
        green_max = (top == green) and not red_max
        span = (green - blue) if red_max else ((blue - red) if green_max else (red - green))
        base = _ZERO if red_max else (np.float32(2.0) if green_max else np.float32(4.0))
        h = base + span * inv + turn
        h = h - np.float32(6.0) * np.floor(h * np.float32(1.0 / 6.0))
        x[0, i, j] = low + chroma * _ramp(h, np.float32(3.0))
        x[1, i, j] = top - chroma * _ramp(h, np.float32(2.0))
        x[2, i, j] = top - chroma * _ramp(h, np.float32(4.0))


@njit(**_SUM)
def _luma_sum(x, i):
    total = _ZERO
    for j in range(x.shape[2]):
        total += _LR * x[0, i, j] + _LG * x[1, i, j] + _LB * x[2, i, j]
    return total


@njit(**_JIT)
def _gray(x, i):
    for j in range(x.shape[2]):
        x[0, i, j] = _LR * x[0, i, j] + _LG * x[1, i, j] + _LB * x[2, i, j]


@njit(**_JIT)
def _solarized(v):
    return (_TOP - v) if v >= np.float32(127.5) else v


@njit(**_JIT)
def _finish_inplace(x, c, i, solarize, scale, shift):
    """``x[c, i]`` solarized and normalised (``* scale[c] - shift[c]``) in place."""
    s, t = scale[c], shift[c]
    for j in range(x.shape[2]):
        v = x[c, i, j]
        x[c, i, j] = (_solarized(v) if solarize else v) * s - t


@njit(**_JIT)
def _finish_copy(src, x, c, i, solarize, scale, shift):
    """``x[c, i]`` = solarized and normalised ``src``, a row that does not overlap ``x[c, i]``
    (the same row in place would fail the vectoriser's overlap test: scalar code)."""
    s, t = scale[c], shift[c]
    for j in range(x.shape[2]):
        v = src[j]
        x[c, i, j] = (_solarized(v) if solarize else v) * s - t


@njit(**_JIT)
def _finish_row(x, i, gray, solarize, scale, shift):
    """Row ``i`` of ``x`` finished in place; a grayscale sample's plane 0 to all three planes."""
    if gray:
        for c in range(1, 3):
            _finish_copy(x[0, i], x, c, i, solarize, scale, shift)
        _finish_inplace(x, 0, i, solarize, scale, shift)
    else:
        for c in range(3):
            _finish_inplace(x, c, i, solarize, scale, shift)


@njit(**_JIT)
def _pointwise(src, x, ops, factors, lo, hi, mean, convert, luma_sum, gray, finish, solarize, scale, shift):
    """Rows of ``x``: (``convert``) from ``src``, jitter ``ops[lo:hi]``, (``gray``) luma into plane 0,
    (``finish``) solarize and normalise. Returns (``luma_sum``) the luma summed after the jitter ops."""
    total = 0.0
    for i in range(x.shape[1]):
        if convert:
            _convert(src, x, i)
        for k in range(lo, hi):
            op, f = ops[k], factors[k]
            if op == 0:
                _brightness(x, i, f)
            elif op == 1:
                _contrast(x, i, f, mean)
            elif op == 2:
                _saturation(x, i, f)
            else:
                _hue(x, i, f)
        if luma_sum:
            total += _luma_sum(x, i)
        if gray:
            _gray(x, i)
        if finish:
            _finish_row(x, i, gray, solarize, scale, shift)
    return total


@njit(**_JIT)
def _blur_rows(x, c, taps, radius, out):
    """``out`` = plane ``c`` of ``x`` convolved along its rows (taps symmetric, reflect borders)."""
    w = x.shape[2]
    for i in range(x.shape[1]):
        for j in range(w):
            out[i, j] = taps[radius] * x[c, i, j]
        for k in range(1, radius + 1):
            t, step, inner = taps[radius + k], uint64(k), uint64(w - 2 * k)
            for j in range(inner):  # unsigned: no wraparound test, so this loop vectorises
                out[i, j + step] += t * (x[c, i, j] + x[c, i, j + step + step])
            for j in range(k):  # borders: x[j - k] reflects to x[k - j], x[w - 1 + m] to x[w - 1 - m]
                out[i, j] += t * (x[c, i, k - j] + x[c, i, j + k])
                out[i, w - 1 - j] += t * (x[c, i, w - 1 - j - k] + x[c, i, w - 1 - k + j])


@njit(**_JIT)
def _blur_column(rows, i, taps, radius, acc):
    """``acc`` = row ``i`` of ``rows`` convolved along the columns (reflect borders)."""
    h = rows.shape[0]
    for j in range(acc.shape[0]):
        acc[j] = taps[radius] * rows[i, j]
    for k in range(1, radius + 1):
        up, down = abs(i - k), i + k
        down = 2 * (h - 1) - down if down >= h else down
        t = taps[radius + k]
        for j in range(acc.shape[0]):
            acc[j] += t * (rows[up, j] + rows[down, j])


@njit(**_JIT)
def _blur_finish(x, gray, taps, radius, rows, acc, solarize, scale, shift):
    """Blur ``x`` in place (plane 0 only where ``gray``), solarize and normalise on the way out."""
    for c in range(1 if gray else 3):
        _blur_rows(x, c, taps, radius, rows)
        for i in range(x.shape[1]):
            _blur_column(rows, i, taps, radius, acc)
            for out in range(3) if gray else range(c, c + 1):
                _finish_copy(acc, x, out, i, solarize, scale, shift)


@njit(**_JIT)
def _gaussian_taps(sigma, radius, out):
    """``data_pipeline.color_batched.gaussian_kernel`` into ``out[:2 radius + 1]`` (float64 sums)."""
    total = 0.0
    for k in range(2 * radius + 1):
        total += math.exp(-0.5 * ((k - radius) / sigma) ** 2)
    for k in range(2 * radius + 1):
        out[k] = math.exp(-0.5 * ((k - radius) / sigma) ** 2) / total


@njit(**_JIT)
def _jitter_ops(order, factors, ops, fs):
    """The sample's jitter ops that change anything, in its order; returns (count, contrast index or -1)."""
    count, split = 0, -1
    for k in range(4):
        op = order[k]
        f = factors[op]
        if (op == 3 and f != 0.0) or (op != 3 and f != 1.0):
            if op == 1:
                split = count
            ops[count], fs[count] = op, f
            count += 1
    return count, split


@njit(**_JIT)
def color_batch(images, out, jitter, order, factors, gray, blur, sigma, solarize, scale, shift):
    """uint8 ``images`` (B, 3, H, W) -> normalised float32 ``out`` (B, 3, H, W), C-contiguous, with
    the per-sample parameters of ``augment.sample_color_params`` as numpy arrays and the
    normalisation ``scale``, ``shift`` (3,) float32 (``x * scale - shift`` on the [0, 255] scale)."""
    n, _, h, w = images.shape
    max_radius = (min(h, w) - 1) // 2
    ops, fs = np.empty(4, np.int64), np.empty(4, np.float32)
    taps = np.empty(2 * max(max_radius, 0) + 1, np.float32)
    rows, acc = np.empty((h, w), np.float32), np.empty(w, np.float32)
    for i in range(n):
        count, split = _jitter_ops(order[i], factors[i], ops, fs) if jitter[i] else (0, -1)
        radius = min(int(math.ceil(3.0 * float(sigma[i]))), max_radius) if blur[i] else 0
        x, last = out[i], radius < 1
        if split < 0:
            _pointwise(images[i], x, ops, fs, 0, count, _ZERO, True, False, gray[i], last, solarize[i], scale, shift)
        else:  # the contrast op needs the mean luma of the image the ops before it made
            total = _pointwise(images[i], x, ops, fs, 0, split, _ZERO, True, True, False, False, False, scale, shift)
            mean = np.float32(total / (h * w))
            _pointwise(images[i], x, ops, fs, split, count, mean, False, False, gray[i], last, solarize[i], scale, shift)
        if not last:
            _gaussian_taps(float(sigma[i]), radius, taps)
            _blur_finish(x, gray[i], taps, radius, rows, acc, solarize[i], scale, shift)
