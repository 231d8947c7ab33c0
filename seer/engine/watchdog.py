"""Failure detection: a rank that dies, stops or hangs is noticed by the others within
``train.failure_timeout_s``, and every surviving rank ends with one line naming the rank and the
step (:class:`RankFailure`). What happens next (a restart) is the launcher's business: it hands
``pretrain`` an ``on_failure`` callback, called on every rank before the rank ends.

How it is noticed (one :class:`Watchdog` thread per rank of a multi-rank run):

- heartbeats: every ``interval`` s (a tenth of the timeout, 0.5-10 s) the thread writes this rank's
  heartbeat (``seer.engine.heartbeat``) and reads those of the ranks it watches: the next rank
  (a ring: every rank is watched) and the ranks of its own node. A watched rank whose process is
  gone (same host) is a failure at once; one whose heartbeat is older than the timeout (killed on
  another host, SIGSTOPped, its node down) is a failure then. A heartbeat comes from a thread, so
  a rank busy in a long save keeps beating;
- progress: no step completed on this rank for the timeout (a peer stuck outside any collective,
  or a collective that never completes) is a failure. Phases that may legitimately take long
  (start-up until the first step: process group, checkpoint load, DataLoader workers; checkpoint
  saves; the kNN probe) run under :func:`slow`, which allows ``train.slow_timeout_s`` instead;
- collectives: the process group's timeout follows the phase (timeout + a margin, or the slow
  timeout + a margin), so gloo raises and nccl's own watchdog aborts even if this thread is
  starved; a peer's death usually surfaces first as a collective error ("Connection reset by
  peer"), which :func:`failure_watch` turns into the same one-line failure;
- the first failure of a session is published in ``heartbeats/failure.json`` (first writer wins);
  every rank reads it each interval, so all ranks end within an interval of the first detection
  and all report the same cause.

A failure found by the thread ends the process there (``os._exit``, after the callbacks, the one
line and a flush: the main thread may be blocked in a collective that never returns). One found
in the main thread (an exception) is raised as :class:`RankFailure`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from seer.engine.checkpoint_files import CheckpointSaveError
from seer.engine.heartbeat import (
    FAILURE,
    age,
    heartbeat_dir,
    heartbeat_path,
    heartbeat_record,
    process_state,
    publish_once,
    read_heartbeats,
    read_json,
    write_json,
)

log = logging.getLogger("seer")


def _distributed():
    """seer.engine.distributed, imported when first needed: this module stays free of torch at
    import, so the CLI can catch :class:`RankFailure` without loading it."""
    from seer.engine import distributed

    return distributed


EXIT_CODE = 3  # a rank ended by the watchdog thread
_COMM_ERROR = re.compile(r"gloo|nccl|c10d|Connection (reset|closed|refused)|Broken pipe|Timed out|timed out|"
                         r"ProcessGroup|DistBackendError|DistNetworkError", re.IGNORECASE)
_NOT_RETRIED = (ValueError, FileNotFoundError)  # input errors (config, mismatched or no complete checkpoint)


class RankFailure(RuntimeError):
    """One rank's failure as every rank reports it: ``rank`` (None when no rank can be singled
    out), the ``step`` (that rank's last completed step), the ``reason``, who ``detected`` it, and
    its ``kind``: ``crash`` (an exception on that rank), ``peer`` (died, stopped, silent), ``hang``
    (no progress), ``checkpoint`` (a save failed), ``error`` (an input error: not worth a retry)."""

    def __init__(self, rank: int | None, step: int | None, reason: str, *, kind: str, detected_by: int,
                 time_s: float | None = None):
        self.rank, self.step, self.reason, self.kind, self.detected_by = rank, step, reason, kind, detected_by
        self.time = time.time() if time_s is None else time_s
        super().__init__(self.line)

    @property
    def line(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "no rank singled out"
        step = "?" if self.step is None else self.step
        by = "" if self.detected_by == self.rank else f" (detected by rank {self.detected_by})"
        return f"{who} at step {step}: {self.reason}{by}"

    def to_dict(self) -> dict:
        return {"rank": self.rank, "step": self.step, "reason": self.reason, "kind": self.kind,
                "detected_by": self.detected_by, "time": self.time}

    @classmethod
    def from_dict(cls, row: dict) -> "RankFailure":
        return cls(row.get("rank"), row.get("step"), row.get("reason", "?"), kind=row.get("kind", "crash"),
                   detected_by=row.get("detected_by", -1), time_s=row.get("time"))


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith((" ", "Traceback"))]
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def is_comm_error(err: BaseException) -> bool:
    """An error raised by a collective: the cause is usually another rank."""
    name = type(err).__name__
    return name.startswith("Dist") or bool(_COMM_ERROR.search(str(err)[:2000]))


class Watchdog:
    """This rank's heartbeat writer and failure detector (see the module docstring)."""

    def __init__(self, run_dir: Path, *, rank: int, world_size: int, local_rank: int, local_world_size: int,
                 token: str, timeout_s: float, slow_timeout_s: float,
                 on_failure: list[Callable[[RankFailure], None]] | None = None,
                 crash_at: tuple[int, int] | None = None):
        self.run_dir, self.rank, self.world_size, self.token = Path(run_dir), rank, world_size, token
        self.timeout_s, self.slow_timeout_s = float(timeout_s), float(slow_timeout_s)
        self.interval = min(10.0, max(0.5, self.timeout_s / 10))
        self.stale_s = 3 * self.interval  # a heartbeat this old names its rank once something failed
        self.on_failure = list(on_failure or [])
        self.crash_at = crash_at
        first = rank - local_rank  # ranks of a node are consecutive (Slurm's block layout, torchrun)
        node = range(max(first, 0), min(first + local_world_size, world_size))
        self.watched = sorted({(rank + 1) % world_size, *node} - {rank})
        self.step: int | None = None
        self.phase, self._slow_depth, self._started_steps = "start", 1, False
        self._progress = time.monotonic()
        self._stop = threading.Event()
        self._claim = threading.Lock()
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="seer-watchdog", daemon=True)

    # ---------------------------------------------------------------- the loop's side

    def start(self) -> "Watchdog":
        heartbeat_dir(self.run_dir).mkdir(parents=True, exist_ok=True)
        self._beat("running")
        _distributed().set_timeout(self.slow_timeout_s + 60)
        self._thread.start()
        return self

    def at_step(self, step: int, completed: bool = True) -> None:
        """The run is at ``step``: a step ``completed``, or a checkpoint of it was restored."""
        self.step = step
        self._progress = time.monotonic()
        if not completed:
            return
        if not self._started_steps:  # the first step: start-up is over, the fast timeouts apply
            self._started_steps, self._slow_depth, self.phase = True, self._slow_depth - 1, "train"
            if self._slow_depth == 0:
                _distributed().set_timeout(self._fast_pg_timeout())
        if self.crash_at == (self.rank, step):  # fault injection (train.inject_crash_step)
            raise RuntimeError(f"injected crash after step {step} (train.inject_crash_step)")

    def _fast_pg_timeout(self) -> float:
        """Collectives outlive the watchdog's own timeout a little: its one line comes first."""
        return self.timeout_s + max(30.0, 3 * self.interval)

    @contextlib.contextmanager
    def slow(self, what: str) -> Iterator[None]:
        outer = self.phase
        self._slow_depth += 1
        self.phase = what
        _distributed().set_timeout(self.slow_timeout_s + 60)
        try:
            yield
        finally:
            self._slow_depth -= 1
            self.phase = outer
            self._progress = time.monotonic()
            if self._slow_depth == 0:
                _distributed().set_timeout(self._fast_pg_timeout())

    def stop(self, state: str = "finished") -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval + 5)
        with contextlib.suppress(OSError):
            self._beat(state)

    # ---------------------------------------------------------------- the thread

    def _beat(self, state: str = "running") -> None:
        record = heartbeat_record(self.token, self.rank, self.step, self.phase, state)
        write_json(heartbeat_path(self.run_dir, self.rank), record)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                failure = self.check()
            except OSError as err:  # a full or vanished run folder: the peers will see this rank go silent
                log.warning("heartbeat: %s", err)
                continue
            if failure is not None and not self._stop.is_set():
                self.fail(failure, exit_process=True)
                return

    def check(self) -> RankFailure | None:
        """A failure to act on now, or None: a published one, a watched peer gone or silent,
        or no progress on this rank for too long."""
        published = self.published_failure()
        if published is not None:
            return published
        now = time.time()
        for rank, record in sorted(read_heartbeats(self.run_dir, self.watched, self.token).items()):
            failure = self._judge(rank, record, now, silent_after=self.timeout_s)
            if failure is not None:
                return failure
        quiet = time.monotonic() - self._progress
        allowed = self.slow_timeout_s if self._slow_depth else self.timeout_s
        if quiet > allowed:
            return self.diagnose(None, quiet_s=quiet)
        return None

    def _judge(self, rank: int, record: dict, now: float, *, silent_after: float) -> RankFailure | None:
        """A running peer whose process is gone (this host), or whose heartbeat is older than
        ``silent_after``: a failure; None otherwise."""
        if record.get("state") != "running":
            return None
        state = process_state(record)
        if state == "gone":
            return self._peer(rank, record, "its process ended without a word (killed, or crashed in native code)")
        if age(record, now) > silent_after:
            stopped = " (its process is stopped: SIGSTOP?)" if state == "stopped" else ""
            return self._peer(rank, record, f"stopped responding: no heartbeat for {age(record, now):.0f} s{stopped}")
        return None

    def _peer(self, rank: int, record: dict, reason: str) -> RankFailure:
        """Ranks step in lockstep: the failed step is the later of its last heartbeat's and ours."""
        steps = [s for s in (record.get("step"), self.step) if s is not None]
        return RankFailure(rank, max(steps) if steps else None, reason, kind="peer", detected_by=self.rank)

    def published_failure(self) -> RankFailure | None:
        row = read_json(heartbeat_dir(self.run_dir) / FAILURE, self.token)
        return None if row is None else RankFailure.from_dict(row)

    # ---------------------------------------------------------------- what went wrong

    def diagnose(self, err: BaseException | None, quiet_s: float | None = None) -> RankFailure:
        """The failure behind ``err`` (an exception on this rank) or behind ``quiet_s`` seconds
        without progress: a published failure, else a peer that is gone, stopped or silent, else
        (after a collective error, for up to a few intervals) the first such peer to show, else a
        peer busy outside any collective while this one waits, else this rank itself."""
        deadline = time.monotonic() + (self.stale_s + self.interval if err is not None and is_comm_error(err) else 0)
        while True:
            blamed = self.published_failure() or self._blame()
            if blamed is not None or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, self.interval / 2))
        if blamed is not None:
            return blamed
        if err is not None and not is_comm_error(err):
            kind = "checkpoint" if isinstance(err, CheckpointSaveError) else (
                "error" if isinstance(err, _NOT_RETRIED) else "crash")
            return RankFailure(self.rank, self.step, f"failed: {first_line(err)}", kind=kind, detected_by=self.rank)
        return self._hang(err, quiet_s)

    def _blame(self) -> RankFailure | None:
        peers = read_heartbeats(self.run_dir, [r for r in range(self.world_size) if r != self.rank], self.token)
        now = time.time()
        for rank, record in sorted(peers.items()):
            failure = self._judge(rank, record, now, silent_after=self.stale_s)
            if failure is not None:
                return failure
        missing = sorted(set(range(self.world_size)) - set(peers) - {self.rank})
        if missing:  # never beat in this session, or its file is gone
            return RankFailure(missing[0], None, "has no heartbeat in this session", kind="peer", detected_by=self.rank)
        return None

    def _hang(self, err: BaseException | None, quiet_s: float | None) -> RankFailure:
        peers = read_heartbeats(self.run_dir, range(self.world_size), self.token)
        busy = [r for r, rec in sorted(peers.items()) if rec.get("state") == "running" and not rec.get("waiting")]
        waiting = [r for r, rec in sorted(peers.items()) if rec.get("waiting")]
        what = first_line(err) if err is not None else f"no step completed for {quiet_s:.0f} s"
        if busy and waiting:  # the others wait in a collective for these
            rank = busy[0]
            where = peers[rank].get("where", "?")
            return RankFailure(rank, peers[rank].get("step"), f"made no progress, busy outside any collective "
                               f"at {where} ({what})", kind="hang", detected_by=self.rank)
        where = peers.get(self.rank, {}).get("where", "?")
        return RankFailure(None, self.step, f"{what}; every rank alive (this one at {where}): a collective did "
                           f"not complete", kind="hang", detected_by=self.rank)

    def fail(self, failure: RankFailure, *, exit_process: bool) -> None:
        """Publish ``failure``, mark this rank failed, run the callbacks; then, from the thread,
        log the one line and end the process. Only the first caller on this rank acts; a later
        one from the main thread waits for the thread to end the process."""
        with self._claim:
            first, self._failed = not self._failed, True
        if not first:
            if exit_process:
                return
            time.sleep(60)  # the thread is ending the process
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            if not publish_once(heartbeat_dir(self.run_dir) / FAILURE, {"token": self.token, **failure.to_dict()}):
                failure = self.published_failure() or failure
            self._beat("failed")
        for callback in self.on_failure:
            try:
                callback(failure)
            except Exception as err:  # noqa: BLE001 - the rank ends anyway; say why the callback did not run
                log.error("on failure: %s", first_line(err))
        if exit_process:
            log.error("%s", failure.line)
            _to_stderr_if_not_logged(failure.line)
            for handler in logging.getLogger().handlers:
                with contextlib.suppress(Exception):
                    handler.flush()
            sys.stderr.flush()
            os._exit(EXIT_CODE)


