"""Shard indexes: where each sample's members lie inside a shard, in NVIDIA DALI's format.

An index lets a reader fetch one sample with one seek + read instead of scanning the tar. The
file is exactly what DALI's ``tools/wds2idx.py`` writes (format ``v1.2``) and what
``fn.readers.webdataset(index_paths=...)`` parses::

    v1.2 <number of samples>
    <ext> <offset> <size> <member name> [<ext> <offset> <size> <member name> ...]   (one line per sample)

``offset`` is the byte offset of the member's *data* (just after its tar header; always a
multiple of 512) and ``size`` its length in bytes. A sample is a run of consecutive regular
members sharing the key (the member name up to the first dot after the last slash, as
webdataset and DALI split it); members whose key is empty or a folder are left out, as DALI
does. Member names holding whitespace cannot be written in this format: such members are
left out and counted in a warning.

Where: ``<shard stem>.idx`` beside ``<shard stem>.tar`` (``shard-000003.tar`` ->
``shard-000003.idx``, the name ``wds2idx`` picks by default). Ingest writes it before it
publishes the shard; for shards without one (img2dataset's) ``ensure_index`` builds it once,
scanning tar headers only, and writes it atomically beside the shard, or, when that folder is
not writable, into ``cache_dir`` as ``<shard stem>-<hash of the shard's absolute path>.idx``.
Shards may be remote (``s3://``, ``data_pipeline.storage``): the edge checks below are ranged
reads, and building an index downloads the shard once.

An index is used only if it is *valid* for its shard: its header and first and last lines
parse, and the tar headers just before its first and last members hold those members' names and
sizes (two 512-byte reads), so a stale index of a replaced shard is rebuilt, not trusted. (DALI
refuses an index of 0 samples; an empty shard's index is written anyway and rebuilt each time.)

Public API (the DALI backend uses it too): ``ensure_index(shard_path, cache_dir=None) -> Path``,
``read_index(index_path) -> list[SampleEntry]``, ``build_entries(shard_path)``,
``write_index(entries, path)``, ``index_path_for(shard_path)``.
(``data_pipeline.sample_reader`` reads single samples through these indexes.)
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.storage import ShardReadError, StorageError, atomic_write_bytes, local_copy, read_range, where

log = logging.getLogger(__name__)

INDEX_VERSION = "v1.2"
INDEX_SUFFIX = ".idx"
_BLOCK = 512
_EDGE_BYTES = 65536  # head and tail of an index read to check it


class ShardIndexError(ValueError):
    """An index file that cannot be used (names the file and the problem)."""


@dataclass(frozen=True)
class SampleEntry:
    """One sample of a shard: its key and, per member extension, ``(offset, size)`` of the data."""

    key: str
    components: dict[str, tuple[int, int]]

    def member_name(self, ext: str) -> str:
        return f"{self.key}.{ext}"


def split_member_name(name: str) -> tuple[str, str]:
    """``(key, ext)`` split at the first dot after the last slash (webdataset's and DALI's rule)."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def index_path_for(shard_path: str | Path) -> Path:
    """``<stem>.idx`` beside the shard (``a/shard-000001.tar`` -> ``a/shard-000001.idx``)."""
    shard_path = where(shard_path)
    return shard_path.with_name(shard_path.name.removesuffix(".tar") + INDEX_SUFFIX)


def cached_index_path(shard_path: str | Path, cache_dir: str | Path) -> Path:
    """Where the index of a shard in a read-only folder goes inside ``cache_dir``."""
    shard_path = where(shard_path)
    digest = hashlib.blake2b(str(shard_path.resolve()).encode(), digest_size=6).hexdigest()
    return Path(cache_dir) / f"{shard_path.name.removesuffix('.tar')}-{digest}{INDEX_SUFFIX}"


def entries_from_members(members: list[tuple[str, str, int, int]]) -> list[SampleEntry]:
    """Group ``(key, ext, data offset, size)`` of consecutive members into samples."""
    entries: list[SampleEntry] = []
    for key, ext, offset, size in members:
        if not entries or entries[-1].key != key:
            entries.append(SampleEntry(key, {}))
        entries[-1].components[ext] = (offset, size)
    return entries


def build_entries(shard_path: str | Path) -> list[SampleEntry]:
    """Scan the tar headers of a shard (member data is seeked over, not read) into entries.

    Members whose data runs past the end of the file (a truncated shard), or that follow a
    damaged header, are left out (with a warning); a shard with no readable member raises."""
    shard_path = where(shard_path)
    with local_copy(shard_path) as local:  # a remote shard's download may raise StorageError (the network's)
        return _build_local(local, shard_path)


def _build_local(local: Path, shard_path) -> list[SampleEntry]:
    members: list[tuple[str, str, int, int]] = []
    left_out = 0
    try:
        shard_size = local.stat().st_size
        with tarfile.open(local, mode="r:") as archive:
            for member in archive:
                key, ext = split_member_name(member.name)
                if not member.isreg() or not key or key.endswith("/"):
                    continue
                if any(ch.isspace() for ch in member.name) or member.offset_data + member.size > shard_size:
                    left_out += 1
                    continue
                members.append((key, ext, member.offset_data, member.size))
    except (tarfile.TarError, OSError) as exc:
        if not members:
            raise ShardReadError(shard_path, f"cannot index: {type(exc).__name__}: {exc}") from None
        log.warning("%s is damaged after %d members (%s): indexing the members before", shard_path,
                    len(members), exc)
    if left_out:
        log.warning("%s: %d member(s) left out of the index (whitespace in the name, or data past "
                    "the end of the file)", shard_path, left_out)
    return entries_from_members(members)


