"""Checkpoint folders on disk: their names, the ``latest`` pointer, the manifest a published
checkpoint carries, what "complete" means, and the newest complete checkpoint of a run.

Complete: every file the checkpoint's ``manifest.json`` lists exists with the size it had when
the checkpoint was published (rank 0 writes the manifest after every rank has finished writing,
just before the folder is renamed into place). That catches a truncated or missing shard
(``__<r>_0.distcp``), a missing ``extra_rank<r>.pt`` and a cut ``.metadata`` at the cost of one
``stat`` per file; it does not checksum contents. A checkpoint without a manifest (an older
seer) is complete when its ``.metadata`` loads, every file it refers to is at least as long as
the bytes it needs there, and ``extra_rank0.pt`` exists.

:func:`latest_checkpoint` returns the checkpoint ``latest`` names when it is complete, and
otherwise, with a warning, the newest complete one before it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from data_pipeline.storage import atomic_write_bytes

log = logging.getLogger("seer.engine.checkpoint")

LATEST = "latest"
MANIFEST = "manifest.json"


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written (one line: which, why, on which rank, and what is
    still the latest). Raised by ``Checkpointer.save``; defined here, free of torch, so the CLI
    can name it without importing torch."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(checkpoint: Path | None) -> int:
    """The step a checkpoint folder was saved at (``step_00000100`` -> 100); 0 for None."""
    if checkpoint is None:
        return 0
    name = Path(checkpoint).name
    if not name.startswith("step_") or not name[5:].isdigit():
        raise ValueError(f"{checkpoint} is not a checkpoint folder (step_NNNNNNNN)")
    return int(name[5:])


def write_manifest(folder: Path, step: int, world_size: int) -> None:
    """List every file of ``folder`` with its size (rank 0, once every rank's files are written)."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    text = json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1)
    atomic_write_bytes(folder / MANIFEST, text.encode())


def update_manifest(folder: Path, name: str) -> None:
    """Record the new size of ``name`` after it was replaced in a published checkpoint."""
    path = folder / MANIFEST
    if not path.is_file():
        return
    manifest = json.loads(path.read_text())
    manifest["files"][name] = (folder / name).stat().st_size
    atomic_write_bytes(path, json.dumps(manifest, indent=1).encode())


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (one short phrase), or None when it is."""
    if not folder.is_dir():
        return "the folder is missing"
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return _problem_without_manifest(folder)
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, size in files.items():
        try:
            actual = (folder / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written"
    return None


def _problem_without_manifest(folder: Path) -> str | None:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any unpickling error means the same: unusable
        return f".metadata is unreadable ({type(err).__name__})"
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        try:
            actual = (folder / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if actual < size:
            return f"{name} has {actual} bytes, at least {size} are needed"
    if not (folder / "extra_rank0.pt").is_file():
        return "extra_rank0.pt is missing"
    return None


def _step_folders(checkpoint_dir: Path) -> list[Path]:
    return sorted(p for p in checkpoint_dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit())


def latest_checkpoint(checkpoint_dir: Path, *, warn: bool = True) -> Path | None:
    """The newest complete checkpoint folder, or None when the run has none yet.

    The one ``latest`` names when it is complete; otherwise the newest complete one saved before
    it, with a warning naming what is damaged. ``FileNotFoundError`` when ``latest`` exists but
    no checkpoint is complete (starting over silently would throw the run away).
    """
    checkpoint_dir = Path(checkpoint_dir)
    pointer = checkpoint_dir / LATEST
    if not pointer.is_file():
        return None
    named = checkpoint_dir / pointer.read_text().strip()
    problem = checkpoint_problem(named)
    if problem is None:
        return named
    try:
        limit = checkpoint_step(named)
    except ValueError:  # a pointer that names no checkpoint: any step folder may do
        limit = None
    for candidate in reversed(_step_folders(checkpoint_dir)):
        if limit is not None and checkpoint_step(candidate) >= limit:
            continue
        if checkpoint_problem(candidate) is None:
            if warn:
                log.warning("checkpoint %s is damaged (%s): resuming from %s, the newest complete one",
                            named.name, problem, candidate.name)
            return candidate
    raise FileNotFoundError(f"{pointer} names {named.name}, which is not a complete checkpoint ({problem}), "
                            f"and no older checkpoint in {checkpoint_dir} is complete")


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
