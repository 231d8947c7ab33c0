"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, keep-last-k, resumable.

Layout under ``run.dir/checkpoints``::

    step_00000100/          a DCP checkpoint (one file per rank + .metadata)
        extra_rank0.pt      step, LR schedule, guard, every rank's stream position (rank 0)
        extra_rank<r>.pt    that rank's RNG states
        manifest.json       every file's size at publication (rank 0): what "complete" means
    latest                  the name of the newest *complete* checkpoint (atomically replaced)

A checkpoint is written into ``.tmp-step_...`` and renamed only after every rank has finished,
so a crash mid-save leaves the previous one as ``latest``. A save that fails (disk full, no
permission) on any rank fails on every rank with one line (:class:`CheckpointSaveError`), removes
its temporary folder and leaves the previous checkpoint and ``latest`` as they were. A damaged
newest checkpoint (truncated or missing file) is skipped with a warning for the newest complete
one (``seer.engine.checkpoint_files``, which owns folder names, ``latest`` and the manifest). Model and optimizer state go through
``get_state_dict``/``set_state_dict``, which work for plain, DDP and FSDP2 models and let a
checkpoint saved on N ranks load on M. Extras are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import io
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from data_pipeline.storage import atomic_write_bytes
from seer.collectives import is_distributed
from seer.engine import watchdog
from seer.engine.checkpoint_files import (
    LATEST,
    CheckpointSaveError,
    checkpoint_step,
    latest_checkpoint,
    resolve_checkpoint,
    step_name,
    update_manifest,
    write_manifest,
)
from seer.engine.distributed import all_gather_objects, background_group, barrier, broadcast_object, decide_on_main

__all__ = ["Checkpointer", "CheckpointSaveError", "RNGState", "checkpoint_step", "latest_checkpoint", "load_extra",
           "load_model_and_optimizer", "load_model_weights", "resolve_checkpoint", "update_shared_extras"]
log = logging.getLogger(__name__)
# one process without a process group is a normal way to run (and to export): not worth a warning
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")



def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_extra(checkpoint: Path, rank: int = 0) -> dict[str, Any]:
    path = checkpoint / f"extra_rank{rank}.pt"
    if not path.is_file():
        return {}
    return torch.load(path, map_location="cpu", weights_only=True)


def update_shared_extras(checkpoint: Path, **updates: Any) -> None:
    """Replace entries of a checkpoint's shared extras (rank 0 calls it; atomic). A rollback
    writes its LR cut into the checkpoint it restored, so a restart from there keeps the cut."""
    buffer = io.BytesIO()
    torch.save({**load_extra(checkpoint, 0), **updates}, buffer)
    atomic_write_bytes(checkpoint / "extra_rank0.pt", buffer.getvalue())
    update_manifest(checkpoint, "extra_rank0.pt")


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _save_cause(err: BaseException) -> str:
    """The first rank's root error out of DCP's CheckpointException (or our own one-liners)."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, wrapped = sorted(err.failures.items())[0]
        cause = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        return f"{_describe(cause)} (rank {rank})"
    if isinstance(err, CheckpointException):
        return str(err.args[0]) if err.args else "CheckpointException"
    return _describe(err)


class RNGState:
    """This process's random generators (torch, CUDA, Python, numpy) as a checkpoint part."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


