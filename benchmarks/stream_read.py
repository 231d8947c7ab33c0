"""The stream's read path, one core: random access (seek + read per sample) against the previous
sequential read, and how mixed the batches are.

Run: ``python benchmarks/stream_read.py [--samples 1200] [--rounds 3]``. Prints two tables and
writes ``benchmarks/results/stream_read.json``. ``--remote``: instead, one worker's sample rate from
an S3 server with 0/20/100 ms per request against local disk (``benchmarks/stream_read_remote.py``).

Throughput. ``--samples`` real JPEGs (about 1100x830, quality 90, from the bundled photos, as in
``benchmarks/multicrop.py``) packed into shards of 100 with ``ShardWriter`` (index included), in
a temp folder on the local disk. Methods, all in this process with one torch thread, interleaved
round by round (the order rotating), median over rounds:

- ``previous (sequential)``: the stream as of commit ``BASELINE_COMMIT`` (its ``stream.py`` and
  ``stream_plan.py`` loaded from git), fixed mode: every worker reads shards front to back
  through webdataset's tar iterator.
- ``fixed``: the new fixed mode (a global permutation of all samples, one ``os.pread`` each);
  ``fixed, window 4``: the locality knob; ``online``: the new online draws.

"read" rows run a slot's sample sequence without decoding (decode excluded); "worker" rows run
the whole worker stage (read + decode + SwAV crops 2x224 + 6x96 via ``MultiCrop.from_bytes``).
"cold" rows first evict the shards from the page cache (``posix_fadvise(DONTNEED)``), so reads
come from the disk; "warm" rows read from the page cache.

Mixing. A class-folder tree (10 classes x 100 small crops of 10 photos) ingested once with the
default shuffled packing and once in path order (every shard one class); the mean number of
distinct classes in a batch of 32 (over 20 batches of one slot) for the previous stream and the
new modes and windows.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from multicrop import SWAV_CROPS, machine, make_images  # noqa: E402

from data_pipeline.crops import CropSpec, MultiCrop  # noqa: E402
from data_pipeline.ingest import ingest  # noqa: E402
from data_pipeline.sample_corpus import build_class_folders, classes_of_keys  # noqa: E402
from data_pipeline.sample_reader import SampleReader  # noqa: E402
from data_pipeline.shards import ShardWriter  # noqa: E402
from data_pipeline.storage import atomic_write_bytes  # noqa: E402
from data_pipeline.stream import ShardStream  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "stream_read.json"
BASELINE_COMMIT = "32a52b2"  # the last commit with the sequential (shard after shard) stream
PER_SHARD = 100
BATCH = 32


def load_previous_stream():
    """The ``data_pipeline.stream`` module of ``BASELINE_COMMIT``, under another name."""
    module_dir = Path(tempfile.mkdtemp(prefix="previous_stream_"))
    for name in ("stream", "stream_plan"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:data_pipeline/{name}.py"],
                              check=True, capture_output=True, text=True).stdout
        text = text.replace("data_pipeline.stream_plan", "previous_stream_plan")
        # names that moved since: the error to data_pipeline.storage
        text = text.replace("from data_pipeline.shards import ShardReadError, iter_shard",
                            "from data_pipeline.shards import iter_shard\nfrom data_pipeline.storage import ShardReadError")
        (module_dir / f"previous_{name}.py").write_text(text)
    sys.path.insert(0, str(module_dir))
    spec = importlib.util.spec_from_file_location("previous_stream", module_dir / "previous_stream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_shards(folder: Path, images: list[bytes], samples: int) -> None:
    folder.mkdir(parents=True)
    for s in range(0, samples, PER_SHARD):
        writer = ShardWriter(folder, f"shard-{s // PER_SHARD:06d}")
        for i in range(s, min(s + PER_SHARD, samples)):
            writer.write(writer.next_key(), images[i % len(images)], "jpg", {"i": i})
        writer.publish()


def evict(folder: Path) -> None:
    for path in folder.glob("*.tar"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def slot_reads(stream, n: int):
    """The first ``n`` samples of slot 0 of a stream, read but not decoded; returns the bytes read."""
    info = (stream._deal(1) if isinstance(stream, ShardStream) else stream._info(1))["info"]
    total = 0
    if isinstance(stream, ShardStream):
        reader = SampleReader()
        items = stream._fixed_items(info, 0, {}) if stream.mode == "fixed" else stream._online_items(info, 0, {})
        for _, (path, i, _, _) in zip(range(n), items):
            total += len(reader.read(path, i).image)
        reader.close()
    else:  # the previous stream yields samples already read
        for _, (sample, _, _, _) in zip(range(n), stream._fixed_items(info, 0, {})):
            total += len(sample.image)
    return total


def slot_worker(stream, n: int) -> int:
    """The first ``n`` samples of a stream through the whole worker stage (views made)."""
    return sum(1 for _, _ in zip(range(n), stream))


def throughput(folder: Path, previous, samples: int, decode_samples: int, rounds: int) -> list[dict]:
    swav = MultiCrop(SWAV_CROPS)
    makers = {
        "previous (sequential)": lambda crops: previous.ShardStream(folder, crops, mode="fixed", seed=1),
        "fixed": lambda crops: ShardStream(folder, crops, mode="fixed", seed=1),
        "fixed, window 4": lambda crops: ShardStream(folder, crops, mode="fixed", seed=1, window=4),
        "online": lambda crops: ShardStream(folder, crops, mode="online", seed=1),
    }
    kinds = [("read, cold", samples, True, False), ("read, warm", samples, False, False),
             ("worker, cold", decode_samples, True, True), ("worker, warm", decode_samples, False, True)]
    times: dict[tuple[str, str], list[float]] = {}
    names = list(makers)
    for r in range(rounds):
        for kind, n, cold, decode in kinds:
            for name in names[r % len(names):] + names[: r % len(names)]:
                stream = makers[name](swav)
                if cold:
                    evict(folder)
                else:
                    slot_reads(stream, n)  # fill the page cache with what this method reads
                start = time.perf_counter()
                slot_worker(stream, n) if decode else slot_reads(stream, n)
                times.setdefault((kind, name), []).append((time.perf_counter() - start) / n)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    rows = []
    for kind, n, _, _ in kinds:
        base = statistics.median(times[(kind, "previous (sequential)")])
        for name in names:
            per = statistics.median(times[(kind, name)])
            rows.append({"kind": kind, "method": name, "samples": n, "samples_per_s": 1 / per,
                         "us_per_sample": per * 1e6, "vs_previous": base / per,
                         "per_round_us": [t * 1e6 for t in times[(kind, name)]]})
    return rows


def mixing(work: Path, previous) -> list[dict]:
    tree = work / "classes"
    build_class_folders(tree, classes=10, per_class=100, size=32)
    tiny = MultiCrop([CropSpec(16, 1, (0.5, 1.0))])
    rows = []
    for packing, seed in (("shuffled (default)", 0), ("path order", None)):
        folder = work / f"classes-{seed}"
        ingest([tree], folder, shard_max_count=100, shuffle_seed=seed)
        classes = classes_of_keys(folder)
        configs = [("previous", "fixed", None), ("previous", "online", None)]
        configs += [("new", "fixed", w) for w in (0, 1, 2, 4)] + [("new", "online", w) for w in (0, 1, 4)]
        for version, mode, window in configs:
            if version == "previous":
                stream = previous.ShardStream(folder, tiny, mode=mode, seed=3)
            else:
                stream = ShardStream(folder, tiny, mode=mode, seed=3, window=window)
            keys = [item["key"] for _, item in zip(range(20 * BATCH), stream)]
            per_batch = [len({classes[k] for k in keys[b:b + BATCH]}) for b in range(0, len(keys), BATCH)]
            rows.append({"packing": packing, "stream": version, "mode": mode, "window": window,
                         "classes_per_batch": statistics.mean(per_batch)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1200, help="samples in the throughput corpus")
    parser.add_argument("--decode-samples", type=int, default=200, help="samples per worker-stage run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--remote", action="store_true", help="S3 server + latency proxy vs local disk instead")
    parser.add_argument("--duration", type=float, default=8.0, help="--remote: seconds each pair of workers is timed")
    args = parser.parse_args()
    if args.remote:
        from stream_read_remote import RESULTS as REMOTE_RESULTS, run_remote

        run_remote(min(args.samples, 600), args.duration, args.rounds, args.out or REMOTE_RESULTS)
        return
    args.out = args.out or RESULTS
    torch.set_num_threads(1)
    previous = load_previous_stream()
    work = Path(tempfile.mkdtemp(prefix="stream_read_", dir=os.environ.get("BENCH_TMP")))
    try:
        images = make_images(76)
        folder = work / "shards"
        write_shards(folder, images, args.samples)
        rows = throughput(folder, previous, args.samples, args.decode_samples, args.rounds)
        mixed = mixing(work, previous)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mean_kb = sum(len(b) for b in images) / len(images) / 1024
    print(f"\n{args.samples} JPEGs of {mean_kb:.0f} KiB in shards of {PER_SHARD}, 1 thread, "
          f"median of {args.rounds} rounds (slot 0 of 1)")
    print(f"{'kind':<14}{'method':<24}{'samples/s':>11}{'us/sample':>11}{'x previous':>12}")
    for row in rows:
        print(f"{row['kind']:<14}{row['method']:<24}{row['samples_per_s']:>11.0f}{row['us_per_sample']:>11.0f}"
              f"{row['vs_previous']:>12.2f}")
    worker = {r["method"]: r["us_per_sample"] for r in rows if r["kind"] == "worker, cold"}
    share = {r["method"]: r["us_per_sample"] / worker[r["method"]] for r in rows if r["kind"] == "read, cold"}
    print("read path as a share of the worker stage (cold): "
          + ", ".join(f"{m} {s:.1%}" for m, s in share.items()) + "  (target <= 10%)")
    print(f"\nmean distinct classes per batch of {BATCH} (10 classes; a shuffled batch holds ~9.7)")
    print(f"{'packing':<20}{'stream':<10}{'mode':<8}{'window':>7}{'classes':>9}")
    for row in mixed:
        window = "-" if row["window"] is None else ("all" if row["window"] == 0 else row["window"])
        print(f"{row['packing']:<20}{row['stream']:<10}{row['mode']:<8}{window!s:>7}{row['classes_per_batch']:>9.2f}")
    doc = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), "machine": machine(), "image_kib": mean_kb,
           "throughput": rows, "read_share_of_worker_cold": share, "mixing": mixed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(doc, indent=1) + "\n").encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
