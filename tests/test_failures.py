"""Failures on a real Slurm (cluster/local_slurm.sh), 2 CPU tasks, the tiny quickstart config,
``train.deterministic=true``, ``train.failure_timeout_s=20``:

- a task SIGKILLed mid-run: the other task ends within 150 s naming rank 1 and the step, the job
  restarts by itself; the newest checkpoint was truncated meanwhile, so it resumes from the one
  before (with a warning) and still ends bitwise equal to an uninterrupted run;
- a task SIGSTOPped (a hang): the same, within failure_timeout_s + 30 s;
- the checkpoint folder runs out of space during a save (a small tmpfs): the previous checkpoint
  and ``latest`` stay, one line says why, and the restart, with space again, resumes and ends;
- a task that crashes after the same step every time: the job stops after --max-restarts, with
  the reason in `seer status`, instead of looping.

Slurm holds a requeued job for about two minutes (Reason=BeginTime) before it may start again;
the tests let it start at once with `scontrol update StartTime=now` (changes only when). Skipped,
with the reason, where Slurm cannot start (not root, no apt, no daemons); the tmpfs case also
needs root for `mount`.
"""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from cluster.local import torchrun_command
from conftest import REPO, tiny_overrides
from seer.engine.checkpoint_files import checkpoint_problem
from test_slurm import QUICKSTART, ENV, TWO_TASKS, events, release_when_requeued, seer, slurm_state, starts, wait_for

COMMON = {"train.max_steps": 20, "checkpoint.every_steps": 5, "checkpoint.keep_last": 3,
          "train.deterministic": True, "train.failure_timeout_s": 20}
