"""`seer status`: where a launched job stands, from Slurm (when it can be asked), the job folder's
history and the run folder's metrics.

State is Slurm's word for the job (``scontrol show job``: PENDING, RUNNING, COMPLETED, FAILED,
...) while Slurm still knows it; otherwise it comes from the job's history (``COMPLETED`` after
a ``finished`` event, ``FAILED`` after ``failed``/``gave_up``, ``TERMINATED`` after a SIGTERM
(cancel, hard requeue), ``RUNNING`` while a local job's controller lives, else ``UNKNOWN``); a
job that gave up after a failure is ``FAILED`` even where Slurm says ``CANCELLED`` (it ended its
own leftovers). Failures: the restarts, the last failure (rank, step, reason) and the time they
cost (``cluster.restart.time_lost``), and why the job stopped when it gave up.
The training monitor's last health numbers and any collapse alarm come from metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from cluster.jobfolder import JobFolder

# what Python's traceback ends with (torch.distributed prefixes "[rank0]: ")
_EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]:\s*)?(\w+\.)*\w*(Error|Exception)\b")
_ERROR_LINE = re.compile(r"\bERROR\b|\berror:|\bCANCELLED\b")  # logs, srun, slurmstepd


def slurm_state(job_id: str) -> str | None:
    """The job's state as Slurm's controller reports it, or None (no Slurm, job forgotten)."""
    if shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\bJobState=(\S+)", out.stdout)
    return match.group(1) if out.returncode == 0 and match else None


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def _state_from_history(events: list[dict], launch: dict) -> str:
    last = next((row["event"] for row in reversed(events) if row["event"] != "submitted"), None)
    if last == "finished":
        return "COMPLETED"
    if last in ("failed", "gave_up"):
        return "FAILED"
    if last == "terminated":
        return "TERMINATED"
    if launch.get("executor") == "local" and _pid_alive(launch.get("job_id", "")):
        return "RUNNING"
    return "UNKNOWN"


def failures(events: list[dict], run_dir: Path) -> dict:
    """Restarts, the last failure, the time lost to failures, and why the job gave up (if it did)."""
    from cluster.restart import time_lost

    failed = [row for row in events if row["event"] == "failed"]
    progress = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row and "time" in row:
            progress.append((row["time"], row["step"]))
    last = failed[-1] if failed else None
    gave_up = events[-1].get("reason") if events and events[-1]["event"] == "gave_up" else None
    return {
        "restarts": sum(1 for row in events if row["event"] == "restart"),
        "last_failure": {k: last.get(k) for k in ("rank", "step", "reason", "kind", "detected_by", "time")} if last else None,
        "time_lost_s": round(time_lost(events, progress), 1) if failed else 0.0,
        "stopped_reason": gave_up,
    }


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    for line in reversed(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            return row
    return {}


def last_health(run_dir: Path) -> dict:
    """The training monitor's last numbers (``health/*`` without the prefix, and their step) and
    the last collapse alarm (``{"step", "message"}``) of the run's metrics, or empty/None."""
    path = run_dir / "metrics.jsonl"
    health, alarm = {}, None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if any(k.startswith("health/") for k in row):
                health = {"step": row["step"], **{k[7:]: v for k, v in row.items() if k.startswith("health/")}}
            if "collapse alarm" in str(row.get("event", "")):
                alarm = {"step": row["step"], "message": row["event"]}
    return {"health": health, "collapse_alarm": alarm}


def format_health(status: dict) -> str:
    """``health (step N): feature rank R (F of max), std ratio S, ...; collapse alarm: ...``."""
    h = status.get("health") or {}
    names = (("rank_fraction", "feature rank {rank:.1f} ({rank_fraction:.2f} of max)"), ("std_ratio", "std ratio {std_ratio:.2f}"),
             ("swav_prototypes_used", "prototypes used {swav_prototypes_used:.0f}"),
             ("mocov3_positive_similarity", "positive / negative cosine {mocov3_positive_similarity:.2f} / "
                                            "{mocov3_negative_similarity:.2f}"))
    shown = ", ".join(fmt.format(**h) for key, fmt in names if key in h)
    alarm = status.get("collapse_alarm")
    verdict = f"COLLAPSE ALARM at step {alarm['step']}" if alarm else "no collapse alarm"
    return f"health (step {h['step']}): {shown}; {verdict}" if h else f"health: not measured; {verdict}"


def last_error_line(logs: list[Path]) -> str | None:
    """The last error line of the most recently written log that has one, as ``file: line``: a
    Python exception's line when there is one (srun's "task exited" line says less)."""
    for path in sorted(logs, key=lambda p: p.stat().st_mtime, reverse=True):
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
        for pattern in (_EXCEPTION_LINE, _ERROR_LINE):
            found = [line for line in lines if pattern.search(line)]
            if found:
                return f"{path.name}: {found[-1]}"
    return None


def job_status(path: str | Path) -> dict:
    from seer.engine.checkpoint import latest_checkpoint

    folder = JobFolder.find(path)
    launch = folder.launch()
    run_dir = Path(launch["run_dir"])
    events = folder.current_submission()
    state = slurm_state(launch["job_id"]) if launch.get("executor") == "slurm" else None
    metrics = _last_metrics(run_dir)
    try:
        checkpoint = latest_checkpoint(run_dir / "checkpoints", warn=False)
    except FileNotFoundError:
        checkpoint = None
    logs = folder.rank_logs() + sorted((run_dir / "logs").glob("rank*.log"))
    return {
        "job_id": launch["job_id"],
        "executor": launch.get("executor"),
        "state": _state_from_history(events, launch) if state is None or (
            state in ("CANCELLED", "COMPLETING") and events and events[-1]["event"] == "gave_up") else state,
        "step": metrics.get("step", 0),
        "max_steps": launch["max_steps"],
        "loss": metrics.get("loss"),
        "images_per_s": metrics.get("images_per_s"),
        "last_checkpoint": str(checkpoint) if checkpoint else None,
        "requeues": folder.requeues(),
        **failures(events, run_dir),
        "history": [row["event"] for row in events],
        "last_error": last_error_line(logs),
        **last_health(run_dir),
        "folder": str(folder.path),
        "run_dir": str(run_dir),
    }


def format_failures(status: dict) -> str:
    """``restarts: N; last failure: rank R at step S: reason; time lost M min[; stopped: why]``."""
    last = status.get("last_failure")
    if not last:
        return f"restarts: {status.get('restarts', 0)}; no failure"
    who = f"rank {last['rank']}" if last.get("rank") is not None else "no rank singled out"
    line = (f"restarts: {status['restarts']}; last failure: {who} at step {last.get('step', '?')}: {last.get('reason')}; "
            f"time lost {status['time_lost_s'] / 60:.1f} min")
    return line + (f"; stopped: {status['stopped_reason']}" if status.get("stopped_reason") else "")


def format_status(status: dict) -> str:
    loss = "-" if status["loss"] is None else f"{status['loss']:.4f}"
    rate = "-" if status["images_per_s"] is None else f"{status['images_per_s']:.1f}"
    history = status["history"]
    shown = history if len(history) <= 8 else ["...", *history[-7:]]
    return "\n".join([
        f"job {status['job_id']} ({status['executor']}): {status['state']}",
        f"step {status['step']}/{status['max_steps']}, loss {loss}, {rate} images/s",
        f"last checkpoint: {status['last_checkpoint'] or 'none'}",
        f"requeues: {status['requeues']} ({' > '.join(shown) or 'no events'})",
        format_failures(status),
        f"last error: {status['last_error'] or 'none'}",
        format_health(status),
        f"job folder: {status['folder']}",
    ])
