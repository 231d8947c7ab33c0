"""What runs inside a submitit job, on every task: ranks from the scheduler, the warning signal,
``seer pretrain``, and the requeue through submitit's checkpoint hook.

submitit starts one process per task (no torchrun inside). Each one:

1. exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (first host of the job)
   and MASTER_PORT (derived from the job id) from Slurm's environment (or submitit's local
   executor's) with ``submitit.helpers.TorchDistributedEnvironment``; the engine then joins the
   process group (nccl on GPUs, gloo on CPUs) and picks its GPU (``LOCAL_RANK`` when the task
   sees all of the node's GPUs, the only one when the scheduler bound one GPU per task);
2. replaces submitit's handler of the warning signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says
   otherwise) by one that only raises a flag: submitit's would requeue and exit in the middle of
   a step, before the other ranks have saved their shards;
3. trains: after each step the engine asks every rank "stop requested?" (one all-reduce), so all
   ranks stop at the same step and save a complete checkpoint, synchronously;
4. rank 0 then hands the signal to submitit's own handler, which calls ``PretrainJob.checkpoint``
   (the same job again, or None past ``--max-requeues``) and runs ``scontrol requeue``. The
   requeued job resumes from the newest checkpoint: with the signal, no step is redone.

A requeue without the signal (``scontrol requeue``, node failure) restarts the job the same way
and loses at most the steps since the last periodic checkpoint.

5. on a failure (the engine's watchdog names a dead, stopped or hung rank, or a rank crashes; every
   surviving rank gets the same ``RankFailure``), the first rank to claim it in the job folder
   records it and, per ``cluster.restart.decide_restart``, requeues the job (``scontrol requeue``:
   it resumes from the newest complete checkpoint) or gives up and cancels what is left of it.
   Every failing rank then logs one line and exits at once (``os._exit``: a process group with a
   dead peer is not torn down politely). A failure while Slurm itself ends the job (SIGTERM of a
   cancel or hard requeue) is recorded as ``terminated``, not restarted.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import submitit

from cluster.jobfolder import JobFolder
from cluster.restart import Decision

log = logging.getLogger("seer.cluster")


def distributed_env() -> dict[str, str]:
    """The torch.distributed variables of this task, from the scheduler's environment."""
    env = submitit.helpers.TorchDistributedEnvironment()
    # submitit derives the port from the job id (20000-60000), which a requeued job keeps, so the
    # killed run's rendezvous socket may still hold it (EADDRINUSE): each requeue moves it on; and it
    # is kept below Linux's ephemeral range (32768-60999), where any outgoing connection may hold it
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    port = 20000 + (env.master_port + 997 * restarts) % 12768
    return {
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(port),
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
    }


class WarningSignal:
    """Turns the scheduler's warning signal into a flag the training loop polls."""

    def __init__(self) -> None:
        self.signum = submitit.JobEnvironment._usr_sig()
        self.received = False
        self.terminated = False  # SIGTERM: Slurm cancels, hard-requeues or preempts; SIGKILL follows
        self._submitit_handler = None
        self._term_handler = None

    def install(self) -> "WarningSignal":
        self._submitit_handler = signal.getsignal(self.signum)
        self._term_handler = signal.getsignal(signal.SIGTERM)
        signal.signal(self.signum, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_term)
        return self

    def _on_signal(self, signum, frame) -> None:  # only a flag: no locks, no I/O in a handler
        self.received = True

    def _on_term(self, signum, frame) -> None:
        self.terminated = True
        if callable(self._term_handler):  # submitit's: logs it and carries on until SIGKILL
            self._term_handler(signum, frame)

    def requested(self) -> bool:
        return self.received

    def requeue(self) -> None:
        """Rank 0: submitit's handler checkpoints the job (``PretrainJob.checkpoint``), requeues
        it and exits; it raises ``UncompletedJobError`` when the job is not requeued."""
        handler = self._submitit_handler
        if callable(handler):
            handler(self.signum, None)
        else:  # not under submitit (a plain process): nothing requeues it
            raise RuntimeError("stopped on the warning signal, but no submitit job to requeue")


def _log_to_stderr(rank: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)


