"""The sample stream over real shards: exact epochs in fixed mode across ranks and DataLoader
workers, exact resume from a saved position, and new shards picked up by an online stream."""

import threading
import time
from collections import Counter

import pytest

from data_pipeline.crops import CropSpec, MultiCrop
from data_pipeline.ingest import ingest
from data_pipeline.shards import iter_shard
from data_pipeline.manifest import shard_paths
from data_pipeline.stream import ShardStream, StreamPosition, make_loader

CROPS = MultiCrop([CropSpec(16, 1, (0.5, 1.0))])


def all_keys(folder):
    return sorted(s.key for p in shard_paths(folder) for s in iter_shard(p))


def stream(folder, **kw):
    kw.setdefault("mode", "fixed")
    return ShardStream(folder, CROPS, seed=7, **kw)


def epoch_keys(folder, rank, world, workers, epoch=0):
    """Keys one rank yields in ``epoch`` (reads until every worker has moved past it)."""
    keys, finished = [], set()
    for batch in make_loader(stream(folder, rank=rank, world_size=world), batch_size=1, num_workers=workers):
        position = batch["position"]
        if position["epoch"] == epoch:
            keys.extend(batch["keys"])
        elif position["epoch"] > epoch:
            finished.add(position["slot"])
            if len(finished) == workers:
                break
    return keys


@pytest.mark.slow
@pytest.mark.parametrize("world,workers", [(1, 2), (2, 2)])
def test_fixed_mode_epoch_is_the_corpus_once(shard_dir, world, workers):
    seen = Counter()
    for rank in range(world):
        seen.update(epoch_keys(shard_dir, rank, world, workers))
    assert sorted(seen) == all_keys(shard_dir)
    assert set(seen.values()) == {1}


def test_fixed_mode_more_slots_than_shards(shard_dir):
    """5 shards, 8 slots: samples, not shards, are dealt out; still exactly once."""
    seen = Counter()
    for rank in range(8):
        s = stream(shard_dir, rank=rank, world_size=8)
        for item in s:
            if item["position"]["epoch"] > 0:
                break
            seen[item["key"]] += 1
    assert sorted(seen) == all_keys(shard_dir) and set(seen.values()) == {1}


def run_keys(folder, n_batches, state=None, workers=2, mode="fixed"):
    loader = make_loader(stream(folder, mode=mode, state=state), batch_size=3, num_workers=workers)
    position = StreamPosition(state)
    keys = []
    for i, batch in enumerate(loader):
        if i == n_batches:
            break
        keys.append(batch["keys"])
        position.update(batch)
    return keys, position.state_dict()


@pytest.mark.parametrize("mode", ["fixed", "online"])
@pytest.mark.parametrize("stop_after", [5, 8])
def test_resume_continues_the_same_key_sequence(shard_dir, mode, stop_after):
    """Crossing an epoch (fixed: 38 samples in 13 batches of 3) and odd worker boundaries."""
    uninterrupted, _ = run_keys(shard_dir, 16, mode=mode)
    first, state = run_keys(shard_dir, stop_after, mode=mode)
    rest, _ = run_keys(shard_dir, 16 - stop_after, state=state, mode=mode)
    assert first + rest == uninterrupted


def test_online_stream_picks_up_new_shard(tmp_path, photo_dir):
    folder = tmp_path / "shards"
    ingest([photo_dir / "astronaut.jpg", photo_dir / "coffee.jpg"], folder)
    old = set(all_keys(folder))
    s = stream(folder, mode="online", poll_seconds=1.0)
    published = {}

    def publish():
        time.sleep(1.0)
        ingest([photo_dir / "chelsea.jpg"], folder)
        published["at"] = time.monotonic()

    thread = threading.Thread(target=publish)
    thread.start()
    deadline = time.monotonic() + 30
    new_key = None
    for item in s:
        if item["key"] not in old:
            new_key = item["key"]
            break
        assert time.monotonic() < deadline, "new shard never served"
    thread.join()
    assert new_key is not None
    assert time.monotonic() - published["at"] <= 1.0 + 1.0  # within one poll interval (+ read time)


