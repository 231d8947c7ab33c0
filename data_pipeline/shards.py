"""Shard layout, atomic shard writing and shard reading (webdataset tar format).

A shard is a plain tar. Each sample is ``<key>.<jpg|png|webp>`` plus ``<key>.json`` (meta:
at least source, ingest_time, width, height, sha256 of the stored image bytes). Keys are
``<shard-stem>-<NNNNNN>`` (zero-padded, no dots: webdataset splits the key at the first dot).
Shards written by other tools in the same layout (img2dataset: ``<key>.jpg``, ``<key>.json``,
``<key>.txt``; its ``*_stats.json``/``*.parquet`` sit beside the tars) are read too.

Writing: ``ShardWriter`` writes ``<dir>/.tmp-<name>.tar`` with deterministic member metadata
(mtime 0, uid/gid 0, mode 0644, ustar), fsyncs it, writes its index ``<dir>/<name>.idx``
(member offsets, ``data_pipeline.shard_index``) atomically, then ``os.replace``s the tar to
``<dir>/<name>.tar`` and fsyncs the folder: a reader never sees a half-written shard under its
final name, nor a published shard without its index (atomic writes: ``data_pipeline.storage``).
Into a remote folder (``s3://``) the tar is written to a local temp file, then the index and the
tar are uploaded (each a whole object); the manifest, saved after, is what lists the shard.

Reading: ``iter_shard`` uses webdataset's tar iterators. A truncated or corrupt tar raises
``ShardReadError`` after every readable sample has been yielded; since Python's tarfile stops
silently at a damaged header, the end of the archive is checked separately (the members must
be followed by the zero end-of-archive blocks). A remote shard is downloaded once for the scan
(``storage.local_copy``).
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data_pipeline.shard_index import entries_from_members, index_path_for, write_index
from data_pipeline.storage import ShardReadError, list_files, local_copy, publish_staged, staging_path, where

# Member suffixes taken as the sample's image (first match wins, in this order).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "avif")
META_EXT = "json"
KEY_DIGITS = 6
_BLOCK = 512
_END_OF_ARCHIVE = 2 * _BLOCK


@dataclass
class ShardSample:
    key: str
    image: bytes | None
    ext: str | None
    meta: dict
    extras: dict[str, bytes] = field(default_factory=dict)  # other members, e.g. "txt"


def sample_key(shard_stem: str, index: int) -> str:
    return f"{shard_stem}-{index:0{KEY_DIGITS}d}"


def tar_member_bytes(size: int) -> int:
    """Bytes one regular member of ``size`` bytes occupies in a ustar archive."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def archive_bytes(members_bytes: int) -> int:
    """Final tar size: members + end-of-archive blocks, padded to tarfile's record size."""
    return -(-(members_bytes + _END_OF_ARCHIVE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Write one shard named ``name`` into ``out_dir``; ``publish()`` makes it visible.

    Use as a context manager (an exception aborts: the temp file is removed) or call
    ``publish()``/``abort()`` yourself. ``size`` is the exact size of the published file
    (end-of-archive blocks and the padding to tarfile's 10 KiB record size included).
    """

    def __init__(self, out_dir: str | Path, name: str):
        if not name or "/" in name or "." in name or name.startswith("-"):
            raise ValueError(f"shard name must be a plain stem without dots or slashes, got {name!r}")
        self.out_dir = where(out_dir)
        self.name = name
        self.path = self.out_dir / f"{name}.tar"
        if self.path.exists():
            raise FileExistsError(f"shard {self.path} already exists")
        self.count = 0
        self._members_bytes = 0
        self._keys: set[str] = set()
        self._members: list[tuple[str, str, int, int]] = []  # (key, ext, data offset, size)
        self.tmp_path = staging_path(self.path)  # beside it, or a local temp file for a remote folder
        self._file = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._closed = False

    def next_key(self) -> str:
        return sample_key(self.name, self.count)

    @property
    def size(self) -> int:
        """Size the published file will have with the samples written so far."""
        return archive_bytes(self._members_bytes)

    def size_after(self, image: bytes, meta: dict) -> int:
        """Size the published file would have after also writing this sample."""
        sample = tar_member_bytes(len(image)) + tar_member_bytes(len(_encode_meta(meta)))
        return archive_bytes(self._members_bytes + sample)

    def _add_member(self, member_name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(member_name)
        info.size = len(payload)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, _BytesReader(payload))
        key, ext = member_name.split(".", 1)
        data_offset = self._tar.offset - -(-len(payload) // _BLOCK) * _BLOCK
        self._members.append((key, ext, data_offset, len(payload)))

    def write(self, key: str, image: bytes, ext: str, meta: dict) -> None:
        if self._closed:
            raise RuntimeError(f"shard {self.name} is already closed")
        if not key or "." in key or "/" in key or len(key) + 1 + len(ext) > 99:
            raise ValueError(f"bad sample key {key!r}: no dots/slashes, under 100 chars with ext")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {self.name}")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image ext must be one of {IMAGE_EXTS}, got {ext!r}")
        meta_bytes = _encode_meta(meta)
        self._add_member(f"{key}.{ext}", image)
        self._add_member(f"{key}.{META_EXT}", meta_bytes)
        self._keys.add(key)
        self.count += 1
        self._members_bytes += tar_member_bytes(len(image)) + tar_member_bytes(len(meta_bytes))

    def publish(self) -> Path:
        """Finish the archive, fsync it, write its index, then rename (upload) it into place."""
        if self._closed:
            raise RuntimeError(f"shard {self.name} is already closed")
        self._closed = True
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        try:
            write_index(entries_from_members(self._members), index_path_for(self.path))
            publish_staged(self.tmp_path, self.path)
        except BaseException:
            self.tmp_path.unlink(missing_ok=True)
            raise
        return self.path

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._tar.close()
        finally:
            self._file.close()
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.publish()


class _BytesReader:
    """Minimal file-like object for tarfile.addfile (avoids copying into a BytesIO)."""

    def __init__(self, payload: bytes):
        self._view = memoryview(payload)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._pos + size
        chunk = self._view[self._pos:end]
        self._pos += len(chunk)
        return chunk.tobytes()


def _encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=True).encode("ascii")


def _to_sample(raw: dict) -> ShardSample:
    members = {k: v for k, v in raw.items() if not k.startswith("__")}
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    image = members.pop(ext) if ext is not None else None
    meta: dict = {}
    if META_EXT in members:
        try:
            parsed = json.loads(members[META_EXT])
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            meta = parsed
            del members[META_EXT]
    return ShardSample(key=raw["__key__"], image=image, ext=ext, meta=meta, extras=members)


def _check_archive_end(local: Path, path) -> None:
    """Raise ShardReadError (naming ``path``) unless the last member of the tar at ``local`` is
    followed by end-of-archive zeros."""
    try:
        with tarfile.open(local, mode="r:") as archive:
            for _ in archive:  # headers only: random-access mode seeks over member data
                pass
            end = archive.offset
    except (tarfile.TarError, OSError) as exc:
        raise ShardReadError(path, f"{type(exc).__name__}: {exc}") from None
    size = local.stat().st_size
    if size - end < _END_OF_ARCHIVE:
        raise ShardReadError(path, f"truncated at byte {size}: end-of-archive blocks missing")
    with open(local, "rb") as handle:
        handle.seek(end)
        while chunk := handle.read(1 << 16):
            if chunk.count(0) != len(chunk):
                raise ShardReadError(path, f"damaged tar header at byte {end}")


def iter_shard(path: str | Path) -> Iterator[ShardSample]:
    """Yield every sample of one shard in archive order (see module docstring)."""
    path = where(path)
    try:
        with local_copy(path) as local:
            yield from _iter_local(local, path)
    except OSError as exc:
        raise ShardReadError(path, f"{type(exc).__name__}: {exc}") from None


def _iter_local(local: Path, path) -> Iterator[ShardSample]:
    from webdataset.tariterators import group_by_keys, tar_file_expander  # imports torch: lazy

    with open(local, "rb") as stream:
        files = tar_file_expander([{"url": str(path), "stream": stream}])
        samples = group_by_keys(files)
        while True:
            try:
                raw = next(samples)
            except StopIteration:
                break
            except Exception as exc:  # tarfile/webdataset errors on damaged archives
                message = str(exc.args[0]).split(" @ ")[0] if exc.args else ""
                raise ShardReadError(path, f"{type(exc).__name__}: {message}") from None
            yield _to_sample(raw)
    _check_archive_end(local, path)


def list_shards(directory: str | Path) -> list[Path]:
    """Sorted ``*.tar`` files of a folder (no manifest needed), ignoring hidden/.tmp- files."""
    directory = where(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"shard folder {directory} does not exist or is not a folder")
    return list_files(directory, "*.tar")
