"""The order behind the sample stream: epoch orders, the deal to slots, the pinned corpus, the state.

Pure functions and small classes, no I/O beyond listing shards and counting samples (local or
remote: a shard's identity is its name, count and creation time from the manifest, never where
it is kept, so a corpus copied to ``s3://`` gives the same orders and crop seeds): how an
epoch's global order is made (``EpochOrder``: a seeded permutation of all samples, or with a
locality ``window`` an interleaving of a few shards at a time), how it is dealt to slots in
contiguous chunks, how online draws are made (``online_draws``: every sample at the same rate),
how a run's corpus is pinned, and how per-rank states saved in a checkpoint are turned into
the state of a rank of a new world size (``resume_state``). ``data_pipeline.stream`` runs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from data_pipeline.manifest import Manifest
from data_pipeline.seeding import derive_seed
from data_pipeline.shard_index import ShardIndexError, load_index
from data_pipeline.shards import list_shards
from data_pipeline.storage import ShardReadError, where

log = logging.getLogger(__name__)

STATE_VERSION = 4  # 4: "plans" renamed "bases"; 3 (read too): global sample permutation + online sample draws
_SECONDS_PER_DAY = 86400.0
INFO_KEYS = ("mode", "seed", "window", "n_slots", "workers", "pin", "samples", "start_epoch", "bases", "generation")


# -- item ranges: sorted, disjoint [a, b) intervals of an epoch's global sequence ---------------

def _size(ranges: list) -> int:
    return sum(b - a for a, b in ranges)


def _select(ranges: list, ranks: list) -> list[list[int]]:
    """The items of ``ranges`` whose rank (0-based, within ``ranges``) lies in the sorted,
    disjoint rank intervals ``ranks``; one sweep over both."""
    out: list[list[int]] = []
    i, seen = 0, 0  # ranges[i] holds ranks seen .. seen + len(ranges[i]) - 1
    for lo, hi in ranks:
        while lo < hi:
            while seen + ranges[i][1] - ranges[i][0] <= lo:
                seen += ranges[i][1] - ranges[i][0]
                i += 1
            a, b = ranges[i]
            start, stop = a + lo - seen, min(b, a + hi - seen)
            if out and out[-1][1] == start:
                out[-1][1] = stop
            else:
                out.append([start, stop])
            lo += stop - start
    return out


def _chunk(total: int, n_slots: int, chunk: int) -> tuple[int, int]:
    """Rank interval of chunk ``chunk`` of ``n_slots`` contiguous, balanced chunks."""
    return chunk * total // n_slots, (chunk + 1) * total // n_slots


def deal(base: list, n_slots: int, chunk: int) -> list[list[int]]:
    return _select(base, [_chunk(_size(base), n_slots, chunk)])


def skip_items(ranges: list, n: int) -> list[list[int]]:
    """``ranges`` without their first ``n`` items."""
    return _select(ranges, [(n, _size(ranges))]) if n < _size(ranges) else []


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(*parts)))


class EpochOrder:
    """Epoch ``epoch``'s global order over a pinned corpus: item ``p`` is sample ``ids[p]``.

    Samples are numbered shard by shard in corpus order (``starts``). ``window`` 0: ``ids`` is a
    seeded permutation of all samples. ``window`` k > 0 (locality): the shards in a seeded order,
    cut into groups of k; a group's samples are interleaved at random, each shard's in archive
    order, so a reader of a stretch of the order has at most about k shards open and reads each
    of them front to back.
    """

    def __init__(self, corpus: list[tuple[str, Path, int]], seed: int, epoch: int, window: int = 0):
        self.corpus = corpus
        counts = np.array([count for _, _, count in corpus], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        total = int(self.starts[-1])
        dtype = np.int32 if total < 2**31 else np.int64
        rng = _rng(seed, "epoch", epoch)
        if window <= 0:
            self.ids = rng.permutation(total).astype(dtype)
            return
        self.ids = np.empty(total, dtype=dtype)
        order = rng.permutation(len(corpus))
        at = 0
        for first in range(0, len(order), window):
            group = order[first:first + window]
            labels = np.repeat(np.arange(len(group)), counts[group])
            rng.shuffle(labels)
            by_shard = np.concatenate([np.arange(self.starts[j], self.starts[j + 1]) for j in group])
            self.ids[at + np.argsort(labels, kind="stable")] = by_shard
            at += len(labels)

    def items(self, ranges: list) -> Iterator[tuple[int, int, int]]:
        """``(p, shard number, sample number in the shard)`` for the positions in ``ranges``."""
        for a, b in ranges:
            ids = self.ids[a:b].astype(np.int64)
            shards = np.searchsorted(self.starts, ids, side="right") - 1
            yield from zip(range(a, b), shards.tolist(), (ids - self.starts[shards]).tolist())


def online_draws(counts: list[int], seed: int, generation: int, slot: int, block: int,
                 window: int = 0, size: int = 128) -> list[tuple[int, int]]:
    """Block ``block`` of a slot's online draws: ``size`` (shard number, sample number) pairs.

    Every sample of the listed shards (``counts`` samples each) is drawn with probability
    ``1 / sum(counts)`` per draw, whatever its shard's size. ``window`` 0: each draw is a uniform
    sample of all. ``window`` k: the block first picks k shards (with replacement, probability
    proportional to their sample counts), then each draw takes one of them uniformly and a
    uniform sample of it, so a block reads at most k shards.
    """
    counts_arr = np.asarray(counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts_arr)])
    rng = _rng(seed, "online", generation, slot, block)
    if window <= 0:
        ids = rng.integers(0, starts[-1], size=size)
        shards = np.searchsorted(starts, ids, side="right") - 1
        return list(zip(shards.tolist(), (ids - starts[shards]).tolist()))
    picked = np.searchsorted(starts, rng.integers(0, starts[-1], size=window), side="right") - 1
    shards = picked[rng.integers(0, window, size=size)]
    samples = (rng.random(size) * counts_arr[shards]).astype(np.int64)
    return list(zip(shards.tolist(), samples.tolist()))


def _count_samples(path, cache_dir: Path | None) -> int:
    """Samples in a shard without a manifest entry, from its index (built once if missing)."""
    try:
        return len(load_index(path, cache_dir))
    except (ShardReadError, ShardIndexError, OSError) as err:
        log.warning("cannot count samples of %s: %s", path, err)
        return 0


def _shard_entries(shard_dir) -> list[tuple[str, Path, int | None, float]]:
    """(name, path, count or None, creation time) of every shard: manifest, else *.tar + mtime."""
    manifest = Manifest.load(shard_dir)
    if manifest.path.exists():
        return [(i.name, manifest.shard_path(i), i.count, i.created) for i in manifest.shards]
    return [(p.stem, p, None, p.stat().st_mtime) for p in list_shards(shard_dir)]


def _cutoff(retention_days: float | None) -> float:
    return -float("inf") if retention_days is None else time.time() - retention_days * _SECONDS_PER_DAY


def pin_corpus(shard_dir: str | Path, retention_days: float | None = None) -> list[float]:
    """``[first, last]`` creation times of the shards active now: pins the corpus of a run.

    Every rank computes the same pin from the same folder (no clocks compared), unless a shard
    is published or retired while the ranks are starting.
    """
    cutoff = _cutoff(retention_days)
    times = [t for _, _, _, t in _shard_entries(where(shard_dir)) if t >= cutoff]
    if not times:
        raise FileNotFoundError(f"no shards to read in {shard_dir} (fixed mode)")
    return [min(times), max(times)]


def _with_counts(chosen: list, cache_dir: str | Path | None, known: dict | None = None) -> list[tuple[str, Path, int]]:
    """Fill in the counts a manifest did not give, from the shards' indexes (memoised in ``known``
    by path and modification time)."""
    cache = Path(cache_dir) if cache_dir is not None else None
    known = {} if known is None else known
    out = []
    for name, path, count in chosen:
        if count is None:
            stamp = (path, path.stat().st_mtime_ns) if path.exists() else (path, None)
            if stamp not in known:
                known[stamp] = _count_samples(path, cache)
            count = known[stamp]
        out.append((name, path, count))
    return sorted(out)


def list_corpus(shard_dir: str | Path, pin: list, cache_dir: str | Path | None = None) -> list[tuple[str, Path, int]]:
    """(name, path, sample count) of the shards created within ``pin``, sorted by name."""
    first, last = pin
    return _with_counts([(n, p, c) for n, p, c, t in _shard_entries(where(shard_dir)) if first <= t <= last],
                        cache_dir)


def active_shards(shard_dir: str | Path, retention_days: float | None = None,
                  cache_dir: str | Path | None = None, known: dict | None = None) -> list[tuple[str, Path, int]]:
    """(name, path, sample count) of the shards active now (within retention), sorted by name."""
    cutoff = _cutoff(retention_days)
    chosen = [(n, p, c) for n, p, c, t in _shard_entries(where(shard_dir)) if t >= cutoff]
    return _with_counts(chosen, cache_dir, known)


def deal_id(info: dict) -> str:
    """Digest of what fixes every slot's sequence (a position means something only under it)."""
    keys = ("mode", "seed", "window", "n_slots", "pin", "start_epoch", "bases", "generation")
    text = json.dumps([info.get(k) for k in keys], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def usable_state(state: dict | None, mode: str | None = None, seed: int | None = None,
                 version: int | str = STATE_VERSION) -> dict | None:
    """``state`` if it is a ``version`` state for ``mode``/``seed``; else None (with a warning).
    The one check of a saved stream state, for both backends (DALI's states have their own
    ``version``)."""
    if not state:
        return None
    if not isinstance(state, dict):
        raise ValueError(f"stream state must be a dict (StreamPosition.state_dict()), got {type(state).__name__}")
    if version == STATE_VERSION and state.get("version") == 3:  # the same state under its old key name
        state = {**{k: v for k, v in state.items() if k != "plans"}, "version": STATE_VERSION,
                 "bases": state.get("plans", {})}
    if state.get("version") != version:
        log.warning("stream state of version %s is not understood (want %s): the stream restarts",
                    state.get("version"), version)
        return None
    if mode is not None and state.get("mode") != mode:
        log.warning("stream state is for %s mode, the stream runs in %s mode: it restarts", state.get("mode"), mode)
        return None
    if seed is not None and state.get("seed") != seed:
        log.warning("stream state is for seed %s, the stream has seed %s: it restarts", state.get("seed"), seed)
        return None
    return state


def _remap_fixed(info: dict, slots: dict[int, dict], n_new: int) -> dict:
    """The deal for ``n_new`` slots: the items no old slot has consumed, epoch by epoch."""
    n_old, start, bases = int(info["n_slots"]), int(info["start_epoch"]), info.get("bases", {})
    positions = [slots.get(s, {"epoch": start, "index": 0}) for s in range(n_old)]
    first = min(p["epoch"] for p in positions)
    last = max([p["epoch"] for p in positions] + [int(e) for e in bases])  # partial bases stay
    remaining = {}
    for epoch in range(first, last + 1):
        base = bases.get(str(epoch), [[0, int(info["samples"])]])
        total, keep = _size(base), []
        for chunk in range(n_old):
            pos = positions[(chunk - epoch) % n_old]  # the slot that was dealt this chunk
            lo, hi = _chunk(total, n_old, chunk)
            taken = hi - lo if pos["epoch"] > epoch else min(int(pos["index"]), hi - lo) if pos["epoch"] == epoch else 0
            if lo + taken < hi:
                keep.append((lo + taken, hi))
        remaining[epoch] = _select(base, keep)
    start_new = next((e for e in range(first, last + 1) if remaining[e]), last + 1)
    new_bases = {str(e): r for e, r in remaining.items() if e >= start_new}
    return {**info, "n_slots": n_new, "start_epoch": start_new, "bases": new_bases}


def resume_state(saved_states: list[dict], rank: int, world_size: int, num_workers: int) -> dict:
    """The stream state for ``rank`` of ``world_size`` from the per-rank states of a checkpoint.

    Same slot count (``world_size * max(1, num_workers)``): the rank's own positions, so the
    stream continues exactly. Another slot count: fixed mode deals the samples not yet consumed
    in the epochs in progress to the new slots (then whole epochs); online mode continues with
    a fresh seed generation. Returns ``{}`` when nothing usable was saved (the stream starts).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    states = [usable_state(s) for s in saved_states or []]
    known = [s for s in states if s and "n_slots" in s]
    if not known:
        return {}
    ids = {deal_id(s) for s in known}
    if len(ids) > 1:
        raise ValueError(f"the {len(known)} saved stream states belong to {len(ids)} different deals; "
                         "they must come from one checkpoint of one run")
    info = {k: known[0][k] for k in INFO_KEYS if k in known[0]}
    n_old, workers_old = int(info["n_slots"]), int(info["workers"])
    if n_old != workers_old * len(states):
        raise ValueError(f"stream states of {len(states)} ranks, but the deal has {n_old} slots of "
                         f"{workers_old} workers: pass the list of every rank's state")
    slots: dict[int, dict] = {}
    for r, state in enumerate(states):  # each rank is the authority on its own slots
        for key, pos in (state or {}).get("slots", {}).items():
            if int(key) // workers_old == r:
                slots[int(key)] = dict(pos)
    workers = max(1, int(num_workers))
    n_new = world_size * workers
    if n_new == n_old:  # same slots (perhaps on other ranks): every slot continues where it was
        mine = {str(s): p for s, p in slots.items() if s // workers == rank}
        same_ranks = workers == workers_old and rank < len(states)
        next_worker = int((states[rank] or {}).get("next_worker", 0)) if same_ranks else 0
        return {"version": STATE_VERSION, **info, "workers": workers, "slots": mine, "next_worker": next_worker}
    log.info("stream: %d slots saved, %d now: %s", n_old, n_new,
             "dealing the rest of the epoch" if info["mode"] == "fixed" else "online stream reseeded")
    if info["mode"] == "fixed":
        info = _remap_fixed(info, slots, n_new)
    else:
        info = {**info, "n_slots": n_new, "generation": int(info.get("generation", 0)) + 1}
    skipped = sum(int(p.get("skipped", 0)) for p in slots.values()) if rank == 0 else 0
    return {"version": STATE_VERSION, **info, "workers": workers, "slots": {}, "next_worker": 0,
            "skipped_before": skipped}
