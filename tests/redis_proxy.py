"""A TCP proxy between a broker and Redis that can wedge one connection.

A wedged connection stays open in both directions, and the proxy keeps
forwarding the broker's commands to Redis, but what Redis answers on it is
read and thrown away: the broker's subscription (or XREAD) hears nothing,
while every other connection through the proxy (PING, PUBLISH, XINFO) keeps
working. This is the silent failure a canary must catch.
"""

from __future__ import annotations

import asyncio
import contextlib

LOOPBACK = "127.0.0.1"
_MARKER_TAIL = 64  # bytes kept from the last chunk, so a marker split across reads is found


class Pipe:
    """One proxied connection: the broker's side and Redis's side."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.wedged = False
        self.closed = asyncio.Event()
        self.commands_seen = bytearray()  # the broker's bytes (capped), to find commands in
        self.dropped = 0  # Redis->broker bytes thrown away while wedged
        self.writers: list[asyncio.StreamWriter] = []

    def saw(self, marker: bytes) -> bool:
        return marker.upper() in bytes(self.commands_seen).upper()

    def wedge(self) -> None:
        """From now on nothing Redis sends on this connection reaches the broker."""
        self.wedged = True

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def __repr__(self) -> str:
        state = "wedged" if self.wedged else "flowing"
        return f"<Pipe {self.number} {state} closed={self.closed.is_set()}>"


class RedisProxy:
    """``async with RedisProxy(port) as proxy``: listens on ``proxy.url``."""

    def __init__(self, upstream_port: int, upstream_host: str = LOOPBACK) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.pipes: list[Pipe] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    async def __aenter__(self) -> RedisProxy:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for pipe in self.pipes:
            pipe.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        await self._server.wait_closed()

    def pipes_with(self, marker: bytes) -> list[Pipe]:
        """Every connection (open or closed) on which the broker sent ``marker``."""
        return [p for p in self.pipes if p.saw(marker)]

    async def wait_pipe(self, marker: bytes, *, count: int = 1, timeout: float = 10.0) -> Pipe:
        """The ``count``-th connection on which the broker sent ``marker`` (e.g. b"PSUBSCRIBE")."""
        async with asyncio.timeout(timeout):
            while True:
                found = self.pipes_with(marker)
                if len(found) >= count:
                    return found[count - 1]
                self._changed.clear()
                await self._changed.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pipe = Pipe(len(self.pipes))
        self.pipes.append(pipe)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            pipe.closed.set()
            return
        pipe.writers = [writer, up_writer]
        down = asyncio.create_task(self._copy(reader, up_writer, pipe, upstream=True))
        up = asyncio.create_task(self._copy(up_reader, writer, pipe, upstream=False))
        for task in (down, up):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pipe.close()
            pipe.closed.set()
            self._changed.set()

    async def _copy(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pipe: Pipe,
        *,
        upstream: bool,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if upstream:
                    if len(pipe.commands_seen) < 1 << 20:
                        pipe.commands_seen += data
                    else:  # keep a tail so late markers are still found
                        pipe.commands_seen[:] = pipe.commands_seen[-_MARKER_TAIL:] + data
                    self._changed.set()
                elif pipe.wedged:
                    pipe.dropped += len(data)
                    continue
                writer.write(data)
                await writer.drain()