def test_bad_samples_are_skipped_and_quarantined(tmp_path, photo_dir):
    """A shard holding a sample whose bytes no longer decode: skipped, counted, logged."""
    import json
    from data_pipeline.shards import ShardWriter

    folder = tmp_path / "shards"
    folder.mkdir()
    good = (photo_dir / "coffee.jpg").read_bytes()
    writer = ShardWriter(folder, "shard-000000")
    writer.write("shard-000000-000000", good, "jpg", {"source": "a"})
    writer.write("shard-000000-000001", good[: len(good) // 3], "jpg", {"source": "b"})
    writer.write("shard-000000-000002", good, "jpg", {"source": "c"})
    writer.publish()
    log = tmp_path / "quarantine.jsonl"
    items = []
    for item in ShardStream(folder, CROPS, mode="fixed", quarantine_path=log):
        if item["position"]["epoch"] > 0:
            assert item["skipped"] >= 1  # the running count of skipped samples travels along
            break
        items.append(item)
    assert sorted(i["key"] for i in items) == ["shard-000000-000000", "shard-000000-000002"]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["key"] == "shard-000000-000001" and records[0]["shard"] == "shard-000000.tar"


def test_a_stream_that_decodes_nothing_stops_loudly(tmp_path, monkeypatch):
    import data_pipeline.stream as stream_module
    from data_pipeline.shards import ShardWriter

    folder = tmp_path / "shards"
    folder.mkdir()
    writer = ShardWriter(folder, "shard-000000")
    for i in range(5):
        writer.write(f"shard-000000-{i:06d}", b"\xff\xd8 not really a jpeg", "jpg", {"source": str(i)})
    writer.publish()
    monkeypatch.setattr(stream_module, "MAX_FAILURES_IN_A_ROW", 3)
    with pytest.raises(RuntimeError, match="3 samples in a row failed to decode"):
        next(iter(ShardStream(folder, CROPS, mode="online", quarantine_path=tmp_path / "q.jsonl")))


def test_shards_without_index_are_indexed_on_first_read(tmp_path):
    """img2dataset-style tars (no manifest, no index): counted and read through indexes built once."""
    from test_shard_index import img2dataset_like_shard

    folder = tmp_path / "foreign"
    folder.mkdir()
    for s in range(2):
        img2dataset_like_shard(folder / f"{s:05d}.tar", n=4)
    keys = []
    for item in stream(folder):
        if item["position"]["epoch"] > 0:
            break
        keys.append(item["key"])
    assert sorted(keys) == sorted([f"{i:09d}" for i in range(4)] * 2)  # both tars use keys 0-3
    assert sorted(p.name for p in folder.glob("*.idx")) == ["00000.idx", "00001.idx"]


def test_plan_travels_once_per_worker(shard_dir):
    items = [item for _, item in zip(range(5), stream(shard_dir))]
    assert "stream" in items[0] and all("stream" not in i for i in items[1:])
    assert {i["deal_id"] for i in items} == {items[0]["stream"]["deal_id"]}


def test_cached_tables_serve_the_same_stream(shard_dir, tmp_path):
    plain = [item["key"] for _, item in zip(range(12), stream(shard_dir))]
    cached = [item["key"] for _, item in zip(range(12), stream(shard_dir, index_cache_dir=tmp_path))]
    assert cached == plain and len(list(tmp_path.glob("*.table.npy"))) == 5


def test_an_unreadable_shard_is_skipped_sample_by_sample(shard_dir, tmp_path, caplog):
    import json
    import shutil

    from data_pipeline.manifest import Manifest

    folder = tmp_path / "shards"
    shutil.copytree(shard_dir, folder)
    broken = Manifest.load(folder).shards[1]
    (folder / f"{broken.name}.tar").write_bytes(b"not a tar at all" * 100)
    (folder / f"{broken.name}.idx").unlink()
    log = tmp_path / "q.jsonl"
    keys = []
    with caplog.at_level("WARNING"):
        for item in stream(folder, quarantine_path=log):
            if item["position"]["epoch"] > 0:
                break
            keys.append(item["key"])
    assert sorted(keys) == [k for k in all_keys(shard_dir) if not k.startswith(broken.name)]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == broken.count and {r["reason"] for r in records} == {"sample_unreadable"}
    assert caplog.text.count(f"shard {broken.name}.tar is unreadable") == 1
