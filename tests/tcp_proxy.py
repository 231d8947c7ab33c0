"""A small TCP proxy for fault and latency tests: it forwards 127.0.0.1:<port> to a target, adds
``latency`` seconds before forwarding each chunk a client sends (a request: one added round trip
each), and with probability ``drop`` closes a connection instead of forwarding a chunk (a
connection dropped mid-use: the request gets no answer).

In a thread: ``with TcpProxy(target_port, latency=0.1, drop=0.05) as proxy: proxy.url``; in its
own process (benchmarks, so it shares no GIL with the reader under test):
``python tests/tcp_proxy.py TARGET_PORT LISTEN_PORT --latency 0.1 --drop 0``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading


class TcpProxy:
    def __init__(self, target_port: int, *, latency: float = 0.0, drop: float = 0.0, port: int = 0, seed: int = 0):
        self.target_port, self.latency, self.drop = target_port, latency, drop
        self.port, self.dropped, self.connections = port, 0, 0
        self._random = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _pump(self, reader, writer, delay: bool, peer) -> None:
        try:
            while data := await reader.read(1 << 16):
                if delay:
                    if self._random.random() < self.drop:
                        self.dropped += 1
                        break
                    if self.latency:
                        await asyncio.sleep(self.latency)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (writer, peer):
                w.close()

    async def _handle(self, client_reader, client_writer) -> None:
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self._writers |= {client_writer, server_writer}
        try:
            await asyncio.gather(self._pump(client_reader, server_writer, True, client_writer),
                                 self._pump(server_reader, client_writer, False, server_writer))
        except asyncio.CancelledError:  # the proxy stops: end quietly
            pass
        self._writers -= {client_writer, server_writer}

    async def serve(self) -> None:
        """Serve until :meth:`stop` (or forever, in its own process)."""
        self._writers: set = set()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        async with server:
            await self._stopping.wait()
        for writer in list(self._writers):
            writer.close()

    def start(self) -> TcpProxy:
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TCP proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target_port", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    parser.add_argument("--drop", type=float, default=0.0, help="share of requests whose connection is closed")
    args = parser.parse_args()
    asyncio.run(TcpProxy(args.target_port, latency=args.latency, drop=args.drop, port=args.port).serve())


if __name__ == "__main__":
    main()
