"""The training loop's one view of data: a batch source of device-ready views, and its state.

A :class:`BatchSource` is what the loop calls, whatever the backend:

- ``next_batch(step)``: the views of the next batch (one float32 ``(B, 3, S, S)`` tensor per crop,
  color work done, on the training device);
- ``commit()``: the last batch was trained on (a batch whose step was rolled back or never
  finished is not counted as consumed);
- ``state_dict()``: this rank's position, JSON-friendly; ``load_state_dict(states)`` takes the
  list of EVERY rank's saved state (a checkpoint may come from another number of ranks) before
  the first batch;
- ``skipped``: samples this rank skipped so far (undecodable, unreadable), saved runs included.

Backends: :class:`StreamBatchSource` (here: ``ShardStream`` in DataLoader workers, the position
kept from the batches, the color stage on ``color_device``) and
``data_pipeline.dali_loader.DaliBatchSource`` (a DALI pipeline that crops and colors itself).

Pin agreement (fixed mode) lives here, once for both backends: a run that starts without a saved
position pins its corpus (``stream_order.pin_corpus``) through ``decide``, the caller's "run on
one rank, hand the result to every rank" (the engine's ``decide_on_main``), so ranks listing a
shared folder while a shard is published never pin different corpora.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, TypeVar

import torch

from data_pipeline.augment import ColorAugmentSpec, color_augment
from data_pipeline.crops import MultiCrop
from data_pipeline.seeding import derive_seed
from data_pipeline.stream import ShardStream, StreamPosition, make_loader
from data_pipeline.stream_order import pin_corpus, resume_state

log = logging.getLogger(__name__)

T = TypeVar("T")
Decide = Callable[[Callable[[], T]], T]


def _alone(decide: Callable[[], T]) -> T:
    return decide()


class BatchSource:
    """The interface the loop knows, and what both backends share (see the module doc)."""

    def __init__(self, shard_dir: str | Path, *, mode: str, seed: int, rank: int, world_size: int,
                 retention_days: float | None = None, decide: Decide | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format):
        if mode not in ("online", "fixed"):
            raise ValueError(f"stream mode must be 'online' or 'fixed', got {mode!r}")
        self.shard_dir = shard_dir
        self.mode, self.seed, self.rank, self.world_size = mode, seed, rank, world_size
        self.retention_days = retention_days
        self.decide = decide or _alone
        self.memory_format = memory_format  # the model's layout (train.memory_format): views come in it
        self.saved: dict = {}  # this rank's state to start from
        self.started = False

    # -- the interface ------------------------------------------------------------------------
    def next_batch(self, step: int) -> list[torch.Tensor]:
        if not self.started:
            self._start(self.saved, self._pin(self.saved))
            self.started = True
        return [view.contiguous(memory_format=self.memory_format) for view in self._next(step)]  # no copy if so

    def commit(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, states: list[dict]) -> None:
        """Every rank's saved state (a checkpoint's list); call before the first batch."""
        if self.started:
            raise RuntimeError("a batch source's state is loaded before its first batch")
        self.saved = self._resume(list(states or [])) or {}

    @property
    def skipped(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers and pipelines."""

    # -- shared by the backends ---------------------------------------------------------------
    def _pin(self, saved: dict) -> list | None:
        """Fixed mode: the saved run's pin, else the one rank 0 takes now, on every rank."""
        if self.mode != "fixed":
            return None
        if saved.get("pin"):
            return list(saved["pin"])
        return list(self.decide(lambda: pin_corpus(self.shard_dir, self.retention_days)))

    # -- per backend ---------------------------------------------------------------------------
    def _resume(self, states: list[dict]) -> dict:
        raise NotImplementedError

    def _start(self, saved: dict, pin: list | None) -> None:
        raise NotImplementedError

    def _next(self, step: int) -> list[torch.Tensor]:
        raise NotImplementedError


def batch_loader(stream: ShardStream, batch_size: int, num_workers: int, device: torch.device):
    """The DataLoader over ``stream``; batches in page-locked memory when training on CUDA, so
    the ``non_blocking`` copies to the GPU are asynchronous."""
    loader = make_loader(stream, batch_size, num_workers)
    loader.pin_memory = torch.device(device).type == "cuda"  # read when the iterator is created
    return loader


class StreamBatchSource(BatchSource):
    """The torch path: ``ShardStream`` in ``num_workers`` DataLoader workers (decode, crops), its
    position kept in this process from the batches, then the color stage per view on
    ``color_device`` (seeded by (seed, rank, step, view): a resumed step repeats its colors)."""

    def __init__(self, shard_dir: str | Path, multicrop: MultiCrop, colors: list[ColorAugmentSpec], *,
                 batch_size: int, num_workers: int, device: torch.device, color_device: torch.device | None = None,
                 window: int = 0, poll_seconds: float = 60.0, max_pixels: int = 100_000_000, read_ahead: int = 32,
                 quarantine_path: str | Path | None = None, index_cache_dir: str | Path | None = None,
                 color_method: str = "auto", **common):
        super().__init__(shard_dir, **common)
        self.color_method = color_method  # data_pipeline.augment.color_augment's method
        self.stream_options = dict(mode=self.mode, seed=self.seed, rank=self.rank, world_size=self.world_size,
                                   retention_days=self.retention_days, window=window, poll_seconds=poll_seconds,
                                   max_pixels=max_pixels, read_ahead=read_ahead, quarantine_path=quarantine_path,
                                   index_cache_dir=index_cache_dir)
        self.multicrop, self.colors = multicrop, list(colors)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.device = torch.device(device)
        self.color_device = torch.device(color_device) if color_device is not None else self.device
        self.position = StreamPosition()
        self.batches = None
        self.pending: dict | None = None

    def _resume(self, states: list[dict]) -> dict:
        # every rank's saved position, re-dealt when the number of ranks or workers changed
        return resume_state(states, self.rank, self.world_size, self.num_workers)

    def _start(self, saved: dict, pin: list | None) -> None:
        stream = ShardStream(self.shard_dir, self.multicrop, state=saved, pin=pin, **self.stream_options)
        self.position = StreamPosition(saved)
        self.batches = iter(batch_loader(stream, self.batch_size, self.num_workers, self.device))

    def _next(self, step: int) -> list[torch.Tensor]:
        self.pending = next(self.batches)
        return [
            color_augment(
                view.to(self.color_device, non_blocking=True), self.colors[i],
                torch.Generator().manual_seed(derive_seed(self.seed, "color", self.rank, step, i)),
                method=self.color_method, memory_format=self.memory_format,
            ).to(self.device, non_blocking=True)
            for i, view in enumerate(self.pending["views"])
        ]

    def commit(self) -> None:
        if self.pending is not None:
            self.position.update(self.pending)
            self.pending = None

    def state_dict(self) -> dict:
        return self.position.state_dict()

    @property
    def skipped(self) -> int:
        return self.position.total_skipped

    def close(self) -> None:
        self.batches = None  # the DataLoader iterator's workers stop when it is collected
