"""Random access into shards: one sample read with one ``os.pread``, through the shard's index.

``SampleReader`` is what a stream worker holds: per shard it has used, a ``ShardTable`` (per
sample its key, image member extension, data offset and size, from the shard's DALI-format index,
``data_pipeline.shard_index``), and a small LRU of open files. Reading sample ``i`` is one
``pread`` of its image member (the ``.json`` member is not read): a worker never holds more of a
shard than the sample being read.

Tables: with a ``cache_dir`` (the stream uses ``run.dir/shard_index``), a shard's table is
written once, atomically, as a numpy file ``<stem>-<digest>.table.npy`` (the digest covers the
shard's absolute path, size and modification time, so a replaced shard gets a new table) and
memory-mapped: workers and ranks on a node share it through the page cache, the index text is
parsed once per node instead of once per worker, and a worker's anonymous memory does not grow
with the corpus. Without a ``cache_dir`` tables live in the worker's memory (~36 bytes a sample).

Remote shards (``s3://``, ``data_pipeline.storage``): a sample is one ranged GET of its image
member instead of the ``pread``. ``read`` may then be called from several threads at once (the
stream's read-ahead): a shard's table is loaded once, whichever thread needs it first.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from data_pipeline.shard_index import ShardIndexError, SampleEntry, build_entries, load_index
from data_pipeline.shards import IMAGE_EXTS, ShardSample
from data_pipeline.storage import ShardReadError, StorageError, atomic_write_bytes, is_remote

log = logging.getLogger(__name__)

TABLE_SUFFIX = ".table.npy"


def table_records(entries: list[SampleEntry]) -> np.ndarray:
    """One record per sample: ``offset``, ``size`` and ``ext`` (position in ``IMAGE_EXTS``, -1 for
    no image member) of its image member, and its ``key`` (utf-8 bytes)."""
    keys = [e.key.encode("utf-8", "surrogateescape") for e in entries]
    width = max([len(k) for k in keys] + [1])
    records = np.zeros(len(entries), dtype=[("offset", "<i8"), ("size", "<i8"), ("ext", "i1"), ("key", f"S{width}")])
    records["ext"] = -1
    for i, entry in enumerate(entries):
        ext = next((e for e in IMAGE_EXTS if e in entry.components), None)
        if ext is not None:
            offset, size = entry.components[ext]
            records[i] = (offset, size, IMAGE_EXTS.index(ext), keys[i])
        else:
            records[i]["key"] = keys[i]
    return records


def table_path(shard_path, cache_dir: str | Path) -> Path:
    stat = shard_path.stat()
    digest = hashlib.blake2b(f"{shard_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode(),
                             digest_size=8).hexdigest()
    return Path(cache_dir) / f"{shard_path.name.removesuffix('.tar')}-{digest}{TABLE_SUFFIX}"


class ShardTable:
    """A shard's samples as a numpy record array (in memory, or memory-mapped from the cache)."""

    def __init__(self, records: np.ndarray):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def load(cls, shard_path, cache_dir: str | Path | None = None) -> ShardTable:
        """The shard's table: the cached file if there is one, else built from its index."""
        cached = table_path(shard_path, cache_dir) if cache_dir is not None else None
        if cached is not None and cached.is_file():
            try:
                return cls(np.load(cached, mmap_mode="r"))
            except (OSError, ValueError) as exc:
                log.warning("cached table %s unreadable (%s): rebuilt", cached, exc)
        try:
            entries = load_index(shard_path, cache_dir)
        except ShardIndexError as exc:  # damaged inside (its edges looked fine), or nowhere to write
            log.warning("%s; indexing %s in memory", exc, shard_path)
            entries = build_entries(shard_path)
        records = table_records(entries)
        if cached is None:
            return cls(records)
        buffer = io.BytesIO()
        np.save(buffer, records)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(cached, buffer.getvalue())
            return cls(np.load(cached, mmap_mode="r"))
        except OSError as exc:  # a full or read-only cache folder costs memory, not the run
            log.warning("cannot cache the table of %s in %s (%s): kept in memory", shard_path, cache_dir, exc)
            return cls(records)


class SampleReader:
    """Reads single samples of shards by seek + read through their indexes.

    Keeps the ``ShardTable`` of every shard it has used (``keep_only`` forgets retired ones) and
    at most ``max_open`` open files (least recently used closed first).
    """

    def __init__(self, cache_dir: str | Path | None = None, max_open: int = 64):
        self.cache_dir = cache_dir
        self.max_open = max_open
        self._tables: dict[Path, ShardTable] = {}
        self._broken: dict[Path, ShardReadError] = {}  # shards that could not be indexed: not retried
        self._files: OrderedDict[Path, int] = OrderedDict()
        self._loading: dict = {}  # path -> lock held while its table loads (read-ahead threads)
        self._lock = threading.Lock()

    def table(self, path) -> ShardTable:
        """The shard's table (its index built once if missing); ``ShardReadError`` if unreadable."""
        table = self._tables.get(path)
        if table is not None:
            return table
        with self._lock:
            loading = self._loading.setdefault(path, threading.Lock())
        with loading:
            table = self._tables.get(path)
            if table is None:
                table = self._load(path)
        return table

    def _load(self, path) -> ShardTable:
        if path in self._broken:
            raise self._broken[path]
        try:
            table = self._tables[path] = ShardTable.load(path, self.cache_dir)
        except (ShardReadError, OSError) as exc:
            error = exc if isinstance(exc, ShardReadError) else ShardReadError(path, f"{type(exc).__name__}: {exc}")
            log.warning("shard %s is unreadable, its samples are skipped: %s", path.name, error.detail)
            if not isinstance(exc, StorageError):  # the network's failure: tried again next time
                self._broken[path] = error
            raise error from None
        return table

    def keep_only(self, paths: set[Path]) -> None:
        """Forget the tables and close the files of shards not in ``paths`` (retired shards)."""
        for path in [p for p in self._tables if p not in paths]:
            self._tables.pop(path, None)
            self._loading.pop(path, None)
        self._broken = {p: e for p, e in self._broken.items() if p in paths}
        for path in [p for p in self._files if p not in paths]:
            os.close(self._files.pop(path))

    def _fd(self, path: Path) -> int:
        fd = self._files.pop(path, None)
        if fd is None:
            if len(self._files) >= self.max_open:
                os.close(self._files.popitem(last=False)[1])
            fd = os.open(path, os.O_RDONLY)
        self._files[path] = fd
        return fd

    def read(self, path, i: int) -> ShardSample | None:
        """Sample ``i`` (archive order) of the shard; None if the shard holds fewer samples."""
        table = self.table(path)
        if not 0 <= i < len(table):
            return None
        offset, size, ext_code, raw_key = table.records[i].tolist()
        key = raw_key.decode("utf-8", "surrogateescape")
        if ext_code < 0:
            return ShardSample(key=key, image=None, ext=None, meta={})
        try:
            data = path.read_range(offset, size) if is_remote(path) else os.pread(self._fd(path), size, offset)
        except OSError as exc:
            raise ShardReadError(path, f"sample {key}: {type(exc).__name__}: {exc}") from None
        if len(data) != size:
            raise ShardReadError(path, f"sample {key}: {len(data)} of {size} bytes at offset {offset} (truncated)")
        return ShardSample(key=key, image=data, ext=IMAGE_EXTS[ext_code], meta={})

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