def _traceback_to_log_file(err: BaseException) -> None:
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "this rank crashed:", (),
                            (type(err), err, err.__traceback__))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _to_stderr_if_not_logged(line: str) -> None:
    streams = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    if not any(getattr(h, "stream", None) in (sys.stderr, sys.__stderr__) for h in streams):
        print(f"seer: error: {line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ this process's watchdog

_active: Watchdog | None = None
_callbacks: list[Callable[[RankFailure], None]] = []


def start(run_dir: Path, info, *, timeout_s: float, slow_timeout_s: float,
          crash_at: tuple[int, int] | None = None) -> Watchdog | None:
    """Start this rank's watchdog (several ranks only; called by ``start_run`` once the process
    group is up: every rank takes part in drawing the session token)."""
    global _active
    distributed = _distributed()
    if info.world_size <= 1 or not distributed.is_distributed():
        return None
    token = distributed.decide_on_main(lambda: f"{time.time_ns():x}-{os.getpid()}")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)  # torchrun and cluster/ export it
    _active = Watchdog(run_dir, rank=info.rank, world_size=info.world_size, local_rank=info.local_rank,
                       local_world_size=local_world, token=token, timeout_s=timeout_s,
                       slow_timeout_s=slow_timeout_s, on_failure=_callbacks, crash_at=crash_at).start()
    distributed.barrier()  # every rank has beaten once: a missing heartbeat from now on means something
    return _active


