"""Does pretraining help? SwAV and MoCo v3 on Fashion-MNIST against random init and raw pixels.

    python benchmarks/quality.py [--methods swav mocov3] [--max-steps N] [--set k=v ...] [--work DIR]
                                 [--from-run swav=RUN_DIR ...] [--key NAME]

1. The 60,000 Fashion-MNIST training images (Debian's dataset-fashion-mnist,
   /usr/share/datasets/fashion-mnist) are written as PNGs *without labels* and packed by
   `seer ingest` into WORK/shards (once).
2. Each method pretrains with its preset (configs/fashion_mnist_<method>.yaml) in a child
   process, in a fresh WORK/run_<method> (a previous one is removed: resuming it would measure
   nothing); its CPU time (user + sys of the process and its data workers) is measured against
   the budget (30 minutes of the 2-core machine; CPU minutes are the measure because wall time
   on a machine shared with other work is inflated; wall minutes are reported beside them), and
   the training monitor's collapse alarms (metrics.jsonl events) are counted.
   ``--from-run METHOD=DIR ...`` probes those existing runs instead (no pretraining, no CPU time).
3. In the same run, the same protocol on the same images: features of 5,000 labelled training
   images and the 10,000 test images at 32 px, for each pretrained backbone, the same
   architecture at random init with seeds 0, 1 and 2 (their mean is the baseline), and raw
   pixels. Three probes: kNN (k = 20, cosine, T = 0.07), seer's linear probe (L-BFGS logistic
   regression on standardised features, weight decay chosen on a held-out 10 %), and an
   independent one (scikit-learn logistic regression on standardised features, C chosen by
   5-fold cross-validation; ``--skip-cv`` leaves it out). Prints a table and the gains
   (pretrained minus the mean of the random inits, in points, against the targets +5 linear in
   both linear probes and +8 kNN; and against raw pixels), and stores the result under
   ``runs[KEY]`` of benchmarks/results/quality.json (other keys are kept).
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

from data_pipeline.storage import atomic_write_bytes  # noqa: E402
from seer.eval.datasets import FASHION_MNIST_DIR, load_labelled  # noqa: E402
from seer.eval.features import compute_features, load_backbone, random_backbone, raw_pixel_features  # noqa: E402
from seer.eval.probes import effective_rank, knn_accuracy, linear_probe, logistic_regression_cv  # noqa: E402

BUDGET_CPU_MIN = 30.0
RANDOM_SEEDS = (0, 1, 2)
TARGETS = {"linear": 5.0, "linear_cv": 5.0, "knn_k20": 8.0}
PROBES = ("linear", "linear_cv", "knn_k20")


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


def collapse_alarms(run: Path) -> list[int]:
    """Steps at which the training monitor raised its collapse alarm."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r["step"] for r in rows if "collapse alarm" in str(r.get("event", ""))]


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
                   run=str(run), overrides=extra, collapse_alarms=collapse_alarms(run))
    return summary


def probe(name: str, train_x, train_y, test_x, test_y, cv: bool) -> dict:
    started = time.monotonic()
    row = {
        "features": name,
        "knn_k20": knn_accuracy(train_x, train_y, test_x, test_y, ks=(20,))["k20"],
        "linear": linear_probe(train_x, train_y, test_x, test_y)["accuracy"],
        "effective_rank": effective_rank(train_x),
        "dims": int(train_x.shape[1]),
    }
    if cv:
        search = logistic_regression_cv(train_x, train_y, test_x, test_y)
        row.update(linear_cv=search["accuracy"], linear_cv_C=search["C"])
    print(f"  {name}: kNN {row['knn_k20']:.1f}, linear {row['linear']:.1f}"
          + (f", linear (CV) {row['linear_cv']:.1f} (C {row['linear_cv_C']:g})" if cv else "")
          + f", effective rank {row['effective_rank']:.1f} ({time.monotonic() - started:.0f} s)", flush=True)
    return row


def probe_all(runs: dict, train, test, size: int, cv: bool) -> list[dict]:
    """Rows for each pretrained backbone, each architecture at random init (3 seeds, then their
    mean as a row of its own), and raw pixels."""
    rows, architectures = [], {}
    for method, summary in runs.items():
        backbone = load_backbone(summary["run"])
        architectures.setdefault(backbone.architecture, backbone)
        features = [compute_features(backbone.model, d, size, backbone.mean, backbone.std) for d in (train, test)]
        rows.append({"method": method, "architecture": backbone.architecture,
                     **probe(f"{method} pretrained ({backbone.architecture})", features[0], train.labels, features[1],
                             test.labels, cv)})
    for architecture, backbone in architectures.items():
        seeds = []
        for seed in RANDOM_SEEDS:
            baseline = random_backbone(architecture, backbone, seed=seed)
            features = [compute_features(baseline.model, d, size, baseline.mean, baseline.std) for d in (train, test)]
            seeds.append({"method": f"random init seed {seed}", "architecture": architecture,
                          **probe(f"random init seed {seed} ({architecture})", features[0], train.labels, features[1],
                                  test.labels, cv)})
        mean = {k: sum(s[k] for s in seeds) / len(seeds) for k in (*PROBES, "effective_rank") if k in seeds[0]}
        rows += seeds + [{"method": "random init", "architecture": architecture, "dims": seeds[0]["dims"],
                          "features": f"random init, mean of seeds {RANDOM_SEEDS} ({architecture})", **mean}]
    pixels = [raw_pixel_features(d, 28) for d in (train, test)]
    rows.append({"method": "raw pixels", **probe("raw pixels (28 x 28)", pixels[0], train.labels, pixels[1], test.labels,
                                                 cv)})
    return rows


