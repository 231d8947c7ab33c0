"""The ``dali`` backend's batch source for the trainer: shard lists, rebuilds, torch tensors, state.

:class:`DaliLoader` yields ``{"views": [...], "keys": [...], "skipped": n}`` batches whose views are
what the torch path's views are after its color stage: a list (one per view, in the crop
specs' order) of contiguous float32 ``(B, 3, S, S)`` normalised tensors on the training device
(DALI crops and colors itself). :class:`DaliBatchSource` is the loop's
``data_pipeline.batch_source.BatchSource`` over it; the pin of a fixed-mode run comes from there.

Shards. ``fixed`` mode reads the corpus pinned when the run started
(:func:`stream_order.pin_corpus`, kept in the state) in a seeded shard order; DALI's reader deals
each epoch's samples to the ranks (``shard_id=rank, num_shards=world_size``: each sample once per
epoch over all ranks) and reshuffles the shard order after every epoch (the same order on every
rank); samples are mixed by a shuffle buffer of ``initial_fill`` samples (DALI's, not the torch
path's global permutation: a batch mixes the few shards the buffer spans). ``online`` mode reads
the shards active now and re-lists them every ``poll_seconds`` (checked before each batch): when
the list changed, the pipeline is rebuilt with the new shards first, then the others in a seeded
random order, so new shards are read from the first batches after the poll that saw them.

Remote shards (``s3://``): DALI's reader opens local files, so the listed shards are first copied
into the node's bounded shard cache (``data_pipeline.shard_cache``: ``data.cache_dir``,
``data.cache_gb``, least recently used evicted, shared by the node's ranks); the names, hence the
state and the sample keys, are the bucket's. The listed corpus must fit in the cache.

State (``state_dict()``, one per rank, JSON-friendly; ``version`` ``dali-1``)::

    {"version", "backend": "dali", "mode", "seed", "rank", "world_size", "graph" (fingerprint),
     "generation", "shards": [names in reading order], "pin" (fixed), "batches", "skipped",
     "checkpoint": DALI's serialized pipeline checkpoint, base64}

What a resume restores (:func:`resume_dali_state` picks this rank's state):

- Same rank count, same graph (crops, color parameters, batch size, device), same shards
  (fixed: the pinned corpus still complete; online: the same active shard list): the pipeline is
  rebuilt from DALI's checkpoint: reader position, shuffle buffer and every random operator's
  state. The batches continue exactly where they stopped: same samples, same augmentation.
- Another rank count: DALI's checkpoints are per rank and cannot be re-dealt. The stream starts
  afresh with a new ``generation`` (new seeds); in fixed mode the pin is kept and a new epoch
  starts: samples of the interrupted epoch that were not read yet are not read in it.
- A changed graph or shard list (online: shards published or retired while the run was down):
  afresh with a new generation, as above. Nothing else is promised.
"""

from __future__ import annotations

import base64
import logging
import random
import time
from pathlib import Path

import torch

from data_pipeline.batch_source import BatchSource
from data_pipeline.dali_pipeline import build_pipeline, graph_fingerprint, view_recipes
from data_pipeline.dali_shards import ReadyShard, prepare_shards
from data_pipeline.manifest import shard_paths
from data_pipeline.seeding import derive_seed
from data_pipeline.shard_cache import ShardCache
from data_pipeline.storage import is_remote, where
from data_pipeline.stream_order import list_corpus, pin_corpus, usable_state

log = logging.getLogger(__name__)

STATE_VERSION = "dali-1"


def _seed31(*parts) -> int:
    return derive_seed(*parts) % (2**31 - 1)


def _as_bytes(checkpoint: str | bytes) -> bytes:
    return checkpoint.encode("latin-1") if isinstance(checkpoint, str) else bytes(checkpoint)


def key_of(source_info: str) -> str:
    """Sample key from DALI's source info ``<tar path>:<offset>:<member name>``."""
    member = source_info.rsplit(":", 1)[-1]
    return member[:member.find(".", member.rfind("/") + 1)] if "." in member else member


def resume_dali_state(saved: list[dict], rank: int, world_size: int) -> dict:
    """This rank's state from the per-rank states of a checkpoint (see the module docstring)."""
    mine = [s for s in saved if isinstance(s, dict) and s.get("version") == STATE_VERSION]
    if not mine:
        if any(saved):
            log.warning("the checkpoint's stream state is not a DALI state (backend changed?): the stream restarts")
        return {}
    if len(mine) == world_size and mine[rank].get("rank") == rank and mine[rank].get("world_size") == world_size:
        return mine[rank]
    generation = max(int(s.get("generation", 0)) for s in mine) + 1
    log.warning("DALI state saved on %d rank(s), resuming on %d: DALI positions cannot be re-dealt, the stream "
                "restarts with generation %d%s", len(mine), world_size, generation,
                " (a new epoch of the pinned corpus)" if mine[0].get("pin") else "")
    keep = {k: mine[0][k] for k in ("version", "mode", "seed", "pin") if k in mine[0]}
    return {**keep, "generation": generation}


