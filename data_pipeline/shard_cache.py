"""A node-local, bounded cache of remote shards, for readers that open local files (DALI).

DALI's webdataset reader takes file paths and reads them itself, so a corpus on ``s3://`` is
mirrored shard by shard into ``folder`` (``data.cache_dir``) before the reader is built:
``ShardCache(folder, max_bytes).localize(remote_tars)`` returns the local path of each shard (its
``.idx`` beside it), downloading those not cached yet (whole objects, written to a temp name and
renamed: a shard is in the cache whole or not at all).

Bound: the cached tars and indexes stay under ``max_bytes`` (``data.cache_gb``); shards not asked
for in the current call are evicted least recently used first (a use touches the tar's mtime).
DALI reads the shards of a pipeline in any order for a whole epoch, so the shards of one call
must all fit: a corpus bigger than the cache is an error naming both sizes (use the torch backend,
which reads samples by ranged GETs and needs no local copy, or give a bigger cache).

Several ranks of a node share one folder: ``localize`` holds an exclusive ``flock`` on
``folder/.lock`` while it evicts and downloads, so one rank downloads a shard and the others find
it there. Entries live under ``folder/<digest of the remote folder>/<shard name>``: shard names (and
so DALI's sample keys and the saved state's shard list) are the same as on the bucket.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from data_pipeline.shard_index import index_path_for
from data_pipeline.storage import TMP_PREFIX, RemotePath

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: the other ranks of the node wait for the download
        yield
    finally:
        os.close(fd)


class ShardCache:
    """Local copies of remote shards under ``folder``, at most ``max_bytes`` in all (see module doc)."""

    def __init__(self, folder: str | Path, max_bytes: float):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)

    def entry(self, remote: RemotePath) -> Path:
        """Where the local copy of the remote tar ``remote`` lives."""
        digest = hashlib.blake2b(str(remote.parent).encode(), digest_size=6).hexdigest()
        return self.folder / digest / remote.name

    def _cached(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes with the index, tar path) of every cached shard."""
        out = []
        for tar in self.folder.glob("*/*.tar"):
            if tar.name.startswith(TMP_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                index = index_path_for(tar)
                size = tar.stat().st_size + (index.stat().st_size if index.exists() else 0)
                out.append((tar.stat().st_mtime, size, tar))
        return out

    def _evict(self, keep: set[Path], room: int) -> None:
        """Drop least recently used shards not in ``keep`` until ``room`` more bytes fit."""
        cached = sorted(self._cached())
        total = sum(size for _, size, _ in cached)
        for _, size, tar in cached:
            if total + room <= self.max_bytes:
                return
            if tar in keep:
                continue
            tar.unlink(missing_ok=True)
            index_path_for(tar).unlink(missing_ok=True)
            total -= size
            log.info("shard cache: evicted %s (%d MB)", tar.name, size // 2**20)

    def _download(self, remote: RemotePath, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        for source, target in ((index_path_for(remote), index_path_for(local)), (remote, local)):  # index first
            tmp = target.with_name(f"{TMP_PREFIX}{os.getpid()}-{target.name}")
            try:
                source.download(tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)

    def localize(self, remotes: list[RemotePath]) -> list[Path]:
        """The local path of every shard of ``remotes`` (all cached at once; see module doc)."""
        sizes = {r: r.stat().st_size for r in remotes}
        need = sum(sizes.values())
        if need > self.max_bytes:
            raise ValueError(f"the DALI backend reads local files: the {len(remotes)} shards of "
                             f"{remotes[0].parent} hold {need / 1e9:.2f} GB, more than the shard cache "
                             f"(data.cache_gb={self.max_bytes / 1e9:g} in {self.folder}); raise data.cache_gb "
                             "or use data.backend=torch, which streams samples from the bucket")
        locals_ = {r: self.entry(r) for r in remotes}
        with _locked(self.folder):
            missing = [r for r in remotes if not (locals_[r].is_file() and locals_[r].stat().st_size == sizes[r]
                                                  and index_path_for(locals_[r]).is_file())]
            if missing:
                self._evict(set(locals_.values()), sum(sizes[r] for r in missing))
                start = time.monotonic()
                for remote in missing:
                    self._download(remote, locals_[remote])
                log.info("shard cache: %d shard(s), %.0f MB downloaded into %s in %.1f s", len(missing),
                         sum(sizes[r] for r in missing) / 2**20, self.folder, time.monotonic() - start)
            now = time.time()
            for path in locals_.values():
                os.utime(path, (now, now))  # a use: evicted last
        return [locals_[r] for r in remotes]
