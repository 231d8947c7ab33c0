"""Seeds derived from names: every random choice of seer that must repeat (crops, color, epoch
orders, online draws, DALI's operators, model init per parameter) draws from a generator seeded
by :func:`derive_seed` of the run's seed and what the choice is for, so it depends on neither the
process that makes it nor the order of other random calls."""

from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of printable parts (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
