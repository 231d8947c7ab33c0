"""Multi-crop on the CPU, one thread: SwAV's reference chain against seer's two stages, on plain
Pillow and on Pillow-SIMD, with simplejpeg and with PIL's draft decode.

Run: ``make simd-venv`` once (builds Pillow-SIMD into ``.venv-simd``, ~2 min), then
``.venv/bin/python benchmarks/multicrop.py [--images 76] [--rounds 5] [--batch 16]``
(``--no-simd`` for plain Pillow alone, ``--simd-python PATH`` for another Pillow-SIMD
interpreter). Prints one table, writes ``benchmarks/results/multicrop.json`` and refreshes its
section of docs/benchmarks.md (``--no-doc`` to skip).

Each environment is a worker process (this script with ``--worker``): plain Pillow is this
interpreter, Pillow-SIMD the other venv's. The driver (``multicrop_envs.py``) writes the JPEGs once
(photos bundled with scikit-image and scikit-learn, cropped and resized to about 1100x830, quality
90), and the workers read the same files. One torch thread everywhere; interleaved rounds: a round
runs every method of every environment on each batch of ``--batch`` images in turn (the order
rotating batch by batch; the idle workers wait on a pipe), so background load hits all methods
alike; the table gives the median over rounds of each method's time for all images, and every
ratio is to the reference chain on plain Pillow measured in the same run.

Methods in each environment:

- ``reference``: what SwAV's ``MultiCropDataset`` does: ``Image.open().convert("RGB")``, then
  per crop torchvision's ``RandomResizedCrop``, ``RandomHorizontalFlip``, ``ColorJitter(0.8,
  0.8, 0.8, 0.2)`` with p 0.8, ``RandomGrayscale(0.2)``, PIL ``GaussianBlur`` with p 0.5 and
  radius 0.1-2, ``ToTensor``, ``Normalize``; 2x224 (scale 0.14-1) + 6x96 (0.05-0.14).
- ``seer worker stage``: ``MultiCrop.from_bytes`` (decode at the smallest useful DCT scale,
  crop boxes as RandomResizedCrop, resize, flip; uint8), with the decoder and resizer that
  ``data_pipeline.crops.decoder_info()`` reports for the environment (simplejpeg; Pillow-SIMD's
  resize where it is the PIL, torch's elsewhere).
- ``seer full chain``: the worker stage plus ``color_augment`` on CPU batches of ``--batch``
  images per view (jitter, grayscale, blur, normalise; per-sample random parameters), with the
  CPU color path ``data_pipeline.color_cpu.BACKEND`` names: numba's fused kernels where numba is
  installed (compiled, or loaded from numba's cache, before the first timed round), else numpy.
- ``, PIL draft decode``: the same two with simplejpeg switched off (what runs where it is not
  installed: the environment's PIL decodes at DCT scale in draft mode).
- ``decode only``: ``Image.open().convert("RGB")`` at full size, in megapixels/s.

Also checks in each environment, over a few thousand crops, that seer's crop area/aspect
distribution equals RandomResizedCrop's and that its color statistics match torchvision's ColorJitter.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
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
from data_pipeline import color_cpu  # noqa: E402
from data_pipeline import crops as crops_module  # noqa: E402
from data_pipeline.augment import ColorAugmentSpec, color_augment  # noqa: E402
from data_pipeline.crops import CropSpec, MultiCrop  # noqa: E402
from data_pipeline.sample_corpus import load_bundled_photos  # noqa: E402

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
    """KS distances of color statistics: seer's color_augment vs torchvision's ColorJitter +
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
    try:
        import numba
        numba_version = numba.__version__
    except ImportError:
        numba_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "pillow_simd": crops_module.pil_build()["name"] == "pillow-simd", "simplejpeg": simple,
            "numba": numba_version, "color_backend": color_cpu.BACKEND,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


METHODS = ("reference", "seer full chain", "seer worker stage", "seer full chain, PIL draft decode",
           "seer worker stage, PIL draft decode", "decode only")


def worker_methods(images: list[bytes], batch: int) -> dict:
    """This environment's measured methods: ``name -> fn(start, count, seed)`` over ``images``."""
    multicrop, spec, transforms = MultiCrop(SWAV_CROPS), ColorAugmentSpec(), reference_transforms()
    full = lambda chunk, seed: run_full(chunk, multicrop, spec, batch, seed)  # noqa: E731
    worker = lambda chunk, seed: run_worker(chunk, multicrop, seed)  # noqa: E731
    methods = {"reference": lambda chunk, seed: run_reference(chunk, transforms),
               "seer full chain": full, "seer worker stage": worker,
               "seer full chain, PIL draft decode": pillow_only(full),
               "seer worker stage, PIL draft decode": pillow_only(worker),
               "decode only": lambda chunk, seed: run_decode(chunk)}
    return {name: (lambda start, count, seed, fn=fn: fn(images[start:start + count], seed)) for name, fn in methods.items()}


def distribution_checks(images: list[bytes]) -> dict:
    """Crop boxes vs RandomResizedCrop, color statistics vs ColorJitter, on this environment's crops."""
    crops = torch.stack([v for views in run_worker(images[:40], MultiCrop([CropSpec(32, 50, (0.05, 0.5))]), 7)
                         for v in views])
    return {"crop_boxes": crop_distribution_check(), "color": color_distribution_check(crops)}


def worker_main(image_dir: Path, batch: int) -> int:
    """``--worker``: read JSON commands on stdin, answer one JSON line each on stdout.

    ``{"run": METHOD, "start": i, "count": n, "seed": s}`` -> ``{"seconds": t}`` (only the call
    is timed); ``{"checks": true}`` -> the distribution checks; end of input ends the worker.
    The first line out describes the environment (PIL build, decoder, resizer, machine).
    """
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    images = [path.read_bytes() for path in sorted(image_dir.glob("*.jpg"))]
    methods = worker_methods(images, batch)
    # the CPU color path's numba kernels: compiled (or loaded from numba's cache) here, not in round 1
    color_augment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ColorAugmentSpec(), torch.Generator().manual_seed(0))
    reply = lambda obj: print(json.dumps(obj), flush=True)  # noqa: E731
    reply({"ready": True, "images": len(images), "decoder_info": crops_module.decoder_info(), "machine": machine()})
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("checks"):
            reply(distribution_checks(images))
            continue
        run = methods[command["run"]]
        begin = time.perf_counter()
        run(command["start"], command["count"], command["seed"])
        reply({"seconds": time.perf_counter() - begin})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=76)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--simd-python", type=Path, default=Path(__file__).resolve().parent.parent / ".venv-simd/bin/python",
                        help="interpreter of a venv with Pillow-SIMD (make simd-venv)")
    parser.add_argument("--no-simd", action="store_true", help="measure plain Pillow only")
    parser.add_argument("--no-doc", action="store_true", help="do not refresh docs/benchmarks.md")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # folder of JPEGs
    args = parser.parse_args()
    if args.worker is not None:
        return worker_main(args.worker, args.batch)
    if args.images < 1 or args.rounds < 1 or args.batch < 1:
        parser.error("--images, --rounds and --batch must be >= 1")
    from multicrop_envs import run_benchmark

    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
