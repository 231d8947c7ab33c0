"""A real S3 server on 127.0.0.1 for the tests and ``benchmarks/stream_read.py --remote``: moto's
standalone server (``python -m moto.server``, extra ``dev``) in its own process, so its work does
not share a GIL with the client under test. The real client library (s3fs/botocore) talks HTTP to
it; nothing is mocked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "seer-test", "AWS_SECRET_ACCESS_KEY": "seer-test-secret",
                    "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")
            time.sleep(0.05)


class MotoServer:
    """``with MotoServer() as server:`` an S3 endpoint at ``server.url``; ``auth=True`` makes it
    check credentials (moto's INITIAL_NO_AUTH_ACTION_COUNT=0: every key is unknown to it)."""

    def __init__(self, auth: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if auth else {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            wait_for_port(self.port)
        except RuntimeError:
            self.stop()
            raise

    def env(self, endpoint: str | None = None) -> dict:
        """What a client process needs: the endpoint (or a proxy's) and fake credentials."""
        return {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint or self.url}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def filesystem(endpoint: str):
    """An s3fs filesystem at ``endpoint`` with the fake credentials (for setting up buckets)."""
    import s3fs

    return s3fs.S3FileSystem(key=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                             secret=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], endpoint_url=endpoint,
                             use_listings_cache=False, skip_instance_cache=True)


def upload_folder(fs, folder: Path, prefix: str) -> None:
    """Copy every file of a local shard folder to ``prefix`` (``bucket/path``), as ``aws s3 sync`` would."""
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            fs.put_file(str(path), f"{prefix}/{path.name}")
