"""`seer launch` without a Slurm: the sbatch script of --dry-run, the ranks and GPU a task of a
2-node x 4-task job gets from the environment Slurm gives it, one-line errors, the requeue bound,
and the same job run by submitit's local executor (2 real gloo ranks) watched with `seer status`."""

import json
import os
import subprocess
import sys

import pytest
import submitit

from cluster.job import PretrainJob, distributed_env
from cluster.jobfolder import JobFolder
from conftest import REPO, tiny_overrides
from seer.engine.distributed import cuda_index

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def seer(*args, env=ENV, timeout=300):
    return subprocess.run([sys.executable, "-m", "seer", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)


def one_line_error(proc, *words):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_dry_run_prints_the_sbatch_script_and_resolved_config(tmp_path):
    run_dir = tmp_path / "run"
    proc = seer("launch", QUICKSTART, f"run.dir={run_dir}", "train.max_steps=77", "--nodes", 2, "--gpus-per-node", 4,
                "--partition", "learn", "--time", 4320, "--cpus-per-task", 10, "--mem", 480, "--account", "vision",
                "--qos", "high", "--constraint", "volta32gb", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=learn", "#SBATCH --time=4320", "#SBATCH --cpus-per-task=10",
                 "#SBATCH --mem=491520MB", "#SBATCH --account=vision", "#SBATCH --qos=high",
                 "#SBATCH --constraint=volta32gb", "#SBATCH --signal=USR2@180", "#SBATCH --requeue", f"#SBATCH --output={run_dir}/job/%j_0_log.out"]:
        assert line in out, line
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "submitit.core._submit" in srun and "torchrun" not in srun and "torch.distributed.run" not in srun
    assert f"dir: {run_dir}" in out and "max_steps: 77" in out
    assert not run_dir.exists()  # nothing written, nothing submitted


def test_dry_run_json_and_layout_errors(tmp_path):
    proc = seer("launch", QUICKSTART, f"run.dir={tmp_path / 'r'}", "--tasks-per-node", 3, "--dry-run", "--json")
    info = json.loads(proc.stdout)
    assert info["folder"] == str(tmp_path / "r" / "job") and info["run_dir"] == str(tmp_path / "r")
    assert "#SBATCH --ntasks-per-node=3" in info["sbatch"] and "max_steps: 200" in info["config"]
    one_line_error(seer("launch", QUICKSTART, "--gpus-per-node", 8, "--tasks-per-node", 2, "--dry-run"), "one task per GPU")
    one_line_error(seer("launch", QUICKSTART, "--local", "--nodes", 2, "--dry-run"), "--nodes must be 1")


def test_missing_config_is_a_one_line_error(tmp_path):
    one_line_error(seer("launch", tmp_path / "nope.yaml"), "nope.yaml")


def test_machine_without_slurm_is_a_one_line_error(tmp_path, shard_dir):
    env = {**ENV, "PATH": os.path.dirname(sys.executable)}  # no sbatch on it
    proc = seer("launch", QUICKSTART, f"data.shards={shard_dir}", f"run.dir={tmp_path / 'r'}", env=env)
    one_line_error(proc, "Slurm not found", "--local")
    assert not (tmp_path / "r").exists()


def test_status_of_a_folder_that_is_no_job_is_a_one_line_error(tmp_path):
    one_line_error(seer("status", tmp_path), "launch.json")


def _slurm_task_env(monkeypatch, job_id, node, local_rank, nodes=2, per_node=4):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    values = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": job_id, "SLURM_NTASKS": nodes * per_node,
        "SLURM_JOB_NUM_NODES": nodes, "SLURM_NODEID": node, "SLURM_PROCID": node * per_node + local_rank,
        "SLURM_LOCALID": local_rank, "SLURM_JOB_NODELIST": "gpu-[017-018]",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, str(value))


def test_two_nodes_of_four_tasks_get_their_ranks_from_slurm(monkeypatch):
    seen = []
    for node in range(2):
        for local_rank in range(4):
            _slurm_task_env(monkeypatch, "123456", node, local_rank)
            env = distributed_env()
            seen.append(env)
            assert env["RANK"] == str(node * 4 + local_rank) and env["LOCAL_RANK"] == str(local_rank)
            assert env["WORLD_SIZE"] == "8" and env["LOCAL_WORLD_SIZE"] == "4"
            # GPU: the local rank's when the task sees the node's 4, the only one when Slurm bound one
            assert cuda_index(local_rank, 4) == local_rank and cuda_index(local_rank, 1) == 0
    assert {env["MASTER_ADDR"] for env in seen} == {"gpu-017"}  # the job's first node, on all 8
    assert len({env["MASTER_PORT"] for env in seen}) == 1 and 20000 <= int(seen[0]["MASTER_PORT"]) < 32768
    _slurm_task_env(monkeypatch, "123457", 0, 0)
    assert distributed_env()["MASTER_PORT"] != seen[0]["MASTER_PORT"]  # another job, another port
    # a requeued job (same id): another port, the same on every task, so the old socket cannot block it
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeued = set()
    for local_rank in range(4):
        _slurm_task_env(monkeypatch, "123456", 1, local_rank)
        requeued.add(distributed_env()["MASTER_PORT"])
    assert len(requeued) == 1 and requeued != {seen[0]["MASTER_PORT"]} and 20000 <= int(requeued.pop()) < 32768
    with pytest.raises(RuntimeError, match="sees only 4 GPUs"):
        cuda_index(5, 4)


def test_checkpoint_hook_requeues_until_max_requeues(tmp_path):
    folder = JobFolder(tmp_path)
    folder.record("submitted", job_id="1")
    folder.record("start")
    job = PretrainJob(tmp_path, max_requeues=1)
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function.max_requeues == 1
    folder.record("start")  # the requeued job started
    assert folder.requeues() == 1 and job.checkpoint() is None
    assert [row["event"] for row in folder.history()] == ["submitted", "start", "requeue", "start", "gave_up"]
    folder.record("submitted", job_id="2")  # a new launch of the same run starts a new count
    folder.record("start")
    assert folder.requeues() == 0


@pytest.mark.slow
def test_local_executor_runs_two_ranks_and_status_says_completed(tmp_path, shard_dir):
    run_dir = tmp_path / "local"
    proc = seer("launch", QUICKSTART, *tiny_overrides(shard_dir, run_dir, **{"train.max_steps": 3}),
                "--local", "--tasks-per-node", 2, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info, summary = (json.loads(line) for line in proc.stdout.strip().splitlines())
    assert info["folder"] == str(run_dir / "job") and summary["step"] == 3
    assert (run_dir / "job" / "config.yaml").is_file()
    logs = sorted(p.name for p in (run_dir / "job").glob("*_log.err"))
    assert logs == [f"{info['job_id']}_0_log.err", f"{info['job_id']}_1_log.err"]
    status = json.loads(seer("status", run_dir, "--json").stdout)
    assert status["state"] == "COMPLETED" and status["step"] == status["max_steps"] == 3
    assert status["requeues"] == 0 and status["last_checkpoint"].endswith("step_00000003")
