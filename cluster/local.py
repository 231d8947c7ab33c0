"""Local multi-process launch: the torchrun command line for ``seer pretrain`` on one machine."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, config: str, overrides: list[str] = (), port: int | None = None) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node=N -m seer pretrain CONFIG ...``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port or free_port()}",
        "-m",
        "seer",
        "pretrain",
        config,
        *overrides,
    ]
