"""The DALI graph of the ``dali`` backend: shards -> decoded images -> the normalised multi-crop views.

One pipeline per rank reads the shards with ``fn.readers.webdataset`` (index files, this rank's
share of the samples: ``shard_id=rank, num_shards=world_size``), decodes each image once
(``mixed``, i.e. nvJPEG, on a GPU; ``cpu`` otherwise; full-size decoding, no ROI decoder, so the
hardware decoder stays usable) and cuts every view from that one decode. Per view, as the torch
path (:mod:`data_pipeline.crops` then :mod:`data_pipeline.augment`) does:

- random resized crop at the view's scale and ratio (``fn.random_resized_crop``, 10 tries,
  antialiased linear resize), horizontal flip with probability ``flip_p``;
- color jitter with probability ``jitter_p``: brightness, contrast, saturation and hue factors
  drawn as torchvision's ``ColorJitter`` draws them, applied in a random order per sample, each
  clamped to [0, 255]; contrast blends with the mean luma, saturation with the luma image, hue
  rotates in HSV space (exact HSV arithmetic, as torchvision's ``adjust_hue``);
- grayscale with probability ``grayscale_p`` (ITU-R 601 luma, torchvision's weights);
- Gaussian blur with probability ``blur_p``, sigma uniform in ``blur_sigma``, radius
  ``ceil(3 sigma)``, mirrored borders;
- solarize (threshold 127.5 of 255) with probability ``solarize_p``;
- normalisation by mean/std to float32 ``CHW``.

Every probabilistic step is a DALI conditional (``enable_conditionals``): only the samples whose
coin came up run the branch. So DALI does the color stage too: its views are what the torch path's
views are *after* :func:`data_pipeline.augment.color_augment`. Pixels are not bit-identical to the
torch path (different decoders, resize kernels, float rounding and random streams); their
statistics agree (tests/test_dali_stats.py states the tolerances). One known difference: when 10
tries find no crop, DALI falls back to its own crop, torchvision to a centre crop.

``enable_checkpointing`` is on: the reader position and every random operator's state can be
saved with ``pipe.checkpoint()`` and restored by building the same graph with ``checkpoint=``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from data_pipeline.augment import _LUMA, ColorAugmentSpec
from data_pipeline.crops import CropSpec

try:  # the `dali` extra; callers check DALI_IMPORT_ERROR for a one-line message
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    DALI_IMPORT_ERROR = None
except ImportError as _err:  # pragma: no cover - depends on the environment
    DALI_IMPORT_ERROR = f"data.backend=dali needs NVIDIA DALI: pip install 'seer[dali]' ({_err})"

IMAGE_EXTS = "jpg;jpeg;png;webp;bmp;tif;tiff"  # what fn.decoders.image reads (ingest stores jpg/png/webp)


@dataclass(frozen=True)
class ViewRecipe:
    """One output view: its crop and its color work."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    color: ColorAugmentSpec


def view_recipes(crops: list[CropSpec], colors: list[ColorAugmentSpec]) -> list[ViewRecipe]:
    """The views in the torch path's order: ``count`` views per crop spec, one color spec per view."""
    sizes = [spec for spec in crops for _ in range(spec.count)]
    if len(sizes) != len(colors):
        raise ValueError(f"{len(sizes)} crops but {len(colors)} color specs: one color spec per view")
    return [ViewRecipe(s.size, tuple(s.scale), tuple(s.ratio), c) for s, c in zip(sizes, colors)]


