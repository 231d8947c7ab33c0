"""Where bytes are kept: local paths and object stores (``s3://``) behind one vocabulary.

A *location* is a ``pathlib.Path`` (local) or a :class:`RemotePath` (an object in an
S3-compatible store, through fsspec/s3fs) with the part of ``Path``'s vocabulary seer uses on
shards: ``/``, ``name``, ``stem``, ``parent``, ``with_name``, ``exists``, ``is_file``,
``is_dir``, ``stat``, ``read_bytes``, ``read_text``, ``open``, ``glob``, ``unlink``, ``mkdir``.
:func:`where` turns a config string into one (``s3://bucket/prefix`` -> ``RemotePath``, anything
else -> ``Path``; another scheme is an error, never a local folder named ``gs:``). What differs
between the two kinds lives here and only here:

- :func:`read_range` (one ``os.pread`` locally, one ranged GET remotely),
- :func:`atomic_write_bytes` / :func:`atomic_output` (temp + fsync + ``os.replace`` locally; one
  PUT remotely: an object appears whole or not at all),
- :func:`staging_path` / :func:`publish_staged` (a file written locally, then renamed into place or
  uploaded), :func:`local_copy` (a remote object downloaded for a sequential scan),
- :func:`append_bytes` (``O_APPEND`` locally; read + rewrite remotely: one writer per prefix),
- :func:`list_files`, :func:`local_path`.

Remote locations are ``data_pipeline.storage_remote``'s (imported only from here): errors there
become :class:`StorageError` (an ``OSError``) naming the problem in one line (no such bucket,
access denied, cannot connect to the endpoint), and every remote call is bounded (retries with
backoff, timeouts). ``ShardReadError`` (shard bytes that cannot be read) is here too.

Shard modules reach bytes through these (``sample_reader`` alone keeps its own descriptors for
local ``pread``, its hot path); this module and ``storage_remote`` import nothing from the project
(every layer uses them), and fsspec/s3fs are imported only when a remote location is used.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from data_pipeline.storage_remote import SCHEMES, RemotePath, StorageError

__all__ = ["TMP_PREFIX", "RemotePath", "ShardReadError", "StorageError", "append_bytes", "atomic_output",
           "atomic_write_bytes", "fsync_dir", "is_remote", "list_files", "local_copy", "local_path",
           "publish_staged", "read_range", "staging_path", "where"]

TMP_PREFIX = ".tmp-"  # files being written; never listed as shards, checkpoints or outputs


class ShardReadError(Exception):
    """A shard that could not be read to its end. ``path`` and ``detail`` say where/why."""

    def __init__(self, path, detail: str):
        self.path = where(path)
        self.detail = detail
        super().__init__(f"cannot read shard {self.path}: {detail}")


def where(location, storage_options: dict | None = None):
    """The location a config string or path names: a ``RemotePath`` for ``s3://``, else a ``Path``."""
    if isinstance(location, (Path, RemotePath)):
        return location
    text = os.fspath(location)
    if "://" not in text:
        return Path(text)
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        return Path(text.split("://", 1)[1])
    if scheme not in SCHEMES:
        raise ValueError(f"{text}: seer reads and writes local paths and {', '.join(s + '://' for s in SCHEMES)} "
                         f"locations, not {scheme}://")
    return RemotePath(text, storage_options)


def is_remote(location) -> bool:
    return isinstance(location, RemotePath)


def local_path(location) -> Path | None:
    """The absolute local path of a location; None for a remote one."""
    return None if is_remote(location) else Path(location).resolve()


# -- what differs between local and remote ------------------------------------------------------

def read_range(location, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` (fewer at the end of the file)."""
    if is_remote(location):
        return location.read_range(offset, size)
    fd = os.open(location, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def list_files(folder, pattern: str = "*") -> list:
    """Sorted files directly in ``folder`` matching ``pattern``, hidden and ``.tmp-`` names left out."""
    if is_remote(folder):
        files = folder.glob(pattern)
    else:
        files = [p for p in Path(folder).glob(pattern) if p.is_file()]
    return sorted(p for p in files if not p.name.startswith("."))


def fsync_dir(directory) -> None:
    """Make a rename/creation inside ``directory`` durable (nothing to do remotely)."""
    if is_remote(directory):
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_path(destination, tag: str = "") -> Path:
    """A local file to write ``destination``'s content into before :func:`publish_staged`: beside it
    (``.tmp-<tag><name>``) locally, in the temp folder for a remote destination."""
    if is_remote(destination):
        fd, tmp = tempfile.mkstemp(prefix=f"seer-{tag}", suffix=f"-{destination.name}")
        os.close(fd)
        return Path(tmp)
    destination = Path(destination)
    return destination.with_name(f"{TMP_PREFIX}{tag}{destination.name}")


def publish_staged(staged: Path, destination) -> None:
    """Make the complete, fsynced file ``staged`` appear whole at ``destination``."""
    if is_remote(destination):
        try:
            destination.upload(staged)
        finally:
            staged.unlink(missing_ok=True)
        return
    os.replace(staged, destination)
    fsync_dir(Path(destination).parent)


@contextlib.contextmanager
def atomic_output(path) -> Iterator[Path]:
    """``with atomic_output(path) as tmp:`` write the file at ``tmp`` (any writer: safetensors,
    PIL, ``open``); on success it is fsynced and published at ``path`` whole (``os.replace`` and a
    folder fsync locally, one upload remotely); on error the temp file is removed and ``path`` is
    untouched.

    The local temp name (``.tmp-<pid>-<name>``) carries the process id, so processes writing the
    same file at once (workers building the same shard index) each publish a whole file."""
    path = where(path)
    tmp = staging_path(path, tag=f"{os.getpid()}-")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        publish_staged(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (one PUT remotely, :func:`atomic_output` locally)."""
    path = where(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def append_bytes(path, data: bytes, durable: bool = False) -> None:
    """Append ``data``: one ``O_APPEND`` write locally (fsynced if ``durable``), so writers of one
    file do not interleave within it; remotely the object is read and rewritten whole (objects
    cannot be appended to: one writer per remote file)."""
    path = where(path)
    if is_remote(path):
        try:
            old = path.read_bytes()
        except FileNotFoundError:
            old = b""
        path.write_bytes(old + data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def local_copy(location) -> Iterator[Path]:
    """A local path holding ``location``'s bytes for a sequential scan: itself when local, else a
    temp download (one GET of the whole object), removed afterwards."""
    if not is_remote(location):
        yield Path(location)
        return
    tmp = staging_path(location, tag="copy-")
    try:
        location.download(tmp)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
