"""Batches mix the corpus: a class-folder tree ingested with one call gives batches of many
classes in fixed and online mode (1 and 2 workers), even when the shards themselves are sorted
by class; the locality window trades mixing for fewer open shards; online draws give every
image the same rate whatever its shard's size; a worker's memory stays bounded on big shards."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from data_pipeline.crops import CropSpec, MultiCrop
from data_pipeline.ingest import ingest
from data_pipeline.sample_corpus import build_class_folders, classes_of_keys
from data_pipeline.stream import ShardStream, make_loader
from data_pipeline.stream_order import online_draws

CROPS = MultiCrop([CropSpec(16, 1, (0.5, 1.0))])
BATCH = 32


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    build_class_folders(root, classes=10, per_class=100, size=32)
    return root


@pytest.fixture(scope="module")
def class_shards(tmp_path_factory, class_tree):
    """The tree ingested with one command, ``seer ingest TREE --out DIR`` (packing shuffled by default)."""
    from seer.cli import main

    out = tmp_path_factory.mktemp("class_shards")
    assert main(["ingest", str(class_tree), "--out", str(out), "--shard-count", "100", "--json"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [100] * 10
    assert {s["shuffle_seed"] for s in manifest["shards"]} == {0}
    return out, classes_of_keys(out)


@pytest.fixture(scope="module")
def sorted_shards(tmp_path_factory, class_tree):
    """The worst case for the stream: packed in path order, so every shard holds one class."""
    out = tmp_path_factory.mktemp("sorted_shards")
    ingest([class_tree], out, shard_max_count=100, shuffle_seed=None)
    classes = classes_of_keys(out)
    per_shard = Counter(len({c for k, c in classes.items() if k.startswith(f"shard-{i:06d}-")}) for i in range(10))
    assert per_shard == {1: 10}
    return out, classes


def mean_classes_per_batch(folder, classes, mode, workers, n_batches=12, window=0):
    stream = ShardStream(folder, CROPS, mode=mode, seed=3, window=window)
    counts = []
    for batch in make_loader(stream, BATCH, workers):
        counts.append(len({classes[k] for k in batch["keys"]}))
        if len(counts) == n_batches:
            return sum(counts) / len(counts)


@pytest.mark.slow
@pytest.mark.parametrize("corpus", ["class_shards", "sorted_shards"])
@pytest.mark.parametrize("mode", ["fixed", "online"])
@pytest.mark.parametrize("workers", [1, 2])
def test_batches_hold_many_classes(request, corpus, mode, workers):
    folder, classes = request.getfixturevalue(corpus)
    assert mean_classes_per_batch(folder, classes, mode, workers) >= 8


@pytest.mark.parametrize("mode", ["fixed", "online"])
def test_locality_window_bounds_the_shards_a_batch_comes_from(sorted_shards, mode):
    """window=1 reads one (single-class) shard at a time; window=4 mixes about 4 of them."""
    folder, classes = sorted_shards
    one = mean_classes_per_batch(folder, classes, mode, 0, n_batches=6, window=1)
    four = mean_classes_per_batch(folder, classes, mode, 0, n_batches=6, window=4)
    assert one <= 2.0  # a batch may straddle two windows
    assert 2.5 <= four <= 4.0 + 1.0


@pytest.mark.parametrize("window", [0, 4])
def test_online_rate_does_not_depend_on_shard_size(window):
    """1 shard of 100 samples and 20 of 5: over 20,000 draws each group's images are drawn at
    rates within 15% of each other (both should get 10,000 draws)."""
    counts = [100] + [5] * 20
    draws = []
    block = 0
    while len(draws) < 20_000:
        draws += online_draws(counts, seed=5, generation=0, slot=0, block=block, window=window)
        block += 1
    draws = draws[:20_000]
    big = sum(1 for shard, _ in draws if shard == 0) / 100
    small = sum(1 for shard, _ in draws if shard > 0) / 100
    assert abs(big - small) / max(big, small) <= 0.15, (big, small)
    per_image = Counter(draws)
    assert len(per_image) == 200  # every image drawn


def test_online_stream_follows_the_draws(sorted_shards):
    """The stream serves exactly the samples ``online_draws`` picks (the rate test's code path)."""
    folder, _ = sorted_shards
    stream = ShardStream(folder, CROPS, mode="online", seed=5)
    got = [item["key"] for _, item in zip(range(200), stream)]
    expected = [f"shard-{j:06d}-{i:06d}" for b in range(2)
                for j, i in online_draws([100] * 10, seed=5, generation=0, slot=0, block=b)][:200]
    assert got == expected


MEMORY_SCRIPT = r"""
import json, resource, sys
from data_pipeline.crops import CropSpec, MultiCrop
from data_pipeline.stream import ShardStream

def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

folder, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
stream = ShardStream(folder, MultiCrop([CropSpec(64, 1, (0.5, 1.0))]), mode=mode, seed=1)
items = iter(stream)
next(items)  # the index is loaded, the decoder warmed up
before, peak = rss_mb(), 0.0
for _ in range(n):
    next(items)
    peak = max(peak, rss_mb())
print(json.dumps({"before_mb": before, "peak_mb": peak}))
"""


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory):
    """2 shards of >= 256 MB: 200 real 1.3+ MB JPEGs each (one noisy photo, stored 200 times)."""
    import numpy as np
    from images import encode, photo

    from data_pipeline.shards import ShardWriter

    rng = np.random.default_rng(0)
    base = np.asarray(photo("astronaut.png", (1024, 1024)), dtype=np.int16)
    noisy = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
    from PIL import Image

    jpeg = encode(Image.fromarray(noisy), quality=95)
    per_shard = -(-256 * 2**20 // len(jpeg))
    folder = tmp_path_factory.mktemp("big_shards")
    for s in range(2):
        writer = ShardWriter(folder, f"shard-{s:06d}")
        for _ in range(per_shard):
            writer.write(writer.next_key(), jpeg, "jpg", {})
        writer.publish()
    yield folder, per_shard
    for path in folder.iterdir():
        path.unlink()


WORKER_RSS_BOUND_MB = 32  # measured: +0.9 to +1.5 MB over reading both shards (README, "Data stream")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fixed", "online"])
def test_worker_memory_stays_bounded_on_256mb_shards(big_shards, mode):
    folder, per_shard = big_shards
    assert (folder / "shard-000000.tar").stat().st_size >= 256 * 2**20
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(folder), mode, str(per_shard)],
                         capture_output=True, text=True, timeout=300, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    grown = rss["peak_mb"] - rss["before_mb"]
    print(f"{mode}: worker RSS {rss['before_mb']:.0f} MB -> peak {rss['peak_mb']:.0f} MB (+{grown:.1f})")
    assert grown < WORKER_RSS_BOUND_MB
