"""Benchmark (a script, not a test): seer's training step against a plain-PyTorch loop of the same
work, on a GPU (or, tiny, on the CPU for CI), with images/s, MFU, peak memory and their ratio.

For each ``--case`` (a config: a preset plus overrides; the GPU cases are ``seer.plan_speed``'s
calibration workloads) and each ``--compile`` setting:

- **seer**: the step a run takes (``gpu_step_measure.seer_step``: built on the meta device,
  ``parallelize`` with ``train.compile`` and the backbone's memory format, seer's optimizer, LR
  schedule and stability guard, ``seer.engine.train.train_step``) on synthetic normalised views
  of the case's crops, one process;
- **plain**: the same work without seer's engine: timm's backbone of the same design inside seer's
  method module (so the heads and the loss are the same code), torch.autocast, a torch optimizer,
  GradScaler for fp16, timm's checkpointing where the case checkpoints; ``--compile`` other than
  ``off`` compiles the whole module with ``torch.compile``;
- **color**: the color stage alone for the step's views on the device (``batched``; ``compiled``
  with ``--compile`` on), and its share of seer's step.

MFU = model FLOPs per step (``seer.plan_measure``: 3 x the forward with gradients + the forward
without, e.g. MoCo v3's momentum encoder; recomputation excluded) x steps/s / the GPU's dense peak
(``seer.plan_speed.PEAKS``: H100/H200 989 TFLOP/s bf16/fp16, A100 312, V100 125 fp16); on the CPU
there is no MFU ("-"). Peak memory: ``torch.cuda.max_memory_allocated`` per variant (CPU: the
process's ru_maxrss, cumulative). The same FLOPs are used for timm's model (the same design).

On a GPU box (torch, timm; seer needs omegaconf, which a bare box lacks: carry its wheels, see
docs/benchmarks.md "GPU step"):

    python benchmarks/gpu_step.py --case vitb rny16 rny256 --compile off blocks    # a few minutes on an H200
    python benchmarks/gpu_step.py --device cpu                                      # tiny cases, < 1 min (CI)

Writes benchmarks/results/gpu_step_<device>.json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_step_measure as measure  # noqa: E402

TINY = {  # CPU smoke cases: the engine's paths at a size a CI machine runs in seconds
    "tiny_rny": ("quickstart", ("model.backbone=regnety_400mf", "train.batch_size=4",
                                "augment.crops=[{size: 64, count: 2}]",
                                "method.swav.head_hidden=[64]", "method.swav.head_out=32", "method.swav.n_prototypes=50",
                                "parallel.activation_checkpointing=true", "train.precision=fp32", "train.device=cpu")),
    "tiny_vit": ("mocov3_vit_cpu", ("train.batch_size=16", "train.precision=fp32", "train.device=cpu")),
}


def cases() -> dict[str, tuple[str, tuple[str, ...]]]:
    from seer.plan_speed import CALIBRATION

    names = {"vit_base_patch16": "vitb", "regnety_16gf": "rny16", "regnety_256gf": "rny256"}
    return {**{names[c.backbone]: (c.preset, c.overrides) for c in CALIBRATION}, **TINY}


def peak_flops(device: torch.device, precision: str) -> tuple[str, float | None]:
    from seer.plan_speed import PEAKS

    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    kind = next((k for k in PEAKS if k in name), None)
    return name, PEAKS[kind].get(precision) if kind else None


def run_case(name: str, args, device: torch.device) -> dict:
    from seer.config import load_config

    preset, overrides = cases()[name]
    extra = [f"train.device={device.type}"]
    if args.precision:
        extra.append(f"train.precision={args.precision}")
    if args.memory_format:
        extra.append(f"train.memory_format={args.memory_format}")
    cfg = load_config(REPO / "configs" / f"{preset}.yaml", [*overrides, *extra])
    flops = measure.model_flops_per_step(cfg)
    device_name, peak = peak_flops(device, cfg.train.precision)
    row = {"case": name, "backbone": cfg.model.backbone, "method": cfg.method.name, "precision": cfg.train.precision,
           "batch": cfg.train.batch_size, "crops": [f"{g.count}x{g.size}" for g in cfg.augment.crops],
           "checkpointing": cfg.parallel.activation_checkpointing, "model_flops_per_step": flops,
           "device": device_name, "peak_flops": peak, "variants": {}}

    def add(key: str, build) -> None:
        try:
            result = measure.timed(build(), device, args.warmup, args.steps, cfg.train.batch_size)
            result["mfu"] = flops / result["step_s"] / peak if peak else None
        except Exception as err:  # unattended: record and go on with the next variant
            result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                      "traceback": traceback.format_exc()[-2000:]}
        row["variants"][key] = result
        print(f"  {name} {key}: {summary(result)}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    layout = torch.contiguous_format
    for mode in args.compile:
        def build_seer(mode=mode):
            nonlocal layout
            step, layout = measure.seer_step(cfg, device, mode)
            return step

        add(f"seer/compile={mode}", build_seer)
        if not args.no_plain:
            add(f"plain/{'compiled' if mode != 'off' else 'eager'}",
                lambda mode=mode: measure.plain_step(cfg, device, mode != "off", layout))
    color = "auto" if device.type == "cpu" else (  # the CPU runs its per-sample path
        "compiled" if any(m != "off" for m in args.compile) else "batched")
    try:
        row["color"] = measure.color_stage(cfg, device, color, layout)
    except Exception as err:
        row["color"] = {"error": f"{type(err).__name__}: {err}"}
    ratios(row)
    return row


def summary(result: dict) -> str:
    if "error" in result:
        return f"FAILED {result['error']}"
    mfu = f"{result['mfu']:.1%}" if result.get("mfu") is not None else "-"
    return f"{result['images_per_s']:,.1f} img/s, MFU {mfu}, peak {result['peak_memory_bytes'] / 2**30:,.2f} GiB"


def ratios(row: dict) -> None:
    """seer / plain for the same compile setting, and each seer variant over the plain loop's best."""
    ok = {k: v for k, v in row["variants"].items() if "error" not in v}
    plains = [v["images_per_s"] for k, v in ok.items() if k.startswith("plain/")]
    for key, value in ok.items():
        if key.startswith("seer/"):
            mode = key.split("=", 1)[1]
            pair = ok.get(f"plain/{'compiled' if mode != 'off' else 'eager'}")
            value["ratio_to_plain_same_compile"] = value["images_per_s"] / pair["images_per_s"] if pair else None
            value["ratio_to_best_plain"] = value["images_per_s"] / max(plains) if plains else None
    best = max((v for k, v in ok.items() if k.startswith("seer/")), key=lambda v: v["images_per_s"], default=None)
    color = row.get("color", {})
    if best and "ms_per_step" in color:
        color["share_of_best_seer_step"] = color["ms_per_step"] / 1e3 / best["step_s"]


