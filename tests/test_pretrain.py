"""End to end on CPU: pretrain from real shards, checkpoints, resume after SIGKILL, 2-rank
torchrun with gloo, export to torchvision."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster.local import torchrun_command
from conftest import REPO, tiny_overrides
from seer.config import load_config

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def seer_pretrain(overrides, **kw):
    return subprocess.run([sys.executable, "-m", "seer", "pretrain", QUICKSTART, *overrides, "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=600, **kw)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def loss_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_single_process_run_writes_everything(tmp_path, shard_dir):
    run = tmp_path / "run"
    proc = seer_pretrain(tiny_overrides(shard_dir, run))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["images_seen"] == 24
    stack = summary["image_stack"]  # what decoded, resized and colored this run's images
    assert stack["decoder"] in ("simplejpeg", "pil-draft") and stack["color_cpu"] in ("numba", "numpy")
    assert stack["pil"].startswith(("pillow ", "pillow-simd "))
    assert loss_steps(run) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(run) if "loss" in r)
    assert (run / "config.yaml").is_file() and any((run / "tensorboard").iterdir())
    assert (run / "logs" / "rank0.log").is_file()
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000004", "step_00000006"]  # keep_last 2 of the quickstart
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    info = json.loads(subprocess.run([sys.executable, "-m", "seer", "inspect", str(run), "--json"],
                                     capture_output=True, text=True, cwd=REPO).stdout)
    assert info == {**info, "kind": "checkpoint", "step": 6, "model": "regnety_tiny", "method": "swav", "world_size": 1}


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(tmp_path, shard_dir):
    run = tmp_path / "run"
    overrides = tiny_overrides(shard_dir, run, **{"train.max_steps": 200})
    proc = subprocess.Popen([sys.executable, "-m", "seer", "pretrain", QUICKSTART, *overrides],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step_00000004"):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = int(latest.read_text().strip().split("_")[1])
    done_before = max(loss_steps(run))
    assert done_before >= saved
    again = seer_pretrain(tiny_overrides(shard_dir, run, **{"train.max_steps": saved + 3}))
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and f"at step {saved}" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == saved + 3
    steps = loss_steps(run)
    assert steps[-3:] == [saved + 1, saved + 2, saved + 3]


@pytest.mark.slow
def test_two_rank_torchrun_on_gloo(tmp_path, shard_dir):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = torchrun_command(2, QUICKSTART, tiny_overrides(shard_dir, run, **{"train.max_steps": 4}))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert loss_steps(run) == [1, 2, 3, 4]
    info = json.loads(subprocess.run([sys.executable, "-m", "seer", "inspect", str(run), "--json"],
                                     capture_output=True, text=True, cwd=REPO).stdout)
    assert info["world_size"] == 2 and info["step"] == 4
    assert all(r["images_per_s"] > 0 for r in metrics(run) if "loss" in r)
    # each rank saved its own RNG; the shared extras hold both ranks' stream positions
    assert (run / "checkpoints" / "step_00000004" / "extra_rank1.pt").is_file()
    # and the 2-rank run resumes on 2 ranks
    cmd = torchrun_command(2, QUICKSTART, tiny_overrides(shard_dir, run, **{"train.max_steps": 6}))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert loss_steps(run) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_export_loads_into_torchvision_with_same_features(tmp_path, shard_dir):
    from safetensors.torch import load_file
    from torchvision.models import regnet_y_400mf

    from seer.engine.checkpoint import load_model_weights, resolve_checkpoint
    from seer.methods import build_method

    run = tmp_path / "run"
    overrides = tiny_overrides(shard_dir, run, **{"model.backbone": "regnety_400mf", "train.max_steps": 2})
    assert seer_pretrain(overrides).returncode == 0
    out = tmp_path / "export" / "backbone.safetensors"
    proc = subprocess.run([sys.executable, "-m", "seer", "export", str(run), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["architecture"] == "regnety_400mf" and sidecar["torchvision_name"] == "regnet_y_400mf"
    assert sidecar["step"] == 2 and sidecar["mean"] == [0.485, 0.456, 0.406]

    tv = regnet_y_400mf()
    tv.load_state_dict(load_file(out), strict=True)
    tv.fc = torch.nn.Identity()
    tv.eval()
    method = build_method(load_config(QUICKSTART, overrides))
    load_model_weights(resolve_checkpoint(run), method)
    ours = method.backbone.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (tv(x) - ours(x)).abs().max().item() <= 1e-5

    bare = tmp_path / "bare.safetensors"
    subprocess.run([sys.executable, "-m", "seer", "export", str(run), "--out", str(bare), "--num-classes", "0"],
                   check=True, capture_output=True, cwd=REPO, timeout=300)
    headless = regnet_y_400mf()
    headless.fc = torch.nn.Identity()
    headless.load_state_dict(load_file(bare), strict=True)