def report(rows: list[dict], runs: dict) -> dict:
    """Print the table and the gains; return the gains per method."""
    def cell(row, key):
        return f"{row[key]:.1f}%" if key in row else "-"

    print("\n| features | linear probe | linear (logreg, C by CV) | kNN (k=20) | effective rank | CPU min (pretraining) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        cpu = runs.get(row["method"], {}).get("cpu_minutes")
        print(f"| {row['features']} | {cell(row, 'linear')} | {cell(row, 'linear_cv')} | {cell(row, 'knn_k20')} | "
              f"{row['effective_rank']:.1f} of {row['dims']} | {f'{cpu:.1f}' if cpu is not None else '-'} |")
    pixels = next(r for r in rows if r["method"] == "raw pixels")
    gains = {}
    for method, summary in runs.items():
        row = next(r for r in rows if r["method"] == method)
        base = next(r for r in rows if r["method"] == "random init" and r["architecture"] == row["architecture"])
        gain = {k: row[k] - base[k] for k in PROBES if k in row}
        gain.update({f"{k}_vs_raw_pixels": row[k] - pixels[k] for k in ("linear", "linear_cv", "knn_k20") if k in row})
        cpu = summary.get("cpu_minutes")
        gain["targets_met"] = all(gain[k] >= TARGETS[k] for k in TARGETS if k in gain)
        gain["within_budget"] = cpu is not None and cpu <= BUDGET_CPU_MIN
        gain["collapse_alarms"] = summary.get("collapse_alarms", [])
        gains[method] = gain
        print(f"{method} - mean random init: " + ", ".join(f"{k} {gain[k]:+.1f} (target +{TARGETS[k]:g})" for k in TARGETS
                                                            if k in gain)
              + f"; vs raw pixels: linear {gain['linear_vs_raw_pixels']:+.1f}, kNN {gain['knn_k20_vs_raw_pixels']:+.1f}"
              + (f"; {cpu:.1f} CPU min, {summary['wall_minutes']:.1f} min wall (budget {BUDGET_CPU_MIN:.0f} CPU min)"
                 if cpu is not None else "") + f"; collapse alarms: {gain['collapse_alarms'] or 'none'}")
    return gains


def store(out: Path, key: str, result: dict) -> None:
    """``runs[key] = result`` in the JSON at ``out``, other runs kept."""
    data = json.loads(out.read_text()) if out.is_file() else {}
    data.setdefault("runs", {})[key] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(data, indent=2) + "\n").encode())
    print(f"wrote runs[{key!r}] of {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["swav", "mocov3"], choices=["swav", "mocov3"])
    parser.add_argument("--work", default=str(REPO / "fashion_mnist"), help="shards and runs go here")
    parser.add_argument("--max-steps", type=int, default=None, help="override the presets' train.max_steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for both presets")
    parser.add_argument("--from-run", nargs="*", default=[], metavar="method=RUN_DIR", help="probe these runs instead")
    parser.add_argument("--train-images", type=int, default=5000, help="labelled training images for the probes")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--skip-cv", action="store_true", help="leave out the cross-validated logistic regression")
    parser.add_argument("--prepare-only", action="store_true", help="make the shards and stop")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality.json"))
    parser.add_argument("--key", default="presets_final", help="the entry of runs{} in --out this result replaces")
    args = parser.parse_args(argv)
    work = Path(args.work)
    shards = prepare_shards(work)
    if args.prepare_only:
        return 0
    existing = dict(item.split("=", 1) for item in args.from_run)
    if existing:  # probe these runs only
        runs = {m: {"run": d, "collapse_alarms": collapse_alarms(Path(d))} for m, d in existing.items()}
    else:
        runs = {m: pretrain(m, shards, work, args.max_steps, args.set) for m in args.methods}
    for method, summary in runs.items():
        if "cpu_minutes" in summary:
            print(f"{method}: {summary['step']} steps, {summary['cpu_minutes']:.1f} CPU min ({summary['wall_minutes']:.1f} "
                  f"min wall), loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}", flush=True)
    train = load_labelled(FASHION_MNIST_DIR, "train").head(args.train_images, seed=1)
    test = load_labelled(FASHION_MNIST_DIR, "test")
    rows = probe_all(runs, train, test, args.size, not args.skip_cv)
    gains = report(rows, runs)
    store(Path(args.out), args.key, {"rows": rows, "gains": gains, "pretraining": runs, "cpu_count": os.cpu_count(),
                                     "probe": {"train_images": len(train), "test_images": len(test), "size": args.size,
                                               "knn": "k=20 cosine T=0.07",
                                               "linear": "L-BFGS logistic regression, weight decay chosen on a held-out 10 %",
                                               "linear_cv": "sklearn LogisticRegression, standardised, C by 5-fold CV",
                                               "baseline": f"mean of random init seeds {RANDOM_SEEDS}"}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
