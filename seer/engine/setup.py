"""Everything a run holds before its first step.

``start_run(cfg)``: the process group and device, the run folder and its logs, the config
snapshot, the failure watchdog (``seer.engine.watchdog``), threads, seeds and determinism.
``build_parts(cfg, info, run_dir)``: the method spread over the ranks, its
:class:`~seer.engine.parallel.Precision`, the optimizer, the LR schedule, the stability guard,
the batch source, and the :class:`~seer.engine.checkpoint.Checkpointer` that saves and restores
all of them as stateful parts; and the health monitor (not saved). Each part builds itself from
its own config section; the loop (``seer.engine.train``) only uses them.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_pipeline.batch_source import BatchSource
from data_pipeline.manifest import shard_paths
from data_pipeline.storage import atomic_write_bytes, where
from seer.config import SeerConfig, config_from_yaml_text, to_yaml
from seer.engine import distributed, watchdog
from seer.engine.checkpoint import Checkpointer, RNGState
from seer.engine.data import build_batch_source
from seer.engine.distributed import DistInfo
from seer.engine.guard import StabilityGuard
from seer.engine.metrics import setup_logging
from seer.engine.monitor import HealthMonitor
from seer.engine.optim import Schedule, build_optimizer, build_schedule
from seer.engine.parallel import Precision, parallelize, resolve_memory_format, unwrap
from seer.methods import Method, build_method

log = logging.getLogger("seer")


@dataclass
class TrainingParts:
    info: DistInfo
    run_dir: Path
    model: nn.Module  # as parallelized (FSDP2, DDP or plain)
    method: Method  # the same module unwrapped: its hooks and its backbone
    precision: Precision
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    guard: StabilityGuard
    data: BatchSource
    checkpointer: Checkpointer
    global_batch: int
    monitor: HealthMonitor  # health numbers every monitor.every_steps, the collapse alarm


def start_run(cfg: SeerConfig) -> tuple[DistInfo, Path]:
    info = distributed.init_distributed(cfg.train.device, deterministic=cfg.train.deterministic,
                                        timeout_s=cfg.train.slow_timeout_s + 60)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, info.rank)
    if not cfg.data.shards:
        raise ValueError("data.shards is not set: point it at a folder made by `seer ingest`")
    # also the start-up check of an s3:// corpus: no such bucket, access denied, no endpoint: one line
    if not shard_paths(where(cfg.data.shards, cfg.data.storage_options), retention_days=cfg.data.retention_days):
        raise ValueError(f"data.shards: no shards to serve in {cfg.data.shards}; make some with `seer ingest`")
    if info.is_main:
        write_config(run_dir, cfg)
    crash = (cfg.train.inject_crash_rank, cfg.train.inject_crash_step) if cfg.train.inject_crash_step else None
    watchdog.start(run_dir, info, timeout_s=cfg.train.failure_timeout_s, slow_timeout_s=cfg.train.slow_timeout_s,
                   crash_at=crash)
    if cfg.train.num_threads:  # e.g. 1 on a small CPU box, leaving the other cores to the data workers
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.seed + info.rank)
    random.seed(cfg.seed + info.rank)
    np.random.seed((cfg.seed + info.rank) % 2**32)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    return info, run_dir


def write_config(run_dir: Path, cfg: SeerConfig) -> None:
    """``run.dir/config.yaml``, with a warning when it differs from the one the run started with."""
    path = run_dir / "config.yaml"
    text = to_yaml(cfg)
    if path.is_file() and path.read_text() != text:
        old = config_from_yaml_text(path.read_text())
        sections = ("model", "method", "train", "optim", "schedule", "data", "augment")
        changed = [k for k in sections if getattr(old, k) != getattr(cfg, k)]
        log.warning("config differs from the one this run started with (sections: %s); using the new one",
                    ", ".join(changed))
    atomic_write_bytes(path, text.encode())


def build_parts(cfg: SeerConfig, info: DistInfo, run_dir: Path) -> TrainingParts:
    with torch.device("meta"):  # no rank builds the full model: parallelize materialises its shards
        method = build_method(cfg)
    memory_format = resolve_memory_format(cfg.train.memory_format, method.backbone, info.device)
    model, precision = parallelize(method, info, cfg.parallel, cfg.train.precision, seed=cfg.seed,
                                   compile_mode=cfg.train.compile, memory_format=memory_format,
                                   # inductor's deterministic mode (no autotuning by timing) matters on GPUs only
                                   deterministic=cfg.train.deterministic and info.device.type == "cuda")
    global_batch = cfg.train.batch_size * info.world_size
    optimizer = build_optimizer(unwrap(model), cfg.optim, global_batch)
    schedule = build_schedule(cfg.schedule, cfg.optim, global_batch, cfg.train.max_steps)
    guard = StabilityGuard(cfg.guard)
    data = build_batch_source(cfg, info, run_dir, memory_format=memory_format)  # views in the model's layout
    checkpointer = Checkpointer(
        run_dir / "checkpoints", rank=info.rank, keep_last=cfg.checkpoint.keep_last, model=model,
        optimizer=optimizer, shared={"schedule": schedule, "guard": guard, "scaler": precision.scaler},
        gathered={"stream": data}, own={"rng": RNGState()},
        metadata={"config": to_yaml(cfg), "model_name": cfg.model.backbone, "method_name": cfg.method.name},
    )
    return TrainingParts(info, run_dir, model, unwrap(model), precision, optimizer, schedule, guard, data,
                         checkpointer, global_batch, monitor=HealthMonitor(cfg.monitor))
