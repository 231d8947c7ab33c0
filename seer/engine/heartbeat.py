"""Heartbeat files: what each rank of a run says about itself every few seconds, readable by the
other ranks (and by ``seer status``) without any collective and whichever process is dead.

Layout under ``run.dir/heartbeats/``::

    rank<r>.json     {token, rank, host, pidns, pid, time, step, phase, state, where, waiting}
    failure.json     the first failure of this session, as every rank will report it

``token`` names one session of the run (rank 0 draws it when the process group starts), so the
files of an earlier session (before a restart) are never mistaken for this one's. ``step`` is the
last completed step, ``phase`` what the rank does (``train``, or a slow phase: ``start``,
``checkpoint save``, ...), ``state`` ``running``, ``finished`` or ``failed``, ``where`` the main
thread's innermost frame of seer code and ``waiting`` whether the main thread is inside
torch.distributed (a collective, or a wait on one).

Writes are atomic (temp file + ``os.replace``) but not fsynced: a heartbeat only has to be seen by
the living. Ages are measured against this host's clock (ranks on other hosts: NTP-synchronised
clocks, a few seconds of skew at most, against thresholds of tens of seconds).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

HEARTBEATS = "heartbeats"
FAILURE = "failure.json"
_SEER_CODE = (f"{os.sep}seer{os.sep}", f"{os.sep}data_pipeline{os.sep}", f"{os.sep}cluster{os.sep}")
_DISTRIBUTED_CODE = f"{os.sep}torch{os.sep}distributed{os.sep}"


def heartbeat_dir(run_dir: Path) -> Path:
    return Path(run_dir) / HEARTBEATS


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return heartbeat_dir(run_dir) / f"rank{rank}.json"


def write_json(path: Path, record: dict) -> None:
    """Replace ``path`` with ``record`` atomically (a reader sees the old or the new file whole)."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_once(path: Path, record: dict) -> bool:
    """Write ``record`` at ``path`` unless a file is already there (first writer wins, whole:
    temp file + ``os.link``, which refuses an existing name). True when this call published it."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        tmp.write_text(json.dumps(record))
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path, token: str | None = None) -> dict | None:
    """The record at ``path``, or None (absent, being replaced, or of another session)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if token is not None and record.get("token") != token:
        return None
    return record


def read_heartbeats(run_dir: Path, ranks, token: str) -> dict[int, dict]:
    """This session's heartbeat of each of ``ranks`` that has one."""
    found = {}
    for rank in ranks:
        record = read_json(heartbeat_path(run_dir, rank), token)
        if record is not None:
            found[rank] = record
    return found


def _process_namespace() -> str:
    """This host and PID namespace (a pid means the same process only within one)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}/{namespace}"


def process_state(record: dict) -> str:
    """``gone``, ``stopped`` (SIGSTOP, a debugger) or ``alive`` for a process of this host and
    PID namespace; ``unknown`` for any other (only its heartbeat's age tells)."""
    if record.get("host") != socket.gethostname() or record.get("pidns") != _process_namespace():
        return "unknown"
    pid = int(record.get("pid", 0))
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except OSError:
            return "unknown"
        return "alive"
    state = fields[0] if fields else "?"
    if state in ("Z", "X"):
        return "gone"
    return "stopped" if state in ("T", "t") else "alive"


def main_thread_location() -> tuple[str, bool]:
    """Where the main thread is: its innermost frame in seer's own code (``file:line function``)
    and whether it is inside torch.distributed (waiting for a collective to complete)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    waiting = frame is not None and _DISTRIBUTED_CODE in frame.f_code.co_filename
    where = "?"
    while frame is not None:
        name = frame.f_code.co_filename
        if any(part in name for part in _SEER_CODE) and not name.endswith(("heartbeat.py", "watchdog.py")):
            where = f"{Path(name).parent.name}/{Path(name).name}:{frame.f_lineno} {frame.f_code.co_name}"
            break
        frame = frame.f_back
    return where, waiting


def heartbeat_record(token: str, rank: int, step: int | None, phase: str, state: str) -> dict:
    where, waiting = main_thread_location()
    return {"token": token, "rank": rank, "host": socket.gethostname(), "pidns": _process_namespace(),
            "pid": os.getpid(), "time": time.time(),
            "step": step, "phase": phase, "state": state, "where": where, "waiting": waiting}


def age(record: dict, now: float | None = None) -> float:
    return (time.time() if now is None else now) - float(record.get("time", 0.0))