def render(rows: list[dict]) -> str:
    lines = ["| case | variant | img/s | MFU | peak memory | seer / plain (same compile) | seer / best plain |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for key, v in row["variants"].items():
            if "error" in v:
                lines.append(f"| {row['case']} | {key} | failed: {v['error']} | | | | |")
                continue
            mfu = f"{v['mfu']:.1%}" if v.get("mfu") is not None else "-"
            same = v.get("ratio_to_plain_same_compile")
            best = v.get("ratio_to_best_plain")
            lines.append(f"| {row['case']} | {key} | {v['images_per_s']:,.1f} | {mfu} | "
                         f"{v['peak_memory_bytes'] / 2**30:,.2f} GiB | {'-' if same is None else f'{same:.2f}x'} | "
                         f"{'-' if best is None else f'{best:.2f}x'} |")
        color = row.get("color", {})
        if "ms_per_step" in color:
            share = color.get("share_of_best_seer_step")
            lines.append(f"| {row['case']} | color stage ({color['method']}) | {color['images_per_s']:,.0f} | | | "
                         f"{color['ms_per_step']:,.2f} ms/step{'' if share is None else f', {share:.1%} of the step'} | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", default=None, help="cases (default: GPU ones on cuda, tiny on cpu)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="override the case's train.precision")
    parser.add_argument("--memory-format", default=None, help="override train.memory_format (auto by default)")
    parser.add_argument("--compile", nargs="+", default=None, choices=["off", "blocks", "full"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--no-plain", action="store_true", help="seer only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.case = args.case or (["vitb", "rny16", "rny256"] if gpu else list(TINY))
    args.compile = args.compile or (["off", "blocks"] if gpu else ["off"])
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup or (5 if gpu else 1)
    unknown = sorted(set(args.case) - set(cases()))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {sorted(cases())}")
    if not gpu:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = []
    for name in args.case:
        print(f"{name}:", flush=True)
        rows.append(run_case(name, args, device))
    import timm

    result = {"date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
              "torch": torch.__version__, "timm": timm.__version__, "device": str(device),
              "command": " ".join(["benchmarks/gpu_step.py", *sys.argv[1:]]), "steps": args.steps,
              "warmup": args.warmup, "rows": rows}
    out = args.out or REPO / "benchmarks" / "results" / f"gpu_step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("\n" + render(rows))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
