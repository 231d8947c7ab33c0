"""``benchmarks/stream_read.py --remote``: one stream worker's sample rate from an S3 server with
0, 20 and 100 ms added to every request, against the same worker on local disk, in one run.

Setup: ``--samples`` real JPEGs (``multicrop.make_images``: ~1100x830, quality 90) in shards of 100
written by ``ShardWriter`` with a manifest, in a temp folder on the local disk, and the same files
uploaded to a bucket of moto's S3 server (its own process, on 127.0.0.1). Latency comes from
``tests/tcp_proxy.py`` (its own process) between the client and the server: each request waits the
added latency before it is forwarded. A worker is a ``ShardStream`` (fixed mode, slot 0 of 1) in
its own process with one torch thread, doing the whole worker stage: read, decode, SwAV crops
2x224 + 6x96. Every measurement runs a local-disk worker and an S3 worker at the same time (two
processes, so a shared machine's load hits both alike): each first serves ``WARM`` samples (shard
tables loaded, connections open), then both count samples for ``--duration`` seconds; rows are
interleaved round by round; medians over rounds, the ratio being the median of per-round ratios.

``read_ahead`` is the number of ranged GETs a worker keeps in flight (``data.read_ahead``); the
memory it costs is at most ``(read_ahead + 1)`` x the image size (the bytes read ahead and not yet
decoded), reported from the corpus' mean image size.
"""

from __future__ import annotations

import datetime
import multiprocessing
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
sys.path.insert(0, str(ROOT / "tests"))
from multicrop import SWAV_CROPS, machine, make_images  # noqa: E402
from report import refresh_doc_section, write_results  # noqa: E402
from s3_server import MotoServer, filesystem, free_port, upload_folder, wait_for_port  # noqa: E402

from data_pipeline.crops import MultiCrop  # noqa: E402
from data_pipeline.manifest import Manifest, ShardInfo  # noqa: E402
from data_pipeline.shards import ShardWriter  # noqa: E402
from data_pipeline.stream import ShardStream  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "stream_read_remote.json"
PER_SHARD = 100
WARM = 24
LATENCIES_MS = (0, 20, 100)
READ_AHEAD = 32  # data.read_ahead's default


def write_corpus(folder: Path, images: list[bytes], samples: int) -> None:
    folder.mkdir(parents=True)
    manifest = Manifest(folder)
    for s in range(0, samples, PER_SHARD):
        writer = ShardWriter(folder, f"shard-{s // PER_SHARD:06d}")
        for i in range(s, min(s + PER_SHARD, samples)):
            writer.write(writer.next_key(), images[i % len(images)], "jpg", {"i": i})
        path = writer.publish()
        manifest.add(ShardInfo(writer.name, writer.count, path.stat().st_size, 1.0e9 + s))
    manifest.save()


class Proxy:
    """``tests/tcp_proxy.py`` in its own process, adding ``latency_ms`` to every request."""

    def __init__(self, target_port: int, latency_ms: int):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "tcp_proxy.py"), str(target_port),
                                      str(self.port), "--latency", str(latency_ms / 1000)])
        wait_for_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _worker(shards, endpoint: str | None, read_ahead: int, duration: float, barrier, results) -> None:
    """One stream worker (its own process): warm up, wait for its pair, count samples for ``duration``."""
    torch.set_num_threads(1)
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    stream = iter(ShardStream(shards, MultiCrop(SWAV_CROPS), mode="fixed", seed=1, read_ahead=read_ahead))
    for _ in range(WARM):
        next(stream)
    barrier.wait(120)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < duration:
        next(stream)
        count += 1
    results.put((endpoint is not None, count / (time.perf_counter() - start)))
    stream.close()