def at_step(step: int, completed: bool = True) -> None:
    if _active is not None:
        _active.at_step(step, completed)


@contextlib.contextmanager
def slow(what: str) -> Iterator[None]:
    """Around what may legitimately take long (saves, loads, probes): no progress is expected."""
    if _active is None:
        yield
        return
    with _active.slow(what):
        yield


@contextlib.contextmanager
def failure_watch(on_failure: Callable[[RankFailure], None] | None = None) -> Iterator[None]:
    """Around ``pretrain``'s body: an exception once the watchdog runs becomes a
    :class:`RankFailure` (after ``on_failure``, on every rank); the watchdog stops at the end."""
    global _active
    _callbacks[:] = [on_failure] if on_failure is not None else []
    try:
        yield
    except BaseException as err:
        watch = _active
        if watch is None or isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        failure = err if isinstance(err, RankFailure) else watch.diagnose(err)
        if failure.kind == "crash" and failure.rank == watch.rank:
            _traceback_to_log_file(err)  # a crash of this rank: its traceback, in this rank's log only
        watch.fail(failure, exit_process=False)
        if failure.kind == "error" and failure.rank == watch.rank:
            err.seer_failure = failure  # type: ignore[attr-defined]  # handled: callers need not report it again
            raise  # this rank's own input error: its message as it is (the same on every rank)
        raise failure from err
    finally:
        if _active is not None and not _active._failed:
            _active.stop()
        _active = None
        _callbacks.clear()
