"""Multi-crop on the CPU, one thread: SwAV's reference chain against seer's two stages.

Run: ``python benchmarks/multicrop.py [--images 76] [--rounds 5] [--batch 16]``. Prints a
table and writes ``benchmarks/results/multicrop.json``.

All methods run in this process on the same JPEGs (photos bundled with scikit-image and
scikit-learn, cropped and resized to about 1100x830, quality 90), with one torch thread, in
interleaved rounds: a round runs every method on each batch of ``--batch`` images in turn (the
order rotating batch by batch), so background load hits all methods alike; the table gives the
median over rounds of each method's time for all images.

- ``reference``: what SwAV's ``MultiCropDataset`` does: ``Image.open().convert("RGB")``, then
  per crop torchvision's ``RandomResizedCrop``, ``RandomHorizontalFlip``, ``ColorJitter(0.8,
  0.8, 0.8, 0.2)`` with p 0.8, ``RandomGrayscale(0.2)``, PIL ``GaussianBlur`` with p 0.5 and
  radius 0.1-2, ``ToTensor``, ``Normalize``; 2x224 (scale 0.14-1) + 6x96 (0.05-0.14).
- ``seer worker stage``: ``MultiCrop.from_bytes`` (decode at the smallest useful DCT scale,
  crop boxes as RandomResizedCrop, resize, flip; uint8).
- ``seer full chain``: the worker stage plus ``color_augment`` on CPU batches of ``--batch``
  images per view (jitter, grayscale, blur, normalise; per-sample random parameters).
- ``decode only``: ``Image.open().convert("RGB")`` at full size, in megapixels/s.

Also checks, over a few thousand crops, that seer's crop area/aspect distribution equals
RandomResizedCrop's and that its colour statistics match torchvision's ColorJitter.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_pipeline import crops as crops_module  # noqa: E402
from data_pipeline.augment import ColorAugmentSpec, color_augment  # noqa: E402
from data_pipeline.crops import CropSpec, MultiCrop  # noqa: E402
from data_pipeline.sample_corpus import load_bundled_photos  # noqa: E402
from data_pipeline.shards import atomic_write_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "multicrop.json"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SWAV_CROPS = [CropSpec(224, 2, (0.14, 1.0)), CropSpec(96, 6, (0.05, 0.14))]


def make_images(count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs (q90) of about 1100x830 (or 830x1100) cut from the bundled photos."""
    photos = [img.convert("RGB") for _, img in sorted(load_bundled_photos().items())]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (1100, 830) if cw >= ch else (830, 1100)
        crop = img.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class PILRandomGaussianBlur:
    """SwAV's blur: PIL GaussianBlur with a radius uniform in [0.1, 2], with probability 0.5."""

    def __call__(self, img):
        if random.random() > 0.5:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def reference_transforms() -> list:
    def chain(size, scale):
        return T.Compose([
            T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip(p=0.5),
            T.Compose([T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2)]),
            PILRandomGaussianBlur(), T.ToTensor(), T.Normalize(mean=MEAN, std=STD)])
    return [chain(s.size, s.scale) for s in SWAV_CROPS for _ in range(s.count)]


def run_reference(images: list[bytes], transforms: list) -> None:
    for data in images:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        [t(img) for t in transforms]


def run_worker(images: list[bytes], multicrop: MultiCrop, seed: int) -> list[list[torch.Tensor]]:
    return [multicrop.from_bytes(data, torch.Generator().manual_seed(seed + i)) for i, data in enumerate(images)]


def run_full(images: list[bytes], multicrop: MultiCrop, spec: ColorAugmentSpec, batch: int, seed: int) -> None:
    for start in range(0, len(images), batch):
        views = run_worker(images[start:start + batch], multicrop, seed + start)
        for i in range(len(views[0])):
            color_augment(torch.stack([v[i] for v in views]), spec, torch.Generator().manual_seed(seed + start + i))


def pillow_only(run):
    """``run`` with simplejpeg switched off: JPEGs go through Pillow's draft decode."""
    def wrapped(*args):
        saved, crops_module.simplejpeg = crops_module.simplejpeg, None
        try:
            return run(*args)
        finally:
            crops_module.simplejpeg = saved
    return wrapped


def run_decode(images: list[bytes]) -> None:
    for data in images:
        Image.open(io.BytesIO(data)).convert("RGB")


# -- distribution checks ---------------------------------------------------------------------

