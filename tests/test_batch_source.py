"""The loop's batch source, both backends behind one interface: device-ready views, commit,
state, skipped; and the fixed-mode pin agreed once for both, on 2 real ranks while a shard is
published between two ranks' listings."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_overrides
from distributed_utils import run_distributed

QUICKSTART = REPO / "configs" / "quickstart.yaml"
HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
BACKENDS = ["torch", "dali"] if HAVE_DALI else ["torch"]
LATE = "late"


def _config(folder: Path, run_dir: Path, backend: str, **extra):
    from seer.config import load_config

    overrides = {"data.mode": "fixed", "data.backend": backend, "data.num_workers": 1, **extra}
    return load_config(QUICKSTART, tiny_overrides(folder, run_dir, **overrides))


def _publish_late_shard(folder: Path, photos: Path) -> None:
    from data_pipeline.ingest import ingest

    assert ingest([photos], folder, shard_max_count=8).accepted == 3


def _racing_pin(rank: int, folder: Path, photos: Path, signal: Path):
    """``pin_corpus`` as two ranks would race on it: rank 0 lists, then a shard is published;
    rank 1, if it ever lists itself, does so only after that publication."""
    import data_pipeline.stream_order as order

    original = order.pin_corpus

    def pin_corpus(shard_dir, retention_days=None):
        if rank == 1:
            deadline = time.monotonic() + 30
            while not signal.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        pin = original(shard_dir, retention_days)
        if rank == 0 and not signal.exists():
            _publish_late_shard(folder, photos)
            signal.touch()
        return pin

    return pin_corpus


def _pin_race_worker(rank: int, world: int, cases: list[tuple[str, str, str, str]]) -> dict:
    import data_pipeline.batch_source as batch_source
    import data_pipeline.stream as stream
    import data_pipeline.stream_order as order
    from seer.engine.data import build_batch_source
    from seer.engine.distributed import DistInfo

    out = {}
    for backend, folder, photos, run_dir in cases:
        folder, run_dir = Path(folder), Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        racing = _racing_pin(rank, folder, Path(photos), run_dir / "published")
        modules = [order, stream, batch_source]
        if backend == "dali":
            import data_pipeline.dali_loader as dali_loader

            modules.append(dali_loader)
        for module in modules:  # wherever a rank could list the folder itself
            module.pin_corpus = racing
        cfg = _config(folder, run_dir, backend)
        source = build_batch_source(cfg, DistInfo(rank, world, 0, torch.device("cpu")), run_dir)
        views = source.next_batch(0)
        source.commit()
        state = source.state_dict()
        out[backend] = {"pin": state["pin"], "shards": state.get("shards"), "samples": state.get("samples"),
                        "shapes": [tuple(v.shape) for v in views], "dtypes": sorted({str(v.dtype) for v in views}),
                        "published": (run_dir / "published").exists()}
        source.close()
    return out


def _late_photos(folder: Path) -> Path:
    from images import photo_jpeg

    folder.mkdir()
    for i, size in enumerate(((90, 70), (70, 90), (80, 80))):
        (folder / f"{LATE}{i}.jpg").write_bytes(photo_jpeg("coffee.png", size))
    return folder


@pytest.mark.slow
def test_ranks_train_on_the_corpus_pinned_once_while_a_shard_is_published(tmp_path, shard_dir):
    """Rank 0 pins; a shard is published; rank 1 starts afterwards: both read the same corpus,
    the one without the new shard (for DALI too, whose ranks used to pin by themselves)."""
    cases = []
    for backend in BACKENDS:
        folder = tmp_path / backend / "shards"
        shutil.copytree(shard_dir, folder)
        cases.append((backend, str(folder), str(_late_photos(tmp_path / backend / "photos")),
                      str(tmp_path / backend / "run")))
    before = {backend: sorted(p.name for p in Path(folder).glob("*.tar")) for backend, folder, _, _ in cases}
    ranks = run_distributed(_pin_race_worker, 2, cases, timeout=300)
    for backend, folder, _, _ in cases:
        zero, one = ranks[0][backend], ranks[1][backend]
        assert zero["published"] and len(list(Path(folder).glob("*.tar"))) == len(before[backend]) + 1
        assert zero["pin"] == one["pin"], backend
        assert zero["shapes"] == one["shapes"] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
        assert zero["dtypes"] == ["torch.float32"]
        if backend == "torch":
            assert zero["samples"] == one["samples"] == 38  # the late shard's 3 samples are not in it
        else:
            assert zero["shards"] == one["shards"] and sorted(zero["shards"]) == before[backend]


def test_state_round_trip_and_skipped_count(tmp_path, shard_dir):
    """Torch path, one rank: the position after committed batches resumes the same batches; an
    uncommitted batch is not counted as consumed."""
    from seer.engine.data import build_batch_source
    from seer.engine.distributed import DistInfo

    cfg = _config(shard_dir, tmp_path / "run", "torch", **{"data.num_workers": 0})
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    source = build_batch_source(cfg, info, tmp_path / "run")
    for step in range(2):
        source.next_batch(step)
        source.commit()
    state = source.state_dict()
    expected = [source.next_batch(2)]  # not committed: a resume starts again at this batch
    assert source.state_dict() == state and source.skipped == 0
    resumed = build_batch_source(cfg, info, tmp_path / "run")
    resumed.load_state_dict([state])
    got = resumed.next_batch(2)
    assert all(torch.equal(a, b) for a, b in zip(got, expected[0]))
    with pytest.raises(RuntimeError, match="before its first batch"):
        resumed.load_state_dict([state])
