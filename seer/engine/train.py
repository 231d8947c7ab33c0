"""The pretraining loop, top to bottom: set up, resume, then step, guard, log, checkpoint.

``pretrain(cfg)`` is what ``seer pretrain`` runs on every rank. It knows methods only through
their interface (``seer.methods``), data only through the stream's positions, and parallelism
only through ``seer.engine.parallel``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from data_pipeline.augment import ColorAugmentSpec, color_augment
from data_pipeline.crops import CropSpec, MultiCrop
from data_pipeline.manifest import shard_paths
from data_pipeline.quarantine import rank_log_path
from data_pipeline.shards import atomic_write_bytes
from data_pipeline.stream import ShardStream, StreamPosition, derive_seed, make_loader, resume_state
from data_pipeline.stream_plan import STATE_VERSION as STREAM_STATE_VERSION, pin_corpus
from seer.config import SeerConfig, config_from_yaml_text, to_yaml
from seer.engine import distributed
from seer.engine.distributed import resolve_device
from seer.engine.checkpoint import (
    Checkpointer,
    latest_checkpoint,
    rng_state,
    set_rng_state,
    update_shared_extras,
)
from seer.engine.guard import StabilityGuard, Verdict, global_inputs
from seer.engine.metrics import MetricsLogger, setup_logging
from seer.engine.optim import build_optimizer, build_schedule, set_lr
from seer.engine.parallel import autocast_context, grad_scaler, parallelize, unwrap
from seer.eval.during_training import TrainingProbe
from seer.plot import plot_run
from seer.methods import build_method

log = logging.getLogger("seer")


def crop_specs(cfg: SeerConfig) -> list[CropSpec]:
    ratio = (cfg.augment.ratio[0], cfg.augment.ratio[1])
    return [CropSpec(g.size, g.count, (g.scale[0], g.scale[1]), ratio) for g in cfg.augment.crops]


def color_specs(cfg: SeerConfig) -> list[ColorAugmentSpec]:
    """One colour spec per view (crop groups may differ in blur and solarize: MoCo v3)."""
    a = cfg.augment
    specs = []
    for group in a.crops:
        spec = ColorAugmentSpec(
            jitter=tuple(a.color_jitter),
            jitter_p=a.color_jitter_p,
            grayscale_p=a.grayscale_p,
            blur_p=group.blur_p,
            blur_sigma=tuple(a.blur_sigma),
            solarize_p=group.solarize_p,
            mean=tuple(a.mean),
            std=tuple(a.std),
        )
        specs.extend([spec] * group.count)
    return specs


def _dali_loader(cfg: SeerConfig, info, run_dir: Path, state: dict):
    """data.backend=dali: views (colour included) from a DALI pipeline on this rank's device."""
    from data_pipeline.dali_loader import DaliLoader

    return DaliLoader(
        cfg.data.shards, crop_specs(cfg), color_specs(cfg), cfg.augment.flip_p,
        batch_size=cfg.train.batch_size, mode=cfg.data.mode, seed=cfg.seed, rank=info.rank,
        world_size=info.world_size, device=info.device, num_threads=max(1, cfg.data.num_workers),
        retention_days=cfg.data.retention_days, poll_seconds=cfg.data.poll_seconds, max_pixels=cfg.data.max_pixels,
        cache_dir=run_dir / "shard_index", quarantine_path=rank_log_path(run_dir, info.rank), state=state,
    )


def batch_loader(stream: ShardStream, cfg: SeerConfig, device: torch.device):
    """The DataLoader over ``stream``; batches in page-locked memory when training on CUDA, so
    the ``non_blocking`` copies to the GPU are asynchronous."""
    loader = make_loader(stream, cfg.train.batch_size, cfg.data.num_workers)
    loader.pin_memory = device.type == "cuda"  # read when the iterator is created
    return loader


def _pinned_start(cfg: SeerConfig) -> dict:
    """Fixed mode, fresh start: rank 0 pins the corpus and every rank's stream starts from that
    pin (ranks listing a shared folder while a shard is published could pin different corpora)."""
    pin = distributed.decide_on_main(lambda: pin_corpus(cfg.data.shards, cfg.data.retention_days))
    return {"version": STREAM_STATE_VERSION, "mode": "fixed", "seed": cfg.seed, "pin": pin}


