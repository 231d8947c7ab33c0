"""A small corpus of real photographs for demos and tests, built from bundled package data.

The photos ship inside the scikit-image and scikit-learn wheels, so nothing is downloaded:
9 color photos (astronaut, chelsea, coffee, hubble_deep_field, immunohistochemistry,
motorcycle left/right, retina, rocket) and 8 grayscale ones (camera, moon, coins, brick,
grass, gravel, cell, page) from ``skimage.data``'s folder, plus china and flower from
``sklearn.datasets.load_sample_images()``. Each photo is written as ``<name>.jpg`` (quality
90) together with ``crops_per_photo`` random crops ``<name>-crop<k>.jpg`` (each side 50-100%
of the photo's), so the default corpus has 19 * 5 = 95 images. Same seed, same files;
crop k of a photo does not depend on ``crops_per_photo``.

``build_class_folders`` writes an ImageNet-style tree instead: one folder per class (a photo),
holding small random crops of it; ``classes_of_keys`` maps the sample keys of a shard folder
ingested from such a tree back to their class folders (to measure how mixed batches are).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.storage import atomic_output

SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png", "chelsea": "chelsea.png", "coffee": "coffee.png",
    "hubble_deep_field": "hubble_deep_field.jpg", "immunohistochemistry": "ihc.png",
    "motorcycle_left": "motorcycle_left.png", "motorcycle_right": "motorcycle_right.png",
    "retina": "retina.jpg", "rocket": "rocket.jpg",
    # grayscale photographs
    "camera": "camera.png", "moon": "moon.png", "coins": "coins.png", "brick": "brick.png",
    "grass": "grass.png", "gravel": "gravel.png", "cell": "cell.png", "page": "page.png",
}
JPEG_QUALITY = 90
_INSTALL_HINT = "install the demo extra: pip install seer[demo] (scikit-image, scikit-learn)"


def load_bundled_photos() -> dict[str, Image.Image]:
    """name -> RGB or L image of every bundled photo. Raises ImportError naming the extra."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise ImportError(f"the sample corpus needs {exc.name}: {_INSTALL_HINT}") from None
    data_dir = Path(skimage.data.data_dir)
    photos: dict[str, Image.Image] = {}
    for name, filename in SKIMAGE_PHOTOS.items():
        path = data_dir / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed scikit-image; "
                                    f"reinstall it ({_INSTALL_HINT})")
        with Image.open(path) as img:
            photos[name] = img.convert("L" if img.mode in ("L", "1") else "RGB")
    bundle = load_sample_images()
    for filename, pixels in zip(bundle.filenames, bundle.images):
        photos[Path(filename).stem] = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    return photos


def _save_jpeg(img: Image.Image, path: Path) -> None:
    with atomic_output(path) as tmp:
        img.save(tmp, format="JPEG", quality=JPEG_QUALITY)


def build_sample_corpus(out_dir: str | Path, *, crops_per_photo: int = 4, seed: int = 0) -> list[Path]:
    """Write the photos and their random crops as JPEGs into ``out_dir``; return sorted paths."""
    if crops_per_photo < 0:
        raise ValueError(f"crops_per_photo must be >= 0, got {crops_per_photo}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, img in sorted(load_bundled_photos().items()):
        # one stream per photo: its crops do not depend on the other photos or on the count
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        path = out_dir / f"{name}.jpg"
        _save_jpeg(img, path)
        written.append(path)
        width, height = img.size
        for k in range(crops_per_photo):
            crop_w = int(rng.integers((width + 1) // 2, width + 1))
            crop_h = int(rng.integers((height + 1) // 2, height + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            path = out_dir / f"{name}-crop{k}.jpg"
            _save_jpeg(img.crop((left, top, left + crop_w, top + crop_h)), path)
            written.append(path)
    return sorted(written)


def build_class_folders(out_dir: str | Path, *, classes: int = 10, per_class: int = 100, size: int = 32,
                        seed: int = 0) -> list[Path]:
    """``out_dir/<photo>/<k>.jpg``: ``per_class`` random crops (resized to ``size`` px) of each of
    the first ``classes`` color photos. Returns the class folders, sorted."""
    photos = sorted((n, img) for n, img in load_bundled_photos().items() if img.mode == "RGB")
    if not 1 <= classes <= len(photos):
        raise ValueError(f"classes must be between 1 and {len(photos)}, got {classes}")
    folders = []
    for name, img in photos[:classes]:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        width, height = img.size
        for k in range(per_class):
            side = int(rng.integers(min(width, height) // 4, min(width, height) // 2 + 1))
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            crop = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
            _save_jpeg(crop, folder / f"{k:05d}.jpg")
        folders.append(folder)
    return folders


def classes_of_keys(shard_dir: str | Path) -> dict[str, str]:
    """Sample key -> the name of the folder its source file was in, for every shard of a folder."""
    from data_pipeline.manifest import shard_paths
    from data_pipeline.shards import iter_shard

    return {s.key: Path(s.meta["source"]).parent.name for p in shard_paths(shard_dir) for s in iter_shard(p)}
