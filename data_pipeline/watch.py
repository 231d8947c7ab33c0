"""Watch a drop folder: ``watch()`` ingests files as they arrive, through the writer session of
``data_pipeline.ingest_session`` (re-exported by ``data_pipeline.ingest``).

``watch``: files in the drop folder that have not been modified for ``min_age_seconds`` are
ingested; rejected and already-known files are moved at once to ``.rejected/`` and
``.done/``, accepted files to ``.done/`` only after the shard holding them is committed (a
crash leaves them in place; the rerun sees them as duplicates; nothing is deleted, empty
``.done/`` yourself). A partial shard is published when a poll finds no new files, so new
images are served soon.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from data_pipeline.ingest_session import IngestError, IngestReport, IngestSession, _walk_files
from data_pipeline.storage import local_path, where

DONE_DIR = ".done"
REJECTED_DIR = ".rejected"
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload")  # skipped by watch()


def _ready_files(drop_dir: Path, min_age_seconds: float, exclude: set[Path],
                 skip: Path | None) -> list[Path]:
    now = time.time()
    ready = []
    for path in _walk_files(drop_dir, skip=skip):
        if path in exclude or path.name.lower().endswith(PARTIAL_SUFFIXES):
            continue
        try:
            if now - path.stat().st_mtime >= min_age_seconds:
                ready.append(path)
        except FileNotFoundError:
            continue
    return ready


def _move_into(path: Path, drop_dir: Path, target: str) -> None:
    destination = drop_dir / target / path.relative_to(drop_dir)
    destination.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = destination, 0
    while candidate.exists():
        n += 1
        candidate = destination.with_name(f"{destination.name}.{n}")
    try:
        os.replace(path, candidate)
    except FileNotFoundError:
        pass  # removed by someone else meanwhile


def watch(
    drop_dir: str | Path,
    out_dir: str | Path,
    *,
    poll_seconds: float = 5.0,
    stop: threading.Event | None = None,
    min_age_seconds: float = 2.0,
    retention_days: float | None = None,
    **ingest_kwargs,
) -> IngestReport:
    """Ingest files dropped into ``drop_dir`` until ``stop`` is set (see module docstring).

    ``retention_days``: also retire (and delete) expired shards once per poll.
    ``ingest_kwargs``: shard_max_count, shard_max_bytes, max_pixels, min_side, progress.
    """
    drop_dir = Path(drop_dir)
    if not drop_dir.is_dir():
        raise IngestError(f"drop folder {drop_dir} does not exist or is not a folder")
    stop = stop if stop is not None else threading.Event()
    pending: set[Path] = set()

    def committed(_shard: str, sources: list[Path]) -> None:
        for path in sources:
            pending.discard(path)
            _move_into(path, drop_dir, DONE_DIR)

    with IngestSession(out_dir, on_commit=committed, **ingest_kwargs) as session:
        while not stop.is_set():
            ready = _ready_files(drop_dir, min_age_seconds, pending, local_path(where(out_dir)))
            for path in ready:
                if stop.is_set():
                    break
                pending.add(path)  # before add_file: it may commit (and move) at once
                outcome = session.add_file(path)
                if outcome in ("rejected", "duplicate"):
                    pending.discard(path)
                    _move_into(path, drop_dir, REJECTED_DIR if outcome == "rejected" else DONE_DIR)
            if not ready:
                session.flush()
            if retention_days is not None:
                session.retire(retention_days)
            stop.wait(poll_seconds)
    return session.report
