"""The multi-rank test helper itself: a rank that dies in gloo's teardown after its work is done
does not cost the other ranks their results; a rank that fails before returning still fails the run."""

import os
import signal
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_utils import run_distributed


def _dies_in_teardown_on_rank0(rank, world_size):
    if rank == 0:  # the helper's worker calls this after writing the result: a crash there, as gloo's
        dist.destroy_process_group = lambda: os.kill(os.getpid(), signal.SIGSEGV)
    else:
        time.sleep(1.0)  # still working when rank 0 dies
    return rank * 10


def _fails_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 failed on purpose")
    return rank


def test_a_rank_killed_after_its_result_leaves_the_others_to_finish():
    assert run_distributed(_dies_in_teardown_on_rank0, 2) == [0, 10]


def test_a_rank_that_fails_before_returning_fails_the_run():
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed on purpose"):
        run_distributed(_fails_on_rank1, 2, timeout=60)
