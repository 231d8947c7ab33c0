"""``seer plan``'s step time: model FLOPs over (GPU peak x MFU measured for the backbone family).
For the three workloads measured on an H200 (issue 18) the plan's estimate is within 25% of the
measured step time, and the plan says which numbers are measured and which assumed."""

from __future__ import annotations

import functools

import pytest

from conftest import REPO
from seer.config import load_config
from seer.plan import compute_plan, format_plan
from seer.plan_speed import CALIBRATION, nearest_calibration


def calibration_config(cal):
    return load_config(REPO / "configs" / f"{cal.preset}.yaml", list(cal.overrides))


@functools.lru_cache(maxsize=None)
def calibration_plan(cal):
    return compute_plan(calibration_config(cal), 1, fp32_reference=False)


@pytest.mark.parametrize("cal", CALIBRATION, ids=lambda c: c.backbone)
def test_estimate_is_within_25_percent_of_the_measured_h200_step(cal):
    plan = calibration_plan(cal)
    c = plan["config"]
    assert (c["backbone"], c["method"], c["precision"], c["batch_size_per_rank"], c["activation_checkpointing"]) == (
        cal.backbone, cal.method, cal.precision, cal.batch, cal.checkpointing)
    h200 = next(row for row in plan["speed"]["estimates"] if row["gpu"] == "H200")
    assert h200["basis"] == "measured"
    measured_step = cal.batch / cal.images_per_s
    assert h200["step_time_s"] == pytest.approx(measured_step, rel=0.25)
    others = [row for row in plan["speed"]["estimates"] if row["gpu"] != "H200"]
    assert others and all(row["basis"] == "assumed" for row in others)


def test_other_workloads_say_what_is_assumed():
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["train.precision=bf16"])  # RegNetY-400MF, no AC
    plan = compute_plan(cfg, 1, fp32_reference=False)
    assert plan["speed"]["calibration"]["backbone"] == "regnety_16gf"  # nearest RegNet in size
    h200 = next(row for row in plan["speed"]["estimates"] if row["gpu"] == "H200")
    assert h200["basis"] == "assumed" and "backbone regnety_400mf (measured: regnety_16gf)" in h200["why"]
    assert "checkpointing False (measured: True)" in h200["why"]
    text = format_plan(plan)
    assert "MFU MEASURED for regnety_16gf" in text and "[ASSUMED:" in text and "V100" not in text  # no bf16 on V100
    assert nearest_calibration("vit_small_patch16", 22_000_000).backbone == "vit_base_patch16"
    assert nearest_calibration("regnety_128gf", 640_000_000).backbone == "regnety_256gf"


def test_momentum_encoder_counts_one_forward_not_three():
    f = calibration_plan(CALIBRATION[0])["flops"]
    assert 0.45 * f["forward"] < f["no_grad_forward"] < 0.5 * f["forward"]  # the key encoder, without heads' share
    assert f["model_step"] == 3 * (f["forward"] - f["no_grad_forward"]) + f["no_grad_forward"]