class DaliLoader:
    """Endless iterator of multi-crop batches from a DALI pipeline, and its state."""

    def __init__(self, shard_dir, crops, colors, flip_p: float, *, batch_size: int, mode: str = "online",
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 num_threads: int = 2, retention_days: float | None = None, poll_seconds: float = 60.0,
                 max_pixels: int = 100_000_000, cache_dir=None, quarantine_path=None, state: dict | None = None,
                 initial_fill: int = 1024, pin: list | None = None, shard_cache: tuple | None = None):
        if mode not in ("online", "fixed"):
            raise ValueError(f"stream mode must be 'online' or 'fixed', got {mode!r}")
        self.shard_dir = where(shard_dir)
        self.cache = None  # (folder, GB): where remote shards are copied for DALI
        if is_remote(self.shard_dir):
            if not shard_cache:
                raise ValueError(f"{self.shard_dir}: the DALI backend reads local files; give it a shard cache "
                                 "(data.cache_dir, data.cache_gb) or use data.backend=torch")
            self.cache = ShardCache(shard_cache[0], float(shard_cache[1]) * 1e9)
        self.recipes = view_recipes(crops, colors)
        self.flip_p, self.batch_size, self.mode, self.seed = flip_p, batch_size, mode, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.dali_device = "gpu" if self.device.type == "cuda" else "cpu"
        self.num_threads, self.initial_fill = max(1, num_threads), initial_fill
        self.retention_days, self.poll_seconds, self.max_pixels = retention_days, poll_seconds, max_pixels
        default_cache = self.cache.folder if self.cache else self.shard_dir
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache
        self.quarantine_path = quarantine_path
        self.graph = graph_fingerprint(self.recipes, flip_p, batch_size, self.dali_device)
        state = usable_state(state, mode, seed, version=STATE_VERSION) or {}
        self.generation = int(state.get("generation", 0))
        self.pin = (state.get("pin") or pin or pin_corpus(self.shard_dir, retention_days)) if mode == "fixed" else None
        self.batches = 0
        self.pipe, self.shards, self.listed_at = None, [], 0.0
        self._build(self._listing(), saved=state)

    # -- which shards, in which order -----------------------------------------------------------
    def _listing(self) -> list[Path]:
        self.listed_at = time.monotonic()
        if self.mode == "fixed":
            return [path for _, path, _ in list_corpus(self.shard_dir, self.pin, self.cache_dir)]
        return sorted(shard_paths(self.shard_dir, retention_days=self.retention_days))

    def _order(self, ready: list[ReadyShard], previous: list[str]) -> list[ReadyShard]:
        """Shuffled by (seed, generation), the same order on every rank; online: new shards first."""
        rng = random.Random(derive_seed(self.seed, "dali-order", self.generation))
        if self.mode == "fixed":
            return rng.sample(ready, len(ready))
        seen = set(previous)
        fresh = [r for r in ready if r.path.name not in seen]
        others = [r for r in ready if r.path.name in seen]
        return fresh + rng.sample(others, len(others))

    def _build(self, paths: list[Path], saved: dict | None = None) -> None:
        saved = saved or {}
        self.listed_names = sorted(p.name for p in paths)  # what the next poll compares with
        paths = sorted(paths, key=lambda p: p.name)
        local = self.cache.localize(paths) if self.cache else paths  # remote shards: their node-local copies
        ready = prepare_shards(self.shard_dir, local, cache_dir=self.cache_dir,
                               max_pixels=self.max_pixels, quarantine_path=self.quarantine_path)
        if not ready:
            raise FileNotFoundError(f"no readable samples in the shards of {self.shard_dir} for the DALI backend")
        checkpoint = base64.b64decode(saved["checkpoint"]) if saved.get("checkpoint") else None
        if checkpoint and (saved.get("graph") != self.graph or saved.get("world_size") != self.world_size
                           or saved.get("rank") != self.rank
                           or sorted(saved.get("shards", [])) != [r.path.name for r in ready]):
            log.warning("DALI checkpoint is for another graph, shard list or rank layout: the stream restarts")
            checkpoint = None
        if saved.get("checkpoint") and not checkpoint:
            self.generation += 1  # the saved stream cannot continue: new seeds, not a replay of it
        if checkpoint:
            by_name = {r.path.name: r for r in ready}
            ready = [by_name[name] for name in saved["shards"]]
        else:
            ready = self._order(ready, [r.path.name for r in self.shards] or saved.get("shards", []))
        kwargs = dict(batch_size=self.batch_size, device=self.dali_device, num_threads=self.num_threads,
                      device_id=(self.device.index or 0) if self.dali_device == "gpu" else None,
                      shard_id=self.rank, num_shards=self.world_size,
                      seed=_seed31(self.seed, "dali", self.generation, self.rank),
                      shuffle_seed=_seed31(self.seed, "dali-epochs", self.generation), initial_fill=self.initial_fill)
        paths_, indexes = [str(r.path) for r in ready], [str(r.index_path) for r in ready]
        self.pipe = None  # release the old pipeline's threads and buffers first
        try:
            self.pipe = build_pipeline(paths_, indexes, self.recipes, self.flip_p, checkpoint=checkpoint, **kwargs)
        except RuntimeError as err:
            if not checkpoint:
                raise
            log.warning("DALI could not restore its checkpoint (%s): the stream restarts", str(err).splitlines()[0])
            self.generation += 1
            kwargs.update(seed=_seed31(self.seed, "dali", self.generation, self.rank),
                          shuffle_seed=_seed31(self.seed, "dali-epochs", self.generation))
            self.pipe = build_pipeline(paths_, indexes, self.recipes, self.flip_p, **kwargs)
            checkpoint = None
        self.shards: list[ReadyShard] = ready
        self.batches = int(saved.get("batches", 0)) if checkpoint else 0
        log.info("DALI pipeline (%s, generation %d) over %d shard(s), %d samples%s", self.dali_device,
                 self.generation, len(ready), sum(r.samples for r in ready), ", resumed" if checkpoint else "")

    def _poll(self) -> None:
        if self.mode != "online" or time.monotonic() - self.listed_at < self.poll_seconds:
            return
        paths = self._listing()
        if paths and sorted(p.name for p in paths) != self.listed_names:
            log.info("shard list of %s changed: rebuilding the DALI pipeline", self.shard_dir)
            self.generation += 1
            self._build(paths)

    # -- batches --------------------------------------------------------------------------------
    def _to_torch(self, batch) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = batch.as_tensor()
        out = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(tensor, out, cuda_stream=stream)
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self._poll()
        outputs = self.pipe.run()
        self.batches += 1
        keys = [key_of(outputs[0][i].source_info()) for i in range(len(outputs[0]))]
        return {"views": [self._to_torch(o) for o in outputs], "keys": keys, "skipped": self.total_skipped}

    # -- position ---------------------------------------------------------------------------------
    @property
    def total_skipped(self) -> int:
        return sum(r.skipped for r in self.shards)

    def state_dict(self) -> dict:
        state = {"version": STATE_VERSION, "backend": "dali", "mode": self.mode, "seed": self.seed,
                 "rank": self.rank, "world_size": self.world_size, "graph": self.graph,
                 "generation": self.generation, "shards": [r.path.name for r in self.shards],
                 "batches": self.batches, "skipped": self.total_skipped,
                 "checkpoint": base64.b64encode(_as_bytes(self.pipe.checkpoint())).decode("ascii")}
        if self.pin is not None:
            state["pin"] = list(self.pin)
        return state


