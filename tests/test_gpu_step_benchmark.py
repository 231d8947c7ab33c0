"""benchmarks/gpu_step.py at its CPU size (what CI can run): seer's train step and the plain loop
on the tiny cases, the JSON's shape, ratios and the color stage's share. The GPU numbers come from
running the script on a GPU (docs/benchmarks.md); no timing is asserted here."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_step_runs_on_the_cpu_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_step_cpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--device", "cpu", "--steps", "1",
                           "--warmup", "1", "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["case"] for row in result["rows"]] == ["tiny_rny", "tiny_vit"]
    for row in result["rows"]:
        assert set(row["variants"]) == {"seer/compile=off", "plain/eager"}
        for variant in row["variants"].values():
            assert "error" not in variant, variant.get("traceback")
            assert variant["images_per_s"] > 0 and variant["mfu"] is None  # no MFU on a CPU
        seer = row["variants"]["seer/compile=off"]
        assert seer["ratio_to_plain_same_compile"] == pytest.approx(
            seer["images_per_s"] / row["variants"]["plain/eager"]["images_per_s"])
        assert row["model_flops_per_step"] > 0 and row["color"]["ms_per_step"] > 0
        assert 0 < row["color"]["share_of_best_seer_step"]
    assert "| tiny_rny | seer/compile=off |" in proc.stdout and "| tiny_vit | color stage (auto) |" in proc.stdout
