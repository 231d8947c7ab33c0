"""`seer launch`: submit ``seer pretrain`` as a Slurm job through submitit (or run the same job
with submitit's local executor), with a config snapshot and a job folder to watch.

One task per GPU (``--tasks-per-node`` defaults to ``--gpus-per-node``; on CPU nodes say how
many). The job asks for submitit's warning signal ``--signal-delay`` seconds before its time
limit; ``cluster.job`` turns it into "save and requeue". The job is submitted with ``--requeue``:
after a failure ``cluster.restart`` requeues it (up to ``--max-restarts`` times without progress),
and Slurm may requeue it after a node failure. ``--dry-run`` prints the sbatch script
submitit would submit (built by submitit's own function) and the resolved config, and needs no
Slurm. Errors (no Slurm, a partition Slurm rejects, a bad config) are one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.jobfolder import JobFolder
from data_pipeline.storage import atomic_write_bytes


class LaunchError(ValueError):
    """A launch that cannot go ahead, with a one-line reason."""


@dataclass
class Layout:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU, else 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    time_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # the warning signal's lead: the step in progress + a synchronous save of the SEER preset's 11.5 GB
    # checkpoint at the slowest write rate measured (0.13 GB/s: ~90 s) + slack (benchmarks/checkpoint_save.py)
    signal_delay_s: int = 180
    max_requeues: int = 20  # requeues on the warning signal (time limit, preemption) or by Slurm
    max_restarts: int = 3  # restarts after a failure without progress (the same newest checkpoint)

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    def check(self) -> None:
        for name in ("nodes", "time_min"):
            if getattr(self, name) < 1:
                raise LaunchError(f"--{name.replace('_min', '').replace('_', '-')} must be >= 1")
        if self.gpus_per_node < 0 or self.tasks < 1 or self.max_requeues < 0 or self.max_restarts < 0:
            raise LaunchError("--gpus-per-node, --tasks-per-node, --max-requeues and --max-restarts must not be negative")
        if not 0 < self.signal_delay_s < self.time_min * 60:
            raise LaunchError(f"--signal-delay {self.signal_delay_s} s must be > 0 and shorter than --time "
                              f"{self.time_min} min, or the warning comes before the job starts")
        if self.gpus_per_node and self.tasks != self.gpus_per_node:
            raise LaunchError(f"one task per GPU: --tasks-per-node {self.tasks} with --gpus-per-node {self.gpus_per_node}")


def slurm_parameters(layout: Layout, job_name: str) -> dict:
    """``SlurmExecutor.update_parameters`` keywords (Slurm's names, as submitit takes them)."""
    params = {
        "job_name": job_name,
        "nodes": layout.nodes,
        "ntasks_per_node": layout.tasks,
        "time": layout.time_min,
        "signal_delay_s": layout.signal_delay_s,
        "additional_parameters": {"requeue": True},  # Slurm may requeue it (failure restarts, node failure)
    }
    optional = {
        "gpus_per_node": layout.gpus_per_node or None,
        "cpus_per_task": layout.cpus_per_task,
        "mem": None if layout.mem_gb is None else f"{int(layout.mem_gb * 1024)}MB",
        "partition": layout.partition,
        "account": layout.account,
        "qos": layout.qos,
        "constraint": layout.constraint,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def local_parameters(layout: Layout) -> dict:
    if layout.nodes != 1:
        raise LaunchError("--local runs on this machine: --nodes must be 1")
    return {
        "tasks_per_node": layout.tasks,
        "gpus_per_node": layout.gpus_per_node,
        "timeout_min": layout.time_min,
        "signal_delay_s": layout.signal_delay_s,
    }


def submitit_command(folder: Path) -> str:
    """What every task runs (submitit's own entry point, as its executors write it)."""
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def sbatch_script(layout: Layout, folder: Path, job_name: str) -> str:
    from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor submits

    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **slurm_parameters(layout, job_name))


def resolve(config: str, overrides: list[str], folder: str | None):
    """The config with absolute run/data paths, its YAML, and the job folder."""
    from seer.config import load_config, to_yaml

    cfg = load_config(config, overrides)
    absolute = [f"run.dir={Path(cfg.run.dir).absolute()}"]
    if cfg.data.shards and "://" not in cfg.data.shards:  # an s3:// prefix stays as it is
        absolute.append(f"data.shards={Path(cfg.data.shards).absolute()}")
    cfg = load_config(config, [*overrides, *absolute])
    job_folder = Path(folder).absolute() if folder else Path(cfg.run.dir) / "job"
    return cfg, to_yaml(cfg), job_folder


def _sbatch_error(err: Exception) -> str:
    """The line sbatch said, out of submitit's multi-line FailedJobError."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if re.match(r"\s*(sbatch: error:|srun: error:)", line)]
    specific = [line for line in lines if "Batch job submission failed" not in line]
    return (specific or lines or [text.strip().splitlines()[-1] if text.strip() else type(err).__name__])[-1]


def _refuse_second_job(jobs: JobFolder) -> None:
    """Two jobs training one run folder would overwrite each other's checkpoints."""
    from cluster.status import job_status

    try:
        status = job_status(jobs.path)
    except FileNotFoundError:
        return
    if status["state"] in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED"):
        raise LaunchError(f"job {status['job_id']} of this job folder is {status['state']}; "
                          f"cancel it (scancel {status['job_id']}) or use another run.dir/--folder")


def launch(config: str, overrides: list[str], layout: Layout, *, local: bool = False, dry_run: bool = False,
           folder: str | None = None) -> dict:
    """Submit (or, with ``dry_run``, describe) the job. Returns what `seer launch --json` prints."""
    import submitit

    from cluster.job import PretrainJob

    layout.check()
    cfg, config_yaml, job_folder = resolve(config, overrides, folder)
    job_name = f"seer-{Path(cfg.run.dir).name}"
    info = {
        "executor": "local" if local else "slurm",
        "folder": str(job_folder),
        "run_dir": cfg.run.dir,
        "max_steps": cfg.train.max_steps,
        "layout": asdict(layout) | {"tasks_per_node": layout.tasks},
    }
    if dry_run:
        if local:
            info["command"] = submitit_command(job_folder)
            info["parameters"] = local_parameters(layout)
        else:
            info["sbatch"] = sbatch_script(layout, job_folder, job_name)
        return info | {"config": config_yaml}
    if not local and shutil.which("sbatch") is None:
        raise LaunchError("Slurm not found on this machine (no sbatch on PATH); use --local to run here, or --dry-run")
    if not cfg.data.shards:
        raise LaunchError("data.shards is not set: point it at a folder made by `seer ingest`")

    jobs = JobFolder(job_folder)
    _refuse_second_job(jobs)
    jobs.path.mkdir(parents=True, exist_ok=True)
    before = set(jobs.path.iterdir())
    history_before = jobs.history_path.read_bytes() if jobs.history_path.is_file() else None
    jobs.write_config(config_yaml)
    jobs.record("submitted", executor=info["executor"])  # before the job can record its start
    if local:
        executor = submitit.LocalExecutor(folder=jobs.path, max_num_timeout=layout.max_requeues)
        executor.update_parameters(**local_parameters(layout))
    else:
        executor = submitit.SlurmExecutor(folder=jobs.path, max_num_timeout=layout.max_requeues)
        executor.update_parameters(**slurm_parameters(layout, job_name))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; the error says it
            job = executor.submit(PretrainJob(jobs.path, layout.max_requeues, layout.max_restarts))
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as err:
        for leftover in set(jobs.path.iterdir()) - before:  # submitit's pickles of the refused job
            leftover.unlink()
        if history_before is not None:
            atomic_write_bytes(jobs.history_path, history_before)
        raise LaunchError(f"Slurm refused the job: {_sbatch_error(err)}") from None
    info.update(job_id=str(job.job_id), submitted=time.time())
    jobs.write_launch(info)
    info["job"] = job  # the submitit handle (the CLI waits on it with --local); not in the JSON
    return info


def describe(info: dict) -> str:
    """The human-readable lines `seer launch` prints."""
    if "sbatch" in info or "command" in info:
        head = info.get("sbatch") or f"# local executor: {info['command']}\n# {json.dumps(info['parameters'])}\n"
        return f"{head}\n# resolved config ({info['run_dir']})\n{info['config']}"
    layout = info["layout"]
    return (
        f"submitted job {info['job_id']} ({info['executor']}, {layout['nodes']} node(s) x {layout['tasks_per_node']} task(s))\n"
        f"job folder: {info['folder']}\nrun folder: {info['run_dir']}\n"
        f"watch it:   seer status {info['folder']}"
    )
