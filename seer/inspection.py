"""``seer inspect``: what is in a shard folder or a checkpoint, or (``--env``) what this environment
decodes and resizes images with, as a dict (and a few lines)."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.manifest import Manifest, shard_paths
from data_pipeline.quarantine import merged_counts
from data_pipeline.shards import iter_shard
from data_pipeline.storage import is_remote, where
from seer.engine.checkpoint import load_extra, resolve_checkpoint


def inspect_shards(folder) -> dict:
    paths = shard_paths(folder)
    manifest = Manifest.load(folder)
    if manifest.shards:
        samples = sum(int(s.count) for s in manifest.shards)
        source = "manifest"
    else:
        samples = sum(1 for p in paths for _ in iter_shard(p))
        source = "read"
    return {
        "kind": "shards",
        "path": str(folder),
        "shards": len(paths),
        "samples": samples,
        "bytes": sum(p.stat().st_size for p in paths),
        "counted_from": source,
        "quarantined": merged_counts(folder),  # ingestion's rejects, by reason
    }


def inspect_checkpoint(path: Path) -> dict:
    checkpoint = resolve_checkpoint(path)
    shared = load_extra(checkpoint, 0)
    return {
        "kind": "checkpoint",
        "path": str(checkpoint),
        "step": int(shared.get("step", -1)),
        "model": shared.get("model_name"),
        "method": shared.get("method_name"),
        "world_size": len(shared.get("stream", [])),
        "bytes": sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()),
        # samples the run's ranks skipped, by reason (every rank's quarantine log, merged)
        "quarantined": merged_counts(checkpoint.parent.parent),
    }


def inspect_path(path: str | Path) -> dict:
    path = where(path)
    if is_remote(path):  # only shards live in object stores
        return inspect_shards(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir() and ((path / "manifest.json").is_file() or any(path.glob("*.tar"))):
        return inspect_shards(path)
    return inspect_checkpoint(path)


def inspect_env() -> dict:
    """The data workers' image stack here: PIL build (Pillow or Pillow-SIMD), decoder, resizer, and
    what runs the color stage when it runs on the CPU (numba kernels or numpy)."""
    import platform

    import torch

    from data_pipeline import color_cpu
    from data_pipeline.crops import decoder_info

    return {"kind": "environment", "python": platform.python_version(), "torch": torch.__version__, **decoder_info(),
            "color_cpu": color_cpu.BACKEND}
