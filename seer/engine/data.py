"""The run's batch source from its config: the one place that reads ``data.backend``.

``build_batch_source(cfg, info, run_dir)`` turns the ``data`` and ``augment`` sections into a
``data_pipeline.batch_source.BatchSource`` (the torch path, or DALI with the ``dali`` extra); the
loop then only calls its interface. ``data.shards`` may name an ``s3://`` prefix (with
``data.storage_options``): the source gets a ``data_pipeline.storage`` location. Crop and color
specs (what every view gets) are made here too, for the trainer, the benchmarks and the tests alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_pipeline.augment import ColorAugmentSpec
from data_pipeline.batch_source import BatchSource, StreamBatchSource
from data_pipeline.crops import CropSpec, MultiCrop
from data_pipeline.quarantine import rank_log_path
from data_pipeline.storage import where
from seer.config import SeerConfig
from seer.engine.distributed import DistInfo, decide_on_main, resolve_device


def crop_specs(cfg: SeerConfig) -> list[CropSpec]:
    ratio = (cfg.augment.ratio[0], cfg.augment.ratio[1])
    return [CropSpec(g.size, g.count, (g.scale[0], g.scale[1]), ratio) for g in cfg.augment.crops]


def color_specs(cfg: SeerConfig) -> list[ColorAugmentSpec]:
    """One color spec per view (crop groups may differ in blur and solarize: MoCo v3)."""
    a = cfg.augment
    specs = []
    for group in a.crops:
        spec = ColorAugmentSpec(
            jitter=tuple(a.color_jitter), jitter_p=a.color_jitter_p, grayscale_p=a.grayscale_p,
            blur_p=group.blur_p, blur_sigma=tuple(a.blur_sigma), solarize_p=group.solarize_p,
            mean=tuple(a.mean), std=tuple(a.std),
        )
        specs.extend([spec] * group.count)
    return specs


def build_batch_source(cfg: SeerConfig, info: DistInfo, run_dir: Path,
                       memory_format: torch.memory_format = torch.contiguous_format) -> BatchSource:
    """``memory_format``: the model's layout (``train.memory_format`` resolved for its backbone)."""
    d = cfg.data
    shards = where(d.shards, d.storage_options)
    common = dict(mode=d.mode, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                  retention_days=d.retention_days, decide=decide_on_main, memory_format=memory_format)
    # one quarantine file per rank (appends from many nodes to one NFS file are not atomic)
    files = dict(quarantine_path=rank_log_path(run_dir, info.rank))
    if d.backend == "dali":  # DALI crops and colors on its device; extra `dali`
        from data_pipeline.dali_loader import DaliBatchSource

        return DaliBatchSource(
            shards, crop_specs(cfg), color_specs(cfg), cfg.augment.flip_p, batch_size=cfg.train.batch_size,
            device=info.device, num_threads=max(1, d.num_workers), poll_seconds=d.poll_seconds,
            max_pixels=d.max_pixels, cache_dir=run_dir / "shard_index",
            shard_cache=(Path(d.cache_dir or run_dir / "shard_cache"), d.cache_gb), **files, **common,
        )
    color_device = info.device if cfg.augment.device == "auto" else resolve_device(cfg.augment.device, info.local_rank)
    # on a GPU with train.compile on, the color stage is compiled too (a few fused kernels per view)
    color_method = "compiled" if cfg.train.compile != "off" and color_device.type == "cuda" else "auto"
    return StreamBatchSource(
        shards, MultiCrop(crop_specs(cfg), flip_p=cfg.augment.flip_p), color_specs(cfg),
        batch_size=cfg.train.batch_size, num_workers=d.num_workers, device=info.device, color_device=color_device,
        window=d.shuffle_window, poll_seconds=d.poll_seconds, max_pixels=d.max_pixels, read_ahead=d.read_ahead,
        index_cache_dir=run_dir / "shard_index", color_method=color_method, **files, **common,
    )
