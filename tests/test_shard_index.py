"""Shard indexes in DALI's wds2idx format: written by ingest, built for foreign shards, checked
against DALI's own tool and reader, cached when the shard folder is read-only, rebuilt when stale;
and single samples read back by seek + read."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data_pipeline.sample_reader import SampleReader
from data_pipeline.shard_index import (
    ShardIndexError,
    cached_index_path,
    ensure_index,
    index_path_for,
    read_index,
)
from data_pipeline.shards import iter_shard


def img2dataset_like_shard(path, n=5):
    """A tar as other tools write it (no index, numeric keys, .jpg/.txt/.json, GNU format)."""
    from images import photo_jpeg

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(n):
            for ext, payload in (("jpg", photo_jpeg(size=(40 + i, 32))), ("txt", f"caption {i}".encode()),
                                 ("json", b"{}")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def test_ingest_writes_a_dali_index_beside_every_shard(shard_dir):
    for shard in sorted(shard_dir.glob("*.tar")):
        index = index_path_for(shard)
        assert index.is_file() and index.name == shard.stem + ".idx"
        lines = index.read_text().splitlines()
        assert lines[0] == f"v1.2 {len(lines) - 1}"
        entries = read_index(index)
        samples = list(iter_shard(shard))
        assert [e.key for e in entries] == [s.key for s in samples]
        with open(shard, "rb") as handle:
            for entry, sample in zip(entries, samples):
                assert set(entry.components) == {sample.ext, "json"}
                offset, size = entry.components[sample.ext]
                assert offset % 512 == 0
                handle.seek(offset)
                assert handle.read(size) == sample.image


WDS2IDX = Path(sys.executable).parent / "wds2idx"  # installed with the DALI wheel (extra `dali`)


@pytest.mark.skipif(not WDS2IDX.is_file(), reason="DALI's wds2idx is not installed (pip install seer[dali])")
def test_index_is_byte_identical_to_dalis_wds2idx(shard_dir, tmp_path):
    foreign = img2dataset_like_shard(tmp_path / "00000.tar")
    for shard in [*sorted(shard_dir.glob("*.tar"))[:2], foreign]:
        theirs = tmp_path / f"{shard.stem}.dali.idx"
        subprocess.run([sys.executable, str(WDS2IDX), str(shard), str(theirs)], check=True, capture_output=True)
        assert ensure_index(shard).read_bytes() == theirs.read_bytes()


def test_dali_reader_accepts_the_index(shard_dir):
    dali = pytest.importorskip("nvidia.dali")
    import numpy as np

    shards = sorted(shard_dir.glob("*.tar"))
    expected = [s.image for p in shards for s in iter_shard(p)]

    @dali.pipeline_def(batch_size=len(expected), num_threads=1, device_id=None)
    def pipe():
        return dali.fn.readers.webdataset(paths=[str(p) for p in shards], index_paths=[str(ensure_index(p)) for p in shards],
                                          ext=["jpg;png;webp"], random_shuffle=False)

    p = pipe()
    p.build()
    (images,) = p.run()
    got = [np.array(images[i]).tobytes() for i in range(len(expected))]
    assert got == expected


def test_foreign_shard_gets_an_index_once_and_reads_by_offset(tmp_path):
    shard = img2dataset_like_shard(tmp_path / "00000.tar")
    index = ensure_index(shard)
    assert index == tmp_path / "00000.idx"
    stamp = index.stat().st_mtime_ns
    assert ensure_index(shard) == index and index.stat().st_mtime_ns == stamp  # valid: not rebuilt
    entries = read_index(index)
    assert [e.key for e in entries] == [f"{i:09d}" for i in range(5)]
    assert all(set(e.components) == {"jpg", "txt", "json"} for e in entries)
    reader = SampleReader()
    for i, sample in enumerate(iter_shard(shard)):
        got = reader.read(shard, i)
        assert (got.key, got.ext, got.image) == (sample.key, "jpg", sample.image)
    assert reader.read(shard, 5) is None  # beyond the shard: a missing sample, not a crash
    reader.close()


def make_read_only(folder):
    """chmod for a normal user; root writes through modes, so the immutable attribute then."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a folder read-only here (chattr failed)")
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o555)
    return lambda: folder.chmod(0o755)


def test_read_only_folder_caches_the_index_in_cache_dir(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    shard = img2dataset_like_shard(folder / "00000.tar")
    undo = make_read_only(folder)
    try:
        with pytest.raises(ShardIndexError, match="cache_dir"):
            ensure_index(shard)
        index = ensure_index(shard, cache_dir=tmp_path / "cache")
        assert index == cached_index_path(shard, tmp_path / "cache") and index.is_file()
        assert len(read_index(index)) == 5
        stamp = index.stat().st_mtime_ns
        assert ensure_index(shard, cache_dir=tmp_path / "cache") == index and index.stat().st_mtime_ns == stamp
        assert not index_path_for(shard).exists()
    finally:
        undo()


def test_stale_or_damaged_index_is_rebuilt_and_bad_files_are_clear_errors(tmp_path):
    shard = img2dataset_like_shard(tmp_path / "00000.tar", n=5)
    index = ensure_index(shard)
    img2dataset_like_shard(shard, n=3)  # the shard is replaced: the old index points elsewhere
    assert len(read_index(ensure_index(shard))) == 3
    index.write_text("v1.2 3\njpg 512\n")
    assert len(read_index(ensure_index(shard))) == 3
    index.write_text("v1.1 3\n")
    with pytest.raises(ShardIndexError, match="line 1"):
        read_index(index)
    index.write_text("v1.2 1\njpg 100 5 a.jpg\n")
    with pytest.raises(ShardIndexError, match="line 2"):
        read_index(index)


def test_truncated_shard_indexes_what_is_whole(tmp_path):
    shard = img2dataset_like_shard(tmp_path / "00000.tar", n=4)
    data = shard.read_bytes()
    last_jpg = read_index(ensure_index(shard))[-1].components["jpg"]
    shard.write_bytes(data[: last_jpg[0] + last_jpg[1] // 2])
    entries = read_index(ensure_index(shard))
    assert [e.key for e in entries] == ["000000000", "000000001", "000000002"]


def test_tables_are_cached_once_and_memory_mapped(tmp_path):
    import numpy as np

    shard = img2dataset_like_shard(tmp_path / "00000.tar")
    cache = tmp_path / "cache"
    first = SampleReader(cache_dir=cache)
    expected = [s.image for s in iter_shard(shard)]
    assert [first.read(shard, i).image for i in range(5)] == expected
    (table,) = cache.glob("*.table.npy")
    stamp = table.stat().st_mtime_ns
    second = SampleReader(cache_dir=cache)
    assert second.read(shard, 3).image == expected[3]
    assert isinstance(second.table(shard).records, np.memmap) and table.stat().st_mtime_ns == stamp
    img2dataset_like_shard(shard, n=2)  # replaced: a new table, not the stale one
    assert len(SampleReader(cache_dir=cache).table(shard)) == 2
    assert len(list(cache.glob("*.table.npy"))) == 2