def format_index(entries: list[SampleEntry]) -> bytes:
    """The DALI ``v1.2`` text of ``entries``."""
    lines = [f"{INDEX_VERSION} {len(entries)}"]
    for entry in entries:
        lines.append(" ".join(f"{ext} {offset} {size} {entry.member_name(ext)}"
                              for ext, (offset, size) in entry.components.items()))
    return ("\n".join(lines) + "\n").encode()


def write_index(entries: list[SampleEntry], path: str | Path) -> Path:
    """Write ``entries`` atomically to ``path`` (temp + fsync + rename; one PUT remotely)."""
    atomic_write_bytes(path, format_index(entries))
    return where(path)


def _parse_header(line: str, index_path: Path) -> int:
    head = line.split()
    if len(head) < 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardIndexError(f"shard index {index_path} line 1: want '{INDEX_VERSION} <count>', got {line[:40]!r}")
    return int(head[1])


def _parse_entry(line: str, index_path: Path, number: int) -> SampleEntry:
    fields = line.split()
    if not fields or len(fields) % 4:
        raise ShardIndexError(f"shard index {index_path} line {number}: want '<ext> <offset> <size> <name>' groups")
    components: dict[str, tuple[int, int]] = {}
    key = None
    for ext, offset, size, name in zip(*[iter(fields)] * 4):
        if not (offset.isdigit() and size.isdigit()) or int(offset) % _BLOCK:
            raise ShardIndexError(f"shard index {index_path} line {number}: bad offset/size {offset} {size}")
        member_key, _ = split_member_name(name)
        if key is not None and member_key != key:
            raise ShardIndexError(f"shard index {index_path} line {number}: members of two keys in one sample")
        key = member_key
        components[ext] = (int(offset), int(size))
    return SampleEntry(key, components)


def read_index(index_path: str | Path) -> list[SampleEntry]:
    """Parse a DALI ``v1.2`` index; a malformed file raises ``ShardIndexError`` naming the line."""
    index_path = where(index_path)
    try:
        lines = index_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ShardIndexError(f"cannot read shard index {index_path}: {exc}") from None
    count = _parse_header(lines[0] if lines else "", index_path)
    if len(lines) - 1 < count:
        raise ShardIndexError(f"shard index {index_path}: header says {count} samples, file has {len(lines) - 1}")
    return [_parse_entry(line, index_path, number) for number, line in enumerate(lines[1:count + 1], start=2)]


def _edge_entries(index_path) -> list[SampleEntry]:
    """The first and last entries of an index, reading only its head and tail (ranged reads)."""
    size = index_path.stat().st_size
    head = read_range(index_path, 0, min(size, _EDGE_BYTES))
    tail = head if size <= _EDGE_BYTES else read_range(index_path, size - _EDGE_BYTES, _EDGE_BYTES)
    lines = head.decode("utf-8", "replace").split("\n")
    count = _parse_header(lines[0], index_path)
    if count == 0:
        return []
    last = [line for line in tail.decode("utf-8", "replace").splitlines() if line.strip()]
    first = _parse_entry(lines[1] if len(lines) > 1 else "", index_path, 2)
    return [first, _parse_entry(last[-1], index_path, count + 1)]


def _header_matches(shard_path, shard_size: int, name: str, offset: int, size: int) -> bool:
    """Whether the tar header block just before ``offset`` is that of member ``name`` with
    ``size`` bytes, and the data fits in the file."""
    if offset < _BLOCK or offset + size > shard_size:
        return False
    block = read_range(shard_path, offset - _BLOCK, _BLOCK)
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.TarError:
        return False
    # long or non-ASCII names live in a GNU/pax header before this one, which holds a stand-in
    return info.size == size and (info.name == name or len(name.encode()) > 99 or not name.isascii())


def index_is_valid(index_path: str | Path, shard_path: str | Path) -> bool:
    """Whether the head and tail of ``index_path`` parse and its first and last members match the
    shard's tar headers (a full parse happens when the index is read). False when it is missing."""
    shard_path = where(shard_path)
    try:
        entries = _edge_entries(where(index_path))
        if not entries:
            return False  # rebuilt each time: cheap for an empty shard, never trusted stale
        shard_size = shard_path.stat().st_size
        for entry in entries:
            ext, (offset, size) = max(entry.components.items(), key=lambda item: item[1][0])
            if not _header_matches(shard_path, shard_size, entry.member_name(ext), offset, size):
                return False
    except StorageError:
        raise  # the store cannot be reached: not a stale index (rebuilding would download the shard)
    except (ShardIndexError, OSError, IndexError):
        return False
    return True


def ensure_index(shard_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The path of a valid index of ``shard_path``: the one beside it, else one in ``cache_dir``,
    else one built now (once) and written beside the shard, or into ``cache_dir`` when the shard's
    folder is not writable. Raises ``ShardReadError`` for an unreadable shard and
    ``ShardIndexError`` when there is nowhere to write."""
    shard_path = where(shard_path)
    beside = index_path_for(shard_path)
    if index_is_valid(beside, shard_path):
        return beside
    cached = cached_index_path(shard_path, cache_dir) if cache_dir is not None else None
    if cached is not None and index_is_valid(cached, shard_path):
        return cached
    entries = build_entries(shard_path)
    if not entries:
        log.warning("shard %s holds no samples; its index is empty", shard_path)
    try:
        return write_index(entries, beside)
    except OSError as exc:
        if cached is None:
            raise ShardIndexError(f"cannot write the index of {shard_path} beside it ({exc.strerror or exc}); "
                                  "pass a writable cache_dir") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    return write_index(entries, cached)


def load_index(shard_path: str | Path, cache_dir: str | Path | None = None) -> list[SampleEntry]:
    """``read_index(ensure_index(shard_path, cache_dir))``."""
    return read_index(ensure_index(shard_path, cache_dir))
