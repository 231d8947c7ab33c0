"""The manifest of a shard folder, its content-hash index, retention, and the writer lock.

Files in a shard folder ``D``:
- ``D/manifest.json``: ``{"format": "seer-shards/1", "next_index": N, "shards": [{name,
  count, bytes, created, shuffle_seed}]}`` (``shuffle_seed``: the seed that shuffled the order
  ``ingest`` packed files in; null for ``watch``, which packs in arrival order). It is THE commit point: a shard exists for readers and for
  deduplication only once it is listed here. Saved atomically (temp + fsync + os.replace +
  folder fsync). ``next_index`` only grows, so shard names ``shard-NNNNNN`` never repeat,
  not even after retirement.
- ``D/hashes.txt``: the content-hash index kept out of the manifest so the manifest stays
  small. One line ``<sha256> <shard-name>`` per hash; appended (and fsynced) before the
  manifest that lists the shard is saved. A line counts only while its shard is listed in
  the manifest, so index and manifest always agree, whatever moment a writer was killed
  at; lines of unlisted shards (a killed run, a retired shard) are dropped by
  ``compact_hashes()``. Retired content is therefore forgotten and may be ingested again.
- ``D/<shard>.idx``: the shard's member offsets (``data_pipeline.shard_index``, DALI's format),
  written before the shard is published; deleted with it.
- ``D/.writer.lock``: ``writer_lock(D)`` (flock) keeps two writers (ingest, watch, retire)
  from interleaving their manifest read-modify-write cycles. Readers need no lock.

``D`` may be an ``s3://`` prefix (``data_pipeline.storage``): every file above is then an object,
saved with one PUT (atomic: readers see the old or the new manifest), ``hashes.txt`` is appended to
by rewriting it, and there is no lock: ONE writer per prefix (ingest or watch), not enforced.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from data_pipeline.shard_index import index_path_for
from data_pipeline.shards import list_shards
from data_pipeline.storage import append_bytes, atomic_write_bytes, is_remote, read_range, where

MANIFEST_NAME = "manifest.json"
HASHES_NAME = "hashes.txt"
LOCK_NAME = ".writer.lock"
FORMAT = "seer-shards/1"
SHARD_NAME_RE = re.compile(r"^shard-(\d{6,})$")
_HASH_LINE_RE = re.compile(r"^([0-9a-f]{64}) (\S+)$")
SECONDS_PER_DAY = 86400.0


class ManifestError(ValueError):
    """A manifest.json that cannot be used (names the file and the problem)."""


class WriterLockedError(RuntimeError):
    """Another process (ingest, watch, retire) is writing to the same shard folder."""


@dataclass
class ShardInfo:
    name: str
    count: int
    bytes: int
    created: float  # unix time the shard was published
    shuffle_seed: int | None = None  # seed that shuffled the packing order (None: arrival order)

    @classmethod
    def from_dict(cls, entry: dict) -> ShardInfo:
        seed = entry.get("shuffle_seed")
        return cls(name=str(entry["name"]), count=int(entry["count"]),
                   bytes=int(entry["bytes"]), created=float(entry["created"]),
                   shuffle_seed=None if seed is None else int(seed))


def shard_index(name: str) -> int | None:
    """N for names ``shard-NNNNNN`` written by ``ingest``, else None."""
    match = SHARD_NAME_RE.match(name)
    return int(match.group(1)) if match else None


def _check_retention(retention_days: float | None) -> None:
    if retention_days is not None and not retention_days >= 0:
        raise ValueError(f"retention_days must be >= 0 or None, got {retention_days!r}")


class Manifest:
    def __init__(self, directory: str | Path, shards: list[ShardInfo] | None = None,
                 next_index: int = 0):
        self.directory = where(directory)
        self.shards: list[ShardInfo] = list(shards or [])
        self.next_index = next_index

    @property
    def path(self) -> Path:
        return self.directory / MANIFEST_NAME

    @property
    def hashes_path(self) -> Path:
        return self.directory / HASHES_NAME

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read ``directory/manifest.json``; an empty Manifest if the folder has none."""
        directory = where(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"shard folder {directory} does not exist or is not a folder")
        path = directory / MANIFEST_NAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls(directory)
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError(f"expected a JSON object with format {FORMAT!r}")
            shards = [ShardInfo.from_dict(entry) for entry in doc["shards"]]
            next_index = int(doc["next_index"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"{path} is not a valid shard manifest: {exc}") from None
        return cls(directory, shards, next_index)

    def save(self) -> None:
        doc = {"format": FORMAT, "next_index": self.next_index,
               "shards": [asdict(info) for info in self.shards]}
        atomic_write_bytes(self.path, (json.dumps(doc, indent=1) + "\n").encode())

    def names(self) -> set[str]:
        return {info.name for info in self.shards}

    def new_shard_name(self) -> str:
        """The name the next shard gets (``next_index`` advances when it is ``add``ed)."""
        return f"shard-{self.next_index:06d}"

    def add(self, info: ShardInfo) -> None:
        if info.name in self.names():
            raise ValueError(f"shard {info.name} is already in {self.path}")
        self.shards.append(info)
        index = shard_index(info.name)
        if index is not None:
            self.next_index = max(self.next_index, index + 1)

    def shard_path(self, info: ShardInfo) -> Path:
        return self.directory / f"{info.name}.tar"

    def total_samples(self) -> int:
        return sum(info.count for info in self.shards)

    def active(self, retention_days: float | None, now: float | None = None) -> list[ShardInfo]:
        """Shards created within the last ``retention_days`` (all of them for None)."""
        _check_retention(retention_days)
        if retention_days is None:
            return list(self.shards)
        cutoff = (time.time() if now is None else now) - retention_days * SECONDS_PER_DAY
        return [info for info in self.shards if info.created >= cutoff]

    def retire(self, retention_days: float, delete: bool = False,
               now: float | None = None) -> list[ShardInfo]:
        """Drop expired shards from the manifest (saved), then optionally delete their files.

        The caller must hold ``writer_lock`` (ingest/watch do when they retire).
        """
        if retention_days is None:
            raise ValueError("retire needs a retention window in days, got None")
        keep = self.active(retention_days, now)
        expired = [info for info in self.shards if info not in keep]
        if not expired:
            return []
        self.shards = keep
        self.save()  # commit first: a crash below leaves only unlisted files behind
        if delete:
            for info in expired:
                self.shard_path(info).unlink(missing_ok=True)
                index_path_for(self.shard_path(info)).unlink(missing_ok=True)
        self.compact_hashes()
        return expired

    # -- content-hash index ------------------------------------------------------------

    def _hash_lines(self) -> Iterator[tuple[str, str] | None]:
        """(sha256, shard) per line; None for a malformed (e.g. torn) line."""
        try:
            handle = self.hashes_path.open("r", encoding="ascii", errors="replace")
        except FileNotFoundError:
            return
        with handle:
            for line in handle:
                match = _HASH_LINE_RE.match(line.rstrip("\n"))
                yield (match.group(1), match.group(2)) if match else None

    def load_hashes(self) -> dict[str, str]:
        """sha256 -> shard name, for shards listed in this manifest only."""
        listed = self.names()
        index: dict[str, str] = {}
        for entry in self._hash_lines():
            if entry is not None and entry[1] in listed:
                index.setdefault(entry[0], entry[1])
        return index

    def append_hashes(self, shard_name: str, hashes: Iterable[str]) -> None:
        """Append (and fsync) index lines for one shard. Call BEFORE saving the manifest."""
        lines = "".join(f"{sha} {shard_name}\n" for sha in hashes)
        if not lines:
            return
        # a torn previous line (killed writer) must not swallow our first line
        if not self._ends_with_newline():
            lines = "\n" + lines
        append_bytes(self.hashes_path, lines.encode("ascii"), durable=True)

    def _ends_with_newline(self) -> bool:
        """Whether hashes.txt is empty, missing or ends with a newline."""
        try:
            size = self.hashes_path.stat().st_size
        except FileNotFoundError:
            return True
        return size == 0 or read_range(self.hashes_path, size - 1, 1) == b"\n"

    def compact_hashes(self, drop_shards: Iterable[str] = ()) -> int:
        """Rewrite the index atomically without lines of unlisted shards (and ``drop_shards``).

        Returns the number of lines dropped; the file is left alone when nothing is dropped.
        """
        listed = self.names() - set(drop_shards)
        kept: list[str] = []
        dropped = 0
        for entry in self._hash_lines():
            if entry is not None and entry[1] in listed:
                kept.append(f"{entry[0]} {entry[1]}\n")
            else:
                dropped += 1
        if dropped:
            atomic_write_bytes(self.hashes_path, "".join(kept).encode("ascii"))
        return dropped


@contextlib.contextmanager
def writer_lock(directory: str | Path) -> Iterator[None]:
    """Hold the folder's exclusive writer lock (non-blocking: raises WriterLockedError). A remote
    prefix has none: one writer per prefix (see the module doc)."""
    if is_remote(directory):
        yield
        return
    path = Path(directory) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WriterLockedError(
                f"another ingest/watch is writing to {directory} (lock {path} is held)") from None
        yield
    finally:
        os.close(fd)  # closing releases the flock


def shard_paths(directory: str | Path, retention_days: float | None = None,
                now: float | None = None) -> list[Path]:
    """Shards to read from ``directory``: the manifest's active shards if it has a manifest,
    else every ``*.tar`` (``list_shards``), with retention judged by file modification time."""
    manifest = Manifest.load(directory)
    if manifest.path.exists():
        return [manifest.shard_path(info) for info in manifest.active(retention_days, now)]
    _check_retention(retention_days)
    paths = list_shards(directory)
    if retention_days is None:
        return paths
    cutoff = (time.time() if now is None else now) - retention_days * SECONDS_PER_DAY
    return [p for p in paths if p.stat().st_mtime >= cutoff]