class Checkpointer:
    """Saves and restores a run: model and optimizer through DCP, and the stateful parts
    (objects with ``state_dict``/``load_state_dict``) in the extras files:

    - ``shared``: the same on every rank (LR schedule, guard, loss scaler); rank 0's copy is kept;
    - ``gathered``: one state per rank (the batch source's position), gathered into rank 0's file
      as a list, and handed back WHOLE to every rank's ``load_state_dict`` (a resume on another
      number of ranks re-deals it);
    - ``own``: one state per rank, kept in that rank's file (RNG states);
    - ``metadata``: plain values written once (config text, model and method names).
    """

    def __init__(self, checkpoint_dir: Path, *, rank: int, keep_last: int, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None, shared: dict | None = None, gathered: dict | None = None,
                 own: dict | None = None, metadata: dict | None = None):
        self.dir = Path(checkpoint_dir)
        self.rank = rank
        self.keep_last = keep_last
        self.model, self.optimizer = model, optimizer
        self.shared, self.gathered, self.own = dict(shared or {}), dict(gathered or {}), dict(own or {})
        self.metadata = dict(metadata or {})
        self.dir.mkdir(parents=True, exist_ok=True)
        self._pending = None
        self._gloo = None

    def latest(self) -> Path | None:
        """The newest complete checkpoint, as rank 0 sees it (a network file system may show
        ranks different folder states)."""
        return decide_on_main(lambda: latest_checkpoint(self.dir))

    def save(self, step: int, *, asynchronous: bool = False) -> Path:
        """A checkpoint of every part at ``step``; returns its final folder.

        Asynchronous: the state is staged to CPU memory and written by a background thread
        while training goes on; the checkpoint becomes ``latest`` only in :meth:`wait`, called
        before the next save, before a rollback and at the end of the run. A write that fails on
        any rank raises :class:`CheckpointSaveError` on every rank (here, or in :meth:`wait`).
        """
        self.wait()
        final = self.dir / step_name(step)
        tmp = self.dir / f".tmp-{final.name}"
        with watchdog.slow("checkpoint save"):
            try:
                self._write_extras(step, tmp)
                model_state, optim_state = get_state_dict(self.model, self.optimizer)
                state = {"model": model_state, "optim": optim_state}
                if asynchronous:
                    future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group())
                    self._pending = (future, tmp, final)
                else:
                    dcp.save(state, checkpoint_id=str(tmp))
                    self._publish(tmp, final)
            except (OSError, CheckpointException) as err:
                raise self._abandon(tmp, final, err) from None
        return final

    def _write_extras(self, step: int, tmp: Path) -> None:
        """Every rank's ``extra_rank<r>.pt``; a rank that cannot write its file fails the save on
        every rank (they agree before DCP's collective write starts)."""
        if self.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        barrier()
        gathered = {name: all_gather_objects(part.state_dict()) for name, part in self.gathered.items()}
        payload = {name: part.state_dict() for name, part in self.own.items()}
        if self.rank == 0:
            shared = {name: part.state_dict() for name, part in self.shared.items()}
            payload.update({"step": step, **shared, **gathered, **self.metadata})
        buffer = io.BytesIO()
        torch.save(payload, buffer)  # in memory: a full disk is then an OSError of the write below
        error = None
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            with open(tmp / f"extra_rank{self.rank}.pt", "wb") as handle:
                handle.write(buffer.getbuffer())
        except OSError as err:
            error = f"{_describe(err)} (rank {self.rank})"
        errors = [e for e in all_gather_objects(error) if e]
        if errors:
            raise CheckpointException(errors[0], {})

    def _async_group(self):
        """async_save's collectives need a CPU-capable group (gloo) even when training uses nccl."""
        if not is_distributed():
            return None
        if self._gloo is None:
            self._gloo = background_group("gloo")
        return self._gloo

    def wait(self) -> None:
        """Finish a pending asynchronous save and publish it."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        with watchdog.slow("checkpoint save"):
            try:
                future.result()
                self._publish(tmp, final)
            except (OSError, CheckpointException) as err:
                raise self._abandon(tmp, final, err) from None

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rank 0, once every rank has written: manifest, rename, ``latest``; every rank learns
        whether that worked."""
        barrier()
        error = None
        if self.rank == 0:
            world = torch.distributed.get_world_size() if is_distributed() else 1
            try:
                write_manifest(tmp, checkpoint_step(final), world)
                if final.exists():  # a step saved again (after a rollback or a damaged checkpoint)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                try:
                    atomic_write_bytes(self.dir / LATEST, final.name.encode())
                except OSError:
                    shutil.rmtree(final, ignore_errors=True)  # complete, but not the latest: leave nothing
                    raise
            except OSError as err:
                error = f"{_describe(err)} (rank 0, publishing)"
            else:
                self._prune()
        error = broadcast_object(error)
        if error:
            raise CheckpointException(error, {})
        barrier()

    def _abandon(self, tmp: Path, final: Path, err: BaseException) -> CheckpointSaveError:
        """After a failed save: remove its temporary folder (rank 0); the one-line error."""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            previous = latest_checkpoint(self.dir, warn=False)
        except (OSError, ValueError):
            previous = None
        kept = f"{previous.name} is still the latest" if previous is not None else "there is no earlier checkpoint"
        try:
            free = f" ({shutil.disk_usage(self.dir).free / 2**20:,.0f} MiB free there)"
        except OSError:
            free = ""
        return CheckpointSaveError(f"checkpoint {final.name} not saved: {_save_cause(err)}{free}; {kept}")

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, checkpoint: Path, *, skip: tuple[str, ...] = ()) -> int:
        """Restore the model, the optimizer and every part not named in ``skip`` from
        ``checkpoint``; return its step. A checkpoint of another model, method or optimizer is
        a one-line ``ValueError``. A part the checkpoint lacks (an older seer) keeps its state."""
        with watchdog.slow("checkpoint load"):
            step = self._load(checkpoint, skip)
        watchdog.at_step(step, completed=False)
        return step

    def _load(self, checkpoint: Path, skip: tuple[str, ...]) -> int:
        try:
            load_model_and_optimizer(checkpoint, self.model, self.optimizer)
        except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
            if watchdog.is_comm_error(err):  # another rank failed meanwhile: not a mismatch
                raise
            lines = [line for line in str(err).splitlines() if line.strip() and not line.startswith((" ", "Traceback"))]
            first = lines[-1] if lines else type(err).__name__
            raise ValueError(
                f"cannot resume from {checkpoint}: it does not match this run's model/method/optimizer ({first}); "
                f"use a new run.dir, or the config the run started with ({self.dir.parent / 'config.yaml'})"
            ) from err
        shared = load_extra(checkpoint, 0)
        own = load_extra(checkpoint, self.rank) if self.rank != 0 else shared
        for name, part in [*self.shared.items(), *self.gathered.items()]:
            if name not in skip and shared.get(name) not in (None, {}):
                part.load_state_dict(shared[name])
        for name, part in self.own.items():
            if name not in skip and name in own:
                part.load_state_dict(own[name])
        return int(shared["step"])


