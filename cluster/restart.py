"""After a failure: whether the job starts again, how, and what the failures cost.

The engine ends every rank of a failed run with one :class:`~seer.engine.watchdog.RankFailure`
(rank, step, reason, kind); ``cluster.job`` hands it here on the first rank to claim it, which
records ``failed`` in the job's history and then either ``restart`` (and requeues the job with
``scontrol requeue``: it resumes from the newest complete checkpoint) or ``gave_up`` (and ends it).

:func:`decide_restart` says no when

- the failure is an input error (``kind == "error"``: a bad config, a checkpoint of another
  model, no complete checkpoint): the same would happen again;
- there is no checkpoint yet: nothing to resume from (a restart would start over and most likely
  fail the same way; fix the cause and launch again);
- the run failed more than ``--max-restarts`` times since its newest checkpoint was written
  (no progress between restarts: the same newest checkpoint each time);
- the job is not a Slurm job (``--local``: nothing to requeue it).

:func:`time_lost` is what the failures cost, measured on the run's own progress: for each failure,
the wall time from the last step logged before it to the moment the restarted run logged that
step again (detection, Slurm's requeue hold, start-up, and the steps redone since the checkpoint),
or until now while it has not yet.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    restart: bool
    reason: str


def decide_restart(events: list[dict], *, kind: str, checkpoint_step: int | None, max_restarts: int,
                   executor: str = "slurm") -> Decision:
    """Restart or not after the failure just recorded (the last ``failed`` row of ``events``,
    the current submission's history)."""
    if kind == "error":
        return Decision(False, "not restarted: an input error, the same again on a restart (fix it and launch again)")
    if checkpoint_step is None:
        return Decision(False, "not restarted: it failed before the first checkpoint, nothing to resume from "
                               "(fix the cause and launch again)")
    if executor != "slurm":
        return Decision(False, "not restarted: only Slurm jobs restart by themselves (--local does not)")
    failures = sum(1 for row in events if row.get("event") == "failed" and row.get("checkpoint") == checkpoint_step)
    if failures > max_restarts:
        return Decision(False, f"gave up: {failures} failures since the checkpoint of step {checkpoint_step}, "
                               f"more than --max-restarts {max_restarts}")
    return Decision(True, f"restart {failures} of {max_restarts} from the checkpoint of step {checkpoint_step}")


def requeue(job_id: str) -> None:
    """Put the job back in the queue (Slurm stops its tasks, holds it ~2 minutes, starts it again)."""
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)


def end_job(job_id: str) -> None:
    """Stop what is left of a job that will not restart (a stopped or hung task would hold its
    nodes until the time limit)."""
    subprocess.run(["scancel", job_id], check=False, capture_output=True, text=True, timeout=60)


def time_lost(events: list[dict], progress: list[tuple[float, int]], now: float | None = None) -> float:
    """Seconds lost to the failures of ``events`` (history rows), measured on ``progress``
    ((time, step) of the run's logged steps, in order): see the module docstring."""
    now = time.time() if now is None else now
    spans = []
    for failure in (row for row in events if row.get("event") == "failed"):
        before = [(t, s) for t, s in progress if t <= failure["time"]]
        if not before:
            continue
        last_time, last_step = before[-1]
        back = next((t for t, s in progress if t > failure["time"] and s >= last_step), None)
        spans.append((last_time, back if back is not None else now))
    total, reached = 0.0, float("-inf")  # a failure while recovering from the one before: counted once
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return total
