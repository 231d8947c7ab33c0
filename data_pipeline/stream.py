"""The sample stream: which shard and sample each rank and DataLoader worker reads next.

Every (rank, worker) pair is a *slot*. A slot's stream is a sequence of *visits*; a visit reads
one shard, permutes its samples with a seed derived from (seed, epoch, slot, visit) and yields
them. A slot's position is therefore ``(epoch, visit, index)``, and the crops of a sample are
drawn from a generator seeded by that position, so the stream is a pure function of the seed
and the position: restoring positions resumes it exactly.

- ``online`` mode: endless; each visit picks a shard at random (seeded) from the shards active
  now; the shard list is re-read every ``poll_seconds``, so newly published shards are served
  without a restart and retired ones stop being served.
- ``fixed`` mode: epochs; the epoch's shard list is shuffled by (seed, epoch); with at least as
  many shards as slots, shards are dealt to slots, otherwise every slot reads every shard and
  keeps every ``n_slots``-th sample. Each sample is read once per epoch across all slots.

Undecodable samples are skipped, written to the quarantine log with shard and key, and counted;
the stream never stops on data. Positions are tracked in the main process by
:class:`StreamPosition` from what each batch carries, and saved in checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.crops import MultiCrop
from data_pipeline.decode import DecodeError, decode_image
from data_pipeline.manifest import shard_paths
from data_pipeline.quarantine import QuarantineLog
from data_pipeline.shards import ShardReadError, iter_shard

log = logging.getLogger(__name__)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of printable parts (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ShardStream(IterableDataset):
    """Yields dicts with the uint8 views of one image and the position it came from."""

    def __init__(
        self,
        shard_dir: str | Path,
        multicrop: MultiCrop,
        *,
        mode: str = "online",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        retention_days: float | None = None,
        poll_seconds: float = 60.0,
        max_pixels: int = 100_000_000,
        quarantine_path: str | Path | None = None,
        state: dict | None = None,
    ):
        if mode not in ("online", "fixed"):
            raise ValueError(f"stream mode must be 'online' or 'fixed', got {mode!r}")
        self.shard_dir = Path(shard_dir)
        self.multicrop = multicrop
        self.mode = mode
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.retention_days = retention_days
        self.poll_seconds = poll_seconds
        self.max_pixels = max_pixels
        self.quarantine_path = quarantine_path
        state = state or {}
        self.positions = {int(k): v for k, v in state.get("slots", {}).items()}
        self.first_worker = int(state.get("next_worker", 0))

    # -- shard lists -------------------------------------------------------------------------
    def _active_shards(self) -> list[Path]:
        return sorted(shard_paths(self.shard_dir, retention_days=self.retention_days))

    def _read_shard(self, path: Path, quarantine: QuarantineLog | None) -> list:
        samples = []
        try:
            for sample in iter_shard(path):
                samples.append(sample)
        except (ShardReadError, OSError) as err:
            log.warning("shard %s is unreadable after %d samples: %s", path.name, len(samples), err)
            if quarantine is not None:
                quarantine.record("shard_unreadable", shard=path.name, detail=str(err))
        return samples

    # -- visits ------------------------------------------------------------------------------
    def _online_visits(self, slot: int, start: dict) -> Iterator[tuple[int, int, Path, list[int] | None]]:
        visit = int(start.get("visit", 0))
        resume_shard = start.get("shard")
        shards: list[Path] = []
        listed_at = -float("inf")
        while True:
            if time.monotonic() - listed_at >= self.poll_seconds or not shards:
                shards = self._active_shards()
                listed_at = time.monotonic()
                if not shards:
                    log.warning("no active shards in %s; waiting %.0f s", self.shard_dir, self.poll_seconds)
                    time.sleep(min(self.poll_seconds, 5.0))
                    continue
            by_name = {p.name: p for p in shards}
            if resume_shard is not None and resume_shard in by_name:
                shard = by_name[resume_shard]
            else:
                shard = random.Random(derive_seed(self.seed, "online", slot, visit)).choice(shards)
            resume_shard = None
            yield 0, visit, shard, None
            visit += 1

    def _fixed_visits(self, slot: int, n_slots: int, start: dict) -> Iterator[tuple[int, int, Path, list[int] | None]]:
        epoch = int(start.get("epoch", 0))
        first_visit = int(start.get("visit", 0))
        while True:
            shards = self._active_shards()
            if not shards:
                raise FileNotFoundError(f"no shards to read in {self.shard_dir}")
            random.Random(derive_seed(self.seed, "epoch", epoch)).shuffle(shards)
            if len(shards) >= n_slots:
                for visit, shard in enumerate(shards[slot::n_slots]):
                    if visit >= first_visit:
                        yield epoch, visit, shard, None
            else:  # fewer shards than slots: every slot reads all, keeps its share of samples
                offset = 0
                for visit, shard in enumerate(shards):
                    count = self._shard_count(shard)
                    keep = [j for j in range(count) if (offset + j) % n_slots == slot]
                    offset += count
                    if visit >= first_visit:
                        yield epoch, visit, shard, keep
            epoch += 1
            first_visit = 0

    def _shard_count(self, shard: Path) -> int:
        from data_pipeline.manifest import Manifest

        manifest = Manifest.load(self.shard_dir)
        for info in manifest.shards:
            if info.name == shard.name or info.name == shard.stem:
                return int(info.count)
        return sum(1 for _ in iter_shard(shard))

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if info is not None:
            torch.set_num_threads(1)
        # The DataLoader asks its workers for batches round-robin from worker 0; rotating the
        # logical worker ids makes a resumed loader continue with the worker that was next.
        worker = (worker + self.first_worker) % workers
        slot = self.rank * workers + worker
        n_slots = self.world_size * workers
        start = self.positions.get(slot, {})
        quarantine = QuarantineLog(self.quarantine_path) if self.quarantine_path else None
        visits = self._online_visits(slot, start) if self.mode == "online" else self._fixed_visits(slot, n_slots, start)
        first = True
        skipped = 0
        for epoch, visit, shard, keep in visits:
            samples = self._read_shard(shard, quarantine)
            order = list(range(len(samples)))
            if keep is None:  # this slot's own shard: a slot-private order
                random.Random(derive_seed(self.seed, "order", epoch, slot, visit)).shuffle(order)
            else:  # fixed mode, shared shard: one order for all slots, then this slot's share
                random.Random(derive_seed(self.seed, "order", epoch, visit)).shuffle(order)
                order = [order[j] for j in keep if j < len(order)]
            begin = int(start.get("index", 0)) if first else 0
            first = False
            for index in range(begin, len(order)):
                sample = samples[order[index]]
                views = self._views(sample, shard, quarantine, derive_seed(self.seed, "crops", epoch, slot, visit, index))
                if views is None:
                    skipped += 1
                    continue
                yield {
                    "views": views,
                    "key": sample.key,
                    "position": {"slot": slot, "epoch": epoch, "visit": visit, "index": index + 1, "shard": shard.name},
                    "workers": workers,
                    "skipped": skipped,
                }

    def _views(self, sample, shard: Path, quarantine: QuarantineLog | None, seed: int) -> list[torch.Tensor] | None:
        if sample.image is None:
            reason, detail = "no_image", "sample has no image member"
        else:
            try:
                side = self.multicrop.decode_side
                image = decode_image(sample.image, max_pixels=self.max_pixels, min_side=1, draft_size=(side, side))
                return self.multicrop(image, torch.Generator().manual_seed(seed))
            except DecodeError as err:
                reason, detail = err.reason, str(err)
            except Exception as err:  # a decoder bug must not kill a week-long job: skip and count
                reason, detail = "decode_failed", f"{type(err).__name__}: {err}"
        if quarantine is not None:
            quarantine.record(reason, shard=shard.name, key=sample.key, detail=detail)
        return None


def collate_views(samples: list[dict]) -> dict:
    """Stack crop i of every sample into one ``(B, 3, S, S)`` uint8 tensor per crop."""
    n_views = len(samples[0]["views"])
    return {
        "views": [torch.stack([s["views"][i] for s in samples]) for i in range(n_views)],
        "keys": [s["key"] for s in samples],
        "position": samples[-1]["position"],
        "workers": samples[-1]["workers"],
        "skipped": samples[-1]["skipped"],
    }


class StreamPosition:
    """The main process's record of where every slot of this rank has got to.

    ``state_dict()`` is what a checkpoint stores for the rank and what ``ShardStream(state=...)``
    takes back: each slot's next ``(epoch, visit, index, shard)`` and which worker is next.
    """

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.positions: dict[int, dict] = {int(k): dict(v) for k, v in state.get("slots", {}).items()}
        self.next_worker = int(state.get("next_worker", 0))
        self.skipped: dict[int, int] = {}

    def update(self, batch: dict) -> None:
        position = dict(batch["position"])
        slot = int(position.pop("slot"))
        self.positions[slot] = position
        self.skipped[slot] = int(batch["skipped"])
        workers = int(batch["workers"])
        self.next_worker = (slot % workers + 1) % workers

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def state_dict(self) -> dict:
        return {"slots": {str(k): dict(v) for k, v in self.positions.items()}, "next_worker": self.next_worker}


def make_loader(stream: ShardStream, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_views,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
        drop_last=True,
    )