def paired_rates(local: Path, endpoint: str, read_ahead: int, duration: float) -> tuple[float, float]:
    """(local, remote) samples/s of two workers running at the same time, under the same load."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(shards, url, ra, duration, barrier, results))
             for shards, url, ra in ((local, None, 0), ("s3://bench/shards", endpoint, read_ahead))]
    for proc in procs:
        proc.start()
    rates = dict(results.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join(60)
    return rates[False], rates[True]


def measure_all(local: Path, server: MotoServer, duration: float, rounds: int) -> list[dict]:
    proxies = {ms: Proxy(server.port, ms) for ms in LATENCIES_MS}
    methods = [(ms, READ_AHEAD) for ms in LATENCIES_MS] + [(100, k) for k in (0, 8, 16)]
    got: dict[tuple, list[tuple[float, float]]] = {m: [] for m in methods}
    try:
        for r in range(rounds):
            for ms, read_ahead in methods[r % len(methods):] + methods[:r % len(methods)]:
                endpoint = f"http://127.0.0.1:{proxies[ms].port}"
                got[(ms, read_ahead)].append(paired_rates(local, endpoint, read_ahead, duration))
            print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        for proxy in proxies.values():
            proxy.stop()
    rows = []
    for (ms, read_ahead), pairs in got.items():
        rows.append({"method": f"s3, +{ms} ms, read_ahead {read_ahead}", "added_latency_ms": ms,
                     "read_ahead": read_ahead,
                     "local_samples_per_s": statistics.median(a for a, _ in pairs),
                     "samples_per_s": statistics.median(b for _, b in pairs),
                     "vs_local": statistics.median(b / a for a, b in pairs),
                     "per_round": [[a, b] for a, b in pairs]})
    return rows


def doc_section(doc: dict) -> str:
    rows = "\n".join(
        f"| +{r['added_latency_ms']} ms | {r['read_ahead']} | {r['local_samples_per_s']:.1f} | "
        f"{r['samples_per_s']:.1f} | "
        f"{r['vs_local']:.0%} | {', '.join(f'{b / a:.0%}' for a, b in r['per_round'])} |" for r in doc["rows"])
    m = doc["machine"]
    return f"""## Shards on S3: one worker's sample rate with 0, 20 and 100 ms per request (CPU)

Measured {doc['when']} on {m['cores']} CPU cores ({m['cpu']}), Python {m['python']}, torch {m['torch']}.
Command: `.venv/bin/python benchmarks/stream_read.py --remote --rounds {doc['rounds']}` (raw numbers:
`benchmarks/results/stream_read_remote.json`). Setup: {doc['samples']} real JPEGs (~1100x830, quality
90, {doc['image_kib']:.0f} KiB on average) in shards of {PER_SHARD} with a manifest, on the local disk and
in a bucket of moto's S3 server (its own process, 127.0.0.1); the added latency comes from
`tests/tcp_proxy.py` (its own process) and is paid by every request. A worker is a `ShardStream`
(fixed mode, one torch thread, its own process) doing read + decode + SwAV crops 2x224 + 6x96.
Each row runs a local-disk worker and an S3 worker **at the same time**, so both see the same load
on this shared machine (load average {doc['load_average'][0]:.1f} at the end of the run; moto's server and the
proxy run on the same two cores, work a real object store does elsewhere): {WARM} samples each to
warm up, then both count samples for {doc['duration_s']:.0f} s; rows interleaved, {doc['rounds']} rounds,
medians (the ratio is the median of the per-round ratios).

| added latency | read_ahead (GETs in flight) | local disk samples/s | S3 samples/s | S3 / local | per round |
| --- | --- | --- | --- | --- | --- |
{rows}

With `data.read_ahead={READ_AHEAD}` (the default) a worker keeps {READ_AHEAD} ranged GETs in flight; the
bytes it holds ahead of decoding are at most {READ_AHEAD + 1} x the image size, here
{doc['read_ahead_memory_kib']:.0f} KiB per worker ({READ_AHEAD + 1} x {doc['image_kib']:.0f} KiB), plus
{READ_AHEAD} threads that wait on sockets.
"""


def run_remote(samples: int, duration: float, rounds: int, out: Path = RESULTS) -> None:
    work = Path(tempfile.mkdtemp(prefix="stream_read_remote_", dir=os.environ.get("BENCH_TMP")))
    try:
        images = make_images(76)
        local = work / "shards"
        write_corpus(local, images, samples)
        with MotoServer() as server:
            os.environ.update(server.env())
            fs = filesystem(server.url)
            fs.mkdir("bench")
            upload_folder(fs, local, "bench/shards")
            rows = measure_all(local, server, duration, rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    image_kib = sum(len(b) for b in images) / len(images) / 1024
    doc = {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": " ".join(sys.argv), "machine": machine(), "samples": samples, "duration_s": duration,
           "rounds": rounds, "image_kib": image_kib, "read_ahead_memory_kib": (READ_AHEAD + 1) * image_kib,
           "load_average": os.getloadavg(), "rows": rows}
    print(f"\n{'method':<36}{'local/s':>9}{'S3/s':>9}{'S3/local':>10}")
    for row in rows:
        print(f"{row['method']:<36}{row['local_samples_per_s']:>9.1f}{row['samples_per_s']:>9.1f}"
              f"{row['vs_local']:>10.0%}")
    write_results(out, doc)
    refresh_doc_section("## Shards on S3:", doc_section(doc))
    print(f"wrote {out} and its section of docs/benchmarks.md")