class PretrainJob:
    """The submitted callable: ``seer pretrain`` on the job folder's config snapshot."""

    def __init__(self, folder: str | Path, max_requeues: int, max_restarts: int = 3):
        self.folder = str(Path(folder).absolute())
        self.max_requeues = max_requeues
        self.max_restarts = max_restarts

    def __call__(self) -> dict:
        os.environ.update(distributed_env())
        rank = int(os.environ["RANK"])
        folder = JobFolder(self.folder)
        warning = WarningSignal().install()
        if rank != 0:  # the engine logs to stderr on rank 0 only: every rank's log goes to the job folder
            _log_to_stderr(rank)
        try:
            summary = self._train(folder, rank, warning)
        except Exception as err:  # noqa: BLE001 - every failure ends here: recorded, maybe restarted, one line
            self._end_after(err, rank, warning)
        if warning.received:
            log.info("warning signal received on this rank (%s)", warning.signum.name)
        if not summary.get("stopped_for_requeue"):
            if rank == 0:
                folder.record("finished", step=summary["step"], checkpoint=summary["checkpoint"])
            return summary
        if rank == 0:
            folder.record("stop", step=summary["step"], checkpoint=summary["checkpoint"], signal=warning.signum.name)
            warning.requeue()  # exits this process when the job is requeued
        return summary

    def _train(self, folder: JobFolder, rank: int, warning: WarningSignal) -> dict:
        from seer.config import load_config
        from seer.engine.checkpoint import checkpoint_step, latest_checkpoint
        from seer.engine.train import pretrain

        cfg = load_config(folder.config)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        if rank == 0:
            folder.record(
                "start",
                job_id=submitit.JobEnvironment().job_id,
                restart_count=restarts,
                world_size=int(os.environ["WORLD_SIZE"]),
                master=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                resume_step=checkpoint_step(latest_checkpoint(Path(cfg.run.dir) / "checkpoints", warn=False)),
            )
        # requeued without the signal too (scontrol, node failure): Slurm counts all requeues, the same on
        # every rank; the restarts after a failure were recorded before their requeue, and count apart
        requeues = restarts - folder.restarts()
        if requeues > self.max_requeues:
            raise _GiveUp(f"requeued {requeues} times, more than --max-requeues {self.max_requeues}")
        return pretrain(cfg, stop_requested=warning.requested,
                        on_failure=lambda failure: self._on_failure(failure, warning))

    def _on_failure(self, failure, warning: WarningSignal) -> None:
        """On every rank of a failed run (the engine's callback, before the rank ends): the first
        rank to claim it records the failure and restarts the job, or gives up (cluster.restart)."""
        from cluster.restart import decide_restart, end_job, requeue
        from cluster.status import slurm_state
        from seer.config import load_config
        from seer.engine.checkpoint import checkpoint_step, latest_checkpoint

        folder = JobFolder(self.folder)
        executor = folder.launch().get("executor", "slurm")
        job_id = submitit.JobEnvironment().job_id
        start = f"{job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        if not folder.claim(f"failure-{start}"):
            return  # another rank records it
        state = slurm_state(job_id) if executor == "slurm" else None
        if warning.terminated or state not in (None, "RUNNING"):  # Slurm cancels or requeues it: not ours to restart
            folder.record("terminated", error=failure.line, slurm_state=state)
            return
        try:
            newest = latest_checkpoint(Path(load_config(folder.config).run.dir) / "checkpoints", warn=False)
        except (OSError, ValueError):
            newest = None
        step = checkpoint_step(newest) if newest is not None else None
        folder.record("failed", **failure.to_dict(), error=failure.line, checkpoint=step)
        decision = decide_restart(folder.current_submission(), kind=failure.kind, checkpoint_step=step,
                                  max_restarts=self.max_restarts, executor=executor)
        if decision.restart:
            folder.record("restart", reason=decision.reason, checkpoint=step)
            try:
                requeue(job_id)
                return
            except (OSError, subprocess.SubprocessError) as err:
                decision = Decision(False, f"not restarted: scontrol requeue failed ({_first_line(err)})")
        folder.record("gave_up", reason=decision.reason)
        log.error("%s", decision.reason)
        if executor == "slurm":
            end_job(job_id)

    def _end_after(self, err: Exception, rank: int, warning: WarningSignal) -> None:
        """The one line, the failure recorded (through the engine's callback, or here for one
        that happened before the engine's watchdog ran), then the process ends: a rank whose
        process group is broken is not torn down politely."""
        from seer.engine.watchdog import RankFailure

        if isinstance(err, _GiveUp):
            if rank == 0:
                JobFolder(self.folder).record("gave_up", reason=str(err))
            failure = None
        elif isinstance(err, RankFailure) or hasattr(err, "seer_failure"):
            failure = getattr(err, "seer_failure", err)  # already recorded: pretrain called _on_failure
        else:
            kind = "error" if isinstance(err, (ValueError, FileNotFoundError)) else "crash"
            failure = RankFailure(rank, None, f"failed before training: {_first_line(err)}", kind=kind,
                                  detected_by=rank)
            log.error("this rank failed", exc_info=err)
            self._on_failure(failure, warning)
        log.error("%s", failure.line if failure is not None else err)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    def checkpoint(self, *args, **kwargs):
        """submitit's hook (rank 0, on the warning signal): the job to requeue, or None."""
        folder = JobFolder(self.folder)
        done = folder.requeues()
        if done >= self.max_requeues:
            folder.record("gave_up", reason=f"--max-requeues {self.max_requeues} reached", requeues=done)
            return None
        folder.record("requeue", requeues=done + 1)
        return submitit.helpers.DelayedSubmission(PretrainJob(self.folder, self.max_requeues, self.max_restarts))


class _GiveUp(RuntimeError):
    """The job ends without a restart (its requeue budget is spent)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
