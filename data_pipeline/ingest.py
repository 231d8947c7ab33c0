"""Ingest image files into webdataset shards: ``ingest()`` once, or ``watch()`` a drop folder.

Sources: image files; folders (recursive, files in sorted path order, names starting with
"." skipped); and file lists written ``@list.txt``: the ``@`` prefix (not the extension) marks
a list, whose lines are paths (relative ones resolved against the list's folder; blank lines
and ``#`` comments skipped). All sources are expanded before anything is written; a missing
path or a folder without files raises ``IngestError``.

The files are packed in a seeded random order (``shuffle_seed``, default 0, recorded per shard
in the manifest; None keeps the sorted order), so a shard is a sample of the whole input and
not a run of neighbouring files (one class folder, one camera).

Every file is validated (``decode.prepare_for_storage``); rejected files are counted per
reason and logged to ``<out_dir>/quarantine.jsonl`` with their path. Accepted images are
packed into shards of at most ``shard_max_count`` samples and ``shard_max_bytes`` bytes (a
single bigger image gets a shard of its own).

Crash safety and dedup are the writer session's (``data_pipeline.ingest_session``); ``watch()`` is
``data_pipeline.watch``'s. Their public names are re-exported here: ``data_pipeline.ingest`` stays
the one import.
"""

from __future__ import annotations

import random
from pathlib import Path

from data_pipeline.ingest_session import QUARANTINE_NAME, IngestError, IngestReport, IngestSession, expand_sources
from data_pipeline.storage import local_path, where
from data_pipeline.watch import DONE_DIR, PARTIAL_SUFFIXES, REJECTED_DIR, watch

__all__ = [
    "DONE_DIR", "PARTIAL_SUFFIXES", "QUARANTINE_NAME", "REJECTED_DIR", "IngestError", "IngestReport",
    "expand_sources", "ingest", "watch",
]


def ingest(
    sources: list[str | Path],
    out_dir: str | Path,
    *,
    shard_max_count: int = 1000,
    shard_max_bytes: int = 256 * 2**20,
    max_pixels: int = 100_000_000,
    min_side: int = 16,
    shuffle_seed: int | None = 0,
    progress: bool = False,
) -> IngestReport:
    """Validate and pack every source image into new shards of ``out_dir`` (see module doc)."""
    out_dir = where(out_dir)  # a folder, or an s3:// prefix
    files = expand_sources(sources, skip=local_path(out_dir))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)
    with IngestSession(out_dir, shard_max_count=shard_max_count, shard_max_bytes=shard_max_bytes,
                       max_pixels=max_pixels, min_side=min_side, shuffle_seed=shuffle_seed,
                       progress=progress) as session:
        for path in files:
            session.add_file(path)
    return session.report