ENDED = ("COMPLETED", "FAILED", "CANCELLED")


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0 and subprocess.run(["which", "sinfo"], capture_output=True).returncode != 0:
        pytest.skip("no Slurm here and not root: cluster/local_slurm.sh cannot start one")
    proc = subprocess.run(["bash", str(REPO / "cluster" / "local_slurm.sh")], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"Slurm cannot start here: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shard_dir):
    """The exported backbone of an uninterrupted 2-rank run of the same config."""
    run = tmp_path_factory.mktemp("reference") / "straight"
    proc = subprocess.run(torchrun_command(2, QUICKSTART, tiny_overrides(shard_dir, run, **COMMON)), cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exported(run)


def exported(run_dir):
    out = run_dir.parent / f"{run_dir.name}.safetensors"
    proc = seer("export", run_dir, "--out", out, "--num-classes", 0)
    assert proc.returncode == 0, proc.stderr
    return load_file(out)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


_launched: list[str] = []


@pytest.fixture(autouse=True)
def cancel_leftovers():
    """A test that fails midway leaves no job (or SIGSTOPped task) behind."""
    yield
    for job_id in _launched:
        if slurm_state(job_id)[0] not in (*ENDED, None):
            subprocess.run(["scancel", "--signal=KILL", job_id], check=False)
            subprocess.run(["scancel", job_id], check=False)
    _launched.clear()


def launch(shard_dir, run_dir, *args, **overrides):
    proc = seer("launch", QUICKSTART, *tiny_overrides(shard_dir, run_dir, **{**COMMON, **overrides}), *TWO_TASKS,
                *args, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _launched.append(json.loads(proc.stdout)["job_id"])
    return _launched[-1]


def latest_step(run_dir):
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip()[5:]) if latest.is_file() else 0


def heartbeat(run_dir, rank):
    return json.loads((run_dir / "heartbeats" / f"rank{rank}.json").read_text())


def task_pid(run_dir, rank, job_id):
    """The training process of task ``rank`` of this start of the job (from its heartbeat)."""
    def current():
        try:
            beat = heartbeat(run_dir, rank)
        except (OSError, ValueError):
            return None
        return beat["pid"] if beat["state"] == "running" and beat["step"] else None
    return wait_for(current, f"rank {rank}'s heartbeat of job {job_id}")


def failed_after(folder, count):
    return wait_for(lambda: [r for r in events(folder) if r["event"] == "failed"][count - 1:count], "a failure",
                    timeout=200)[0]


def status(folder):
    return json.loads(seer("status", folder, "--json").stdout)


def wait_until_ended(job_id, timeout=300):
    wait_for(lambda: slurm_state(job_id)[0] in ENDED, f"job {job_id} to end", timeout=timeout)


@pytest.mark.slow
def test_killed_task_restarts_from_the_newest_complete_checkpoint(slurm, reference, tmp_path, shard_dir):
    run_dir = tmp_path / "killed"
    folder = run_dir / "job"
    job_id = launch(shard_dir, run_dir)
    wait_for(lambda: latest_step(run_dir) >= 10, "the checkpoint of step 10", timeout=300)
    pid = task_pid(run_dir, 1, job_id)
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    failure = failed_after(folder, 1)
    print(f"kill -9: the failure was recorded {failure['time'] - killed:.1f} s later")  # shown with -s
    assert failure["time"] - killed < 150 and failure["rank"] == 1 and failure["kind"] == "peer", failure
    assert any(r["event"] == "restart" for r in events(folder))
    line = next(line for line in (folder / f"{job_id}_0_log.err").read_text().splitlines() if "ERROR" in line)
    assert f"rank 1 at step {failure['step']}" in line and "detected by rank 0" in line, line

    # the newest checkpoint is damaged meanwhile (a shard cut short): the restart takes the one before
    newest = run_dir / "checkpoints" / f"step_{latest_step(run_dir):08d}"
    shard = newest / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert "__1_0.distcp has" in checkpoint_problem(newest)
    release_when_requeued(job_id)
    second = wait_for(lambda: starts(folder)[1:2], "the restarted job")[0]
    assert second["resume_step"] == latest_step(run_dir) - 5
    wait_until_ended(job_id)
    log = (folder / f"{job_id}_0_log.err").read_text()
    assert f"checkpoint {newest.name} is damaged (__1_0.distcp has" in log
    resumed = run_dir / "checkpoints" / f"step_{second['resume_step']:08d}"
    assert f"resumed from {resumed}" in log
    final = status(folder)
    assert final["state"] == "COMPLETED" and final["step"] == 20 and final["restarts"] == 1, final
    assert final["last_failure"]["rank"] == 1 and final["time_lost_s"] > 0
    assert_same_weights(reference, exported(run_dir))


@pytest.mark.slow
def test_stopped_task_is_found_within_the_timeout_and_the_job_comes_back(slurm, reference, tmp_path, shard_dir):
    run_dir = tmp_path / "stopped"
    folder = run_dir / "job"
    job_id = launch(shard_dir, run_dir)
    wait_for(lambda: latest_step(run_dir) >= 10, "the checkpoint of step 10", timeout=300)
    pid = task_pid(run_dir, 1, job_id)
    stopped = time.time()
    os.kill(pid, signal.SIGSTOP)
    failure = failed_after(folder, 1)
    print(f"kill -STOP: the failure was recorded {failure['time'] - stopped:.1f} s later")  # shown with -s
    assert failure["time"] - stopped < COMMON["train.failure_timeout_s"] + 30, failure
    assert failure["rank"] == 1 and "stopped responding" in failure["reason"], failure
    release_when_requeued(job_id)
    wait_until_ended(job_id)
    final = status(folder)
    assert final["state"] == "COMPLETED" and final["step"] == 20 and final["restarts"] == 1, final
    assert "stopped responding" in final["last_failure"]["reason"]
    assert_same_weights(reference, exported(run_dir))


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs for the run's checkpoints (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "full" / "checkpoints"
    mount.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_keeps_the_previous_checkpoint_and_a_restart_with_space_resumes(slurm, small_disk, shard_dir):
    run_dir = small_disk.parent
    folder = run_dir / "job"
    job_id = launch(shard_dir, run_dir)
    wait_for(lambda: latest_step(run_dir) >= 10, "the checkpoint of step 10", timeout=300)
    free = os.statvfs(small_disk)
    filler = small_disk / "filler"
    with open(filler, "wb") as handle:  # leave 100 KB: less than one checkpoint
        handle.write(b"\0" * (free.f_bavail * free.f_frsize - 100_000))
    failure = failed_after(folder, 1)
    assert failure["kind"] == "checkpoint" and "No space left on device" in failure["reason"], failure
    kept = latest_step(run_dir)
    assert f"step_{kept:08d} is still the latest" in failure["reason"], failure
    assert checkpoint_problem(small_disk / f"step_{kept:08d}") is None  # the previous checkpoint is intact
    assert not list(small_disk.glob(".tmp-*"))  # the partial one is gone
    errors = [line for line in (folder / f"{job_id}_0_log.err").read_text().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "not saved: OSError: [Errno 28] No space left on device" in errors[0], errors
    filler.unlink()  # space again
    release_when_requeued(job_id)
    second = wait_for(lambda: starts(folder)[1:2], "the restarted job")[0]
    assert second["resume_step"] == kept
    wait_until_ended(job_id)
    final = status(folder)
    assert final["state"] == "COMPLETED" and final["step"] == 20 and final["restarts"] == 1, final


@pytest.mark.slow
def test_a_crash_after_the_same_step_every_time_stops_after_max_restarts(slurm, tmp_path, shard_dir):
    run_dir = tmp_path / "crashing"
    folder = run_dir / "job"
    job_id = launch(shard_dir, run_dir, "--max-restarts", 2,
                    **{"train.inject_crash_step": 7, "train.inject_crash_rank": 1})
    for attempt in (1, 2):
        failed_after(folder, attempt)
        release_when_requeued(job_id)
    failed_after(folder, 3)
    wait_until_ended(job_id)
    time.sleep(3)  # nothing requeues it again
    assert slurm_state(job_id)[0] in ENDED and len(starts(folder)) == 3
    final = status(folder)
    assert final["state"] == "FAILED" and final["restarts"] == 2, final
    assert final["last_failure"]["rank"] == 1 and final["last_failure"]["step"] == 7
    assert "injected crash" in final["last_failure"]["reason"]
    assert final["stopped_reason"] == "gave up: 3 failures since the checkpoint of step 5, more than --max-restarts 2"
    text = seer("status", folder).stdout
    assert "restarts: 2; last failure: rank 1 at step 7" in text and "stopped: gave up" in text
