"""Ingestion end to end: exact counts, dedup on rerun, shard reading, recovery after kills, watch."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from images import photo_jpeg, tiny_png, truncated, write_odd_images
from PIL import Image

from data_pipeline.decode import validate_image
from data_pipeline.ingest import IngestError, ingest, watch
from data_pipeline.manifest import Manifest, shard_paths, writer_lock
from data_pipeline.quarantine import QuarantineLog
from data_pipeline.sample_corpus import build_sample_corpus
from data_pipeline.shards import iter_shard, list_shards
from data_pipeline.storage import ShardReadError

REPO_ROOT = Path(__file__).resolve().parents[1]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(out_dir: Path) -> dict[str, list]:
    """shard name -> samples, for every shard in the manifest (checked against it)."""
    manifest = Manifest.load(out_dir)
    result = {}
    for info in manifest.shards:
        assert not info.name.startswith(".tmp-")
        path = manifest.shard_path(info)
        samples = list(iter_shard(path))
        assert len(samples) == info.count, info
        assert path.stat().st_size == info.bytes, info
        for sample in samples:
            assert sample.image is not None and sample.meta["sha256"] == sha256(sample.image)
        result[info.name] = samples
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    return build_sample_corpus(tmp_path_factory.mktemp("corpus"))


def test_sample_corpus_is_real_deterministic_photos(corpus, tmp_path):
    assert len(corpus) == 95
    names = {p.stem for p in corpus}
    assert {"astronaut", "china", "flower", "moon", "astronaut-crop3"} <= names
    sizes = {}
    for path in corpus:
        with Image.open(path) as img:
            assert img.format == "JPEG"
            sizes[path.stem] = img.size
    for stem, (width, height) in sizes.items():
        if "-crop" in stem:
            full_w, full_h = sizes[stem.split("-crop")[0]]
            assert full_w / 2 <= width <= full_w and full_h / 2 <= height <= full_h
    again = build_sample_corpus(tmp_path, crops_per_photo=1)
    assert len(again) == 38
    first = {p.name: p.read_bytes() for p in corpus}
    assert all(p.read_bytes() == first[p.name] for p in again)  # same seed, same files


def test_odd_images_exact_counts_quarantine_and_rerun(tmp_path):
    expected = write_odd_images(tmp_path / "in")
    out = tmp_path / "shards"
    report = ingest([tmp_path / "in"], out, shard_max_count=5)
    accepted = [p for p, outcome in expected.items() if outcome == "accepted"]
    rejected = Counter(outcome for outcome in expected.values() if outcome != "accepted")
    assert report.accepted == len(accepted) == 12
    assert report.rejected == dict(rejected)
    assert report.duplicates == 0
    assert report.shards == ["shard-000000", "shard-000001", "shard-000002"]
    quarantine = QuarantineLog(out / "quarantine.jsonl")
    assert quarantine.counts() == dict(rejected)
    assert {(Path(e["source"]).name, e["reason"]) for e in quarantine.entries()} == {
        (p.name, outcome) for p, outcome in expected.items() if outcome != "accepted"}
    json.dumps(report.to_dict())

    samples = [s for shard in read_all(out).values() for s in shard]
    by_source = {Path(s.meta["source"]).name: s for s in samples}
    assert set(by_source) == {p.name for p in accepted}
    assert len({s.key for s in samples}) == len(samples)
    for path in accepted:
        sample = by_source[path.name]
        _, width, height = validate_image(path.read_bytes())
        assert (sample.meta["width"], sample.meta["height"]) == (width, height)
        assert sample.meta["ingest_time"] > 1.6e9
        if path.suffix == ".bmp":
            assert sample.ext == "png" and sample.meta["source_sha256"] == sha256(path.read_bytes())
        else:
            assert sample.image == path.read_bytes() and sample.ext == path.suffix[1:]
    assert by_source["rotated.jpg"].meta["width"] == 32  # oriented size

    before = (out / "manifest.json").read_bytes()
    rerun = ingest([tmp_path / "in"], out, shard_max_count=5)
    assert (rerun.accepted, rerun.duplicates, rerun.shards) == (0, 12, [])
    assert rerun.rejected == dict(rejected)
    assert (out / "manifest.json").read_bytes() == before


def test_shards_respect_count_and_byte_limits(corpus, tmp_path):
    report = ingest([corpus[0].parent], tmp_path / "by_count", shard_max_count=10)
    manifest = Manifest.load(tmp_path / "by_count")
    assert [s.count for s in manifest.shards] == [10] * 9 + [5]
    assert manifest.total_samples() == report.accepted == 95
    keys = [s.key for samples in read_all(tmp_path / "by_count").values() for s in samples]
    assert keys[:2] == ["shard-000000-000000", "shard-000000-000001"]
    assert keys[-1] == "shard-000009-000004" and len(set(keys)) == 95

    limit = 400_000
    ingest([corpus[0].parent], tmp_path / "by_bytes", shard_max_bytes=limit)
    manifest = Manifest.load(tmp_path / "by_bytes")
    assert manifest.total_samples() == 95 and len(manifest.shards) > 5
    for info in manifest.shards:
        assert info.bytes <= limit or info.count == 1


def test_packing_order_is_shuffled_by_a_recorded_seed(corpus, tmp_path):
    files = sorted(corpus[:12])
    ingest(files, tmp_path / "out", shard_max_count=5, shuffle_seed=3)
    manifest = Manifest.load(tmp_path / "out")
    assert [s.shuffle_seed for s in manifest.shards] == [3, 3, 3]
    packed = [s.meta["source"] for p in shard_paths(tmp_path / "out") for s in iter_shard(p)]
    expected = [os.path.abspath(f) for f in files]
    random.Random(3).shuffle(expected)
    assert packed == expected and packed != sorted(packed)


def test_source_kinds_and_bad_sources(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(photo_jpeg("astronaut.png"))
    (folder / "sub" / "b.jpg").write_bytes(photo_jpeg("chelsea.png"))
    (folder / ".hidden.jpg").write_bytes(photo_jpeg("coffee.png"))
    single = tmp_path / "single.jpg"
    single.write_bytes(photo_jpeg("rocket.jpg"))
    listed = tmp_path / "lists" / "more.txt"
    listed.parent.mkdir()
    (tmp_path / "lists" / "c.jpg").write_bytes(photo_jpeg("coins.png"))
    listed.write_text(f"# comment\n\nc.jpg\n{single}\n{folder / 'a.jpg'}\n")

    report = ingest([folder, single, f"@{listed}", listed], tmp_path / "out", shuffle_seed=None)
    assert report.accepted == 4  # a, sub/b, single, c; .hidden skipped
    assert report.duplicates == 0  # the same path listed twice is ingested once
    assert report.rejected == {"not_an_image": 1}  # the list file without "@"
    (entry,) = QuarantineLog(tmp_path / "out" / "quarantine.jsonl").entries()
    assert "prefix it with @" in entry["detail"]
    sources = [Path(s.meta["source"]).name for s in iter_shard(tmp_path / "out" / "shard-000000.tar")]
    assert sources == ["a.jpg", "b.jpg", "single.jpg", "c.jpg"]  # sorted walk, then given order (unshuffled)

    (tmp_path / "empty").mkdir()
    (tmp_path / "only_hidden").mkdir()
    (tmp_path / "only_hidden" / ".x").write_text("x")
    for bad, message in [([tmp_path / "missing.jpg"], "does not exist"),
                         ([tmp_path / "empty"], "contains no files"),
                         ([tmp_path / "only_hidden"], "contains no files"),
                         ([f"@{tmp_path / 'nolist.txt'}"], "does not exist"),
                         ([], "no sources")]:
        with pytest.raises(IngestError, match=message):
            ingest(bad, tmp_path / "never")
    listed.write_text("c.jpg\nmissing-from-list.jpg\n")
    with pytest.raises(IngestError, match="more.txt line 2"):
        ingest([f"@{listed}"], tmp_path / "never")
    assert not (tmp_path / "never").exists()  # nothing written before sources are checked

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    (junk / "tiny.png").write_bytes(tiny_png())
    report = ingest([junk], tmp_path / "junk_out")
    assert (report.accepted, report.rejected, report.shards) == (0, {"not_an_image": 1, "too_small": 1}, [])


def write_img2dataset_shard(path: Path, first_key: int, count: int) -> None:
    with tarfile.open(path, "w") as archive:
        for i in range(first_key, first_key + count):
            key = f"{i:09d}"
            members = {"jpg": photo_jpeg(size=(40 + i, 40)), "txt": f"caption {i}".encode(),
                       "json": json.dumps({"key": key, "status": "success", "caption": f"caption {i}"}).encode()}
            if i == first_key + 1:
                del members["jpg"]  # a sample whose download failed: meta only
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))


def test_reads_img2dataset_layout(tmp_path):
    write_img2dataset_shard(tmp_path / "00000.tar", 0, 4)
    write_img2dataset_shard(tmp_path / "00001.tar", 10000, 3)
    (tmp_path / "00000_stats.json").write_text('{"count": 4}')
    (tmp_path / "00000.parquet").write_bytes(b"PAR1 not really PAR1")
    paths = shard_paths(tmp_path)
    assert paths == [tmp_path / "00000.tar", tmp_path / "00001.tar"]
    samples = [s for path in paths for s in iter_shard(path)]
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002", "000000003",
                                        "000010000", "000010001", "000010002"]
    assert [s.image is None for s in samples].count(True) == 2
    for sample in samples:
        assert sample.meta["key"] == sample.key
        assert sample.extras == {"txt": sample.meta["caption"].encode()}
        if sample.image is not None:
            assert sample.ext == "jpg" and Image.open(io.BytesIO(sample.image)).size[1] == 40


def test_damaged_shards_raise_after_yielding_readable_samples(corpus, tmp_path):
    ingest(corpus[:6], tmp_path / "out", shard_max_count=6)
    data = (tmp_path / "out" / "shard-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as archive:
        offsets = [m.offset for m in archive.getmembers()]
    cases = {
        "cut_in_member": (data[: offsets[7] + 700], 3),
        "cut_at_member_boundary": (data[: offsets[8]], 4),
        "damaged_header": (data[: offsets[6]] + b"\x07" * 512 + data[offsets[6] + 512:], 3),
    }
    for name, (damaged, readable) in cases.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(damaged)
        got = []
        with pytest.raises(ShardReadError) as caught:
            for sample in iter_shard(path):
                got.append(sample.key)
        assert len(got) == readable, name
        assert caught.value.path == path
    with pytest.raises(ShardReadError, match="No such file"):
        list(iter_shard(tmp_path / "absent.tar"))


def test_recovery_adopts_good_unlisted_shard_and_removes_bad_one(corpus, tmp_path):
    out = tmp_path / "out"
    ingest(corpus[:12], out, shard_max_count=4)

    def forget_last_shard():  # = killed between the tar rename and the manifest save
        manifest = Manifest.load(out)
        last = manifest.shards.pop()
        manifest.next_index -= 1
        manifest.save()
        return last

    last = forget_last_shard()
    (out / ".tmp-shard-000003.tar").write_bytes(b"half written")
    report = ingest(corpus[:12], out, shard_max_count=4)
    assert report.recovered_shards == [last.name] and report.shards == []
    assert report.duplicates == 12 and report.accepted == 0
    assert not (out / ".tmp-shard-000003.tar").exists()
    assert Manifest.load(out).shards[-1].count == last.count

    last = forget_last_shard()
    path = out / f"{last.name}.tar"
    damaged = bytearray(path.read_bytes())
    damaged[600:620] = b"\x00" * 20  # inside the first image: its sha256 no longer matches
    path.write_bytes(bytes(damaged))
    report = ingest(corpus[:12], out, shard_max_count=4)
    assert report.recovered_shards == [] and report.accepted == 4 and report.duplicates == 8
    assert report.shards == [last.name]  # re-ingested under the freed name
    assert QuarantineLog(out / "quarantine.jsonl").counts() == {"unlisted_shard_removed": 1}
    hashes = [s.meta["sha256"] for shard in read_all(out).values() for s in shard]
    assert sorted(hashes) == sorted(sha256(p.read_bytes()) for p in corpus[:12])

    # retired shards stay retired even when their files are kept
    Manifest.load(out).retire(0, delete=False)
    report = ingest(corpus[:4], out, shard_max_count=4)
    assert report.recovered_shards == [] and report.accepted == 4  # retired content forgotten
    assert [s.name for s in Manifest.load(out).shards] == ["shard-000003"]


def test_second_writer_is_refused(corpus, tmp_path):
    (tmp_path / "out").mkdir()
    with writer_lock(tmp_path / "out"):
        with pytest.raises(IngestError, match="another ingest"):
            ingest(corpus[:1], tmp_path / "out")


CHILD = """
import sys
from data_pipeline.ingest import ingest
print("ready", flush=True)
ingest([sys.argv[1]], sys.argv[2], shard_max_count=5)
"""


@pytest.mark.slow
def test_kill_9_at_random_moments_never_breaks_the_shard_folder(corpus, tmp_path):
    rng = random.Random(1)
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    files = []
    for path in corpus[:57]:
        img = Image.open(path)
        img.thumbnail((128, 128))
        files.append((f"{path.stem}.jpg", _jpeg(img)))
    valid = {sha256(data) for _, data in files}
    files += [("broken.jpg", truncated(files[0][1])), ("text.jpg", b"text " * 50), ("tiny.png", tiny_png())]
    rng.shuffle(files)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-c", CHILD, str(source), str(out)]

    batches = [files[i::8] for i in range(8)]  # every round brings new work
    for round_files in batches:
        for name, data in round_files:
            (source / name).write_bytes(data)
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, cwd=tmp_path)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        read_all(out)  # listed shards only, each complete with its listed count and bytes

    finished = subprocess.run(command, env=env, capture_output=True, cwd=tmp_path, timeout=120)
    assert finished.returncode == 0, finished.stderr.decode()
    stored = [s.meta["sha256"] for shard in read_all(out).values() for s in shard]
    assert len(stored) == len(set(stored)) == 57  # no duplicates, nothing lost
    assert set(stored) == valid
    listed = {f"{s.name}.tar" for s in Manifest.load(out).shards}
    assert {p.name for p in list_shards(out)} == listed  # no orphan shard files
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert set(Manifest.load(out).load_hashes()) == valid


def _jpeg(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def wait_for(condition, timeout: float = 15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_watch_publishes_dropped_files_and_stops(tmp_path):
    drop, out = tmp_path / "drop", tmp_path / "out"
    drop.mkdir()
    stop = threading.Event()
    reports = []
    thread = threading.Thread(target=lambda: reports.append(watch(
        drop, out, poll_seconds=0.1, stop=stop, min_age_seconds=0.3, shard_max_count=100)))
    thread.start()
    try:
        for i, name in enumerate(["astronaut.png", "chelsea.png", "coffee.png"]):
            (drop / f"p{i}.jpg").write_bytes(photo_jpeg(name))
        (drop / "sub").mkdir()
        (drop / "sub" / "bad.jpg").write_bytes(b"not an image")
        (drop / "copying.part").write_bytes(b"partial download")
        growing = drop / "growing.jpg"  # still being copied: modified "now"
        full = photo_jpeg("rocket.jpg")
        growing.write_bytes(truncated(full))
        future = time.time() + 3600
        os.utime(growing, (future, future))

        assert wait_for(lambda: Manifest.load(out).total_samples() == 3 if out.exists() else False)
        assert wait_for(lambda: not (drop / "p2.jpg").exists())
        assert sorted(p.name for p in (drop / ".done").iterdir()) == ["p0.jpg", "p1.jpg", "p2.jpg"]
        assert wait_for(lambda: (drop / ".rejected" / "sub" / "bad.jpg").exists())
        assert growing.exists() and (drop / "copying.part").exists()  # left alone

        growing.write_bytes(full)  # copy finished
        past = time.time() - 10
        os.utime(growing, (past, past))
        assert wait_for(lambda: Manifest.load(out).total_samples() == 4)
        (drop / "again.jpg").write_bytes(photo_jpeg("astronaut.png"))  # already ingested
        assert wait_for(lambda: (drop / ".done" / "again.jpg").exists())
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    (report,) = reports
    assert (report.accepted, report.duplicates, report.rejected) == (4, 1, {"not_an_image": 1})
    assert len(report.shards) == 2  # partial shards flushed when the drop folder went quiet
