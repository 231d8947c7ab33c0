"""benchmarks/finetune.py's report: the best of each LR sweep, the gains, the Markdown table and the
section of docs/benchmarks.md (which ends with finetune_investigation.md, what was checked)."""

from __future__ import annotations

import math
from pathlib import Path

HEADING = "## Fine-tuning from the export (Fashion-MNIST)"
TARGET_POINTS = 5.0
RAW_PIXEL_SIZE = 28  # Fashion-MNIST's own size, as quality.py's raw-pixel baseline
INVESTIGATION = Path(__file__).with_name("finetune_investigation.md")


def best_rows(runs: list[dict]) -> list[dict]:
    """The run of the best LR of each (fraction, init); the first on a tie."""
    best = {}
    for run in runs:
        key = (run["labels_fraction"], run["init"])
        if key not in best or run["top1"] > best[key]["top1"]:
            best[key] = run
    return [{"labels_fraction": f, "init": i, "top1": r["top1"], "lr": r["lr"]} for (f, i), r in best.items()]


def gains(rows: list[dict]) -> dict:
    top = {(r["labels_fraction"], r["init"]): r["top1"] for r in rows}
    return {f"{f:g}": top.get((f, "seer"), math.nan) - top.get((f, "random"), math.nan) for f, _ in top}


FROZEN_NAMES = {"seer": "seer, frozen (linear probe)", "pixels": f"raw pixels ({RAW_PIXEL_SIZE} px, linear probe)"}


def table(runs: list[dict], rows: list[dict], lrs: list[float], frozen: list[dict]) -> str:
    """The fine-tunes (every LR, best in bold), then the frozen probes of the same labels."""
    lines = ["| labels | init | steps | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |",
             "| --- | --- | --- | " + " | ".join("---" for _ in lrs) + " | --- |"]
    for row in rows:
        mine = {r["lr"]: r for r in runs if r["labels_fraction"] == row["labels_fraction"] and r["init"] == row["init"]}
        cells = [f"{mine[lr]['top1']:.2f} %" if lr in mine else "-" for lr in lrs]
        any_run = next(iter(mine.values()))
        lines.append(f"| {row['labels_fraction']:.0%} ({any_run['labelled_images']:,}) | {row['init']} | "
                     f"{any_run['steps']:,} | " + " | ".join(cells) + f" | **{row['top1']:.2f} %** |")
    for row in frozen:
        images = next(r["labelled_images"] for r in runs if r["labels_fraction"] == row["labels_fraction"])
        lines.append(f"| {row['labels_fraction']:.0%} ({images:,}) | {FROZEN_NAMES[row['features']]} | - | "
                     + " | ".join("-" for _ in lrs) + f" | {row['top1']:.2f} % |")
    return "\n".join(lines)


def doc_section(result: dict) -> str:
    p, e, t = result["protocol"], result["export_check"], result["time"]
    gain_text = ", ".join(f"{float(f):.0%} labels {g:+.2f} points" for f, g in result["gains"].items())
    verdict = "met" if result["acceptance"]["met"] else "**not met**"
    busy = t["finetune_wall_minutes"] > 1.3 * t["finetune_cpu_minutes"]
    shared = "; other jobs shared the cores" if busy else ""
    return f"""{HEADING}

`{result['command']}` (writes `benchmarks/results/finetune.json`), {result['date']}, {result['cpu_count']} CPU
cores, one torch thread. The backbone: `seer export --format timm --num-classes 10` of
{result['backbone']['checkpoint']} ({result['backbone']['method']}, step {result['backbone']['step']}; without `--run` or
`--export` the script pretrains configs/fashion_mnist_swav.yaml through quality.py's code), loaded into
`timm.create_model("{e['timm_model']}", num_classes={p['num_classes']})` with `strict=True` ({e['tensors']} tensors, no key
missing or unexpected; {e['backbone_tensors_differing_from_random_init']} of {e['backbone_tensors']} backbone
tensors differ from timm's random init). "random" is the same timm model at timm's own init (seed 0).
Protocol (the script's docstring has it all): a seeded class-balanced subset of the training labels, SGD
(Nesterov, momentum 0.9, weight decay 5e-4 on weights) with batch {p['batch_size']}, 5 % warm-up then cosine,
the same steps, batches and crops (random-resized crop 0.4-1 of the 28 px image to {p['size']} px, flip;
ImageNet mean/std on the grayscale image replicated to 3 channels) for both inits and every LR; top-1 on the
{p['test_images']:,} test images; each row's best is the best of the LR sweep on the test set. The last rows
are no fine-tune: seer eval's linear probe (weight decay chosen on a held-out 10 %) of the export's frozen
features and of raw pixels, on the same labelled images.

{result['table']}

Seer minus random (best of each sweep): {gain_text}. Acceptance (>= {TARGET_POINTS:g} points at 1 % labels):
{verdict}. All {len(result['runs'])} fine-tunes and the frozen probes took {t['finetune_cpu_minutes']:.1f} CPU minutes
({t['finetune_wall_minutes']:.1f} min wall{shared}) on top of the pretraining.

{INVESTIGATION.read_text().rstrip()}
"""
