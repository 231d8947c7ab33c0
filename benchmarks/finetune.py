"""Fine-tuning from a seer export against random init, on 1 % and 10 % of Fashion-MNIST's labels.

    python benchmarks/finetune.py [--run RUN_DIR | --export FILE] [--work DIR] [--steps N N] [--lrs A B C]

1. The backbone: ``--export FILE`` (``seer export --format timm --num-classes 10``), else the
   export (seer.export.export_backbone, timm layout) of ``--run`` (a run folder or checkpoint),
   else of WORK/run_swav, pretrained first with configs/fashion_mnist_swav.yaml by quality.py's
   code (ingest without labels, ~12 CPU minutes) when it holds no checkpoint. The model is
   ``timm.create_model(<the sidecar's timm_name>, num_classes=10)``: "seer" loads the export
   with ``strict=True`` (every key, its seeded classifier included), "random" keeps timm's
   initialisation (seed 0; He-normal convs, zero-initialised last BN of each block).
2. Labels: a seeded (``--seed``) class-balanced subset of the 60,000 training images, the same
   fraction of every class: 1 % = 600 images (60 a class), 10 % = 6,000 (600 a class).
3. Training, identical for both inits and every LR at a fraction: ``--steps`` SGD steps (one
   count per fraction) of batch 64 (momentum 0.9, Nesterov, weight decay 5e-4 on conv/linear
   weights only), LR linear warm-up over the first 5 % of the steps then cosine to 0, cross
   entropy, BatchNorm in train mode, one torch thread. Batches are drawn epoch by epoch from a
   generator seeded with ``--seed``, so the seer and random runs see the same images and crops.
   Augmentation as the pretraining crops fed the backbone (configs/fashion_mnist_swav.yaml):
   a random-resized crop (RandomResizedCrop's box, scale 0.4-1, ratio 3/4-4/3) of the 28 px
   image resized to 32 px (bilinear), horizontal flip p 0.5, grayscale replicated to 3 channels,
   ImageNet mean/std (the sidecar's). No colour jitter (the pretraining's is a pretext task).
4. Evaluation: top-1 on all 10,000 test images, resized to 32 px (as quality.py's probes), BN in
   eval mode. Each init gets the same sweep of three LRs (``--lrs``); a row of the JSON is the
   best of the three on the test set, as the issue asks (every LR's number is in ``runs``).
5. The same labels without fine-tuning (``frozen``): seer eval's linear probe of the export's frozen
   pooled features and of raw pixels (28 px), so the fine-tunes can be read against both.

Defaults, sized on the 2-core box (~0.22 CPU s a step, ~7 s an evaluation; ~35 CPU minutes in
all): 500 steps at 1 % (53 epochs), 1,000 at 10 % (11 epochs); LRs 0.003 / 0.0125 / 0.4: the
two inits' optima (0.0125 and 0.4, pilots: finetune_investigation.md) and one below seer's. Prints the table, writes
benchmarks/results/finetune.json (``rows``: labels_fraction, init, top1; ``runs``: every
fine-tune; ``frozen``; the export check; CPU and wall time) and refreshes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from report import REPO, refresh_doc_section, write_results  # benchmarks/ is sys.path[0]; puts REPO on it

from data_pipeline.crops import sample_crop_box  # noqa: E402
from seer.eval.datasets import FASHION_MNIST_DIR, LabelledImages, load_labelled  # noqa: E402
from seer.eval.features import compute_features, image_batch, normalise, raw_pixel_features  # noqa: E402
from seer.eval.probes import linear_probe  # noqa: E402
from finetune_report import HEADING, RAW_PIXEL_SIZE, TARGET_POINTS, best_rows, doc_section, gains, table  # noqa: E402

INITS = ("seer", "random")
CROP_SCALE, CROP_RATIO = (0.4, 1.0), (3.0 / 4.0, 4.0 / 3.0)
WEIGHT_DECAY, MOMENTUM, WARMUP = 5e-4, 0.9, 0.05


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of ``fraction`` of every class (at least one image a class), seeded, sorted."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = max(1, int(round(fraction * len(members))))
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen))


def source_pixels(data: LabelledImages, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) of every image: IDX images at their own size, others resized to ``size``."""
    if data.pixels is not None and data.pixels.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(data.pixels))[:, None].expand(-1, 3, -1, -1).contiguous()
    return image_batch(data, np.arange(len(data)), size)


