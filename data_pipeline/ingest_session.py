"""The writer session behind ``ingest()`` and ``watch()``: source expansion, the writer lock,
the manifest, the dedup hash index and the open (partial) shard; the public entry points and
what they accept are ``data_pipeline.ingest``'s.

Crash safety (the manifest is the commit point; see ``manifest``): per shard,
write its index and publish the tar atomically (``ShardWriter.publish``) -> append its hashes to ``hashes.txt`` (fsync) -> save the
manifest atomically. On start, under the folder's writer lock: ``.tmp-*`` leftovers are
removed, index lines of unlisted shards dropped, and a published ``shard-N.tar`` missing from
the manifest (killed between rename and manifest save; N >= the manifest's ``next_index``,
so retired-but-kept shards are never resurrected) is read back and verified (every sample's
sha256) and then adopted, or deleted if it does not verify. So a kill -9 at any moment
leaves a state a rerun completes, and content is never stored twice: the dedup key is the
sha256 of the source file's bytes (plus that of the stored bytes when they were re-encoded).

The shard folder may be an ``s3://`` prefix (``data_pipeline.storage``): a shard is written to a
local temp file, then its index and its tar are uploaded (each PUT is atomic), then hashes.txt
and manifest.json are rewritten; the manifest is what lists a shard, so a reader never sees one
whose tar and index are incomplete, and the recovery above works the same on the bucket. There is
no lock on a prefix: run one writer (ingest or watch) per prefix.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from data_pipeline.decode import DecodeError, prepare_for_storage
from data_pipeline.manifest import Manifest, ShardInfo, shard_index, writer_lock
from data_pipeline.quarantine import QuarantineLog
from data_pipeline.shard_index import index_path_for
from data_pipeline.shards import ShardWriter, iter_shard
from data_pipeline.storage import TMP_PREFIX, ShardReadError, where

log = logging.getLogger("data_pipeline.ingest")  # the logger name users know

QUARANTINE_NAME = "quarantine.jsonl"
LIST_EXTS = (".txt", ".lst")


class IngestError(Exception):
    """Bad input: missing source, folder without files, out_dir locked by another writer."""


@dataclass
class IngestReport:
    out_dir: str
    accepted: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)  # shards published by this run
    recovered_shards: list[str] = field(default_factory=list)  # adopted from a killed run

    def to_dict(self) -> dict:
        return asdict(self)


# -- source expansion ---------------------------------------------------------------------

def _walk_files(folder: Path, skip: Path | None) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and (skip is None or Path(root, d).resolve() != skip)]
        found.extend(Path(root, f) for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _expand_path(path: Path, origin: str, skip: Path | None) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _walk_files(path, skip)
        if not files:
            raise IngestError(f"source folder {path} contains no files ({origin})")
        return files
    if not path.exists():
        raise IngestError(f"source {path} does not exist ({origin})")
    raise IngestError(f"source {path} is neither a regular file nor a folder ({origin})")


def expand_sources(sources: list[str | Path], skip: Path | None = None) -> list[Path]:
    """Files to ingest, in order, each once (source kinds: see ``data_pipeline.ingest``'s docstring)."""
    if isinstance(sources, (str, Path)):
        raise TypeError("sources must be a list of paths, not a single path")
    if not sources:
        raise IngestError("no sources given")
    files: list[Path] = []
    for source in sources:
        text = str(source)
        if text.startswith("@"):
            list_path = Path(text[1:])
            if not list_path.is_file():
                raise IngestError(f"file list {list_path} does not exist (from source {text!r})")
            lines = list_path.read_text(encoding="utf-8", errors="replace").splitlines()
            for number, line in enumerate(lines, 1):
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                entry_path = Path(entry)
                if not entry_path.is_absolute():
                    entry_path = list_path.parent / entry_path
                files += _expand_path(entry_path, f"{list_path} line {number}", skip)
        else:
            files += _expand_path(Path(text), "given as a source", skip)
    unique, seen = [], set()
    for path in files:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


# -- the writer session -------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class IngestSession:
    """Holds the writer lock, the manifest, the hash index and the open (partial) shard."""

    def __init__(self, out_dir: str | Path, *, shard_max_count: int = 1000,
                 shard_max_bytes: int = 256 * 2**20, max_pixels: int = 100_000_000,
                 min_side: int = 16, shuffle_seed: int | None = None, progress: bool = False,
                 on_commit: Callable[[str, list[Path]], None] | None = None):  # (shard, sources)
        if shard_max_count < 1:
            raise ValueError(f"shard_max_count must be >= 1, got {shard_max_count}")
        if shard_max_bytes < 1:
            raise ValueError(f"shard_max_bytes must be >= 1, got {shard_max_bytes}")
        self.out_dir = where(out_dir)
        self.shard_max_count = shard_max_count
        self.shard_max_bytes = shard_max_bytes
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.shuffle_seed = shuffle_seed  # recorded per shard: the files came in this seeded order
        self.progress = progress
        self.on_commit = on_commit
        self.report = IngestReport(out_dir=str(self.out_dir))
        self.quarantine = QuarantineLog(self.out_dir / QUARANTINE_NAME)
        self._lock = None
        self._writer: ShardWriter | None = None
        self._pending_hashes: set[str] = set()
        self._pending_sources: list[Path] = []
        self._files_seen = 0

    def __enter__(self) -> IngestSession:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = writer_lock(self.out_dir)
        try:
            self._lock.__enter__()
        except Exception as exc:
            raise IngestError(str(exc)) from None
        try:
            self.manifest = Manifest.load(self.out_dir)
            self._recover()
            self.known = set(self.manifest.load_hashes())
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
                self.flush()  # Ctrl-C: the samples written so far are complete, publish them
            elif self._writer is not None:
                self._writer.abort()
        finally:
            self._lock.__exit__(None, None, None)

    # recovery after a killed run --------------------------------------------------------

    def _recover(self) -> None:
        for path in self.out_dir.glob(f"{TMP_PREFIX}*"):
            if path.is_file():
                path.unlink()
        self.manifest.compact_hashes()
        listed = self.manifest.names()
        for path in sorted(self.out_dir.glob("shard-*.tar"), key=lambda p: shard_index(p.stem) or -1):
            index = shard_index(path.stem)
            if index is None or path.stem in listed or index < self.manifest.next_index:
                continue
            verified = self._verify_unlisted(path)
            if verified is None:
                path.unlink()
                index_path_for(path).unlink(missing_ok=True)
                continue
            count, hashes = verified
            self.manifest.append_hashes(path.stem, sorted(hashes))
            stat = path.stat()
            self.manifest.add(ShardInfo(path.stem, count, stat.st_size, stat.st_mtime))
            self.manifest.save()
            self.report.recovered_shards.append(path.stem)
            log.info("adopted shard %s (%d samples) published by a killed run", path.stem, count)

    def _verify_unlisted(self, path: Path) -> tuple[int, set[str]] | None:
        """(count, dedup hashes) if every sample reads back intact, else None (logged)."""
        count, hashes = 0, set()
        try:
            for sample in iter_shard(path):
                sha = sample.meta.get("sha256")
                if sample.image is None or sha != _sha256(sample.image):
                    raise ShardReadError(path, f"sample {sample.key} fails its sha256 check")
                hashes.add(sha)
                if isinstance(sample.meta.get("source_sha256"), str):
                    hashes.add(sample.meta["source_sha256"])
                count += 1
        except ShardReadError as exc:
            self.quarantine.record("unlisted_shard_removed", shard=path.stem, detail=exc.detail)
            log.warning("removing unlisted shard %s: %s", path, exc.detail)
            return None
        return (count, hashes) if count else None

    # adding files ------------------------------------------------------------------------

    def _reject(self, path: Path, reason: str, detail: str) -> str:
        self.report.rejected[reason] = self.report.rejected.get(reason, 0) + 1
        self.quarantine.record(reason, source=str(path), detail=detail)
        return "rejected"

    def add_file(self, path: Path) -> str:
        """Ingest one file; returns accepted, duplicate_pending, duplicate or rejected."""
        self._files_seen += 1
        if self.progress and self._files_seen % 200 == 0:
            self._print_progress()
        try:
            data = path.read_bytes()
        except OSError as exc:
            return self._reject(path, "unreadable", f"{type(exc).__name__}: {exc}")
        source_sha = _sha256(data)
        if source_sha in self._pending_hashes:
            self.report.duplicates += 1
            self._pending_sources.append(path)
            return "duplicate_pending"
        if source_sha in self.known:
            self.report.duplicates += 1
            return "duplicate"
        try:
            payload, ext, width, height = prepare_for_storage(
                data, max_pixels=self.max_pixels, min_side=self.min_side)
        except DecodeError as exc:
            detail = exc.detail
            if path.suffix.lower() in LIST_EXTS:
                detail += " (to pass a file list, prefix it with @)"
            return self._reject(path, exc.reason, detail)
        stored_sha = source_sha if payload is data or payload == data else _sha256(payload)
        meta = {"source": os.path.abspath(path), "ingest_time": time.time(),
                "width": width, "height": height, "sha256": stored_sha}
        if stored_sha != source_sha:
            meta["source_sha256"] = source_sha
        writer = self._writer
        if writer is not None and writer.size_after(payload, meta) > self.shard_max_bytes:
            self.flush()
        if self._writer is None:
            self._writer = ShardWriter(self.out_dir, self.manifest.new_shard_name())
        self._writer.write(self._writer.next_key(), payload, ext, meta)
        self._pending_hashes.update({source_sha, stored_sha})
        self._pending_sources.append(path)
        self.report.accepted += 1
        if self._writer.count >= self.shard_max_count:
            self.flush()
        return "accepted"

    def flush(self) -> str | None:
        """Commit the open shard (publish, index, manifest); returns its name or None."""
        writer = self._writer
        if writer is None:
            return None
        self._writer = None
        path = writer.publish()
        self.manifest.append_hashes(writer.name, sorted(self._pending_hashes))
        self.manifest.add(ShardInfo(writer.name, writer.count, path.stat().st_size, time.time(), self.shuffle_seed))
        self.manifest.save()
        self.known |= self._pending_hashes
        self.report.shards.append(writer.name)
        sources = self._pending_sources
        self._pending_hashes, self._pending_sources = set(), []
        if self.progress:
            self._print_progress()
        if self.on_commit is not None:
            self.on_commit(writer.name, sources)
        return writer.name

    def retire(self, retention_days: float) -> list[str]:
        expired = self.manifest.retire(retention_days, delete=True)
        if expired:
            self.known = set(self.manifest.load_hashes()) | self._pending_hashes
        return [info.name for info in expired]

    def _print_progress(self) -> None:
        r = self.report
        print(f"[ingest] {self._files_seen} files: {r.accepted} accepted, {r.duplicates} "
              f"duplicates, {sum(r.rejected.values())} rejected; {len(r.shards)} new shards",
              file=sys.stderr, flush=True)
