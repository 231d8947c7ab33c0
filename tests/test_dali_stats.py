"""The DALI backend's augmentation statistics agree with the torch path's (crops.py + augment.py).

Both backends run the same recipes over the same hand-made PNG shards whose content makes each
random step readable from the output views:

- geometry: every pixel encodes its coordinates (R = x, G = y), color work off: a view's R/G
  range gives its crop's width and height (area fraction, aspect ratio), R decreasing from left to
  right means it was flipped;
- color: a flat image of one known color, one view per color op (brightness, contrast,
  saturation, hue, grayscale, solarize): a flat crop stays flat, so the output color gives the
  op's factor (or that the op did not run);
- blur: a 32x32 texture cut at scale 1 and aspect 1 into 32x32 views (the crop is the whole
  image, no resize): a view differs from the image exactly when it was blurred.

Tolerances (about 1,000-2,000 views per backend and measure): a rate differs from the other
backend's and from its configured probability by at most 0.05 (> 3 standard deviations); a
distribution's two-sample Kolmogorov-Smirnov distance between the backends is at most 0.1
(the 0.001 critical value for these sample sizes is 0.06-0.09).
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install 'seer[dali]')")

from data_pipeline.augment import ColorAugmentSpec, color_augment  # noqa: E402
from data_pipeline.crops import CropSpec, MultiCrop  # noqa: E402
from data_pipeline.dali_loader import DaliLoader  # noqa: E402
from data_pipeline.shards import ShardWriter, iter_shard  # noqa: E402

OFF = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
MEAN, STD = np.array(ColorAugmentSpec().mean), np.array(ColorAugmentSpec().std)
COLOUR = (200.0, 100.0, 50.0)
RATE_TOL, KS_TOL = 0.05, 0.1


def write_png_shard(folder: Path, name: str, images: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(folder, name) as writer:
        for pixels in images:
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="PNG")
            writer.write(writer.next_key(), out.getvalue(), "png", {"source": "test"})


def torch_views(folder: Path, crops, colors, flip_p: float, n_samples: int, batch: int = 64) -> list[np.ndarray]:
    """The torch path: MultiCrop in the workers, color_augment per view on batches (as train.py)."""
    multicrop = MultiCrop(crops, flip_p=flip_p)
    data = [s.image for path in sorted(folder.glob("*.tar")) for s in iter_shard(path)]
    per_view = [[] for _ in colors]
    for start in range(0, n_samples, batch):
        samples = [multicrop.from_bytes(data[i % len(data)], torch.Generator().manual_seed(i))
                   for i in range(start, min(start + batch, n_samples))]
        for v, spec in enumerate(colors):
            stacked = torch.stack([views[v] for views in samples])
            per_view[v].append(color_augment(stacked, spec, torch.Generator().manual_seed(start * 31 + v)).numpy())
    return [_pixels(np.concatenate(chunks)) for chunks in per_view]


def dali_views(folder: Path, crops, colors, flip_p: float, n_samples: int, batch: int = 64) -> list[np.ndarray]:
    loader = DaliLoader(folder, crops, colors, flip_p, batch_size=batch, mode="fixed", seed=5,
                        num_threads=2, cache_dir=folder / "cache", initial_fill=64)
    per_view = [[] for _ in colors]
    for _ in range(-(-n_samples // batch)):
        for v, view in enumerate(next(loader)["views"]):
            per_view[v].append(view.numpy())
    return [_pixels(np.concatenate(chunks)) for chunks in per_view]


def _pixels(normalised: np.ndarray) -> np.ndarray:
    """(N, 3, S, S) normalised float32 -> [0, 255] floats."""
    return normalised * (255.0 * STD[None, :, None, None]) + 255.0 * MEAN[None, :, None, None]


def ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def both(folder, crops, colors, flip_p, n):
    return {"torch": torch_views(folder, crops, colors, flip_p, n), "dali": dali_views(folder, crops, colors, flip_p, n)}


def check_rate(name: str, rates: dict, expected: float) -> None:
    assert abs(rates["torch"] - rates["dali"]) <= RATE_TOL, (name, rates)
    for backend, rate in rates.items():
        assert abs(rate - expected) <= RATE_TOL, (name, backend, rate, expected)


def check_distribution(name: str, values: dict) -> None:
    distance = ks(values["torch"], values["dali"])
    assert distance <= KS_TOL, (name, distance, {k: np.percentile(v, [10, 50, 90]) for k, v in values.items()})


# -- geometry: crop area and aspect, flip ---------------------------------------------------------

def coordinate_image(width: int = 160, height: int = 120) -> np.ndarray:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)


def crop_geometry(views: np.ndarray, width: int = 160, height: int = 120) -> tuple[np.ndarray, ...]:
    """(area fraction, aspect ratio, flipped) of each view of coordinate_image()."""
    size = views.shape[-1]
    left, right = views[:, 0, :, 0].mean(1), views[:, 0, :, -1].mean(1)
    top, bottom = views[:, 1, 0, :].mean(1), views[:, 1, -1, :].mean(1)
    span = 1.0 - 1.0 / size  # first to last output pixel centre, as a fraction of the crop side
    w = np.abs(right - left) / 255.0 * (width - 1) / span
    h = np.abs(bottom - top) / 255.0 * (height - 1) / span
    return w * h / (width * height), w / h, left > right


@pytest.mark.slow
def test_crop_and_flip_statistics_agree(tmp_path):
    folder = tmp_path / "coords"
    write_png_shard(folder, "coords", [coordinate_image()] * 16)
    crops = [CropSpec(32, 2, (0.14, 1.0))]
    out = both(folder, crops, [ColorAugmentSpec(**OFF)] * 2, 0.5, 800)
    geometry = {k: [crop_geometry(v) for v in views] for k, views in out.items()}
    area = {k: np.concatenate([g[0] for g in gs]) for k, gs in geometry.items()}
    aspect = {k: np.concatenate([g[1] for g in gs]) for k, gs in geometry.items()}
    flipped = {k: float(np.concatenate([g[2] for g in gs]).mean()) for k, gs in geometry.items()}
    check_distribution("crop area", area)
    check_distribution("crop aspect", {k: np.log(v) for k, v in aspect.items()})
    check_rate("flip", flipped, 0.5)
    for backend in out:
        assert 0.13 <= np.percentile(area[backend], 1) and np.percentile(area[backend], 99) <= 1.02, backend


# -- color: one view per op on a flat image -------------------------------------------------------

def only(jitter=(0.0, 0.0, 0.0, 0.0), **kwargs) -> ColorAugmentSpec:
    return ColorAugmentSpec(**{**OFF, "jitter": jitter, **kwargs})


def hue_of(rgb: np.ndarray) -> np.ndarray:
    return np.array([colorsys.rgb_to_hsv(*(c / 255.0))[0] for c in rgb])


@pytest.mark.slow
def test_color_statistics_agree(tmp_path):
    folder = tmp_path / "flat"
    write_png_shard(folder, "flat", [np.full((48, 48, 3), COLOUR, dtype=np.uint8)] * 8)
    colors = [only((0.8, 0, 0, 0), jitter_p=0.8), only((0, 0.8, 0, 0), jitter_p=0.8),
               only((0, 0, 0.8, 0), jitter_p=0.8), only((0, 0, 0, 0.2), jitter_p=0.8),
               only(grayscale_p=0.2), only(solarize_p=0.2)]
    out = both(folder, [CropSpec(16, len(colors), (0.5, 1.0))], colors, 0.5, 1200)
    rgb = {k: [v.mean(axis=(2, 3)) for v in views] for k, views in out.items()}  # flat views: one color each
    for k, views in out.items():  # a flat image stays flat through every op
        assert max(float(np.abs(v - v.mean(axis=(2, 3), keepdims=True)).max()) for v in views) < 0.5, k
    luma = 0.2989 * COLOUR[0] + 0.587 * COLOUR[1] + 0.114 * COLOUR[2]
    factor = {  # green is far from both clamps for every factor in range
        "brightness": lambda c: c[:, 1] / COLOUR[1],
        "contrast": lambda c: (c[:, 1] - luma) / (COLOUR[1] - luma),
        "saturation": lambda c: (c[:, 1] - luma) / (COLOUR[1] - luma),
    }
    for v, (name, measure) in enumerate(factor.items()):
        values = {k: measure(c[v]) for k, c in rgb.items()}
        jittered = {k: np.abs(x - 1.0) > 1e-3 for k, x in values.items()}
        check_rate(f"{name} jitter", {k: float(j.mean()) for k, j in jittered.items()}, 0.8)
        check_distribution(name, {k: values[k][jittered[k]] for k in values})
        for k in values:
            assert 0.19 <= values[k][jittered[k]].min() and values[k][jittered[k]].max() <= 1.81, (name, k)
    base_hue = colorsys.rgb_to_hsv(*(np.array(COLOUR) / 255.0))[0]
    shift = {k: (hue_of(c[3]) - base_hue + 0.5) % 1.0 - 0.5 for k, c in rgb.items()}
    check_rate("hue jitter", {k: float((np.abs(s) > 1e-3).mean()) for k, s in shift.items()}, 0.8)
    check_distribution("hue shift", {k: s[np.abs(s) > 1e-3] for k, s in shift.items()})
    gray = {k: float((np.ptp(c[4], axis=1) < 0.5).mean()) for k, c in rgb.items()}
    check_rate("grayscale", gray, 0.2)
    solarized = {k: float((np.abs(c[5][:, 0] - (255.0 - COLOUR[0])) < 0.5).mean()) for k, c in rgb.items()}
    check_rate("solarize", solarized, 0.2)


# -- blur: an uncut, unresized texture -----------------------------------------------------------------

@pytest.mark.slow
def test_blur_rate_agrees(tmp_path):
    texture = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    folder = tmp_path / "texture"
    write_png_shard(folder, "texture", [texture] * 8)
    crops = [CropSpec(32, 2, (1.0, 1.0), (1.0, 1.0))]
    out = both(folder, crops, [only(blur_p=0.5)] * 2, 0.0, 800)
    reference = texture.transpose(2, 0, 1).astype(np.float64)[None]
    rates = {}
    for k, views in out.items():
        diff = np.concatenate([np.abs(v - reference).mean(axis=(1, 2, 3)) for v in views])
        assert np.percentile(diff, 5) < 0.05, k  # unblurred views are the image itself
        rates[k] = float((diff > 0.05).mean())
    check_rate("blur", rates, 0.5)
