"""Does pretraining help? SwAV and MoCo v3 on Fashion-MNIST against random init and raw pixels.

    python benchmarks/quality.py [--methods swav mocov3] [--max-steps N] [--work DIR]

1. The 60,000 Fashion-MNIST training images (Debian's dataset-fashion-mnist,
   /usr/share/datasets/fashion-mnist) are written as PNGs *without labels* and packed by
   `seer ingest` into WORK/shards (once).
2. Each method pretrains with its preset (configs/fashion_mnist_<method>.yaml) in a child
   process, in a fresh WORK/run_<method> (a previous one is removed: resuming it would measure
   nothing); its CPU time (user + sys of the process and its data workers) and its wall time on
   the 2-core machine are each measured against the budget (15 minutes per method).
3. In the same run, the same protocol on the same images: features of 5,000 labelled training
   images and the 10,000 test images at 32 px, kNN (k = 20, cosine, T = 0.07) and the linear
   probe, for each pretrained backbone, the same architecture at random init (seed 0), and raw
   pixels. Prints a table, writes benchmarks/results/quality.json, and reports the gains
   (pretrained minus random init) in points.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipeline.shards import atomic_write_bytes  # noqa: E402
from seer.eval.datasets import FASHION_MNIST_DIR, load_labelled  # noqa: E402
from seer.eval.features import compute_features, load_backbone, random_backbone, raw_pixel_features  # noqa: E402
from seer.eval.probes import effective_rank, knn_accuracy, linear_probe  # noqa: E402

BUDGET_CPU_MIN = 15.0


def prepare_shards(work: Path) -> Path:
    shards = work / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    from PIL import Image

    from data_pipeline.ingest import ingest

    images = load_labelled(FASHION_MNIST_DIR, "train").pixels  # labels are not written anywhere
    folder = work / "png"
    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    report = ingest([folder], shards, shard_max_count=5000)
    print(f"ingested {report.accepted} unlabelled training images into {shards}", flush=True)
    return shards


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pretrain(method: str, shards: Path, work: Path, max_steps: int | None, extra: list[str]) -> dict:
    run = work / f"run_{method}"
    if run.exists():  # a finished run would resume at its last step and measure nothing: start afresh
        print(f"removing the previous pretraining run {run}", flush=True)
        shutil.rmtree(run)
    overrides = [f"data.shards={shards}", f"run.dir={run}", *extra]
    if max_steps:
        overrides.append(f"train.max_steps={max_steps}")
    before, started = children_cpu_seconds(), time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "seer", "pretrain", str(REPO / "configs" / f"fashion_mnist_{method}.yaml"),
                           *overrides, "--json"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} pretraining failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary.update(cpu_minutes=(children_cpu_seconds() - before) / 60.0, wall_minutes=(time.monotonic() - started) / 60.0,
                   run=str(run))
    return summary


def probe(name: str, train_x, train_y, test_x, test_y) -> dict:
    started = time.monotonic()
    row = {
        "features": name,
        "knn_k20": knn_accuracy(train_x, train_y, test_x, test_y, ks=(20,))["k20"],
        "linear": linear_probe(train_x, train_y, test_x, test_y)["accuracy"],
        "effective_rank": effective_rank(train_x),
        "dims": int(train_x.shape[1]),
    }
    print(f"  {name}: kNN {row['knn_k20']:.1f}, linear {row['linear']:.1f}, effective rank {row['effective_rank']:.1f} "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["swav", "mocov3"], choices=["swav", "mocov3"])
    parser.add_argument("--work", default=str(REPO / "fashion_mnist"), help="shards and runs go here")
    parser.add_argument("--max-steps", type=int, default=None, help="override the presets' train.max_steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for both presets")
    parser.add_argument("--train-images", type=int, default=5000, help="labelled training images for the probes")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--prepare-only", action="store_true", help="make the shards and stop")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality.json"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    shards = prepare_shards(work)
    if args.prepare_only:
        return 0
    runs = {m: pretrain(m, shards, work, args.max_steps, args.set) for m in args.methods}
    for method, summary in runs.items():
        print(f"{method}: {summary['step']} steps, {summary['cpu_minutes']:.1f} CPU min "
              f"({summary['wall_minutes']:.1f} min wall), loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}",
              flush=True)

    train = load_labelled(FASHION_MNIST_DIR, "train").head(args.train_images, seed=1)
    test = load_labelled(FASHION_MNIST_DIR, "test")
    rows = []
    architectures = {}
    for method, summary in runs.items():
        backbone = load_backbone(summary["run"])
        architectures[method] = backbone
        features = [compute_features(backbone.model, d, args.size, backbone.mean, backbone.std) for d in (train, test)]
        rows.append({"method": method, **probe(f"{method} pretrained ({backbone.architecture})", features[0],
                                                train.labels, features[1], test.labels)})
    seen = set()
    for method, backbone in architectures.items():
        if backbone.architecture in seen:
            continue
        seen.add(backbone.architecture)
        baseline = random_backbone(backbone.architecture, backbone, seed=0)
        features = [compute_features(baseline.model, d, args.size, baseline.mean, baseline.std) for d in (train, test)]
        rows.append({"method": "random init", **probe(f"random init ({backbone.architecture})", features[0],
                                                      train.labels, features[1], test.labels)})
    pixels = [raw_pixel_features(d, 28) for d in (train, test)]
    rows.append({"method": "raw pixels", **probe("raw pixels (28 x 28)", pixels[0], train.labels, pixels[1], test.labels)})

    random_row = next(r for r in rows if r["method"] == "random init")
    print("\n| features | linear probe | kNN (k=20) | effective rank | CPU min (pretraining) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        cpu = runs[row["method"]]["cpu_minutes"] if row["method"] in runs else None
        print(f"| {row['features']} | {row['linear']:.1f}% | {row['knn_k20']:.1f}% | {row['effective_rank']:.1f} of "
              f"{row['dims']} | {f'{cpu:.1f}' if cpu is not None else '-'} |")
    gains = {m: {"linear": next(r for r in rows if r["method"] == m)["linear"] - random_row["linear"],
                 "knn_k20": next(r for r in rows if r["method"] == m)["knn_k20"] - random_row["knn_k20"]} for m in runs}
    for method, gain in gains.items():
        cpu, wall = runs[method]["cpu_minutes"], runs[method]["wall_minutes"]
        gain["within_budget"] = cpu <= BUDGET_CPU_MIN and wall <= BUDGET_CPU_MIN
        print(f"{method} - random init: linear {gain['linear']:+.1f} points, kNN {gain['knn_k20']:+.1f} points "
              f"(target +5); {cpu:.1f} CPU min and {wall:.1f} min wall (budget {BUDGET_CPU_MIN:.0f} each)")
    result = {"rows": rows, "gains": gains, "pretraining": runs, "probe": {
        "train_images": len(train), "test_images": len(test), "size": args.size, "knn": "k=20 cosine T=0.07",
        "linear": "L-BFGS logistic regression, weight decay chosen on a held-out 10 %"}, "cpu_count": os.cpu_count()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
