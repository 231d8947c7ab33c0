"""Failure handling in pieces, without Slurm (tests/test_failures.py runs it whole on Slurm):

- checkpoints: what "complete" means, the fallback from a damaged newest checkpoint to the one
  before, a save that cannot be written (a real write error: RLIMIT_FSIZE on one of 2 gloo ranks)
  failing on every rank with one line and leaving the previous checkpoint and ``latest``;
- the restart decision, the time lost, the job folder's counts;
- the watchdog: who is blamed from heartbeat files (a process gone, a stopped/silent one, a
  published failure, one busy outside any collective), and two real processes where one hangs
  outside any collective: both end within the timeout, naming it.
"""

import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from cluster.jobfolder import JobFolder
from cluster.restart import decide_restart, time_lost
from conftest import REPO
from distributed_utils import free_port, run_distributed
from seer.engine.checkpoint import Checkpointer, CheckpointSaveError, latest_checkpoint, load_model_weights
from seer.engine.checkpoint_files import MANIFEST, checkpoint_problem
from seer.engine.heartbeat import FAILURE, heartbeat_path, heartbeat_record, write_json
from seer.engine.watchdog import RankFailure, Watchdog, is_comm_error


def _checkpointer(folder, rank=0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    return Checkpointer(folder, rank=rank, keep_last=3, model=model, optimizer=optimizer), model


@pytest.fixture
def three_checkpoints(tmp_path):
    checkpointer, model = _checkpointer(tmp_path / "checkpoints")
    for step in (1, 2, 3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        checkpointer.save(step)
    return tmp_path / "checkpoints"


def test_complete_checkpoints_have_a_manifest_of_every_file(three_checkpoints):
    newest = three_checkpoints / "step_00000003"
    files = json.loads((newest / MANIFEST).read_text())["files"]
    assert {".metadata", "__0_0.distcp", "extra_rank0.pt"} <= set(files)
    assert all((newest / name).stat().st_size == size for name, size in files.items())
    assert latest_checkpoint(three_checkpoints) == newest and checkpoint_problem(newest) is None


@pytest.mark.parametrize("damage, problem", [
    ("truncate __0_0.distcp", "__0_0.distcp has"),
    ("remove __0_0.distcp", "__0_0.distcp is missing"),
    ("remove extra_rank0.pt", "extra_rank0.pt is missing"),
    ("truncate .metadata", ".metadata has"),
    ("truncate manifest.json", "manifest.json is unreadable"),
    ("remove the folder", "the folder is missing"),
])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(three_checkpoints, caplog, damage, problem):
    newest = three_checkpoints / "step_00000003"
    verb, name = damage.split(" ", 1)
    if name == "the folder":
        subprocess.run(["rm", "-r", str(newest)], check=True)
    elif verb == "remove":
        (newest / name).unlink()
    else:
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        found = latest_checkpoint(three_checkpoints)
    assert found == three_checkpoints / "step_00000002"
    assert f"checkpoint step_00000003 is damaged ({problem}" in caplog.text and "resuming from step_00000002" in caplog.text
    # the weights come back from the one before
    _, model = _checkpointer(three_checkpoints.parent / "other")
    assert load_model_weights(found, model)["step"] == 2


def test_checkpoints_without_a_manifest_are_checked_against_their_metadata(three_checkpoints):
    for step in (2, 3):
        (three_checkpoints / f"step_{step:08d}" / MANIFEST).unlink()
    assert checkpoint_problem(three_checkpoints / "step_00000003") is None
    shard = three_checkpoints / "step_00000003" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert "at least" in checkpoint_problem(three_checkpoints / "step_00000003")
    (three_checkpoints / "step_00000002" / ".metadata").write_bytes(b"not a pickle")
    assert ".metadata is unreadable" in checkpoint_problem(three_checkpoints / "step_00000002")
    assert latest_checkpoint(three_checkpoints) == three_checkpoints / "step_00000001"


def test_no_complete_checkpoint_at_all_is_an_error_not_a_fresh_start(three_checkpoints):
    for step in (1, 2, 3):
        (three_checkpoints / f"step_{step:08d}" / "extra_rank0.pt").unlink()
    with pytest.raises(FileNotFoundError, match="names step_00000003, which is not a complete checkpoint"):
        latest_checkpoint(three_checkpoints)


def _save_with_write_limits(rank, world_size, folder):
    """Two gloo ranks save step 1; then rank 1 alone cannot write more than 1 KB (its extras file),
    then 50 KB (its DCP shard) per file (RLIMIT_FSIZE: a real EFBIG from the kernel) while they
    save steps 2 and 3; then it can again, and step 4 is saved."""
    checkpointer, _ = _checkpointer(folder, rank)
    checkpointer.save(1)
    outcomes = []
    for step, limit in ((2, 1_000), (3, 50_000), (4, resource.RLIM_INFINITY)):
        if rank == 1:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            checkpointer.save(step)
            outcomes.append("saved")
        except CheckpointSaveError as err:
            outcomes.append(str(err))
        outcomes.append(sorted(p.name for p in folder.iterdir()))
    return outcomes


@pytest.mark.slow
def test_a_save_that_cannot_be_written_fails_on_every_rank_and_keeps_the_previous_one(tmp_path):
    folder = tmp_path / "checkpoints"
    rank0, rank1 = run_distributed(_save_with_write_limits, 2, folder, timeout=240)
    same = [re.sub(r"\(\S+ MiB free there\)", "", line) for line in rank0[0::2]]  # others write to this disk too
    assert same == [re.sub(r"\(\S+ MiB free there\)", "", line) for line in rank1[0::2]], (rank0, rank1)
    for step, (error, left) in zip((2, 3), (rank0[0:2], rank0[2:4])):
        # the kernel's EFBIG, as the writer met it (an OSError, or torch.save's zip writer's RuntimeError)
        assert "\n" not in error and error.startswith(f"checkpoint step_{step:08d} not saved: "), error
        assert ("File too large" in error or "unexpected pos" in error) and "(rank 1)" in error, error
        assert error.endswith("free there); step_00000001 is still the latest"), error
        assert left == ["latest", "step_00000001"]  # rank 0 removed the partial folder; latest unchanged
    assert rank0[4:] == ["saved", ["latest", "step_00000001", "step_00000004"]]  # with room again, saves go on
    assert (folder / "latest").read_text() == "step_00000004" and checkpoint_problem(folder / "step_00000001") is None


# --------------------------------------------------------------------------- restart decisions


def _failed(checkpoint, t=0.0):
    return {"event": "failed", "checkpoint": checkpoint, "time": t}


def test_restart_decisions():
    decide = decide_restart
    assert decide([_failed(None)], kind="crash", checkpoint_step=None, max_restarts=3).reason.startswith(
        "not restarted: it failed before the first checkpoint")
    assert not decide([_failed(5)], kind="error", checkpoint_step=5, max_restarts=3).restart
    assert not decide([_failed(5)], kind="peer", checkpoint_step=5, max_restarts=3, executor="local").restart
    first = decide([_failed(5)], kind="peer", checkpoint_step=5, max_restarts=3)
    assert first.restart and first.reason == "restart 1 of 3 from the checkpoint of step 5"
    # failures with progress in between do not add up; without progress they do
    history = [_failed(5), _failed(5), _failed(10), _failed(10), _failed(10)]
    assert decide(history, kind="crash", checkpoint_step=10, max_restarts=3).restart
    stop = decide([*history, _failed(10)], kind="crash", checkpoint_step=10, max_restarts=3)
    assert not stop.restart and stop.reason == ("gave up: 4 failures since the checkpoint of step 10, "
                                                "more than --max-restarts 3")
    assert not decide([_failed(5)], kind="crash", checkpoint_step=5, max_restarts=0).restart


def test_time_lost_is_measured_on_the_runs_progress():
    progress = [(0, 1), (10, 2), (20, 3), (30, 4),  # failure at t=35 after step 4
                (100, 3), (110, 4), (120, 5)]  # restarted from step 2: back at step 4 at t=110
    assert time_lost([_failed(2, 35)], progress) == 80  # 110 - 30
    # a second failure while still catching up is not counted twice
    progress2 = [(0, 1), (10, 2), (20, 3), (30, 4), (100, 3), (200, 3), (210, 4)]
    assert time_lost([_failed(2, 35), _failed(2, 105)], progress2) == 180  # 210 - 30
    assert time_lost([_failed(2, 35)], progress[:4], now=50) == 20  # not back yet: until now


def test_job_folder_counts_restarts_apart_from_requeues(tmp_path):
    folder = JobFolder(tmp_path)
    for event in ("submitted", "start", "stop", "requeue", "start", "failed", "restart", "start"):
        folder.record(event)
    assert folder.requeues() == 1 and folder.restarts() == 1
    assert folder.claim("failure-7-2") and not folder.claim("failure-7-2") and folder.claim("failure-7-3")


# --------------------------------------------------------------------------- the watchdog


def _watchdog(run_dir, rank=0, world=3, timeout=20.0):
    return Watchdog(run_dir, rank=rank, world_size=world, local_rank=rank, local_world_size=world, token="T",
                    timeout_s=timeout, slow_timeout_s=100.0)


def _beat(run_dir, rank, pid=None, age=0.0, step=4, state="running", waiting=True):
    record = heartbeat_record("T", rank, step, "train", state) | {"time": time.time() - age, "waiting": waiting}
    if pid is not None:
        record["pid"] = pid
    heartbeat_path(run_dir, rank).parent.mkdir(parents=True, exist_ok=True)
    write_json(heartbeat_path(run_dir, rank), record)


def test_the_watchdog_blames_a_gone_or_silent_rank_or_the_published_failure(tmp_path):
    watch = _watchdog(tmp_path)
    watch.step = 6
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _beat(tmp_path, 0)
    _beat(tmp_path, 1)
    _beat(tmp_path, 2, pid=gone.pid)
    failure = watch.diagnose(RuntimeError("[pair.cc:545] Read error [127.0.0.1]:24457: Connection reset by peer"))
    assert failure.line == ("rank 2 at step 6: its process ended without a word (killed, or crashed in native code) "
                            "(detected by rank 0)")
    assert watch.check().rank == 2  # the thread's own check finds it too (rank 2 is on this node)
    _beat(tmp_path, 2, age=30.0, step=5)
    assert watch.check().reason == "stopped responding: no heartbeat for 30 s"
    write_json(tmp_path / "heartbeats" / FAILURE, {"token": "T", **RankFailure(1, 3, "failed: boom", kind="crash",
                                                                                  detected_by=1).to_dict()})
    assert watch.check().line == "rank 1 at step 3: failed: boom"
    os.unlink(tmp_path / "heartbeats" / FAILURE)
    # an exception of this rank's own, with every peer fine: this rank is the one that failed
    _beat(tmp_path, 2)
    own = watch.diagnose(ValueError("cannot resume from step_00000002: it does not match"))
    assert own.rank == 0 and own.kind == "error" and own.line.startswith("rank 0 at step 6: failed: ValueError")


def test_the_watchdog_blames_the_rank_busy_outside_any_collective(tmp_path):
    watch = _watchdog(tmp_path, timeout=0.5)
    watch.step, watch._slow_depth = 9, 0
    watch._progress = time.monotonic() - 5
    _beat(tmp_path, 0, waiting=True)
    _beat(tmp_path, 1, waiting=False)
    _beat(tmp_path, 2, waiting=True)
    failure = watch.check()
    assert failure.rank == 1 and failure.kind == "hang"
    assert "made no progress, busy outside any collective" in failure.reason and "no step completed for 5 s" in failure.reason
    _beat(tmp_path, 1, waiting=True)  # everyone waits: no one is singled out, the step is still named
    assert watch.check().line.startswith("no rank singled out at step 9: no step completed for")


def test_failure_timeouts_are_checked():
    from seer.config import ConfigError, load_config

    quickstart = str(REPO / "configs" / "quickstart.yaml")
    assert load_config(quickstart).train.failure_timeout_s == 120.0
    for bad in ("train.failure_timeout_s=0", "train.slow_timeout_s=60"):
        with pytest.raises(ConfigError, match="'train.failure_timeout_s' .* must be > 0, the first <= the second"):
            load_config(quickstart, [bad])


def test_collective_errors_are_recognised():
    assert is_comm_error(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer"))
    assert is_comm_error(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"))
    assert not is_comm_error(RuntimeError("injected crash after step 7 (train.inject_crash_step)"))


_HANG = r"""
import os, sys, time, torch, torch.distributed as dist
from pathlib import Path
from seer.engine import watchdog
from seer.engine.distributed import DistInfo, init_distributed
info = init_distributed("cpu", timeout_s=120)
watchdog.start(Path(sys.argv[1]), DistInfo(info.rank, 2, info.rank, info.device), timeout_s=3, slow_timeout_s=60)
for step in range(1, 100):
    if info.rank == 1 and step == 3:
        time.sleep(600)  # stuck outside any collective
    dist.all_reduce(torch.ones(1))
    watchdog.at_step(step)
"""


@pytest.mark.slow
def test_a_rank_stuck_outside_any_collective_ends_both_ranks_within_the_timeout(tmp_path):
    port = free_port()
    procs, started = [], time.monotonic()
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", _HANG, str(tmp_path)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=90)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - started < 60
    assert [p.returncode for p in procs] == [3, 3], outs
    for err in outs:
        lines = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(lines) == 1 and "rank 1 at step 2: made no progress, busy outside any collective" in lines[0], err
