"""Images/s of the DALI backend's CPU pipeline against seer's torch path, same shards, same cores.

Run: ``python benchmarks/dali_throughput.py [--images 64] [--rounds 5] [--batches 3] [--threads 2]``.
Prints a table and writes ``benchmarks/results/dali_throughput.json``.

Both backends read the same shards (``--images`` JPEGs of about 1100x830, cut from the bundled
photos as benchmarks/multicrop.py cuts them, 16 per shard) and produce what the trainer consumes,
SwAV's views 2x224 (scale 0.14-1) + 6x96 (0.05-0.14), normalised float32, color work included:

- ``torch``: what ``seer pretrain`` runs with ``data.backend=torch``: ``ShardStream`` (fixed mode)
  in ``--threads`` DataLoader worker processes (decode at the smallest DCT scale, crops, flips),
  then ``color_augment`` per view on each batch in the main process, on the CPU (no GPU here).
- ``dali``: ``DaliLoader`` with a CPU pipeline of ``--threads`` threads (decode at full size,
  crops, color, normalisation, conversion to torch tensors).
- ``dali, no hue``: the same with the hue jitter range set to 0, to show what the exact HSV hue
  rotation (~50 elementwise DALI operators per view) costs on a CPU.

The loaders are built and warmed up first (time to the first batch is reported apart), then
measured in interleaved rounds (the order rotating) so background load hits all alike. Both kinds
of loader work ahead in the background (DataLoader workers: 2 batches each; DALI: its prefetch
queue), so before each timed window the loaders are left ``--settle`` seconds to fill their
queues (then they are idle), the measured one's queue is drained untimed, and ``--batches``
batches of ``--batch`` images are timed: its steady-state rate with the others idle. The table
gives the median over rounds and the ratio to the torch path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline.augment import ColorAugmentSpec, color_augment  # noqa: E402
from data_pipeline.dali_loader import DaliLoader  # noqa: E402
from data_pipeline.shards import ShardWriter  # noqa: E402
from data_pipeline.storage import atomic_write_bytes  # noqa: E402
from data_pipeline.stream import ShardStream, make_loader  # noqa: E402
from multicrop import SWAV_CROPS, machine, make_images  # noqa: E402
from data_pipeline.crops import MultiCrop  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "dali_throughput.json"


def write_shards(folder: Path, images: list[bytes], per_shard: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(images), per_shard):
        with ShardWriter(folder, f"bench-{start // per_shard:06d}") as writer:
            for data in images[start:start + per_shard]:
                writer.write(writer.next_key(), data, "jpg", {"source": "benchmark"})


def torch_batches(folder: Path, colors: list[ColorAugmentSpec], batch: int, workers: int):
    stream = ShardStream(folder, MultiCrop(SWAV_CROPS, flip_p=0.5), mode="fixed", seed=0)
    step = 0
    for loaded in make_loader(stream, batch, workers):
        yield [color_augment(v, colors[i], torch.Generator().manual_seed(step * 100 + i))
               for i, v in enumerate(loaded["views"])]
        step += 1


def dali_loader(folder: Path, colors: list[ColorAugmentSpec], args, tmp: Path) -> DaliLoader:
    return DaliLoader(folder, SWAV_CROPS, colors, 0.5, batch_size=args.batch, mode="fixed", seed=0,
                      num_threads=args.threads, cache_dir=tmp / "cache")


def timed(batches, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per backend per round")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="DataLoader workers / DALI threads")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds for the idle loaders to fill their queues")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process's color stage; the workers set 1 thread each too
    colors = [ColorAugmentSpec()] * sum(spec.count for spec in SWAV_CROPS)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        write_shards(folder, make_images(args.images))
        no_hue = [replace(c, jitter=(*c.jitter[:3], 0.0)) for c in colors]
        loaders, build = {}, {}
        for name, make in (("torch", lambda: torch_batches(folder, colors, args.batch, args.threads)),
                           ("dali", lambda: dali_loader(folder, colors, args, Path(tmp))),
                           ("dali, no hue", lambda: dali_loader(folder, no_hue, args, Path(tmp)))):
            started = time.perf_counter()
            loaders[name] = make()
            next(loaders[name])
            build[name] = time.perf_counter() - started
        names = list(loaders)
        rounds: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order
                time.sleep(args.settle)
                timed(loaders[name], 2 * args.threads if name == "torch" else 2)  # drain what was made ahead
                seconds = timed(loaders[name], args.batches)
                rounds[name].append(args.batches * args.batch / seconds)
    rates = {name: statistics.median(values) for name, values in rounds.items()}
    ratios = [d / t for d, t in zip(rounds["dali"], rounds["torch"])]
    print(f"{'backend':14s} {'images/s (median)':>18s} {'ratio to torch':>15s} {'first batch (s)':>16s}")
    for name in names:
        print(f"{name:14s} {rates[name]:18.1f} {rates[name] / rates['torch']:15.2f} {build[name]:16.1f}")
    print(f"per-round ratios dali/torch: {', '.join(f'{x:.2f}' for x in ratios)}")
    import nvidia.dali

    doc = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {**machine(), "dali": nvidia.dali.__version__}, "args": {k: str(v) for k, v in vars(args).items()},
           "images_per_s": rates, "ratio_dali_to_torch": rates["dali"] / rates["torch"], "per_round": rounds,
           "per_round_ratio": ratios, "first_batch_s": build, "gpu": "none available: CPU pipelines only"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(doc, indent=1) + "\n").encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
