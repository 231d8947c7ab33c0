"""Test helper: run a function on N real torch.distributed ranks (gloo, one process each).

    from distributed_utils import run_distributed

    def _check(rank, world_size, scale):      # module level, so spawn can pickle it
        t = torch.ones(1) * rank * scale
        dist.all_reduce(t)
        return t.item()

    assert run_distributed(_check, 2, 10.0) == [10.0, 10.0]

Each worker sets ``torch.set_num_threads(1)``, joins a gloo process group on
127.0.0.1 and a free port, runs ``fn(rank, world_size, *args)`` and always destroys the
group afterwards. ``run_distributed`` returns the per-rank return values (anything
picklable; they travel through files in a private temporary folder), raises
``torch.multiprocessing.ProcessRaisedException`` with the worker's traceback when a rank
fails, and ``TimeoutError`` (after killing the workers) when they run past ``timeout``.
"""

from __future__ import annotations

import datetime
import multiprocessing.connection
import os
import pickle
import tempfile
import time
from typing import Any, Callable

import torch

from cluster.local import free_port  # noqa: F401  (re-exported for tests)
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    result_dir: str,
    args: tuple,
) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        result = fn(rank, world_size, *args)
        # written before the teardown: the result is complete once fn has returned
        path = os.path.join(result_dir, f"rank{rank}.pkl")
        with open(path + ".tmp", "wb") as handle:
            pickle.dump(result, handle)
        os.replace(path + ".tmp", path)
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return their results.

    ``fn`` and ``args`` must be picklable (define ``fn`` at module level). The list is
    ordered by rank. ``timeout`` (seconds) bounds both each collective and the whole run.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="seer_dist_") as result_dir:
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, free_port(), backend, timeout, result_dir, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            _wait_for_ranks(context, result_dir, fn, world_size, deadline)
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        results = []
        for rank in range(world_size):
            # our own workers wrote these files into a private folder a moment ago
            with open(os.path.join(result_dir, f"rank{rank}.pkl"), "rb") as handle:
                results.append(pickle.load(handle))
        return results


def _wait_for_ranks(context, result_dir: str, fn, world_size: int, deadline: float) -> None:
    """Until every rank has exited. A rank killed by a signal AFTER it wrote its result (gloo's
    teardown on this torch aborts now and then: "terminate called without an active exception",
    or a SIGSEGV) has done its work: the others are left to finish theirs. Any other failure goes
    to torch's ``join``, which raises with the rank's traceback and stops the rest."""
    def finished(rank: int) -> bool:
        return os.path.exists(os.path.join(result_dir, f"rank{rank}.pkl"))

    while True:
        processes = context.processes
        # alive first: a rank that exits between the two looks is then seen by the failure check
        alive = [p for p in processes if p.is_alive()]
        failed = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0) and not finished(r)]
        if failed:
            context.join(timeout=0)  # raises for the failed rank, kills the others
            raise RuntimeError(f"rank {failed[0]} exited with code {processes[failed[0]].exitcode}")
        if not alive:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} ranks ran past the timeout")
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout=0.5)