def augment(pixels: torch.Tensor, size: int, mean, std, gen: torch.Generator) -> torch.Tensor:
    """Normalised float (B, 3, size, size): a random-resized crop of each image, flipped with p 0.5."""
    height, width = pixels.shape[-2:]
    out = torch.empty(len(pixels), 3, size, size)
    for i, image in enumerate(pixels):
        top, left, h, w = sample_crop_box(width, height, CROP_SCALE, CROP_RATIO, gen)
        crop = image[None, :, top:top + h, left:left + w].float()
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(-1)
        out[i] = crop
    return normalise(out.clamp_(0, 255), mean, std)


def build_model(timm_name: str, init: str, export: Path, num_classes: int, seed: int = 0) -> torch.nn.Module:
    """timm's model; "seer" loads every tensor of the export (strict), "random" keeps timm's init."""
    import timm
    from safetensors.torch import load_file

    torch.manual_seed(seed)
    model = timm.create_model(timm_name, num_classes=num_classes)
    if init == "seer":
        model.load_state_dict(load_file(str(export)), strict=True)
    elif init != "random":
        raise ValueError(f"init must be 'seer' or 'random', got {init!r}")
    return model


def check_export(timm_name: str, export: Path, num_classes: int) -> dict:
    """How the export loads into timm: keys matched, and which tensors differ from random init."""
    from safetensors.torch import load_file

    state = load_file(str(export))
    random_state = build_model(timm_name, "random", export, num_classes).state_dict()
    missing, unexpected = sorted(set(random_state) - set(state)), sorted(set(state) - set(random_state))
    if missing or unexpected:
        raise ValueError(f"{export} does not fit timm's {timm_name} with {num_classes} classes: missing "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}")
    mismatched = [k for k in state if state[k].shape != random_state[k].shape]
    if mismatched:
        raise ValueError(f"{export}: {', '.join(mismatched)} do not fit timm's {timm_name} with {num_classes} classes "
                         f"(export with --num-classes {num_classes})")
    loaded = build_model(timm_name, "seer", export, num_classes).state_dict()
    backbone = [k for k in state if not k.startswith("head.") and not k.endswith("num_batches_tracked")]
    return {
        "timm_model": timm_name, "tensors": len(state), "missing_keys": missing, "unexpected_keys": unexpected,
        "strict_load": True, "loaded_equal_export": all(torch.equal(loaded[k], state[k]) for k in state),
        "backbone_tensors": len(backbone),
        "backbone_tensors_differing_from_random_init": sum(not torch.equal(state[k], random_state[k]) for k in backbone),
    }


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first WARMUP of the steps, then cosine to 0."""
    warmup = max(1, int(round(WARMUP * steps)))
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.SGD:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, nesterov=True)


def finetune(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, *, steps: int, lr: float,
             batch_size: int, size: int, mean, std, seed: int) -> dict:
    """``steps`` SGD steps on (pixels, labels) with the augmentation above; BN in train mode."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, lr)
    model.train()
    order, cursor, losses = torch.randperm(len(pixels), generator=gen), 0, []
    batch_size = min(batch_size, len(pixels))
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(pixels), generator=gen), 0
        index = order[cursor:cursor + batch_size]
        cursor += batch_size
        inputs = augment(pixels[index], size, mean, std, gen)
        loss = F.cross_entropy(model(inputs), labels[index])
        if not torch.isfinite(loss):
            return {"losses": losses, "diverged_at": step}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "diverged_at": None}


def top1(model: torch.nn.Module, data: LabelledImages, size: int, mean, std) -> float:
    """Top-1 accuracy (%) on every image of ``data``, BN in eval mode."""
    predicted = compute_features(model, data, size, mean, std, batch_size=500).argmax(1).numpy()
    return 100.0 * float((predicted == data.labels).sum()) / max(1, len(data))