def graph_fingerprint(recipes: list[ViewRecipe], flip_p: float, batch_size: int, device: str) -> str:
    """What a DALI checkpoint is only valid for: the same graph, batch size and device."""
    text = json.dumps([[asdict(r) for r in recipes], flip_p, batch_size, device], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- per-view operations (DataNode arithmetic: DALI fuses each expression into one operator) -----

def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _hwc(v):
    """Name the layout again: both sides of a conditional must merge with the same layout."""
    return fn.reshape(v, layout="HWC")


def _on(node, device: str):
    return node.gpu() if device == "gpu" else node


def _luma(v):
    return _LUMA[0] * v[:, :, 0] + _LUMA[1] * v[:, :, 1] + _LUMA[2] * v[:, :, 2]


def _brightness(v, f):
    return dmath.clamp(v * f, 0.0, 255.0)


def _contrast(v, f):
    means = fn.reductions.mean(v, axes=[0, 1])
    mean_luma = _LUMA[0] * means[0] + _LUMA[1] * means[1] + _LUMA[2] * means[2]
    return dmath.clamp(v * f + (1.0 - f) * mean_luma, 0.0, 255.0)


def _saturation(v, f):
    return dmath.clamp(v * f + (1.0 - f) * fn.expand_dims(_luma(v), axes=[2]), 0.0, 255.0)


def _hue(v, shift):
    """Rotate the HSV hue by ``shift`` turns; value and saturation kept (torchvision's adjust_hue)."""
    r, g, b = v[:, :, 0], v[:, :, 1], v[:, :, 2]
    top = dmath.max(dmath.max(r, g), b)
    low = dmath.min(dmath.min(r, g), b)
    chroma = top - low
    inv = 1.0 / (chroma + (chroma == 0.0))
    red = top == r  # red wins ties, then green (torchvision's order)
    green = (top == g) * (1.0 - red)
    blue = (1.0 - red) * (1.0 - green)
    hue6 = red * ((g - b) * inv) + green * ((b - r) * inv + 2.0) + blue * ((r - g) * inv + 4.0)
    hue6 = hue6 + 6.0 * shift + 12.0
    hue6 = hue6 - 6.0 * dmath.floor(hue6 / 6.0)
    out_r = low + chroma * dmath.clamp(dmath.abs(hue6 - 3.0) - 1.0, 0.0, 1.0)
    out_g = top - chroma * dmath.clamp(dmath.abs(hue6 - 2.0) - 1.0, 0.0, 1.0)
    out_b = top - chroma * dmath.clamp(dmath.abs(hue6 - 4.0) - 1.0, 0.0, 1.0)
    return dmath.clamp(fn.stack(out_r, out_g, out_b, axis=2, axis_name="C"), 0.0, 255.0)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _jitter_factors(spec: ColorAugmentSpec) -> list:
    """Brightness, contrast, saturation factors and hue shift, drawn as ColorJitter draws them."""
    bri, con, sat, hue = spec.jitter
    ranges = [(max(0.0, 1 - bri), 1 + bri), (max(0.0, 1 - con), 1 + con), (max(0.0, 1 - sat), 1 + sat), (-hue, hue)]
    return [fn.random.uniform(range=list(r)) if r[0] < r[1] else None for r in ranges]


def _color_jitter(v, spec: ColorAugmentSpec, device: str):
    factors = _jitter_factors(spec)
    keys = fn.random.uniform(range=[0.0, 1.0], shape=[4])
    # op j runs at position rank_j = #{i: key_i < key_j}: a uniformly random order per sample
    ranks = [sum(fn.cast(keys[i] < keys[j], dtype=types.INT32) for i in range(4) if i != j) for j in range(4)]
    if _coin(spec.jitter_p):
        for position in range(4):
            for j, op in enumerate(_JITTER_OPS):
                if factors[j] is not None:
                    if ranks[j] == position:
                        v = _hwc(op(v, _on(factors[j], device)))
    return v


def _gray3(v):
    luma = fn.expand_dims(_luma(v), axes=[2])
    return fn.cat(luma, luma, luma, axis=2)


def _solarize(v):
    return v + (v >= 127.5) * (255.0 - 2.0 * v)


def _view(images, recipe: ViewRecipe, flip_p: float, device: str):
    spec = recipe.color
    v = fn.random_resized_crop(images, size=[recipe.size, recipe.size], random_area=list(recipe.scale),
                               random_aspect_ratio=list(recipe.ratio), antialias=True, num_attempts=10)
    v = fn.cast(v, dtype=types.FLOAT)
    if spec.jitter_p > 0:
        v = _color_jitter(v, spec, device)
    if spec.grayscale_p > 0:
        if _coin(spec.grayscale_p):
            v = _hwc(_gray3(v))
    if spec.blur_p > 0:
        sigma = fn.random.uniform(range=list(spec.blur_sigma))
        if _coin(spec.blur_p):
            v = fn.gaussian_blur(v, sigma=sigma)
    if spec.solarize_p > 0:
        if _coin(spec.solarize_p):
            v = _hwc(_solarize(v))
    mirror = fn.random.coin_flip(probability=flip_p)
    return fn.crop_mirror_normalize(v, mirror=mirror, dtype=types.FLOAT,
                                    output_layout="CHW", mean=[255.0 * m for m in spec.mean],
                                    std=[255.0 * s for s in spec.std])


def _multicrop_graph(paths: list[str], index_paths: list[str], recipes: list[ViewRecipe], flip_p: float, *,
                     device: str, shard_id: int, num_shards: int, reader_seed: int, shuffle_seed: int,
                     initial_fill: int):
    encoded = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=[IMAGE_EXTS], missing_component_behavior="skip",
        case_sensitive_extensions=False, shard_id=shard_id, num_shards=num_shards, random_shuffle=True,
        initial_fill=initial_fill, seed=reader_seed, shuffle_after_epoch=True,
        shuffle_after_epoch_seed=shuffle_seed, name="reader",
    )
    images = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    return tuple(_view(images, recipe, flip_p, device) for recipe in recipes)


def build_pipeline(paths: list[str], index_paths: list[str], recipes: list[ViewRecipe], flip_p: float, *,
                   batch_size: int, device: str = "cpu", device_id: int | None = None, num_threads: int = 2,
                   shard_id: int = 0, num_shards: int = 1, seed: int = 0, shuffle_seed: int = 0,
                   initial_fill: int = 1024, prefetch: int = 2, checkpoint: bytes | None = None):
    """A built pipeline whose outputs are the views (one ``(B, 3, S, S)`` float32 batch each).

    ``device``: ``cpu`` (``device_id`` None: no GPU needed) or ``gpu``. ``seed`` seeds the
    augmentation and the reader's shuffle buffer (give each rank its own); ``shuffle_seed`` the
    shard order after each epoch (the same on every rank). ``checkpoint``: what
    ``pipe.checkpoint()`` returned for a pipeline built with the same arguments, to continue where it was.
    """
    if DALI_IMPORT_ERROR:  # a ValueError: the CLI prints it as one line
        raise ValueError(DALI_IMPORT_ERROR)
    if device not in ("cpu", "gpu"):
        raise ValueError(f"DALI device must be cpu or gpu, got {device!r}")
    graph = pipeline_def(_multicrop_graph, enable_conditionals=True, enable_checkpointing=True)
    pipe = graph(paths, index_paths, recipes, flip_p, device=device, shard_id=shard_id, num_shards=num_shards,
                 reader_seed=seed, shuffle_seed=shuffle_seed, initial_fill=initial_fill,
                 batch_size=batch_size, num_threads=num_threads, device_id=device_id if device == "gpu" else None,
                 seed=seed, prefetch_queue_depth=prefetch, checkpoint=checkpoint)
    pipe.build()
    return pipe
