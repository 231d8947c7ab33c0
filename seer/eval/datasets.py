"""Labelled images for evaluation: image-folder trees, WebDataset shards with ``.cls``, IDX files.

``load_labelled(path, split)`` returns a :class:`LabelledImages` whatever the source:

- an image-folder tree: ``ROOT/<class>/<image>`` (classes are the sorted sub-folder names); a
  root holding ``train/`` and ``val/`` (or ``test/``) trees is split by those;
- WebDataset shards (a folder of ``*.tar``) whose samples carry a ``.cls`` member (an integer
  as text, as img2dataset and torchvision-style writers produce); ``train/`` and ``val|test/``
  sub-folders split them; samples without a class or an image are skipped and counted;
- Fashion-MNIST/MNIST IDX files (``train-images-idx3-ubyte[.gz]`` + labels, ``t10k-*`` for the
  test split), as Debian's dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist.

Images are decoded only when features are extracted (:meth:`LabelledImages.image`), always to RGB.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.decode import decode_image
from data_pipeline.shards import iter_shard, list_shards
from data_pipeline.storage import ShardReadError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}
IDX_PREFIX = {"train": "train", "test": "t10k"}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)


@dataclass
class LabelledImages:
    """N images with integer labels. ``pixels`` (N, H, W) uint8 for IDX data, else encoded bytes."""

    source: str
    labels: np.ndarray
    classes: list[str]
    pixels: np.ndarray | None = None
    encoded: list[bytes] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        if self.pixels is not None:
            return Image.fromarray(self.pixels[index]).convert("RGB")
        return decode_image(self.encoded[index])

    def subset(self, indices: np.ndarray) -> LabelledImages:
        indices = np.asarray(indices, dtype=np.int64)
        return LabelledImages(
            source=self.source,
            labels=self.labels[indices],
            classes=self.classes,
            pixels=self.pixels[indices] if self.pixels is not None else None,
            encoded=[self.encoded[i] for i in indices] if self.encoded else [],
            skipped=self.skipped,
        )

    def head(self, limit: int | None, seed: int = 0) -> LabelledImages:
        """A seeded random subset of ``limit`` images (all when ``limit`` is None or larger)."""
        if limit is None or limit >= len(self):
            return self
        order = np.random.default_rng(seed).permutation(len(self))[:limit]
        return self.subset(np.sort(order))

    def fingerprint(self) -> str:
        """A content hash (images and labels), naming the cached features of this set."""
        digest = hashlib.sha256(self.labels.astype(np.int64).tobytes())
        if self.pixels is not None:
            digest.update(np.ascontiguousarray(self.pixels).tobytes())
        for data in self.encoded:
            digest.update(hashlib.sha256(data).digest())
        return digest.hexdigest()[:20]


def _open_maybe_gz(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format): magic 0 0 dtype ndim, big-endian dims, data."""
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def load_idx(folder: Path, split: str) -> LabelledImages:
    prefix = IDX_PREFIX[split]
    images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        raise FileNotFoundError(f"{folder}: no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz]")
    pixels, label_array = read_idx(images), read_idx(labels).astype(np.int64)
    if len(pixels) != len(label_array):
        raise ValueError(f"{folder}: {len(pixels)} images but {len(label_array)} labels in the {split} split")
    classes = list(FASHION_MNIST_CLASSES) if "fashion" in str(folder).lower() else [str(c) for c in range(10)]
    return LabelledImages(source=f"{folder} ({split})", labels=label_array, classes=classes, pixels=pixels)


def load_image_folder(root: Path) -> LabelledImages:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: an image-folder tree needs one sub-folder per class")
    encoded, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                encoded.append(path.read_bytes())
                labels.append(label)
    if not encoded:
        raise ValueError(f"{root}: no images in the class folders {classes[:5]}")
    return LabelledImages(source=str(root), labels=np.array(labels, dtype=np.int64), classes=classes, encoded=encoded)


def load_labelled_shards(folder: Path) -> LabelledImages:
    encoded, labels, skipped = [], [], 0
    for shard in list_shards(folder):
        try:
            for sample in iter_shard(shard):
                cls = sample.extras.get("cls")
                try:
                    label = int(cls.decode().strip()) if cls is not None else -1
                except ValueError:
                    label = -1
                if sample.image is None or label < 0:
                    skipped += 1
                    continue
                encoded.append(sample.image)
                labels.append(label)
        except ShardReadError:
            skipped += 1
    if not encoded:
        raise ValueError(f"{folder}: no sample with an image and a .cls class in its shards")
    label_array = np.array(labels, dtype=np.int64)
    classes = [str(c) for c in range(int(label_array.max()) + 1)]
    return LabelledImages(source=str(folder), labels=label_array, classes=classes, encoded=encoded, skipped=skipped)


def _split_folder(root: Path, split: str) -> Path | None:
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def load_labelled(path: str | Path, split: str = "train") -> LabelledImages:
    """The ``split`` ("train" or "test") of the labelled data at ``path`` (see module doc)."""
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be train or test, got {split!r}")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no such labelled data: {root}")
    if not root.is_dir():
        raise ValueError(f"{root}: labelled data is a folder (image-folder tree, shards with .cls, or IDX files)")
    if _find_idx(root, f"{IDX_PREFIX['train']}-images-idx3-ubyte") or _find_idx(root, f"{IDX_PREFIX['test']}-images-idx3-ubyte"):
        return load_idx(root, split)
    split_root = _split_folder(root, split)
    if split_root is not None:
        return load_labelled(split_root, split)
    if list_shards(root):
        return load_labelled_shards(root)
    return load_image_folder(root)