class DaliBatchSource(BatchSource):
    """The ``dali`` backend as the loop's batch source: a :class:`DaliLoader` made at the first
    batch, from the state :func:`resume_dali_state` picked (or afresh, with the pin the base
    class agreed on)."""

    def __init__(self, shard_dir, crops, colors, flip_p: float, **options):
        common = {k: options.pop(k) for k in ("mode", "seed", "rank", "world_size", "retention_days", "decide",
                                              "memory_format") if k in options}
        super().__init__(shard_dir, **common)
        self.loader_args = (shard_dir, crops, colors, flip_p)
        self.options = {**options, **{k: v for k, v in common.items() if k not in ("decide", "memory_format")}}
        self.loader: DaliLoader | None = None

    def _resume(self, states: list[dict]) -> dict:
        return resume_dali_state(states, self.rank, self.world_size)

    def _start(self, saved: dict, pin: list | None) -> None:
        self.loader = DaliLoader(*self.loader_args, state=saved, pin=pin, **self.options)

    def _next(self, step: int) -> list[torch.Tensor]:
        return next(self.loader)["views"]

    def commit(self) -> None:
        """Nothing to record: DALI's checkpoint is taken at the last batch returned."""

    def state_dict(self) -> dict:
        return self.loader.state_dict() if self.loader is not None else dict(self.saved)

    @property
    def skipped(self) -> int:
        return self.loader.total_skipped if self.loader is not None else int(self.saved.get("skipped", 0))

    def close(self) -> None:
        self.loader = None
