"""Step-time estimates for ``seer plan``: model FLOPs over (GPU peak x MFU measured for the family).

MFU (model FLOPs utilisation) = model FLOPs per step x steps/s / the GPU's dense peak. Model FLOPs
are ``seer.plan_measure``'s: 3 x the forward of everything that runs with gradients (forward +
backward) plus 1 x what runs without (MoCo v3's momentum encoder); activation-checkpoint
recomputation is not model work, so its cost shows in the measured MFU instead.

:data:`CALIBRATION` holds MFUs MEASURED with seer's own ``train_step`` (synthetic views, one
process; the numbers of issue 18). A plan takes the point of its backbone's family (ViT or
RegNet) nearest in parameter count, and says what is measured and what is assumed: another
backbone size, another method, batch, crops, precision or checkpointing than the point's, and
every GPU kind but the measured one (the same MFU is assumed there; the peaks are datasheet
numbers). Measured on more points, ``benchmarks/gpu_step.py`` prints the rows to add.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# dense tensor-core peak FLOP/s per GPU kind and precision (datasheets, SXM parts; fp32 = TF32
# where the GPU has it; V100 has no bf16)
PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}


@dataclass(frozen=True)
class Calibration:
    """One measured point: MFU of seer's train_step for a workload on a GPU kind."""

    device: str
    family: str
    backbone: str
    parameters: int  # of the backbone (what "nearest size" compares)
    method: str
    precision: str
    batch: int
    crops: str
    checkpointing: bool
    images_per_s: float
    mfu: float
    measured: str  # date, torch version, how
    preset: str = ""  # the workload as a config: configs/<preset>.yaml + overrides (benchmarks/gpu_step.py's cases)
    overrides: tuple[str, ...] = ()


_HOW = "2026-12-04, torch 2.11.0+cu130, one process, synthetic views, seer train_step (issue 18)"
_SEER = "seer_regnety256gf_swav"
CALIBRATION: tuple[Calibration, ...] = (
    Calibration("H200", "vit", "vit_base_patch16", 85_798_656, "mocov3", "bf16", 128, "2x224", False, 990.0, 0.269,
                _HOW, "mocov3_vit_b16", ("train.batch_size=128",)),
    Calibration("H200", "regnet", "regnety_16gf", 80_565_140, "swav", "bf16", 64, "2x224+4x96", True, 216.0, 0.058,
                _HOW, _SEER, ("model.backbone=regnety_16gf", "train.batch_size=64", "train.precision=bf16")),
    Calibration("H200", "regnet", "regnety_256gf", 1_272_156_138, "swav", "fp16", 16, "2x224+4x96", True, 24.6, 0.104,
                _HOW + "; the SEER preset", _SEER, ()),
)


def family_of(backbone: str) -> str:
    return "vit" if backbone.startswith("vit") else "regnet"


def nearest_calibration(backbone: str, parameters: int) -> Calibration:
    """The measured point of the same family nearest in log parameter count."""
    same = [c for c in CALIBRATION if c.family == family_of(backbone)]
    return min(same, key=lambda c: (c.backbone != backbone, abs(math.log(c.parameters / max(parameters, 1)))))


def _differences(cal: Calibration, config: dict) -> list[str]:
    checks = [("backbone", cal.backbone, config["backbone"]), ("method", cal.method, config["method"]),
              ("precision", cal.precision, config["precision"]), ("batch", cal.batch, config["batch_size_per_rank"]),
              ("crops", cal.crops, config["crops"]),
              ("checkpointing", cal.checkpointing, config["activation_checkpointing"])]
    return [f"{what} {mine} (measured: {theirs})" for what, theirs, mine in checks if str(theirs) != str(mine)]


def estimate(config: dict, backbone_parameters: int, model_flops: float, recompute_flops: float) -> dict:
    """Step time per GPU kind for one rank's ``model_flops`` (see the module doc)."""
    cal = nearest_calibration(config["backbone"], backbone_parameters)
    mfu = cal.mfu
    if cal.checkpointing != config["activation_checkpointing"] and model_flops > 0:
        # the measured MFU paid (or did not pay) for the recompute: assumed proportional to device FLOPs
        factor = (model_flops + recompute_flops) / model_flops
        mfu = mfu * factor if cal.checkpointing else mfu / factor
    differences = _differences(cal, config)
    rows = []
    for gpu, peaks in PEAKS.items():
        peak = peaks.get(config["precision"])
        if peak is None:
            continue
        measured = gpu == cal.device and not differences
        rows.append({
            "gpu": gpu, "peak": peak, "mfu": mfu, "step_time_s": model_flops / (peak * mfu),
            "basis": "measured" if measured else "assumed",
            "why": "this workload was measured on this GPU" if measured else "; ".join(
                ([] if gpu == cal.device else [f"MFU measured on {cal.device}, assumed on {gpu}"]) + differences),
        })
    return {"calibration": asdict(cal), "model_flops_per_step": model_flops, "mfu_used": mfu, "estimates": rows}


def format_speed(speed: dict, images_per_step: int) -> list[str]:
    cal = speed["calibration"]
    lines = [f"  step time from MFU MEASURED for {cal['backbone']} ({cal['method']}, {cal['precision']}, batch "
             f"{cal['batch']}, {cal['crops']}, checkpointing {'on' if cal['checkpointing'] else 'off'}) on "
             f"{cal['device']}: {cal['mfu']:.1%} ({cal['images_per_s']:g} img/s; {cal['measured']}); model FLOPs "
             f"per step {speed['model_flops_per_step'] / 1e12:,.2f} TFLOP (3 x forward with gradients + forward "
             "without; recompute excluded)"]
    for row in speed["estimates"]:
        lines.append(f"    {row['gpu']:<5} peak {row['peak'] / 1e12:,.0f} TFLOP/s (datasheet) x {row['mfu']:.1%} MFU: "
                     f"{row['step_time_s'] * 1e3:,.1f} ms/step, {images_per_step / row['step_time_s']:,.1f} img/s "
                     f"per GPU [{row['basis'].upper()}{': ' + row['why'] if row['why'] else ''}]")
    return lines