def load_model_and_optimizer(checkpoint: Path, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer | None) -> None:
    """Restore model (and optimizer) in place from a DCP checkpoint saved on any number of ranks."""
    model_state, optim_state = get_state_dict(model, optimizer) if optimizer is not None else (
        get_state_dict(model, [])[0],
        None,
    )
    state = {"model": model_state}
    if optim_state is not None:
        state["optim"] = _drop_unsaved_optimizer_state(optim_state, checkpoint)
    dcp.load(state, checkpoint_id=str(checkpoint))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        # strict=False: parameters without saved state (see below) start with none
        set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(strict=False))


def _drop_unsaved_optimizer_state(optim_state: dict, checkpoint: Path) -> dict:
    """Per-parameter optimizer state the checkpoint does not hold stays absent after loading.

    A parameter that had no gradient before the save (SwAV's frozen prototypes) has no
    momentum buffer in the checkpoint; ``get_state_dict`` creates one for every parameter, so
    asking DCP for it would fail, and keeping the fresh one would change the next updates.
    """
    saved = set(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    for fqn, entries in list(optim_state.get("state", {}).items()):
        for name in list(entries):
            if f"optim.state.{fqn}.{name}" not in saved:
                del entries[name]
        if not entries:
            del optim_state["state"][fqn]
    return optim_state


def load_model_weights(checkpoint: Path, model: torch.nn.Module) -> dict:
    """Single-process: fill ``model`` (plain nn.Module) from a DCP checkpoint; return shared extras."""
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=not is_distributed())
    model.load_state_dict(state["model"], strict=True)
    return load_extra(checkpoint, 0)
