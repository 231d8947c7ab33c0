"""The pretraining loop, top to bottom: build, restore, then step, guard, log, checkpoint; finish.

``pretrain(cfg)`` is what ``seer pretrain`` runs on every rank. The parts it uses are built by
``seer.engine.setup`` (each from its config section) and saved and restored by the
checkpointer; the loop knows methods only through ``seer.methods.Method``, data only through
its batch source (``next_batch``/``commit``/``skipped``: no backend here), and precision only
through ``Precision``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch

from seer.collectives import all_reduce_sum
from seer.config import SeerConfig
from seer.engine import distributed, watchdog
from seer.engine.checkpoint import latest_checkpoint, update_shared_extras
from seer.engine.guard import StabilityGuard, Verdict, global_inputs
from seer.engine.metrics import MetricsLogger
from seer.engine.optim import set_lr
from seer.engine.parallel import Precision, unwrap
from seer.engine.setup import TrainingParts, build_parts, start_run
from seer.eval.during_training import TrainingProbe
from seer.inspection import inspect_env
from seer.plot import plot_run

log = logging.getLogger("seer")


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    guard: StabilityGuard,
    views: list[torch.Tensor],
    step: int,
    *,
    grad_clip: float | None = None,
    inject_nan: bool = False,
) -> tuple[Verdict, float, float]:
    """Forward, backward, guard verdict, and the update when the verdict is "step".

    Returns the verdict, the loss averaged over ranks and the global gradient norm, both on the
    host: reading them for the verdict is the step's one host synchronisation (``global_inputs``).
    A "rollback" verdict leaves the model untouched: the caller restores the last checkpoint.
    """
    method = unwrap(model)
    scaler = precision.scaler
    with precision.autocast():
        loss = model(views)["loss"]
    if inject_nan:  # fault injection (train.inject_nan_steps), to exercise the guard
        loss = loss * float("nan")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    method.on_after_backward(step)
    scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip is not None else float("inf")
    local_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    global_loss, grad_norm = global_inputs(loss, local_norm)  # the same on every rank: one verdict
    # fp16 overflow (non-finite unscaled gradients, so a non-finite norm): no update, the scale backs off
    overflow = scaler.is_enabled() and math.isfinite(global_loss) and not math.isfinite(grad_norm)
    verdict = Verdict("step", "") if overflow else guard.check(step, global_loss, grad_norm)
    if verdict.action == "step":
        if not overflow:  # what scaler.step does, without reading its inf flag back from the device again
            optimizer.step()
        method.after_step(step)
    # also after a rollback verdict: unscale_ was called, and the scaler must be ready for the next
    # step (the rollback then restores the checkpoint's loss scale)
    scaler.update()
    return verdict, global_loss, grad_norm


def pretrain(cfg: SeerConfig, stop_requested: Callable[[], bool] | None = None,
             on_failure: Callable[[watchdog.RankFailure], None] | None = None) -> dict:
    """Train to ``cfg.train.max_steps``, resuming from run.dir's newest checkpoint.

    ``stop_requested`` (cluster/: "the warning signal reached this rank") is asked after every
    step; once any rank says yes, all ranks stop at that step, save a complete checkpoint and
    return with ``stopped_for_requeue`` true, so a requeued job redoes no step.

    A dead, stopped or hung rank ends every rank within ``train.failure_timeout_s`` with one line
    naming the rank and the step (``seer.engine.watchdog``): raised as ``RankFailure``, or, when
    the watchdog thread finds it, the process exits; ``on_failure`` (cluster/: record, restart)
    is called first on every rank either way.
    """
    with watchdog.failure_watch(on_failure):
        return _train(cfg, stop_requested)


def _train(cfg: SeerConfig, stop_requested: Callable[[], bool] | None) -> dict:
    info, run_dir = start_run(cfg)
    p = build_parts(cfg, info, run_dir)
    checkpoint = p.checkpointer.latest()
    step = p.checkpointer.load(checkpoint) if checkpoint is not None else 0
    if checkpoint is not None:
        log.info("resumed from %s at step %d", checkpoint, step)
    metrics = MetricsLogger(run_dir, enabled=info.is_main, start_step=step, max_steps=cfg.train.max_steps,
                            log_every=cfg.train.log_every)
    probe = TrainingProbe(cfg, info.rank) if cfg.eval.every_steps > 0 else None
    log.info("training %s/%s on %d rank(s), global batch %d, from step %d to %d", cfg.method.name,
             cfg.model.backbone, info.world_size, p.global_batch, step, cfg.train.max_steps)
    if probe is not None and step == 0:  # the untrained backbone: the baseline the probe must beat
        metrics.log_scalars(0, probe.run(p.model, p.method.backbone, info.device))
    p.model.train()
    pending_nan = set(cfg.train.inject_nan_steps)
    save_due = stopped_for_requeue = stopped_on_collapse = False
    started = time.monotonic()
    while step < cfg.train.max_steps:
        views = p.data.next_batch(step)
        p.monitor.arm(p.method, step)  # a health check after this step: its forward keeps the batch's embeddings
        lr = p.schedule.lr(step)
        set_lr(p.optimizer, lr)
        verdict, loss, grad_norm = train_step(p.model, p.optimizer, p.precision, p.guard, views, step,
                                              grad_clip=cfg.train.grad_clip, inject_nan=step in pending_nan)
        pending_nan.discard(step)
        if verdict.message:
            metrics.event(verdict.message, step)
        if verdict.action == "rollback":
            step = roll_back(p, cfg, metrics, verdict)
            continue
        step += 1
        p.data.commit()
        watchdog.at_step(step)  # progress, for the failure watchdog
        log_step(p, cfg, metrics, step, lr, float(loss), grad_norm)
        if probe is not None and probe.due(step, cfg.train.max_steps):  # kNN probe on labelled images
            with watchdog.slow("kNN probe"):
                metrics.log_scalars(step, probe.run(p.model, p.method.backbone, info.device))
        # a checkpoint taken inside a run of bad steps is not a good one to roll back to
        save_due = save_due or step % cfg.checkpoint.every_steps == 0
        saved_now = (save_due and p.guard.bad_in_a_row == 0) or step == cfg.train.max_steps
        if saved_now:
            save(p, cfg, step)
            save_due = False
        reason = stop_reason(p, stop_requested, step)
        if reason is not None:
            if not saved_now:
                save(p, cfg, step)
            stopped_for_requeue = reason == "requeue" and step < cfg.train.max_steps
            stopped_on_collapse = reason == "collapse"
            break
    p.checkpointer.wait()  # the last checkpoint is complete on every rank before returning
    return finish(p, metrics, step, time.monotonic() - started, stopped_for_requeue, stopped_on_collapse)


def stop_reason(p: TrainingParts, stop_requested: Callable[[], bool] | None, step: int) -> str | None:
    """After completed step ``step``, on every rank in the same order: "requeue" when any rank got
    the warning signal, "collapse" on a collapse alarm with ``monitor.stop_on_collapse`` (the ranks
    agree at checks), else None. The loop then stops with a checkpoint."""
    if stop_requested is not None and distributed.agree_any(stop_requested()):
        log.warning("stop requested (warning signal): stopping at step %d with a checkpoint", step)
        return "requeue"
    if p.monitor.should_stop(step):
        log.error("collapse alarm: stopped at step %d with a checkpoint (monitor.stop_on_collapse); "
                  "see the alarm above and metrics.jsonl's health/* numbers", step)
        return "collapse"
    return None


def log_step(p: TrainingParts, cfg: SeerConfig, metrics: MetricsLogger, step: int, lr: float, loss: float,
             grad_norm: float) -> None:
    """After a completed step: the plateau schedule and collapse check see the loss; the step's
    numbers go to metrics.jsonl, TensorBoard and the progress display."""
    message = p.schedule.observe(step, loss)
    if message:
        metrics.event(message, step)
    collapse = p.method.check_collapse(loss, step)
    if collapse:
        metrics.event(collapse, step)
    scalars = {"loss": loss, "lr": lr, "grad_norm": grad_norm}  # on the host already (the verdict's read)
    if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
        scalars.update(device_scalars(p))  # reads of the device: at logging time only
    if step % cfg.guard.grad_norm_every == 0:
        scalars.update({f"grad_norm/{k}": v for k, v in p.guard.grad_norms(p.method).items()})
    scalars.update(p.monitor.observe(p.method, step, metrics.event))  # health/*, every monitor.every_steps
    metrics.log_step(step, p.global_batch, scalars)


def device_scalars(p: TrainingParts) -> dict[str, float]:
    """The numbers that cost a collective or a read of the device: samples skipped on all ranks,
    and under fp16 the dynamic loss scale (halves at each overflow). Every rank calls it at the
    same steps."""
    skipped = all_reduce_sum(torch.tensor(float(p.data.skipped), device=p.info.device))
    scalars = {"data_skipped": int(skipped)}
    if p.precision.scaler.is_enabled():
        scalars["loss_scale"] = float(p.precision.scaler.get_scale())
    return scalars


def roll_back(p: TrainingParts, cfg: SeerConfig, metrics: MetricsLogger, verdict: Verdict) -> int:
    """Restore the newest checkpoint (but not the data position: the batches that led here are
    not replayed) with the LR cut by ``guard.rollback_lr_factor``; return its step."""
    p.checkpointer.wait()
    checkpoint = p.checkpointer.latest()
    if checkpoint is None:
        raise RuntimeError(f"{verdict.message}; no checkpoint to roll back to")
    lr_scale = p.schedule.scale * cfg.guard.rollback_lr_factor  # rollbacks compound
    step = p.checkpointer.load(checkpoint, skip=("stream",))
    p.schedule.scale = lr_scale
    if p.info.is_main:  # the cut is part of that checkpoint from now on: a restart keeps it
        update_shared_extras(checkpoint, schedule=p.schedule.state_dict())
    metrics.event(f"rolled back to {checkpoint.name}; LR now x{lr_scale:g} of the schedule", step)
    return step


def save(p: TrainingParts, cfg: SeerConfig, step: int) -> None:
    path = p.checkpointer.save(step, asynchronous=cfg.checkpoint.asynchronous)
    log.info("checkpoint %s%s", path, " (writing in the background)" if cfg.checkpoint.asynchronous else "")


def finish(p: TrainingParts, metrics: MetricsLogger, step: int, elapsed: float, stopped_for_requeue: bool,
           stopped_on_collapse: bool = False) -> dict:
    summary = {
        "step": step,
        "images_seen": metrics.images,
        "first_loss": metrics.first_loss,
        "last_loss": metrics.last_loss,
        "images_per_s": metrics.images / max(elapsed, 1e-9),
        "run_dir": str(p.run_dir),
        "checkpoint": str(latest_checkpoint(p.run_dir / "checkpoints") or ""),
        "stopped_for_requeue": stopped_for_requeue,
        "stopped_on_collapse": stopped_on_collapse,
        "torch_threads": torch.get_num_threads(),
        "image_stack": inspect_env(),  # which PIL, decoder, resizer and CPU color kernels this run used
    }
    metrics.close()
    if p.info.is_main:  # a picture of the run: loss, LR, images/s, kNN accuracy against steps
        summary["plot"] = str(plot_run(p.run_dir))
    p.data.close()
    distributed.shutdown()
    return summary