def _write_config(run_dir: Path, cfg: SeerConfig) -> None:
    path = run_dir / "config.yaml"
    text = to_yaml(cfg)
    if path.is_file() and path.read_text() != text:
        old = config_from_yaml_text(path.read_text())
        changed = [k for k in ("model", "method", "train", "optim", "schedule", "data", "augment") if getattr(old, k) != getattr(cfg, k)]
        log.warning("config differs from the one this run started with (sections: %s); using the new one", ", ".join(changed))
    atomic_write_bytes(path, text.encode())


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler,
    guard: StabilityGuard,
    views: list[torch.Tensor],
    step: int,
    *,
    precision: str,
    grad_clip: float | None,
    inject_nan: bool = False,
) -> tuple[Verdict, torch.Tensor, float]:
    """Forward, backward, guard verdict, and the update when the verdict is "step".

    Returns the verdict, the loss averaged over ranks and the global gradient norm. A
    "rollback" verdict leaves the model untouched: the caller restores the last checkpoint.
    """
    method = unwrap(model)
    device = views[0].device
    with autocast_context(precision, device, model):
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
    if scaler.is_enabled() and torch.isfinite(global_loss) and not math.isfinite(grad_norm):
        verdict = Verdict("step", "")  # fp16 overflow: the loss scaler skips the step and backs off
    else:
        verdict = guard.check(step, global_loss, grad_norm)
    if verdict.action == "step":
        scaler.step(optimizer)
        method.after_step(step)
    # also after a rollback verdict: unscale_ was called, and the scaler must be ready for the next
    # step (the rollback then restores the checkpoint's loss scale)
    scaler.update()
    return verdict, global_loss, grad_norm


