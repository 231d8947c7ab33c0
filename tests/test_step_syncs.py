"""One host synchronisation per training step: the guard's verdict reads the loss and gradient
norm back once; everything else the loop reads from the device (samples skipped on all ranks,
the loss scale, per-layer gradient norms) waits for logging steps. Counted on the CPU with
``seer.profiling.DeviceWork`` around the loop's own calls (``train_step`` then ``log_step``)."""

from __future__ import annotations

import pytest

from conftest import REPO, tiny_overrides
from seer.config import load_config
from seer.engine.metrics import MetricsLogger
from seer.engine.setup import build_parts, start_run
from seer.engine.train import log_step, train_step
from seer.profiling import DeviceWork


def counted_steps(cfg, steps: int) -> list[DeviceWork]:
    info, run_dir = start_run(cfg)
    p = build_parts(cfg, info, run_dir)
    metrics = MetricsLogger(run_dir, enabled=True, start_step=0, max_steps=cfg.train.max_steps, log_every=cfg.train.log_every)
    p.model.train()
    counts = []
    try:
        for step in range(steps):
            views = p.data.next_batch(step)  # the data side is not the step's (CPU tensors, workers)
            with DeviceWork() as work:
                verdict, loss, grad_norm = train_step(p.model, p.optimizer, p.precision, p.guard, views, step)
                assert verdict.action == "step"
                p.data.commit()
                log_step(p, cfg, metrics, step + 1, 0.1, loss, grad_norm)
            counts.append(work)
    finally:
        metrics.close()
        p.data.close()
    return counts


@pytest.mark.slow
def test_a_step_reads_the_device_once_and_logging_steps_more(tmp_path, shard_dir):
    overrides = tiny_overrides(shard_dir, tmp_path, **{"train.log_every": 4, "guard.grad_norm_every": 4,
                                                      "monitor.every_steps": 0, "train.max_steps": 8})
    counts = counted_steps(load_config(REPO / "configs" / "quickstart.yaml", overrides), 8)
    for step, work in enumerate(counts, start=1):
        assert not work.waits, (step, dict(work.waits))  # nothing that waits on data-dependent sizes
        if step % 4:
            assert work.host_reads == ["tolist"], (step, work.host_reads)  # global_inputs' one read
        else:  # logging step: + samples skipped, + the per-layer gradient norms
            assert work.host_reads[0] == "tolist" and len(work.host_reads) >= 3, (step, work.host_reads)
    assert counts[0].kernel_count > 100  # the counter sees the step's real work