def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (largest gap between the empirical CDFs)."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def crop_distribution_check(n: int = 4000, size: tuple[int, int] = (1100, 830)) -> dict:
    """KS distance of area fraction and log aspect: seer's boxes vs RandomResizedCrop's."""
    multicrop = MultiCrop([CropSpec(224, 1, (0.14, 1.0))])
    gen = torch.Generator().manual_seed(1)
    ours = [multicrop.sample_boxes(size[0], size[1], gen)[0] for _ in range(n)]
    torch.manual_seed(2)
    img = Image.new("RGB", size)
    theirs = [T.RandomResizedCrop.get_params(img, [0.14, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    area = size[0] * size[1]
    ours_area = np.array([b.height * b.width / area for b in ours])
    theirs_area = np.array([h * w / area for _, _, h, w in theirs])
    ours_aspect = np.log([b.width / b.height for b in ours])
    theirs_aspect = np.log([w / h for _, _, h, w in theirs])
    return {"crops": n, "ks_area": ks_distance(ours_area, theirs_area),
            "ks_log_aspect": ks_distance(ours_aspect, theirs_aspect)}


def color_statistics(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image mean brightness, contrast (std of luma) and saturation (max - min channel)."""
    luma = 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return {"brightness": luma.mean((1, 2)).numpy(), "contrast": luma.std(dim=(1, 2)).numpy(),
            "saturation": (x.amax(1) - x.amin(1)).mean((1, 2)).numpy()}


def color_distribution_check(crops: torch.Tensor) -> dict:
    """KS distances of colour statistics: seer's color_augment vs torchvision's ColorJitter +
    RandomGrayscale on the same uint8 crops (blur off: it does not move these statistics)."""
    spec = ColorAugmentSpec(blur_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ours = color_augment(crops, spec, torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    reference = T.Compose([T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2)])
    theirs = torch.stack([reference(c.float() / 255) for c in crops])
    a, b = color_statistics(ours), color_statistics(theirs)
    return {"crops": len(crops), **{f"ks_{k}": ks_distance(a[k], b[k]) for k in a}}


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import simplejpeg
        simple = simplejpeg.__version__
    except ImportError:
        simple = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "pillow_simd": "post" in PIL.__version__, "simplejpeg": simple,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=76)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = make_images(args.images)
    megapixels = sum(np.prod(Image.open(io.BytesIO(d)).size) for d in images) / 1e6
    multicrop = MultiCrop(SWAV_CROPS)
    spec = ColorAugmentSpec()
    transforms = reference_transforms()
    random.seed(0)
    torch.manual_seed(0)
    methods = {
        "reference": lambda chunk, seed: run_reference(chunk, transforms),
        "seer full chain": lambda chunk, seed: run_full(chunk, multicrop, spec, args.batch, seed),
        "seer worker stage": lambda chunk, seed: run_worker(chunk, multicrop, seed),
        "decode only": lambda chunk, seed: run_decode(chunk),
    }
    if crops_module.simplejpeg is not None:  # the plain-Pillow path too (simplejpeg is optional)
        methods["seer full chain, Pillow decode"] = pillow_only(methods["seer full chain"])
        methods["seer worker stage, Pillow decode"] = pillow_only(methods["seer worker stage"])
    names = list(methods)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    turn = 0
    for r in range(args.rounds):
        spent = dict.fromkeys(names, 0.0)
        for start in range(0, len(images), args.batch):  # interleaved batch by batch
            chunk = images[start:start + args.batch]
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                begin = time.perf_counter()
                methods[name](chunk, 1000 * r + start)
                spent[name] += time.perf_counter() - begin
            turn += 1
        for name in names:
            seconds[name].append(spent[name])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {len(images) / spent[n]:.1f}/s" for n in names),
              flush=True)
    rate = {name: len(images) / statistics.median(seconds[name]) for name in names}
    rows = []
    for name in names:
        per_round = sorted(ref / own for ref, own in zip(seconds["reference"], seconds[name]))
        row = {"method": name, "images_per_s": rate[name], "ms_per_image": 1000 / rate[name],
               "vs_reference": rate[name] / rate["reference"],
               "vs_reference_per_round": [per_round[0], statistics.median(per_round), per_round[-1]]}
        if name == "decode only":
            row["megapixels_per_s"] = megapixels / statistics.median(seconds[name])
        rows.append(row)
    checks = {"crop_boxes": crop_distribution_check()}
    crops = torch.stack([v for views in run_worker(images[:40], MultiCrop([CropSpec(32, 50, (0.05, 0.5))]), 7)
                         for v in views])
    checks["colour"] = color_distribution_check(crops)
    targets = {name: 3.0 if "full" in name else 5.0 for name in names if name.startswith("seer")}
    print(f"\n{len(images)} JPEGs, {megapixels / len(images):.2f} MP each, 1 thread, median of {args.rounds} rounds")
    print(f"{'method':<34}{'images/s':>10}{'ms/image':>10}{'x reference':>13}{'per round':>18}  target")
    for row in rows:
        target = targets.get(row["method"])
        verdict = "" if target is None else f">= {target:.0f}x: {'met' if row['vs_reference'] >= target else 'NOT met'}"
        extra = f"  ({row['megapixels_per_s']:.0f} MP/s)" if "megapixels_per_s" in row else ""
        low, _, high = row["vs_reference_per_round"]
        print(f"{row['method']:<34}{row['images_per_s']:>10.1f}{row['ms_per_image']:>10.2f}{row['vs_reference']:>13.2f}"
              f"{f'{low:.2f}-{high:.2f}':>18}  {verdict}{extra}")
    print("distribution checks (KS distance, smaller is closer):", json.dumps(checks))
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
           "images": len(images), "megapixels_per_image": megapixels / len(images), "rounds": args.rounds,
           "batch": args.batch, "threads": 1, "rows": rows, "seconds": seconds, "checks": checks,
           "targets": {k: {"ratio": v, "met": rate[k] / rate["reference"] >= v} for k, v in targets.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(doc, indent=1) + "\n").encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
