"""Shared fixtures: a small folder of real WebDataset shards built from real photographs,
and a tiny SwAV config that trains in seconds on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/distributed_utils.py, images.py
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    from data_pipeline.sample_corpus import build_sample_corpus

    out = tmp_path_factory.mktemp("photos")
    build_sample_corpus(out, crops_per_photo=1, seed=0)
    return out


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, photo_dir) -> Path:
    """38 real photos in 5 shards of at most 8 samples."""
    from data_pipeline.ingest import ingest

    out = tmp_path_factory.mktemp("shards")
    report = ingest([photo_dir], out, shard_max_count=8)
    assert report.accepted == 38 and not report.rejected
    return out


def tiny_overrides(shards: Path, run_dir: Path, **extra: object) -> list[str]:
    """A SwAV run on regnety_tiny at 32/16 px: a step takes well under a second on CPU."""
    values = {
        "data.shards": shards,
        "run.dir": run_dir,
        "data.num_workers": 1,
        "model.backbone": "regnety_tiny",
        "augment.crops": "[{size: 32, count: 2, scale: [0.14, 1.0]}, {size: 16, count: 2, scale: [0.05, 0.14]}]",
        "method.swav.head_hidden": "[32]",
        "method.swav.head_out": 16,
        "method.swav.n_prototypes": 10,
        "method.swav.freeze_prototypes_steps": 2,
        "train.batch_size": 4,
        "train.max_steps": 6,
        "train.log_every": 1,
        "train.device": "cpu",
        "checkpoint.every_steps": 2,
        "schedule.warmup_steps": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def sigkill_after_checkpoint(proc, run_dir: Path, step: int, timeout: float = 300.0) -> None:
    """SIGKILL the process group of ``proc`` (started with start_new_session=True) as soon as
    ``run_dir`` holds a checkpoint of ``step`` or later."""
    import os
    import signal
    import time

    latest = Path(run_dir) / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while not (latest.is_file() and latest.read_text().strip() >= f"step_{step:08d}"):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
