"""Manifest, content-hash index, retention, writer lock, and shard listing."""

from __future__ import annotations

import os
import time

import pytest
from images import photo_jpeg

from data_pipeline.manifest import (
    HASHES_NAME,
    Manifest,
    ManifestError,
    ShardInfo,
    WriterLockedError,
    shard_paths,
    writer_lock,
)
from data_pipeline.shards import ShardWriter, list_shards

DAY = 86400.0


def write_shard(folder, name, count=2):
    writer = ShardWriter(folder, name)
    for i in range(count):
        image = photo_jpeg(size=(32 + i, 32))
        writer.write(writer.next_key(), image, "jpg", {"i": i})
    path = writer.publish()
    return ShardInfo(name, count, path.stat().st_size, time.time())


def test_load_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Manifest.load(tmp_path / "nope")


def test_empty_folder_gives_empty_manifest_and_round_trip(tmp_path):
    manifest = Manifest.load(tmp_path)
    assert manifest.shards == [] and manifest.total_samples() == 0
    assert manifest.new_shard_name() == "shard-000000"
    manifest.add(ShardInfo("shard-000000", 3, 10240, 100.0))
    manifest.add(ShardInfo("shard-000004", 2, 20480, 200.0))
    with pytest.raises(ValueError, match="already"):
        manifest.add(ShardInfo("shard-000000", 1, 1, 1.0))
    manifest.save()
    loaded = Manifest.load(tmp_path)
    assert loaded.shards == manifest.shards
    assert loaded.total_samples() == 5
    assert loaded.new_shard_name() == "shard-000005"  # monotonic, never reuses a name
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("text", ["{", "[]", '{"format": "other", "shards": []}',
                                  '{"format": "seer-shards/1", "next_index": 0, "shards": [{}]}'])
def test_malformed_manifest_names_the_file(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match="manifest.json"):
        Manifest.load(tmp_path)


def test_active_and_retire_by_age(tmp_path):
    now = 1_000_000_000.0
    manifest = Manifest.load(tmp_path)
    ages_days = {"shard-000000": 10.0, "shard-000001": 3.0, "shard-000002": 0.5}
    for name, age in ages_days.items():
        info = write_shard(tmp_path, name)
        info.created = now - age * DAY
        manifest.add(info)
        manifest.append_hashes(name, [f"{ord(name[-1]):064x}"])
    manifest.save()
    assert [s.name for s in manifest.active(None, now)] == list(ages_days)
    assert [s.name for s in manifest.active(5, now)] == ["shard-000001", "shard-000002"]
    assert [s.name for s in manifest.active(1, now)] == ["shard-000002"]
    assert manifest.active(0, now) == []
    with pytest.raises(ValueError, match="retention_days"):
        manifest.active(-1, now)

    retired = manifest.retire(5, delete=True, now=now)
    assert [s.name for s in retired] == ["shard-000000"]
    assert not (tmp_path / "shard-000000.tar").exists()
    assert not (tmp_path / "shard-000000.idx").exists() and (tmp_path / "shard-000001.idx").exists()
    reloaded = Manifest.load(tmp_path)
    assert [s.name for s in reloaded.shards] == ["shard-000001", "shard-000002"]
    assert set(reloaded.load_hashes().values()) == {"shard-000001", "shard-000002"}
    assert "shard-000000" not in (tmp_path / HASHES_NAME).read_text()

    retired = reloaded.retire(1, delete=False, now=now)
    assert [s.name for s in retired] == ["shard-000001"]
    assert (tmp_path / "shard-000001.tar").exists()  # kept on disk, gone from the manifest
    assert shard_paths(tmp_path) == [tmp_path / "shard-000002.tar"]
    assert reloaded.retire(1, delete=True, now=now) == []
    assert Manifest.load(tmp_path).new_shard_name() == "shard-000003"


def test_hash_index_counts_only_listed_shards_and_survives_torn_lines(tmp_path):
    manifest = Manifest.load(tmp_path)
    manifest.add(ShardInfo("shard-000000", 1, 1, 1.0))
    manifest.append_hashes("shard-000000", ["a" * 64])
    manifest.append_hashes("shard-000001", ["b" * 64])  # never listed: a killed run
    with open(tmp_path / HASHES_NAME, "a") as handle:
        handle.write("c" * 30)  # torn line without newline
    manifest.append_hashes("shard-000000", ["d" * 64])
    assert manifest.load_hashes() == {"a" * 64: "shard-000000", "d" * 64: "shard-000000"}
    assert manifest.compact_hashes() == 2  # the unlisted line and the torn line
    lines = (tmp_path / HASHES_NAME).read_text().splitlines()
    assert lines == [f"{'a' * 64} shard-000000", f"{'d' * 64} shard-000000"]
    assert manifest.compact_hashes() == 0


def test_shard_paths_without_manifest_lists_tars_and_uses_mtime_for_retention(tmp_path):
    for name in ["00001", "00000"]:
        write_shard(tmp_path, name)
    (tmp_path / ".tmp-00002.tar").write_bytes(b"partial")
    (tmp_path / "00000_stats.json").write_text("{}")
    assert list_shards(tmp_path) == [tmp_path / "00000.tar", tmp_path / "00001.tar"]
    assert shard_paths(tmp_path) == list_shards(tmp_path)
    old = time.time() - 3 * DAY
    os.utime(tmp_path / "00000.tar", (old, old))
    assert shard_paths(tmp_path, retention_days=2) == [tmp_path / "00001.tar"]
    with pytest.raises(FileNotFoundError):
        shard_paths(tmp_path / "missing")


def test_writer_lock_is_exclusive(tmp_path):
    with writer_lock(tmp_path):
        with pytest.raises(WriterLockedError, match="another"):
            with writer_lock(tmp_path):
                pass
    with writer_lock(tmp_path):  # released
        pass
