"""``seer eval knn|linear|lowshot BACKBONE --data ...``: load, extract (cached), probe, report.

The training split is the labelled reference (kNN bank, linear/low-shot training set), the
test split is scored. Both come from ``--data`` (IDX files, or ``train/`` + ``val|test/``
sub-folders), or the test split from ``--test``; data without any split is cut 80/20 (seeded).
Results are a dict (printed as a table or JSON), written atomically to a JSON file, and logged
to the run's TensorBoard (``eval/<protocol>/...`` at the checkpoint's step) when BACKBONE is a
run folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from data_pipeline.storage import atomic_write_bytes
from seer.eval import probes
from seer.eval.datasets import LabelledImages, load_labelled
from seer.eval.features import DEFAULT_CACHE, Backbone, extract_features, load_backbone

PROTOCOLS = ("knn", "linear", "lowshot")


def train_test_split(data: str | Path, test: str | Path | None = None, *, train_limit: int | None = None,
                     test_limit: int | None = None, seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
    train = load_labelled(data, "train")
    held = load_labelled(test, "test") if test is not None else load_labelled(data, "test")
    if held.source == train.source:  # no split in the data: hold out a seeded 20 %
        order = np.random.default_rng(seed).permutation(len(train))
        cut = int(round(0.8 * len(train)))
        train, held = train.subset(np.sort(order[:cut])), train.subset(np.sort(order[cut:]))
    return train.head(train_limit, seed), held.head(test_limit, seed + 1)


def run_protocol(protocol: str, train_features, train_labels, test_features, test_labels, *, num_classes: int,
                 seed: int = 0, ks=probes.KNN_KS, shots=probes.LOWSHOT_SHOTS) -> dict:
    if protocol == "knn":
        return probes.knn_accuracy(train_features, train_labels, test_features, test_labels, ks=ks, num_classes=num_classes)
    if protocol == "linear":
        return probes.linear_probe(train_features, train_labels, test_features, test_labels, seed=seed,
                                   num_classes=num_classes)
    if protocol == "lowshot":
        return probes.lowshot(train_features, train_labels, test_features, test_labels, shots=shots, seed=seed,
                              num_classes=num_classes)
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")


def evaluate(protocol: str, backbone: str | Path | Backbone, data: str | Path, *, test: str | Path | None = None,
             train_limit: int | None = None, test_limit: int | None = None, size: int | None = None,
             cache_dir: Path | None = DEFAULT_CACHE, encoder: str = "base", seed: int = 0,
             ks=probes.KNN_KS, shots=probes.LOWSHOT_SHOTS) -> dict:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    started = time.monotonic()
    model = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, encoder)
    train, held = train_test_split(data, test, train_limit=train_limit, test_limit=test_limit, seed=seed)
    size = size or model.input_size
    train_features = extract_features(model, train, size=size, cache_dir=cache_dir)
    test_features = extract_features(model, held, size=size, cache_dir=cache_dir)
    classes = max(len(train.classes), len(held.classes))
    result = run_protocol(protocol, train_features, train.labels, test_features, held.labels, num_classes=classes,
                          seed=seed, ks=ks, shots=shots)
    return {
        "protocol": protocol,
        "backbone": model.source,
        "architecture": model.architecture,
        "step": model.step,
        "data": {"train": train.source, "test": held.source, "train_images": len(train), "test_images": len(held),
                 "classes": classes, "skipped": train.skipped + held.skipped, "size": size},
        "effective_rank": probes.effective_rank(train_features),
        "num_features": int(train_features.shape[1]),
        "results": result,
        "seconds": time.monotonic() - started,
        "_run_dir": str(model.run_dir) if model.run_dir else None,
    }


def headline(report: dict) -> dict[str, float]:
    """The numbers of a report as flat ``name -> accuracy`` pairs (table rows, TensorBoard tags)."""
    results, protocol = report["results"], report["protocol"]
    if protocol == "knn":
        return {f"knn/{k}": v for k, v in results.items()}
    if protocol == "linear":
        return {"linear/accuracy": results["accuracy"]}
    return {f"lowshot/{n}/{kind}": v[kind] for n, v in results.items() for kind in ("linear", "knn")}


def format_table(report: dict) -> str:
    data = report["data"]
    lines = [
        f"{report['protocol']} probe of {report['architecture']} (step {report['step']}) from {report['backbone']}",
        f"train {data['train_images']} images ({data['train']}), test {data['test_images']} ({data['test']}), "
        f"{data['classes']} classes, {data['size']} px; effective rank {report['effective_rank']:.1f} of "
        f"{report['num_features']}",
        "",
        "| metric | top-1 accuracy (%) |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {value:.2f} |" for name, value in headline(report).items()]
    if report["protocol"] == "linear":
        r = report["results"]
        lines.append(f"\nweight decay {r['weight_decay']:g}, chosen on the held-out 10 % of the training split "
                     f"(held-out accuracy {r['val_accuracy']:.2f})")
    return "\n".join(lines)


def save_report(report: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in report.items() if not k.startswith("_")}
    atomic_write_bytes(out, (json.dumps(clean, indent=2) + "\n").encode())
    return out


def default_output(report: dict, backbone: str | Path) -> Path:
    if report.get("_run_dir"):
        return Path(report["_run_dir"]) / "eval" / f"{report['protocol']}_step{report['step']}.json"
    path = Path(backbone)
    folder = path.parent if path.is_file() else path
    return folder / f"{path.stem}.eval-{report['protocol']}.json"


def log_to_tensorboard(report: dict) -> None:
    """The headline numbers into the run's TensorBoard, at the evaluated checkpoint's step."""
    if not report.get("_run_dir"):
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(Path(report["_run_dir"]) / "tensorboard"))
    try:
        for name, value in headline(report).items():
            writer.add_scalar(f"eval/{name}", value, report["step"])
        writer.add_scalar("eval/effective_rank", report["effective_rank"], report["step"])
    finally:
        writer.close()
