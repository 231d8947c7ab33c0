"""Checkpoints for real: a SIGKILLed run, and a 2-rank FSDP2 run after a crash, resume to the
same weights as uninterrupted ones; a 2-rank checkpoint loads on 1 and 4 ranks to the state the
uninterrupted run saved, and trains on; the stability guard skips NaN steps and rolls back after
K in a row, in fp16 too, and the rollback's LR cut survives a restart."""

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
from distributed_utils import run_distributed
from seer.config import load_config
from seer.engine.checkpoint import load_model_weights, resolve_checkpoint
from seer.engine.optim import build_schedule
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


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def events(run_dir):
    rows = metrics(run_dir)
    return [r["event"] for r in rows if "event" in r], [r["step"] for r in rows if "loss" in r]


def metric_rows(run_dir):
    """The last logged row of each step (a step redone after a rollback is logged again)."""
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r}


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


def torchrun(world, overrides):
    proc = subprocess.run(torchrun_command(world, QUICKSTART, overrides), capture_output=True, text=True, cwd=REPO,
                          env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def crashed_after(run_dir, copy, step):
    """A copy of ``run_dir`` as a crash right after checkpoint ``step`` would have left it."""
    shutil.copytree(run_dir, copy)
    for later in (copy / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    kept = [row for row in metrics(copy) if row["step"] <= step]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
    return copy


def _load_with_engine(rank, world, checkpoint, overrides):
    """The model and optimizer state a resume on ``world`` ranks starts from, gathered whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from seer.engine.checkpoint import load_extra, load_model_and_optimizer
    from seer.engine.distributed import DistInfo
    from seer.engine.optim import build_optimizer
    from seer.engine.parallel import parallelize, unwrap

    cfg = load_config(QUICKSTART, overrides)
    model, _ = parallelize(build_method(cfg), DistInfo(rank, world, 0, torch.device("cpu")), cfg.parallel)
    optimizer = build_optimizer(unwrap(model), cfg.optim, cfg.train.batch_size * world)
    load_model_and_optimizer(checkpoint, model, optimizer)
    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return (load_extra(checkpoint, 0)["step"], model_state, optim_state["state"]) if rank == 0 else None


@pytest.mark.slow
def test_two_rank_run_resumes_like_an_uninterrupted_one_and_on_one_and_four(tmp_path, shard_dir):
    common = {"checkpoint.every_steps": 2, "train.deterministic": True}
    straight = tmp_path / "straight"
    torchrun(2, tiny_overrides(shard_dir, straight, **common, **{"train.max_steps": 4}))

    # same world size: after a crash at step 2, the resumed run ends where the uninterrupted one did
    resumed = crashed_after(straight, tmp_path / "resumed", 2)
    overrides = tiny_overrides(shard_dir, resumed, **common, **{"train.max_steps": 4})
    assert "at step 2" in torchrun(2, overrides).stderr
    a, b = weights(straight, overrides), weights(resumed, overrides)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [metric_rows(resumed)[s]["loss"] for s in (3, 4)] == [metric_rows(straight)[s]["loss"] for s in (3, 4)]

    # another world size: the state loaded into 1 or 4 ranks is the uninterrupted run's at step 2
    checkpoint = straight / "checkpoints" / "step_00000002"
    saved = weights(checkpoint, overrides)
    loaded = {1: _load_with_engine(0, 1, checkpoint, overrides),  # one process: no process group
              4: run_distributed(_load_with_engine, 4, checkpoint, overrides, timeout=300)[0]}
    assert loaded[1][0] == loaded[4][0] == 2
    for world, (_, model_state, optim_state) in loaded.items():
        assert model_state.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(model_state[key], value), (world, key)
    assert loaded[1][2].keys() == loaded[4][2].keys() and len(loaded[1][2]) > 10
    for fqn, entries in loaded[1][2].items():
        for name, value in entries.items():
            assert torch.equal(loaded[4][2][fqn][name], value), (fqn, name)
    # ... and training goes on from there, end to end
    for world in (1, 4):
        run = crashed_after(straight, tmp_path / f"on{world}", 2)
        run_overrides = tiny_overrides(shard_dir, run, **{"train.max_steps": 3})
        proc = pretrain(run_overrides) if world == 1 else torchrun(world, run_overrides)
        assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
        assert sorted(metric_rows(run)) == [1, 2, 3] and (run / "checkpoints" / "step_00000003").is_dir()


@pytest.mark.slow
def test_fp16_rollback_lr_cut_survives_a_restart(tmp_path, shard_dir):
    """Regression: fp16 crashed at the first rollback ("unscale_() has already been called"),
    and a restart from the checkpoint rolled back to resumed without the LR cut."""
    run = tmp_path / "run"
    overrides = tiny_overrides(shard_dir, run, **{
        "train.precision": "fp16", "train.max_steps": 5, "checkpoint.every_steps": 2, "checkpoint.keep_last": 5,
        "train.inject_nan_steps": "[3]", "guard.max_bad_steps": 1,
    })
    pretrain(overrides)
    messages, _ = events(run)
    assert any("rolled back to step_00000002; LR now x0.5" in m for m in messages)
    rows = metric_rows(run)
    assert sorted(rows) == [1, 2, 3, 4, 5]
    cfg = load_config(QUICKSTART, overrides)
    schedule = build_schedule(cfg.schedule, cfg.optim, cfg.train.batch_size, cfg.train.max_steps)
    for step in (3, 4, 5):  # the row of step s logs the LR of the update from s - 1
        assert rows[step]["lr"] == pytest.approx(0.5 * schedule.lr(step - 1), rel=1e-9)
    # a crash before the next checkpoint: the restart from step 2 keeps the cut
    restarted = crashed_after(run, tmp_path / "restarted", 2)
    proc = pretrain(tiny_overrides(shard_dir, restarted, **{"train.precision": "fp16", "train.max_steps": 5}))
    assert "at step 2" in proc.stderr
    again = metric_rows(restarted)
    assert [again[s]["lr"] for s in (3, 4, 5)] == pytest.approx([rows[s]["lr"] for s in (3, 4, 5)], rel=1e-9)


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
