"""Quarantine log: one JSON line per rejected input file or failed sample.

Ingestion records files it rejects (with the source path) in ``quarantine.jsonl``; training
records samples that fail to decode (with shard + key) in one file PER RANK,
``quarantine-rank<r>.jsonl`` (:func:`rank_log_path`): appends from many nodes to one file on a
network file system are not atomic. Each record is one ``os.write`` of one line on a file
opened with O_APPEND, so the writers of one file (threads, DataLoader workers of a rank) do not
interleave within a line. :func:`merged_entries` / :func:`merged_counts` read a folder's logs
back as one (every rank's file plus ``quarantine.jsonl``). Readers skip a torn last line
(a writer killed mid-write) instead of failing. Ingestion into an ``s3://`` prefix keeps its log
there (each record rewrites the object: ``storage.append_bytes``).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from data_pipeline.storage import append_bytes, where

MAX_DETAIL_CHARS = 500  # keeps every line far below a filesystem page
LOG_NAME = "quarantine.jsonl"  # one writer (ingestion)
_RANK_FILE = re.compile(r"quarantine-rank(\d+)\.jsonl")


def rank_log_path(folder: str | Path, rank: int) -> Path:
    """The quarantine log rank ``rank`` of a training run writes in ``folder``."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return Path(folder) / f"quarantine-rank{rank}.jsonl"


def log_paths(folder: str | Path) -> list[Path]:
    """Every quarantine log in ``folder``: ``quarantine.jsonl`` and the per-rank files (by rank)."""
    folder = where(folder)
    ranked = sorted((int(m.group(1)), p) for p in folder.glob("quarantine-rank*.jsonl")
                    if (m := _RANK_FILE.fullmatch(p.name)))
    return [p for p in [folder / LOG_NAME, *(p for _, p in ranked)] if p.is_file()]


def merged_entries(folder: str | Path) -> list[dict]:
    """The records of every log in ``folder`` as one list, by time (per-rank files carry ``rank``)."""
    entries = []
    for path in log_paths(folder):
        match = _RANK_FILE.fullmatch(path.name)
        rank = match.group(1) if match else None
        for entry in QuarantineLog(path).entries():
            entries.append(entry if rank is None else {**entry, "rank": int(rank)})
    return sorted(entries, key=lambda e: float(e.get("time", 0.0)))


def merged_counts(folder: str | Path) -> dict[str, int]:
    """reason -> number of records over every log in ``folder``."""
    return dict(Counter(entry["reason"] for entry in merged_entries(folder)))


class QuarantineLog:
    """Append-only JSON-lines log at ``path`` (parent folders are created on first write)."""

    def __init__(self, path: str | Path):
        self.path = where(path)

    def record(
        self,
        reason: str,
        *,
        shard: str | None = None,
        key: str | None = None,
        source: str | None = None,
        detail: str = "",
    ) -> None:
        if not reason or not isinstance(reason, str):
            raise ValueError(f"quarantine reason must be a non-empty string, got {reason!r}")
        entry = {"time": time.time(), "reason": reason}
        if shard is not None:
            entry["shard"] = shard
        if key is not None:
            entry["key"] = key
        if source is not None:
            entry["source"] = str(source)
        if detail:
            entry["detail"] = str(detail)[:MAX_DETAIL_CHARS]
        append_bytes(self.path, (json.dumps(entry, ensure_ascii=True) + "\n").encode("ascii"))

    def entries(self) -> Iterator[dict]:
        """Every complete, parseable record in file order (none if the file does not exist)."""
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            for raw in handle:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue  # torn line from a killed writer
                if isinstance(entry, dict) and "reason" in entry:
                    yield entry

    def counts(self) -> dict[str, int]:
        """reason -> number of records."""
        return dict(Counter(entry["reason"] for entry in self.entries()))
