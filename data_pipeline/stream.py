"""The sample stream: which sample every rank and DataLoader worker reads next, and its state.

Every (rank, worker) pair is a *slot*; ``n_slots = world_size * workers``. A slot's stream is a
pure function of the seed and its position, so restoring positions resumes it exactly.

``fixed`` mode (exact epochs). The corpus (shard names and sample counts) is pinned when a run
starts: the shards active then, i.e. created within ``pin = [first, last]`` (manifest time, or
file mtime for a folder without manifest); the pin lives in the state, so a resume sees the
same corpus.
Epoch ``e`` is a global plan that does not depend on the slot count: the shards in an order
shuffled by (seed, e), each shard's samples permuted by (seed, e, shard); item ``p`` of this
sequence is the epoch's p-th sample. An epoch's *base* (all N items, or after a resume with
another slot count the items not yet consumed, as ranges) is dealt in contiguous, balanced
chunks: slot ``s`` takes chunk ``(s + e) % n_slots`` (rotated so no slot is always the longer
one). A slot's position is ``(epoch, index)``: it has delivered the first ``index`` items of its
chunk. Crops are seeded by (seed, epoch, p), so a sample's crops do not depend on the slot.
``resume_state`` turns the per-rank states of a checkpoint into the state of a new rank; with
another slot count, the unconsumed items of the epochs in progress become the bases dealt to
the new slots, after which whole epochs follow. Shards published after the pin are not served
in fixed mode (use online mode, or start a new run).

``online`` mode: endless; each visit of a slot reads one shard picked at random (seeded by
seed, generation, slot, visit) among the shards active now, re-listed every ``poll_seconds``:
new shards are served without a restart, retired ones stop being served. Resuming with the
same slot count continues exactly; with another slot count the stream continues freshly
seeded (``generation`` + 1): no exactness is promised there.

Undecodable or missing samples are skipped, logged to the quarantine log and counted; the stream
never stops on data. What the trainer has consumed is tracked in the main process by
:class:`StreamPosition` from the batches (samples prefetched by workers do not count), and its
``state_dict()`` goes into checkpoints. State format (``version`` 2, JSON-friendly)::

    {"version", "mode", "seed", "n_slots", "workers", "next_worker",
     "slots": {"<slot>": {"epoch", "index", "skipped"} | {"visit", "index", "shard", "skipped"}},
     fixed: "pin": [first, last], "samples": N, "start_epoch": e,
            "plans": {"<epoch>": [[a, b], ...]}   (epochs whose base is not all N items)
     online: "generation": g}
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.crops import MultiCrop
from data_pipeline.decode import DecodeError
from data_pipeline.manifest import shard_paths
from data_pipeline.quarantine import QuarantineLog
from data_pipeline.shards import ShardReadError, iter_shard
from data_pipeline.stream_plan import (  # noqa: F401  (derive_seed, resume_state: public API here too)
    INFO_KEYS,
    STATE_VERSION,
    EpochPlan,
    deal,
    derive_seed,
    list_corpus,
    pin_corpus,
    plan_id,
    resume_state,
    usable_state,
)

log = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 1000  # a worker that decodes nothing at all stops the run, loudly

class ShardStream(IterableDataset):
    """Yields dicts with the uint8 views of one image, its key and the position it came from."""

    def __init__(self, shard_dir: str | Path, multicrop: MultiCrop, *, mode: str = "online", seed: int = 0,
                 rank: int = 0, world_size: int = 1, retention_days: float | None = None,
                 poll_seconds: float = 60.0, max_pixels: int = 100_000_000,
                 quarantine_path: str | Path | None = None, state: dict | None = None):
        if mode not in ("online", "fixed"):
            raise ValueError(f"stream mode must be 'online' or 'fixed', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"stream rank {rank} is outside world size {world_size}")
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self.shard_dir = Path(shard_dir)
        self.multicrop, self.mode, self.seed = multicrop, mode, seed
        self.rank, self.world_size = rank, world_size
        self.retention_days, self.poll_seconds = retention_days, poll_seconds
        self.max_pixels, self.quarantine_path = max_pixels, quarantine_path
        self.state = usable_state(state, mode, seed) or {}
        self.corpus: list[tuple[str, Path, int]] = []
        if mode == "fixed":
            self.pin = list(self.state.get("pin") or pin_corpus(self.shard_dir, retention_days))
            self.corpus = list_corpus(self.shard_dir, self.pin)
            samples = sum(count for _, _, count in self.corpus)
            if samples == 0:
                raise FileNotFoundError(f"no samples to read in {self.shard_dir} (fixed mode)")
            if "samples" in self.state and int(self.state["samples"]) != samples:
                epoch = int(self.state.get("start_epoch", 0))  # the same on every rank
                log.warning("the pinned corpus of %s now holds %d samples, the saved state %d (shards were "
                            "removed): positions are void, the stream restarts at epoch %d", self.shard_dir,
                            samples, self.state["samples"], epoch)
                self.state = {"pin": self.pin, "start_epoch": epoch}
            self.samples = samples

    # -- the plan this iteration follows --------------------------------------------------------
    def _info(self, workers: int) -> dict:
        """Global plan info for ``workers`` workers per rank (remapping a state saved for others)."""
        n_slots = self.world_size * workers
        state = self.state
        if state and int(state.get("n_slots", n_slots)) != n_slots:
            if int(state["n_slots"]) != int(state["workers"]):  # state of one rank out of several
                raise ValueError(f"the stream state is for {state['n_slots']} slots, this stream has {n_slots}: "
                                 "merge the saved per-rank states with data_pipeline.stream.resume_state()")
            state = resume_state([state], self.rank, self.world_size, workers)
        info = {k: state[k] for k in INFO_KEYS if k in state}
        info.update(mode=self.mode, seed=self.seed, n_slots=n_slots, workers=workers)
        if self.mode == "fixed":
            info.update(pin=self.pin, samples=self.samples)
            info.setdefault("start_epoch", 0)
            info.setdefault("plans", {})
        else:
            info.setdefault("generation", 0)
        return {"info": info, "slots": state.get("slots", {}), "next_worker": int(state.get("next_worker", 0))}

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        worker_info = get_worker_info()
        workers, worker = (worker_info.num_workers, worker_info.id) if worker_info else (1, 0)
        if worker_info is not None:
            torch.set_num_threads(1)
        plan = self._info(workers)
        info = plan["info"]
        info["plan_id"] = plan_id(info)
        # The DataLoader asks its workers for batches round-robin from worker 0; rotating the
        # logical worker ids makes a resumed loader continue with the worker that was next.
        slot = self.rank * workers + (worker + plan["next_worker"]) % workers
        start = dict(plan["slots"].get(str(slot), {}))
        quarantine = QuarantineLog(self.quarantine_path) if self.quarantine_path else None
        items = self._fixed_items(info, slot, start) if self.mode == "fixed" else self._online_items(info, slot, start)
        skipped = int(start.get("skipped", 0))
        failed_in_a_row = 0
        for sample, shard, position, crop_seed in items:
            views = self._views(sample, shard, quarantine, crop_seed)
            if views is None:
                skipped += 1
                failed_in_a_row += 1
                if failed_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    # bad samples are skipped, but nothing decoding at all is a broken setup
                    raise RuntimeError(
                        f"{failed_in_a_row} samples in a row failed to decode (last: {shard.name} {sample.key}); "
                        f"see {self.quarantine_path or 'the quarantine log'}"
                    )
                continue
            failed_in_a_row = 0
            position.update(slot=slot, skipped=skipped)
            yield {"views": views, "key": sample.key, "position": position, "workers": workers,
                   "skipped": skipped, "stream": info}

    def _fixed_items(self, info: dict, slot: int, start: dict) -> Iterator[tuple]:
        n_slots, plans = info["n_slots"], info["plans"]
        epoch = int(start.get("epoch", info["start_epoch"]))
        begin = int(start.get("index", 0))
        while True:
            plan = EpochPlan(self.corpus, self.seed, epoch)
            chunk = deal(plans.get(str(epoch), [[0, self.samples]]), n_slots, (slot + epoch) % n_slots)
            index = 0
            for j, pieces in plan.runs(chunk):
                n = sum(b - a for a, b in pieces)
                if index + n <= begin:
                    index += n
                    continue
                name, path, _ = plan.shards[j]
                order = plan.sample_order(j)
                wanted = [(p, order[p - plan.starts[j]]) for a, b in pieces for p in range(a, b)]
                skip = max(0, begin - index)
                index += skip
                samples = self._read_samples(path, {i for _, i in wanted[skip:]})
                for p, i in wanted[skip:]:
                    index += 1
                    sample = samples.get(i)
                    if sample is None:
                        sample = _Missing(f"{name}-#{i}")
                    yield sample, path, {"epoch": epoch, "index": index}, derive_seed(self.seed, "crops", epoch, p)
            epoch, begin = epoch + 1, 0

    def _online_items(self, info: dict, slot: int, start: dict) -> Iterator[tuple]:
        generation = info["generation"]
        visit, begin, resume_shard = int(start.get("visit", 0)), int(start.get("index", 0)), start.get("shard")
        shards: list[Path] = []
        listed_at = -float("inf")
        while True:
            if time.monotonic() - listed_at >= self.poll_seconds or not shards:
                shards = sorted(shard_paths(self.shard_dir, retention_days=self.retention_days))
                listed_at = time.monotonic()
                if not shards:
                    log.warning("no active shards in %s; waiting %.0f s", self.shard_dir, self.poll_seconds)
                    time.sleep(min(self.poll_seconds, 5.0))
                    continue
            by_name = {p.name: p for p in shards}
            if resume_shard in by_name:
                shard = by_name[resume_shard]
            else:
                shard = random.Random(derive_seed(self.seed, "online", generation, slot, visit)).choice(shards)
            resume_shard = None
            samples = self._read_samples(shard, None)
            order = sorted(samples)
            random.Random(derive_seed(self.seed, "online-order", generation, slot, visit)).shuffle(order)
            for index in range(begin, len(order)):
                position = {"epoch": 0, "visit": visit, "index": index + 1, "shard": shard.name}
                seed = derive_seed(self.seed, "crops", "online", generation, slot, visit, index)
                yield samples[order[index]], shard, position, seed
            visit, begin = visit + 1, 0

    def _read_samples(self, path: Path, wanted: set[int] | None) -> dict:
        """Archive index -> sample for the ``wanted`` indices (all if None) of one shard."""
        found: dict = {}
        try:
            for i, sample in enumerate(iter_shard(path)):
                if wanted is None or i in wanted:
                    found[i] = sample
                    if wanted is not None and len(found) == len(wanted):
                        break
        except (ShardReadError, OSError) as err:
            log.warning("shard %s is unreadable after %d samples: %s", path.name, len(found), err)
            if self.quarantine_path:
                QuarantineLog(self.quarantine_path).record("shard_unreadable", shard=path.name, detail=str(err))
        return found

    def _views(self, sample, shard: Path, quarantine: QuarantineLog | None, seed: int) -> list[torch.Tensor] | None:
        if isinstance(sample, _Missing):
            reason, detail = "missing_sample", "the shard holds fewer samples than its manifest count"
        elif sample.image is None:
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


class _Missing:
    """Stand-in for a sample the manifest counts but the shard does not hold (any more)."""

    def __init__(self, key: str):
        self.key, self.image = key, None


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
        "stream": last["stream"],
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
        self._plan = plan_id(self.info) if self.info else None

    def update(self, batch: dict) -> None:
        info = batch["stream"]
        if info["plan_id"] != self._plan:  # the stream remapped the state it was given
            self.positions, self._plan = {}, info["plan_id"]
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