def frozen_probes(export: Path, sidecar: dict, train: LabelledImages, test: LabelledImages, opts: dict) -> list[dict]:
    """What the same labels give without fine-tuning: quality.py's linear probe (seer.eval.probes) of
    the export's frozen pooled features and of raw pixels (28 px), on each fraction's subset."""
    model = build_model(sidecar["timm_name"], "seer", export, opts["num_classes"])
    model.reset_classifier(0)  # timm: the model now returns the pooled features its classifier read

    def features(data: LabelledImages) -> dict:
        return {"seer": compute_features(model, data, opts["size"], sidecar["mean"], sidecar["std"], batch_size=500),
                "pixels": raw_pixel_features(data, RAW_PIXEL_SIZE)}

    tested, rows = features(test), []
    for fraction in opts["fractions"]:
        subset = train.subset(balanced_subset(train.labels, fraction, opts["seed"]))
        for name, train_features in features(subset).items():
            probe = linear_probe(train_features, subset.labels, tested[name], test.labels, num_classes=opts["num_classes"])
            rows.append({"labels_fraction": fraction, "features": name, "top1": probe["accuracy"]})
            print(f"  {fraction:.0%} labels ({len(subset)} images), frozen {name} features, linear probe: "
                  f"top-1 {probe['accuracy']:.2f} %", flush=True)
    return rows