def pretrain(cfg: SeerConfig, stop_requested: Callable[[], bool] | None = None) -> dict:
    """Train to ``cfg.train.max_steps`` (resuming from run.dir's newest checkpoint).

    ``stop_requested`` (cluster/: "the warning signal reached this rank") is asked after every
    step; once any rank says yes, all ranks stop at that step, save a complete checkpoint and
    return with ``stopped_for_requeue`` true, so a requeued job redoes no step.
    """
    info = distributed.init_distributed(cfg.train.device, deterministic=cfg.train.deterministic)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, info.rank)
    if not cfg.data.shards:
        raise ValueError("data.shards is not set: point it at a folder made by `seer ingest`")
    if not shard_paths(cfg.data.shards, retention_days=cfg.data.retention_days):
        raise ValueError(f"data.shards: no shards to serve in {cfg.data.shards}; make some with `seer ingest`")
    if info.is_main:
        _write_config(run_dir, cfg)
    if cfg.train.num_threads:  # e.g. 1 on a small CPU box, leaving the other cores to the data workers
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.seed + info.rank)
    random.seed(cfg.seed + info.rank)
    np.random.seed((cfg.seed + info.rank) % 2**32)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)

    with torch.device("meta"):  # no rank builds the full model: parallelize materialises its shards
        method = build_method(cfg)
    model = parallelize(method, info, cfg.parallel, cfg.train.precision, seed=cfg.seed)
    global_batch = cfg.train.batch_size * info.world_size
    optimizer = build_optimizer(unwrap(model), cfg.optim, global_batch)
    schedule = build_schedule(cfg.schedule, cfg.optim, global_batch, cfg.train.max_steps)
    guard = StabilityGuard(cfg.guard)
    scaler = grad_scaler(cfg.train.precision, info.device, model)
    checkpointer = Checkpointer(run_dir / "checkpoints", rank=info.rank, keep_last=cfg.checkpoint.keep_last)

    def restore(checkpoint: Path) -> tuple[int, dict]:
        try:
            extras = checkpointer.load(checkpoint, model, optimizer)
        except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
            lines = [line for line in str(err).splitlines() if line.strip() and not line.startswith((" ", "Traceback"))]
            first = lines[-1] if lines else type(err).__name__
            raise ValueError(
                f"cannot resume from {checkpoint}: it does not match this run's model/method/optimizer "
                f"({first}); use a new run.dir, or the config the run started with ({run_dir / 'config.yaml'})"
            ) from err
        shared, own = extras["shared"], extras["own"]
        schedule.load_state_dict(shared["schedule"])
        guard.load_state_dict(shared["guard"])
        if "scaler" in shared:
            scaler.load_state_dict(shared["scaler"])
        if "rng" in own:
            set_rng_state(own["rng"])
        if cfg.data.backend == "dali":  # DALI's per-rank checkpoints: data_pipeline.dali_loader says what resumes
            from data_pipeline.dali_loader import resume_dali_state

            return int(shared["step"]), resume_dali_state(shared.get("stream", []), info.rank, info.world_size)
        # every rank's saved position, re-dealt when the number of ranks or workers changed
        mine = resume_state(shared.get("stream", []), info.rank, info.world_size, cfg.data.num_workers)
        return int(shared["step"]), mine

    step, stream_state = 0, {}
    # one rank reads the pointer: a network file system may show ranks different folder states
    resume_from = distributed.decide_on_main(lambda: latest_checkpoint(run_dir / "checkpoints"))
    if resume_from is not None:
        step, stream_state = restore(resume_from)
        log.info("resumed from %s at step %d", resume_from, step)

    multicrop = MultiCrop(crop_specs(cfg), flip_p=cfg.augment.flip_p)
    colour_device = info.device if cfg.augment.device == "auto" else resolve_device(cfg.augment.device, info.local_rank)
    views_colour = color_specs(cfg)
    if cfg.data.mode == "fixed" and not stream_state and cfg.data.backend != "dali":
        stream_state = _pinned_start(cfg)
    if cfg.data.backend == "dali":  # DALI crops and colours on its device; the loader is its own position
        stream = position = _dali_loader(cfg, info, run_dir, stream_state)
    else:
        stream = ShardStream(
            cfg.data.shards,
            multicrop,
            mode=cfg.data.mode,
            seed=cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
            retention_days=cfg.data.retention_days,
            poll_seconds=cfg.data.poll_seconds,
            max_pixels=cfg.data.max_pixels,
            quarantine_path=rank_log_path(run_dir, info.rank),  # one file per rank (NFS appends)
            window=cfg.data.shuffle_window,
            index_cache_dir=run_dir / "shard_index",
            state=stream_state,
        )
        position = StreamPosition(stream_state)
    metrics = MetricsLogger(
        run_dir, enabled=info.is_main, start_step=step, max_steps=cfg.train.max_steps, log_every=cfg.train.log_every
    )
    probe = TrainingProbe(cfg, info.rank) if cfg.eval.every_steps > 0 else None
    first_loss = last_loss = None
    log.info(
        "training %s/%s on %d rank(s), global batch %d, from step %d to %d",
        cfg.method.name, cfg.model.backbone, info.world_size, global_batch, step, cfg.train.max_steps,
    )

    def save() -> None:
        shared = {
            "step": step,
            "schedule": schedule.state_dict(),
            "guard": guard.state_dict(),
            "scaler": scaler.state_dict(),
            "stream": distributed.all_gather_objects(position.state_dict()),
            "config": to_yaml(cfg),
            "model_name": cfg.model.backbone,
            "method_name": cfg.method.name,
        }
        path = checkpointer.save(
            step, model, optimizer, {"rng": rng_state()}, shared, asynchronous=cfg.checkpoint.asynchronous
        )
        log.info("checkpoint %s%s", path, " (writing in the background)" if cfg.checkpoint.asynchronous else "")

    if probe is not None and step == 0:  # the untrained backbone: the baseline the probe must beat
        metrics.log_scalars(0, probe.run(model, unwrap(model).backbone, info.device))
    model.train()
    pending_nan = set(cfg.train.inject_nan_steps)
    save_due = stopped_for_requeue = False
    started = time.monotonic()
    loader = stream if cfg.data.backend == "dali" else iter(batch_loader(stream, cfg, info.device))
    while step < cfg.train.max_steps:
        batch = next(loader)
        lr = schedule.lr(step)
        set_lr(optimizer, lr)
        views = batch["views"] if cfg.data.backend == "dali" else [
            color_augment(
                v.to(colour_device, non_blocking=True),
                views_colour[i],
                torch.Generator().manual_seed(derive_seed(cfg.seed, "colour", info.rank, step, i)),
            ).to(info.device, non_blocking=True)
            for i, v in enumerate(batch["views"])
        ]
        verdict, global_loss, grad_norm = train_step(
            model, optimizer, scaler, guard, views, step,
            precision=cfg.train.precision, grad_clip=cfg.train.grad_clip, inject_nan=step in pending_nan,
        )
        pending_nan.discard(step)
        if verdict.message:
            metrics.event(verdict.message, step)
        if verdict.action == "rollback":
            checkpointer.wait()
            checkpoint = distributed.decide_on_main(lambda: latest_checkpoint(run_dir / "checkpoints"))
            if checkpoint is None:
                raise RuntimeError(f"{verdict.message}; no checkpoint to roll back to")
            lr_scale = schedule.scale * cfg.guard.rollback_lr_factor  # rollbacks compound
            step, _ = restore(checkpoint)
            schedule.scale = lr_scale
            if info.is_main:  # the cut is part of that checkpoint from now on: a restart keeps it
                update_shared_extras(checkpoint, schedule=schedule.state_dict())
            metrics.event(f"rolled back to {checkpoint.name}; LR now x{lr_scale:g} of the schedule", step)
            continue
        step += 1
        position.update(batch)
        loss_value = float(global_loss)
        first_loss = loss_value if first_loss is None else first_loss
        last_loss = loss_value
        message = schedule.observe(step, loss_value)
        if message:
            metrics.event(message, step)
        check = getattr(unwrap(model), "check_collapse", None)
        collapse = check(loss_value, step) if check else None
        if collapse:
            metrics.event(collapse, step)
        skipped = distributed.all_reduce_sum(torch.tensor(float(position.total_skipped), device=info.device))
        scalars = {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), "data_skipped": int(skipped)}
        if scaler.is_enabled():  # fp16: the dynamic loss scale (halves at each overflow)
            scalars["loss_scale"] = float(scaler.get_scale())
        if step % cfg.guard.grad_norm_every == 0:
            scalars.update({f"grad_norm/{k}": v for k, v in guard.grad_norms(unwrap(model)).items()})
        metrics.log_step(step, global_batch, scalars)
        if probe is not None and probe.due(step, cfg.train.max_steps):  # kNN probe on labelled images
            metrics.log_scalars(step, probe.run(model, unwrap(model).backbone, info.device))
        # a checkpoint taken inside a run of bad steps is not a good one to roll back to
        save_due = save_due or step % cfg.checkpoint.every_steps == 0
        saved_now = (save_due and guard.bad_in_a_row == 0) or step == cfg.train.max_steps
        if saved_now:
            save()
            save_due = False
        if stop_requested is not None and distributed.agree_any(stop_requested()):
            if not saved_now:
                save()
            stopped_for_requeue = step < cfg.train.max_steps
            log.warning("stop requested (warning signal): stopping at step %d with a checkpoint", step)
            break
    checkpointer.wait()  # the stop checkpoint is complete on every rank before returning
    elapsed = time.monotonic() - started
    summary = {
        "step": step,
        "images_seen": metrics.images,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "images_per_s": metrics.images / max(elapsed, 1e-9),
        "run_dir": str(run_dir),
        "checkpoint": str(latest_checkpoint(run_dir / "checkpoints") or ""),
        "stopped_for_requeue": stopped_for_requeue,
        "torch_threads": torch.get_num_threads(),
    }
    metrics.close()
    if info.is_main:  # a picture of the run: loss, LR, images/s, kNN accuracy against steps
        summary["plot"] = str(plot_run(run_dir))
    del loader
    distributed.shutdown()
    return summary
