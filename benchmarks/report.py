"""Shared by the benchmark scripts: where results go (``benchmarks/results/<name>.json``, written
atomically) and how a script refreshes its own section of docs/benchmarks.md, keeping the others."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipeline.storage import atomic_write_bytes  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"


def write_results(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(result, indent=2).encode())


def refresh_doc_section(heading: str, section: str, doc: Path = DOC) -> None:
    """Replace the section starting at ``heading`` in ``doc`` (or append it); others are kept."""
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    atomic_write_bytes(doc, (text.rstrip("\n") + "\n").encode())


def publish(path: Path, result: dict, heading: str, section: str, *, doc: bool = True) -> None:
    """A benchmark's end: the JSON to ``path``, the section printed, and (unless ``doc`` is
    false) refreshed under ``heading`` in docs/benchmarks.md."""
    write_results(path, result)
    print("\n" + section)
    if doc:
        refresh_doc_section(heading, section)
