"""The sample stream: which sample every rank and DataLoader worker reads next, and its state.

Every (rank, worker) pair is a *slot*; ``n_slots = world_size * workers``. A slot's stream is a
pure function of the seed and its position, so restoring positions resumes it exactly.

``fixed`` mode (exact epochs). The corpus (shard names and sample counts) is pinned when a run
starts: the shards active then, i.e. created within ``pin = [first, last]`` (manifest time, or
file mtime for a folder without manifest); the pin lives in the state, so a resume sees the
same corpus.
Epoch ``e`` is a global order that does not depend on the slot count (``EpochOrder``): a seeded
permutation of all samples of the corpus, so any stretch of it is drawn from across the whole
corpus; item ``p`` of this sequence is the epoch's p-th sample. With a locality ``window`` k > 0
(for storage where seeks are expensive), the shards are taken k at a time in a seeded order and
a group's samples interleaved at random, each shard read front to back. An epoch's *base* (all
N items, or after a resume with another slot count the items not yet consumed, as ranges) is
dealt in contiguous, balanced chunks: slot ``s`` takes chunk ``(s + e) % n_slots`` (rotated so
no slot is always the longer one), so every slot's consecutive samples come from across the
corpus. A slot's position is ``(epoch, index)``: it has delivered the first ``index`` items of
its chunk. Crops are seeded by (seed, epoch, p), so a sample's crops do not depend on the slot.
``resume_state`` turns the per-rank states of a checkpoint into the state of a new rank; with
another slot count, the unconsumed items of the epochs in progress become the bases dealt to
the new slots, after which whole epochs follow. Shards published after the pin are not served
in fixed mode (use online mode, or start a new run).

``online`` mode: endless draws with replacement; block ``b`` of a slot is ``online_draws`` of
(seed, generation, slot, b) over the shards active now (re-listed every ``poll_seconds``, at
block boundaries): every sample is drawn at the same rate, whatever the size of its shard, and
consecutive draws come from many shards (at most ``window`` per block when it is > 0). New
shards are served without a restart, retired ones stop being served. Resuming with the same
slot count continues exactly (while the active shards are the same); with another slot count
the stream continues freshly seeded (``generation`` + 1): no exactness is promised there.

Reading: a sample is one ``os.pread`` of its image member at the offset its shard's index gives
(``data_pipeline.sample_reader``; an index missing beside a shard is built once, into
``index_cache_dir`` when the shard folder is read-only; with ``index_cache_dir`` the per-shard
tables are cached there and memory-mapped, shared by the workers of a node). A worker holds
the epoch order (4 bytes a sample), the tables of the shards it has read (memory-mapped, or ~36
bytes a sample without a cache folder) and one sample's bytes at a time, never a whole shard.
From remote shards (``s3://``, ``data_pipeline.storage``) a sample is one ranged GET, and a worker
keeps ``read_ahead`` of them in flight for the next items of its sequence
(``data_pipeline.read_ahead``, consumed in order: the same samples, order and positions as
locally), holding at most ``read_ahead`` + 1 samples' bytes. A read that fails after the storage
layer's retries is skipped like an undecodable image (``sample_unreadable``).

Undecodable or missing samples are skipped, logged to the quarantine log and counted; the stream
never stops on data. What the trainer has consumed is tracked in the main process by
:class:`StreamPosition` from the batches (samples prefetched by workers do not count), and its
``state_dict()`` goes into checkpoints. A worker's first sample carries the deal (what fixes every slot's sequence); the
others carry its ``deal_id`` only. State format (``version`` 3, JSON-friendly)::

    {"version", "mode", "seed", "window", "n_slots", "workers", "next_worker",
     "slots": {"<slot>": {"epoch", "index", "skipped"} | {"block", "index", "skipped"}},
     fixed: "pin": [first, last], "samples": N, "start_epoch": e,
            "bases": {"<epoch>": [[a, b], ...]}   (epochs whose base is not all N items)
     online: "generation": g}
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.crops import MultiCrop
from data_pipeline.decode import DecodeError
from data_pipeline.quarantine import QuarantineLog
from data_pipeline.read_ahead import read_ahead
from data_pipeline.sample_reader import SampleReader
from data_pipeline.seeding import derive_seed
from data_pipeline.storage import ShardReadError, is_remote, where
from data_pipeline.stream_order import (
    INFO_KEYS,
    STATE_VERSION,
    EpochOrder,
    active_shards,
    deal,
    deal_id,
    list_corpus,
    online_draws,
    pin_corpus,
    resume_state,
    skip_items,
    usable_state,
)

log = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 1000  # a worker that decodes nothing at all stops the run, loudly
ONLINE_BLOCK = 128  # online draws made (and re-listing considered) at a time


class ShardStream(IterableDataset):
    """Yields dicts with the uint8 views of one image, its key and the position it came from."""

    def __init__(self, shard_dir: str | Path, multicrop: MultiCrop, *, mode: str = "online", seed: int = 0,
                 rank: int = 0, world_size: int = 1, window: int = 0, retention_days: float | None = None,
                 poll_seconds: float = 60.0, max_pixels: int = 100_000_000,
                 quarantine_path: str | Path | None = None, index_cache_dir: str | Path | None = None,
                 state: dict | None = None, pin: list | None = None, read_ahead: int = 32):
        if mode not in ("online", "fixed"):
            raise ValueError(f"stream mode must be 'online' or 'fixed', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"stream rank {rank} is outside world size {world_size}")
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        if window < 0:
            raise ValueError(f"window must be >= 0 (0: the whole corpus), got {window}")
        if read_ahead < 0:
            raise ValueError(f"read_ahead must be >= 0, got {read_ahead}")
        self.shard_dir = where(shard_dir)
        self.read_ahead = read_ahead if is_remote(self.shard_dir) else 0  # local: one pread beats a thread
        self.multicrop, self.mode, self.seed = multicrop, mode, seed
        self.rank, self.world_size = rank, world_size
        self.retention_days, self.poll_seconds = retention_days, poll_seconds
        self.max_pixels, self.quarantine_path = max_pixels, quarantine_path
        self.index_cache_dir = index_cache_dir
        self.state = usable_state(state, mode, seed) or {}
        self.window = int(self.state.get("window", window))
        if self.window != window:
            log.warning("the stream state was saved with window %d (now %d): keeping %d so positions stay "
                        "valid; a new run takes the new window", self.window, window, self.window)
        self.corpus: list[tuple[str, Path, int]] = []
        if mode == "fixed":
            self.pin = list(self.state.get("pin") or pin or pin_corpus(self.shard_dir, retention_days))
            self.corpus = list_corpus(self.shard_dir, self.pin, index_cache_dir)
            samples = sum(count for _, _, count in self.corpus)
            if samples == 0:
                raise FileNotFoundError(f"no samples to read in {self.shard_dir} (fixed mode)")
            if "samples" in self.state and int(self.state["samples"]) != samples:
                epoch = int(self.state.get("start_epoch", 0))  # the same on every rank
                log.warning("the pinned corpus of %s now holds %d samples, the saved state %d (shards were "
                            "removed): positions are void, the stream restarts at epoch %d", self.shard_dir,
                            samples, self.state["samples"], epoch)
                self.state = {"pin": self.pin, "start_epoch": epoch, "window": self.window}
            self.samples = samples

    # -- the deal this iteration follows --------------------------------------------------------
    def _deal(self, workers: int) -> dict:
        """The deal for ``workers`` workers per rank (remapping a state saved for others)."""
        n_slots = self.world_size * workers
        state = self.state
        if state and int(state.get("n_slots", n_slots)) != n_slots:
            if int(state["n_slots"]) != int(state["workers"]):  # state of one rank out of several
                raise ValueError(f"the stream state is for {state['n_slots']} slots, this stream has {n_slots}: "
                                 "merge the saved per-rank states with data_pipeline.stream.resume_state()")
            state = resume_state([state], self.rank, self.world_size, workers)
        info = {k: state[k] for k in INFO_KEYS if k in state}
        info.update(mode=self.mode, seed=self.seed, window=self.window, n_slots=n_slots, workers=workers)
        if self.mode == "fixed":
            info.update(pin=self.pin, samples=self.samples)
            info.setdefault("start_epoch", 0)
            info.setdefault("bases", {})
        else:
            info.setdefault("generation", 0)
        return {"info": info, "slots": state.get("slots", {}), "next_worker": int(state.get("next_worker", 0))}

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        worker_info = get_worker_info()
        workers, worker = (worker_info.num_workers, worker_info.id) if worker_info else (1, 0)
        if worker_info is not None:
            torch.set_num_threads(1)
        deal_now = self._deal(workers)
        info = deal_now["info"]
        info["deal_id"] = deal_id(info)
        # The DataLoader asks its workers for batches round-robin from worker 0; rotating the
        # logical worker ids makes a resumed loader continue with the worker that was next.
        slot = self.rank * workers + (worker + deal_now["next_worker"]) % workers
        start = dict(deal_now["slots"].get(str(slot), {}))
        quarantine = QuarantineLog(self.quarantine_path) if self.quarantine_path else None
        reader = SampleReader(self.index_cache_dir)
        items = (self._fixed_items(info, slot, start) if self.mode == "fixed"
                 else self._online_items(info, slot, start, reader))
        skipped = int(start.get("skipped", 0))
        failed_in_a_row = 0
        first = True
        fetched = read_ahead(items, lambda item: reader.read(item[0], item[1]), self.read_ahead)
        for (path, i, position, crop_seed), got in fetched:
            sample = self._sample(got, path, i, quarantine)
            views = None if sample is None else self._views(sample, path, quarantine, crop_seed)
            if views is None:
                skipped += 1
                failed_in_a_row += 1
                if failed_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    # bad samples are skipped, but nothing decoding at all is a broken setup
                    raise RuntimeError(
                        f"{failed_in_a_row} samples in a row failed to decode (last: {path.name} #{i}); "
                        f"see {self.quarantine_path or 'the quarantine log'}"
                    )
                continue
            failed_in_a_row = 0
            position.update(slot=slot, skipped=skipped)
            item = {"views": views, "key": sample.key, "position": position, "workers": workers,
                    "skipped": skipped, "deal_id": info["deal_id"]}
            if first:  # the deal travels once per worker, not with every sample
                item["stream"], first = info, False
            yield item

    def _fixed_items(self, info: dict, slot: int, start: dict) -> Iterator[tuple]:
        n_slots, bases = info["n_slots"], info["bases"]
        epoch = int(start.get("epoch", info["start_epoch"]))
        begin = int(start.get("index", 0))
        while True:
            order = EpochOrder(self.corpus, self.seed, epoch, self.window)
            chunk = deal(bases.get(str(epoch), [[0, self.samples]]), n_slots, (slot + epoch) % n_slots)
            index = begin
            for p, j, i in order.items(skip_items(chunk, begin)):
                index += 1
                yield self.corpus[j][1], i, {"epoch": epoch, "index": index}, derive_seed(self.seed, "crops", epoch, p)
            epoch, begin = epoch + 1, 0

    def _online_items(self, info: dict, slot: int, start: dict, reader: SampleReader | None = None) -> Iterator[tuple]:
        generation = info["generation"]
        block, begin = int(start.get("block", 0)), int(start.get("index", 0))
        shards: list[tuple[str, Path, int]] = []
        listed_at = -float("inf")
        counts_known: dict = {}
        while True:
            if time.monotonic() - listed_at >= self.poll_seconds or not shards:
                shards = [s for s in active_shards(self.shard_dir, self.retention_days, self.index_cache_dir,
                                                   counts_known) if s[2] > 0]
                listed_at = time.monotonic()
                if reader is not None:
                    reader.keep_only({path for _, path, _ in shards})
                if not shards:
                    log.warning("no active shards in %s; waiting %.0f s", self.shard_dir, self.poll_seconds)
                    time.sleep(min(self.poll_seconds, 5.0))
                    continue
            draws = online_draws([count for _, _, count in shards], self.seed, generation, slot, block,
                                 self.window, ONLINE_BLOCK)
            for index in range(begin, len(draws)):
                j, i = draws[index]
                position = {"epoch": 0, "block": block, "index": index + 1}
                seed = derive_seed(self.seed, "crops", "online", generation, slot, block, index)
                yield shards[j][1], i, position, seed
            block, begin = block + 1, 0

    def _sample(self, got, path, i: int, quarantine: QuarantineLog | None):
        """The sample ``reader.read`` got for sample ``i`` of a shard, or None (recorded in the
        quarantine log) when it could not be read (``got`` is then the exception)."""
        if isinstance(got, (ShardReadError, OSError)):
            reason, detail = "sample_unreadable", str(got)
        elif isinstance(got, BaseException):
            raise got
        elif got is not None:
            return got
        else:
            reason, detail = "missing_sample", f"sample #{i}: the shard holds fewer samples than its manifest count"
        if quarantine is not None:
            quarantine.record(reason, shard=path.name, key=f"{path.stem}-#{i}", detail=detail)
        return None

    def _views(self, sample, shard, quarantine: QuarantineLog | None, seed: int) -> list[torch.Tensor] | None:
        if sample.image is None:
            reason, detail = "no_image", "sample has no image member"
        else:
            try:
                return self.multicrop.from_bytes(sample.image, torch.Generator().manual_seed(seed),
                                                 max_pixels=self.max_pixels)
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
    last = samples[-1]
    return {
        "views": [torch.stack([s["views"][i] for s in samples]) for i in range(n_views)],
        "keys": [s["key"] for s in samples],
        "epochs": [s["position"]["epoch"] for s in samples],
        "position": last["position"],
        "workers": last["workers"],
        "skipped": last["skipped"],
        "deal_id": last["deal_id"],
        "stream": next((s["stream"] for s in samples if "stream" in s), None),
    }


class StreamPosition:
    """The main process's record of what the trainer has consumed, per slot of this rank.

    ``update(batch)`` after a batch is used; ``state_dict()`` is what a checkpoint stores for
    the rank (a list over ranks goes to :func:`resume_state`); ``ShardStream(state=...)`` takes a
    rank's state back.
    """

    def __init__(self, state: dict | None = None):
        state = usable_state(state) or {}
        self.info = {k: state[k] for k in INFO_KEYS if k in state}
        self.positions: dict[int, dict] = {int(k): dict(v) for k, v in state.get("slots", {}).items()}
        self.next_worker = int(state.get("next_worker", 0))
        self.skipped_before = int(state.get("skipped_before", 0))
        self._deal_id = deal_id(self.info) if self.info else None

    def update(self, batch: dict) -> None:
        info = batch.get("stream")
        if batch["deal_id"] != self._deal_id:  # the stream remapped the state it was given
            if info is None:
                raise ValueError("a batch of a stream deal this position has not seen arrived without the deal "
                                 "(every worker's first batch carries it): update with every batch, in order")
            self.positions, self._deal_id = {}, batch["deal_id"]
        if info is not None:
            self.info = {k: info[k] for k in INFO_KEYS if k in info}
        position = dict(batch["position"])
        slot = int(position.pop("slot"))
        self.positions[slot] = position
        workers = int(batch["workers"])
        self.next_worker = (slot % workers + 1) % workers

    @property
    def total_skipped(self) -> int:
        return self.skipped_before + sum(int(p.get("skipped", 0)) for p in self.positions.values())

    def state_dict(self) -> dict:
        if not self.info:
            return {}
        return {"version": STATE_VERSION, **self.info, "slots": {str(k): dict(v) for k, v in self.positions.items()},
                "next_worker": self.next_worker, "skipped_before": self.skipped_before}


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
