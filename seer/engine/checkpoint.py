"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, keep-last-k, resumable.

Layout under ``run.dir/checkpoints``::

    step_00000100/          a DCP checkpoint (one file per rank + .metadata)
        extra_rank0.pt      step, LR schedule, guard, every rank's stream position (rank 0)
        extra_rank<r>.pt    that rank's RNG states
    latest                  the name of the newest *complete* checkpoint (atomically replaced)

A checkpoint is written into ``.tmp-step_...`` and renamed only after every rank has finished,
so a crash mid-save leaves the previous one as ``latest``. Model and optimizer state go through
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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from data_pipeline.shards import atomic_write_bytes
from seer.engine.distributed import barrier, is_distributed

log = logging.getLogger(__name__)
# one process without a process group is a normal way to run (and to export): not worth a warning
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

LATEST = "latest"


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


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


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    pointer = checkpoint_dir / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_dir / pointer.read_text().strip()
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def resolve_checkpoint(path: Path) -> Path:
    """Accept a run folder, its checkpoints folder, or one checkpoint folder."""
    path = Path(path)
    for candidate in (path / "checkpoints", path):
        if (candidate / LATEST).is_file():
            found = latest_checkpoint(candidate)
            if found is not None:
                return found
    if (path / ".metadata").is_file():
        return path
    raise FileNotFoundError(f"no checkpoint found at {path} (expected a run folder, checkpoints/ or step_* folder)")


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


class Checkpointer:
    def __init__(self, checkpoint_dir: Path, *, rank: int, keep_last: int):
        self.dir = Path(checkpoint_dir)
        self.rank = rank
        self.keep_last = keep_last
        self.dir.mkdir(parents=True, exist_ok=True)
        self._pending = None
        self._gloo = None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict,
        shared: dict,
        *,
        asynchronous: bool = False,
    ) -> Path:
        """``extra`` is this rank's (RNG...); ``shared`` (step, schedule, stream...) goes to rank 0's file.

        Asynchronous: the state is staged to CPU memory and written by a background thread
        while training goes on; the checkpoint becomes ``latest`` only in :meth:`wait`, called
        before the next save, before a rollback and at the end of the run.
        """
        self.wait()
        final = self.dir / _step_name(step)
        tmp = self.dir / f".tmp-{final.name}"
        if self.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        model_state, optim_state = get_state_dict(model, optimizer)
        payload = {**extra, **shared} if self.rank == 0 else extra
        torch.save(payload, tmp / f"extra_rank{self.rank}.pt")
        state = {"model": model_state, "optim": optim_state}
        if asynchronous:
            self._pending = (dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group()), tmp, final)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._publish(tmp, final)
        return final

    def _async_group(self):
        """async_save's collectives need a CPU-capable group (gloo) even when training uses nccl."""
        if not is_distributed():
            return None
        if self._gloo is None:
            self._gloo = torch.distributed.new_group(backend="gloo")
        return self._gloo

    def wait(self) -> None:
        """Finish a pending asynchronous save and publish it."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        future.result()
        self._publish(tmp, final)

    def _publish(self, tmp: Path, final: Path) -> None:
        barrier()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_bytes(self.dir / LATEST, final.name.encode())
            self._prune()
        barrier()

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        """Restore model (and optimizer) in place; return rank 0's shared extras + this rank's."""
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
            # strict=False: parameters without saved state (see above) start with none
            set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(strict=False))
        shared = load_extra(checkpoint, 0)
        own = load_extra(checkpoint, self.rank) if self.rank != 0 else shared
        return {"shared": shared, "own": own}


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