def one_run(export: Path, sidecar: dict, init: str, lr: float, steps: int, pool: torch.Tensor,
            labels: torch.Tensor, test: LabelledImages, opts: dict) -> dict:
    started, cpu = time.monotonic(), time.process_time()
    model = build_model(sidecar["timm_name"], init, export, opts["num_classes"], seed=0)
    trained = finetune(model, pool, labels, steps=steps, lr=lr, batch_size=opts["batch_size"], size=opts["size"],
                       mean=sidecar["mean"], std=sidecar["std"], seed=opts["seed"])
    train_s = time.monotonic() - started
    accuracy = top1(model, test, opts["size"], sidecar["mean"], sidecar["std"]) if trained["diverged_at"] is None else 0.0
    losses = trained["losses"]
    tail = losses[-max(1, len(losses) // 20):] if losses else [float("nan")]
    return {"init": init, "lr": lr, "steps": steps, "top1": accuracy, "diverged_at": trained["diverged_at"],
            "loss_first": losses[0] if losses else None, "loss_last": float(np.mean(tail)),
            "train_seconds": train_s, "seconds": time.monotonic() - started, "cpu_seconds": time.process_time() - cpu}


def sweep(export: Path, sidecar: dict, train: LabelledImages, test: LabelledImages, opts: dict) -> list[dict]:
    """Every (fraction, init, LR) fine-tune; same steps, batches and crops for both inits at a fraction."""
    runs = []
    for fraction, steps in zip(opts["fractions"], opts["steps"]):
        subset = train.subset(balanced_subset(train.labels, fraction, opts["seed"]))
        pool, labels = source_pixels(subset, opts["size"]), torch.from_numpy(subset.labels)
        for init in INITS:
            for lr in opts["lrs"]:
                run = {"labels_fraction": fraction, "labelled_images": len(subset),
                       **one_run(export, sidecar, init, lr, steps, pool, labels, test, opts)}
                runs.append(run)
                print(f"  {fraction:.0%} labels ({len(subset)} images), {init:6s} lr {lr:g}: top-1 {run['top1']:.2f} %, "
                      f"loss {run['loss_first']:.3f} -> {run['loss_last']:.3f}, {steps} steps, {run['seconds']:.0f} s",
                      flush=True)
    return runs


def read_sidecar(export: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(export), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("seer", "null") or "null")
    except Exception as exc:  # safetensors' own error type for a file that is not one
        raise ValueError(f"{export}: not a safetensors file ({exc})") from None
    if not meta or meta.get("format") != "timm" or not meta.get("timm_name"):
        raise ValueError(f"{export}: not a `seer export --format timm` file of a timm-loadable backbone")
    return meta


def pretrained_export(args: argparse.Namespace, num_classes: int) -> tuple[Path, dict, dict]:
    """(timm export, its sidecar, where the backbone came from); pretrains WORK/run_swav if needed."""
    if args.export:
        export = Path(args.export)
        if not export.is_file():
            raise ValueError(f"no such export: {export}")
        return export, read_sidecar(export), {"export": str(export)}
    from seer.export import export_backbone

    work = Path(args.work)
    run = Path(args.run) if args.run else work / "run_swav"
    source = {"run": str(run)}
    if args.run and not run.exists():
        raise ValueError(f"no such pretraining run: {run}")
    if not args.run and not (run / "checkpoints" / "latest").is_file():
        from quality import prepare_shards, pretrain  # benchmarks/quality.py: ingest without labels, SwAV preset

        print(f"no checkpoint in {run}: pretraining configs/fashion_mnist_swav.yaml there first", flush=True)
        source["pretraining"] = pretrain("swav", prepare_shards(work), work, None, [])
    export = work / "finetune" / "seer_timm.safetensors"
    sidecar = export_backbone(run, export, num_classes=num_classes, fmt="timm", seed=0)
    if not sidecar.get("timm_name"):
        raise ValueError(f"{sidecar['architecture']} has no timm model to fine-tune")
    return export, sidecar, source


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", help="pretraining run folder or checkpoint to export (default: WORK/run_swav)")
    source.add_argument("--export", help="a `seer export --format timm --num-classes <classes of --data>` file")
    parser.add_argument("--work", default=str(REPO / "fashion_mnist"), help="quality.py's work folder")
    parser.add_argument("--data", default=str(FASHION_MNIST_DIR), help="labelled data with train and test splits")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--steps", type=int, nargs="+", default=[500, 1000], help="SGD steps, one per fraction")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.003, 0.0125, 0.4], help="the LR sweep (batch 64)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "finetune.json"))
    parser.add_argument("--no-doc", action="store_true", help="do not refresh docs/benchmarks.md")
    args = parser.parse_args(argv)
    if len(args.steps) != len(args.fractions):
        parser.error(f"--steps needs one count per fraction ({len(args.fractions)}), got {len(args.steps)}")
    if not all(0 < f <= 1 for f in args.fractions) or min(args.steps + [args.batch_size, args.threads]) < 1:
        parser.error("fractions must be in (0, 1]; steps, batch size and threads >= 1")
    if min(args.lrs) <= 0:
        parser.error("learning rates must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, cpu = time.monotonic(), time.process_time()
    try:
        train, test = load_labelled(args.data, "train"), load_labelled(args.data, "test")
        num_classes = max(len(train.classes), int(train.labels.max()) + 1)
        export, sidecar, source = pretrained_export(args, num_classes)
        check = check_export(sidecar["timm_name"], export, num_classes)
    except (OSError, ValueError) as exc:
        print(f"finetune.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"export {export}: {check['tensors']} tensors loaded strict into timm {check['timm_model']}; "
          f"{check['backbone_tensors_differing_from_random_init']} of {check['backbone_tensors']} backbone tensors differ "
          "from random init", flush=True)
    opts = {"fractions": args.fractions, "steps": args.steps, "lrs": args.lrs, "batch_size": args.batch_size,
            "size": args.size, "seed": args.seed, "num_classes": num_classes}
    sweep_cpu, sweep_started = time.process_time(), time.monotonic()
    runs = sweep(export, sidecar, train, test, opts)
    frozen = frozen_probes(export, sidecar, train, test, opts)
    rows = best_rows(runs)
    result = {
        "command": " ".join(["python benchmarks/finetune.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
        "rows": rows, "gains": gains(rows), "runs": runs, "frozen": frozen,
        "table": table(runs, rows, args.lrs, frozen),
        "protocol": {**opts, "optimizer": f"SGD nesterov momentum {MOMENTUM}, weight decay {WEIGHT_DECAY} (weights)",
                     "schedule": f"linear warm-up {WARMUP:.0%} of steps, cosine to 0", "crop_scale": CROP_SCALE,
                     "train_images": len(train), "test_images": len(test), "threads": args.threads},
        "backbone": {k: sidecar.get(k) for k in ("architecture", "timm_name", "method", "step", "checkpoint")},
        "source": source, "export": str(export), "export_check": check,
        "time": {"finetune_cpu_minutes": (time.process_time() - sweep_cpu) / 60,
                 "finetune_wall_minutes": (time.monotonic() - sweep_started) / 60,
                 "total_cpu_minutes": (time.process_time() - cpu) / 60, "total_wall_minutes": (time.monotonic() - started) / 60},
    }
    first = result["gains"].get(f"{min(args.fractions):g}", float("nan"))
    result["acceptance"] = {"target_points_at_1pct": TARGET_POINTS, "gain_at_smallest_fraction": first,
                            "met": bool(first >= TARGET_POINTS)}
    print("\n" + result["table"])
    for fraction, gain in result["gains"].items():
        print(f"seer - random at {float(fraction):.0%} labels: {gain:+.2f} points")
    print(f"fine-tuning: {result['time']['finetune_cpu_minutes']:.1f} CPU min, {result['time']['finetune_wall_minutes']:.1f} min wall")
    write_results(Path(args.out), result)
    print(f"wrote {args.out}")
    if not args.no_doc:
        refresh_doc_section(HEADING, doc_section(result))
        print(f"refreshed '{HEADING}' in docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
