"""Short CPU runs of both methods through the real CLI (`python -m seer pretrain <cpu preset>`)
over real shards: the loss falls, SwAV's leaves ln(K) (the collapsed value) and MoCo v3's falls
below chance; MoCo v3 also runs on 2 gloo ranks under the FSDP strategy of its preset. Plus the
full-scale presets' numbers against the recipes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file

from cluster.local import torchrun_command
from conftest import REPO
from seer.config import load_config
from seer.engine.checkpoint import load_model_weights, resolve_checkpoint
from seer.export import export_backbone
from seer.methods import build_method

SWAV_CPU = REPO / "configs" / "seer_swav_cpu.yaml"
MOCO_CPU = REPO / "configs" / "mocov3_vit_cpu.yaml"
# one thread per process: with two cores and a data worker, more threads only contend
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_overrides(shard_dir: Path, run_dir: Path, **extra: object) -> list[str]:
    values = {"data.shards": shard_dir, "run.dir": run_dir, "train.log_every": 1, "checkpoint.every_steps": 1000}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def pretrain(preset: Path, overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "seer", "pretrain", str(preset), *overrides, "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_presets_reproduce_the_recipe_numbers():
    """The full-scale presets against shared/reference/recipes.md, after the linear scaling rule."""
    from seer.engine.optim import build_schedule

    seer = load_config(REPO / "configs" / "seer_regnety256gf_swav.yaml")
    batch = seer.train.batch_size * 512
    assert batch == 8192
    schedule = build_schedule(seer.schedule, seer.optim, batch, seer.train.max_steps)
    assert schedule.lr(0) == pytest.approx(0.15) and schedule.lr(8000) == pytest.approx(9.6)
    assert schedule.lr(seer.train.max_steps) == pytest.approx(0.0096)
    s = seer.method.swav
    assert (s.head_hidden, s.head_out, s.head_bn, s.n_prototypes) == ([8192, 8192], 256, False, 16000)
    assert (s.sinkhorn_iterations, s.epsilon, s.temperature) == (10, 0.03, 0.1)
    assert [(g.size, g.count) for g in seer.augment.crops] == [(224, 2), (96, 4)]
    for name, ranks in (("mocov3_vit_s16", 32), ("mocov3_vit_b16", 64)):
        moco = load_config(REPO / "configs" / f"{name}.yaml")
        batch = moco.train.batch_size * ranks
        assert batch == 4096
        schedule = build_schedule(moco.schedule, moco.optim, batch, moco.train.max_steps)
        assert schedule.lr(moco.schedule.warmup_steps) == pytest.approx(1.5e-4 * 4096 / 256)
        assert moco.train.max_steps == round(300 * 1281167 / 4096)
        assert moco.schedule.warmup_steps == round(40 * 1281167 / 4096)
        assert moco.model.kwargs["stop_grad_conv1"] is True
        m = moco.method.mocov3
        assert (m.projector_hidden, m.out_dim, m.temperature, m.momentum) == (4096, 256, 0.2, 0.99)
        assert [(g.blur_p, g.solarize_p) for g in moco.augment.crops] == [(1.0, 0.0), (0.1, 0.2)]


@pytest.mark.slow
def test_swav_cpu_preset_learns_and_leaves_ln_k(tmp_path, shard_dir):
    run = tmp_path / "swav"
    steps = 100
    summary = pretrain(SWAV_CPU, run_overrides(shard_dir, run, **{"train.max_steps": steps}))
    assert summary["step"] == steps
    losses = step_losses(run)
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    ln_k = math.log(load_config(SWAV_CPU).method.swav.n_prototypes)
    first, last = mean(losses[:10]), mean(losses[-10:])
    assert last < first - 0.4, (first, last)
    # a collapsed SwAV sits at ln(K) (uniform assignments); this one ends clearly below it
    assert ln_k - last > 0.15, (ln_k, last)
    assert "sits at ln(K)" not in (run / "logs" / "rank0.log").read_text()


@pytest.mark.slow
def test_mocov3_cpu_preset_learns_below_chance(tmp_path, shard_dir):
    run = tmp_path / "mocov3"
    steps = 100
    summary = pretrain(MOCO_CPU, run_overrides(shard_dir, run, **{"train.max_steps": steps}))
    assert summary["step"] == steps
    losses = step_losses(run)
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    cfg = load_config(MOCO_CPU)
    # uniform logits over the batch's keys, in both directions, scaled by 2T
    chance = 2 * 2 * cfg.method.mocov3.temperature * math.log(cfg.train.batch_size)
    first, last = mean(losses[:10]), mean(losses[-10:])
    assert last < first - 0.25, (first, last)
    assert last < chance - 0.15, (chance, last)
    # the checkpoint holds both encoders; export writes the query encoder's backbone
    method = build_method(cfg)
    load_model_weights(resolve_checkpoint(run), method)
    exported = load_file(export_backbone(run, tmp_path / "vit.safetensors", num_classes=0)["out"])
    query, key = method.backbone.state_dict(), method.momentum_backbone.state_dict()
    assert set(exported) == set(query)
    assert all(torch.equal(exported[k], query[k]) for k in query)
    assert not torch.equal(exported["blocks.0.attn.qkv.weight"], key["blocks.0.attn.qkv.weight"])
    assert torch.equal(exported["patch_embed.proj.weight"], key["patch_embed.proj.weight"])  # frozen in both


@pytest.mark.slow
def test_mocov3_runs_on_two_ranks_with_fsdp(tmp_path, shard_dir):
    run = tmp_path / "mocov3_2ranks"
    overrides = run_overrides(shard_dir, run, **{"train.max_steps": 3, "train.batch_size": 8})
    proc = subprocess.run(torchrun_command(2, str(MOCO_CPU), overrides), capture_output=True, text=True,
                          cwd=REPO, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_config(MOCO_CPU).parallel.strategy == "fsdp"
    losses = step_losses(run)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
