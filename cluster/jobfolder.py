"""A job folder: what `seer launch` writes for one job and what the job appends while it runs.

Layout (``<run.dir>/job/`` unless ``--folder`` says otherwise)::

    launch.json            job id, executor (slurm/local), run dir, layout, limits (atomic)
    config.yaml            the resolved config snapshot the job trains with
    history.jsonl          one JSON line per event: submitted, start, stop, requeue, finished,
                           failed (rank, step, reason, kind, checkpoint), restart, gave_up
                           (reason), terminated: the requeue and restart history
    .claim-<what>          empty files that make one rank the one to record a failure
    <job>_submission.sh    submitit's sbatch script, pickles and results
    <job>_<rank>_log.out   every rank's stdout / stderr (.err), appended across requeues

``requeues`` counts the starts after the latest ``submitted`` event, minus one and minus the
``restart`` events (a requeue by the warning signal, by ``scontrol requeue`` or by a node failure
all start the job again; a restart after a failure is counted apart), or the ``requeue`` events
of the signal path if there are more (a restart that failed before it started). ``restarts``
counts the ``restart`` events: requeues after a failure (``cluster.restart``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from data_pipeline.storage import atomic_write_bytes

LAUNCH = "launch.json"
CONFIG = "config.yaml"
HISTORY = "history.jsonl"


class JobFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()

    @classmethod
    def find(cls, path: str | Path) -> "JobFolder":
        """The job folder itself, or the run folder whose ``job/`` holds one."""
        path = Path(path)
        for candidate in (path, path / "job"):
            if (candidate / LAUNCH).is_file():
                return cls(candidate)
        raise FileNotFoundError(f"{path}: no {LAUNCH} here or in {path / 'job'} (not a job or run folder of `seer launch`)")

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def history_path(self) -> Path:
        return self.path / HISTORY

    def write_config(self, text: str) -> None:
        atomic_write_bytes(self.config, text.encode())

    def write_launch(self, info: dict) -> None:
        atomic_write_bytes(self.path / LAUNCH, (json.dumps(info, indent=1) + "\n").encode())

    def launch(self) -> dict:
        return json.loads((self.path / LAUNCH).read_text())

    def record(self, event: str, **fields) -> dict:
        """Append one event (a single ``write`` of one line in append mode)."""
        row = {"event": event, "time": time.time(), **fields}
        line = (json.dumps(row) + "\n").encode()
        fd = os.open(self.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return row

    def history(self) -> list[dict]:
        if not self.history_path.is_file():
            return []
        rows = []
        for line in self.history_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write: not an event
                continue
        return rows

    def current_submission(self) -> list[dict]:
        """The events since the latest ``submitted`` one (a relaunch starts a new count)."""
        rows = self.history()
        starts = [i for i, row in enumerate(rows) if row["event"] == "submitted"]
        return rows[starts[-1]:] if starts else rows

    def requeues(self) -> int:
        events = [row["event"] for row in self.current_submission()]
        return max(events.count("start") - 1 - events.count("restart"), events.count("requeue"), 0)

    def restarts(self) -> int:
        return [row["event"] for row in self.current_submission()].count("restart")

    def claim(self, what: str) -> bool:
        """True for the first caller only, across processes and hosts (an exclusive create of
        ``.claim-<what>`` in the job folder): e.g. which rank records a failure."""
        try:
            os.close(os.open(self.path / f".claim-{what}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return False
        return True

    def rank_logs(self) -> list[Path]:
        """Every rank's submitit stdout/stderr files, newest job id last."""
        return sorted(self.path.glob("*_log.err")) + sorted(self.path.glob("*_log.out"))
