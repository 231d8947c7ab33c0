"""What the DALI reader is given: each shard with a DALI index, bad members of foreign shards left out.

DALI cannot skip an image that fails to decode (a bad image stops the pipeline: DALI issues 3913,
211), so nothing undecodable may reach it:

- Shards listed in a manifest were written by ``seer ingest``, which decodes every image before
  it stores it: they are read through their index as they are (:func:`shard_index.ensure_index`).
- Shards of a folder without a manifest (img2dataset's, hand-made ones: *foreign* shards) are
  checked once: every image member is read through the index (one seek each) and fully decoded
  by seer's decoder (:func:`decode.validate_image`, Pillow). Members that fail, and samples
  without an image member, are logged to the quarantine log and left out of a *checked index*
  (DALI's own ``v1.2`` format, written with :func:`shard_index.write_index`) in
  ``<cache_dir>/dali-checked/``, named after the shard's path, size and modification time, so a
  shard is checked once and re-checked only when it changes. DALI then never sees them.

A shard that cannot be indexed at all (a damaged tar) is left out with a warning and a quarantine
entry.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.decode import DecodeError, validate_image
from data_pipeline.manifest import Manifest
from data_pipeline.quarantine import QuarantineLog
from data_pipeline.shard_index import ShardIndexError, SampleEntry, ensure_index, read_index, write_index
from data_pipeline.storage import ShardReadError

log = logging.getLogger(__name__)

# image members DALI's decoder reads (lower case; the reader matches extensions case-insensitively)
DALI_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
CHECKED_DIR = "dali-checked"


@dataclass(frozen=True)
class ReadyShard:
    """A shard as the DALI reader gets it: its index (checked, for foreign shards) and counts."""

    path: Path
    index_path: Path
    samples: int  # samples DALI will read
    skipped: int  # samples left out by the check


def image_ext(entry: SampleEntry) -> str | None:
    """The member DALI decodes for this sample (the first image extension present), if any."""
    lower = {ext.lower(): ext for ext in entry.components}
    return next((lower[e] for e in DALI_IMAGE_EXTS if e in lower), None)


def checked_index_path(shard_path: Path, cache_dir: Path) -> Path:
    stat = shard_path.stat()
    text = f"{shard_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    return cache_dir / CHECKED_DIR / f"{shard_path.name.removesuffix('.tar')}-{digest}.idx"


def check_members(shard_path: Path, entries: list[SampleEntry], *, max_pixels: int,
                  quarantine: QuarantineLog | None) -> list[SampleEntry]:
    """The entries whose image member decodes; the others are logged and left out."""
    good = []
    with open(shard_path, "rb") as handle:
        for entry in entries:
            ext = image_ext(entry)
            if ext is None:
                reason, detail = "no_image", "sample has no image member DALI can decode"
            else:
                offset, size = entry.components[ext]
                handle.seek(offset)
                data = handle.read(size)
                try:
                    if len(data) != size:
                        raise DecodeError("truncated", f"member ends {size - len(data)} bytes early")
                    validate_image(data, max_pixels=max_pixels, min_side=1)
                    good.append(entry)
                    continue
                except DecodeError as err:
                    reason, detail = err.reason, str(err)
                except Exception as err:  # a decoder bug must not stop the check: leave the member out
                    reason, detail = "decode_failed", f"{type(err).__name__}: {err}"
            log.warning("DALI backend: leaving out %s of %s (%s)", entry.key, shard_path.name, reason)
            if quarantine is not None:
                quarantine.record(reason, shard=shard_path.name, key=entry.key, detail=detail)
    return good


def prepare_shard(shard_path: Path, *, cache_dir: Path, foreign: bool, max_pixels: int,
                  quarantine: QuarantineLog | None) -> ReadyShard | None:
    """The shard's index for DALI (checking a foreign shard's members once); None if unusable."""
    try:
        index = ensure_index(shard_path, cache_dir)
        entries = read_index(index)
        if foreign:
            checked = checked_index_path(shard_path, cache_dir)
            if checked.is_file():
                kept = len(read_index(checked))
            else:
                good = check_members(shard_path, entries, max_pixels=max_pixels, quarantine=quarantine)
                checked.parent.mkdir(parents=True, exist_ok=True)
                try:
                    write_index(good, checked)
                except OSError:  # another rank wrote the same file at the same time: use it
                    if not checked.is_file():
                        raise
                kept = len(good)
            index = checked
        else:
            kept = len(entries)
    except (ShardReadError, ShardIndexError, OSError) as err:
        log.warning("DALI backend: leaving out shard %s: %s", shard_path, err)
        if quarantine is not None:
            quarantine.record("shard_unreadable", shard=shard_path.name, detail=str(err))
        return None
    if kept == 0:
        return None  # DALI's reader refuses an empty index; nothing to read anyway
    return ReadyShard(shard_path, index, kept, len(entries) - kept)


def prepare_shards(shard_dir: Path, paths: list[Path], *, cache_dir: Path, max_pixels: int,
                   quarantine_path: Path | None = None) -> list[ReadyShard]:
    """:func:`prepare_shard` for each path, in order; foreign = the folder has no manifest."""
    foreign = not Manifest.load(shard_dir).path.exists()
    quarantine = QuarantineLog(quarantine_path) if quarantine_path else None
    ready = [prepare_shard(Path(p), cache_dir=cache_dir, foreign=foreign, max_pixels=max_pixels, quarantine=quarantine)
             for p in paths]
    return [r for r in ready if r is not None]
