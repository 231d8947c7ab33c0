"""Quarantine log: one JSON line per rejected input file or failed sample.

Ingestion records files it rejects (with the source path); the training stream records
samples that fail to decode (with shard + key). Each record is one ``os.write`` of one line
on a file opened with O_APPEND, so concurrent writers (threads, DataLoader workers, ranks on
the same machine) do not interleave within a line. ``counts()`` skips a torn last line
(a writer killed mid-write) instead of failing.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

MAX_DETAIL_CHARS = 500  # keeps every line far below a filesystem page


class QuarantineLog:
    """Append-only JSON-lines log at ``path`` (parent folders are created on first write)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

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
        line = (json.dumps(entry, ensure_ascii=True) + "\n").encode("ascii")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def entries(self) -> Iterator[dict]:
        """Every complete, parseable record in file order (none if the file does not exist)."""
        try:
            handle = open(self.path, "rb")
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
