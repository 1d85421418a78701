"""A lean SSE load client: one ``asyncio.Protocol`` per stream over raw sockets (uvloop).

It must never be the bottleneck, so it does the least a client can: send one
HTTP/1.1 GET, wait for the preamble (``: ok``), then scan received bytes for
``data: `` lines. It does not de-chunk: an event's frame always lies inside one
HTTP chunk (both servers write a frame per chunk), so the chunk-size lines
are just lines it skips.

Payloads of tracked streams are ``<seq>:<publish time_ns>``: each stream
checks order (``seq`` must go up by one) and records publish-to-receive
latency in microseconds.

A worker process is driven over a ``multiprocessing`` pipe by ``run.py``:
``connect`` -> ``expect`` -> ``collect`` -> ``close``; every step is bounded by
a timeout the parent gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import time
from array import array
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import uvloop

PREAMBLE_MARK = b": ok\n"
DATA = b"data: "


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Group:
    """What all streams of one worker share: the request, the counters, the latencies."""

    def __init__(self, request: bytes, track: bool) -> None:
        self.request = request
        self.track = track
        self.streams: list[Stream] = []
        self.expected = 0
        self.complete = 0
        self.all_complete = asyncio.Event()
        self.latencies_us = array("q")
        self.seqs = array("q")  # the event each latency belongs to
        self.last_receive_ns = 0
        self.dropped = 0
        self.cpu_start = 0.0

    def stream_complete(self) -> None:
        self.complete += 1
        if self.complete >= len(self.streams):
            self.all_complete.set()


class Stream(asyncio.Protocol):
    __slots__ = (
        "closing",
        "disorder",
        "gaps",
        "group",
        "head",
        "last_seq",
        "ready",
        "received",
        "tail",
        "transport",
    )

    def __init__(self, group: Group, ready: asyncio.Future[None]) -> None:
        self.group = group
        self.ready: asyncio.Future[None] | None = ready
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.tail = b""
        self.last_seq = 0
        self.received = 0
        self.gaps = 0
        self.disorder = 0
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.group.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.ready is not None:
            data = self._preamble(data)
            if not data:
                return
        if self.group.track:
            self._scan(data)

    def _preamble(self, data: bytes) -> bytes:
        head = self.head + data
        if not head.startswith(b"HTTP/1.1 200"):
            if b"\r\n" in head or len(head) >= 12:
                self._fail(head.split(b"\r\n", 1)[0].decode("latin-1")[:80])
            else:
                self.head = head
            return b""
        mark = head.find(PREAMBLE_MARK)
        if mark < 0:
            self.head = head
            return b""
        self.head = b""
        ready, self.ready = self.ready, None
        if ready is not None and not ready.done():
            ready.set_result(None)
        return head[mark + len(PREAMBLE_MARK) :]

    def _fail(self, why: str) -> None:
        ready, self.ready = self.ready, None
        if ready is not None and not ready.done():
            ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def _scan(self, data: bytes) -> None:
        now = time.time_ns()
        buf = self.tail + data if self.tail else data
        end = buf.rfind(b"\n")
        if end < 0:
            self.tail = buf
            return
        self.tail = buf[end + 1 :]
        pos = buf.find(DATA, 0, end)
        if pos < 0:
            return
        group = self.group
        lat = group.latencies_us
        seqs = group.seqs
        while pos >= 0:
            eol = buf.find(b"\n", pos)
            seq_b, _, sent_b = buf[pos + 6 : eol].partition(b":")
            seq = int(seq_b)
            if seq == self.last_seq + 1:
                self.last_seq = seq
            elif seq > self.last_seq:
                self.gaps += seq - self.last_seq - 1
                self.last_seq = seq
            else:
                self.disorder += 1
            lat.append((now - int(sent_b)) // 1000)
            seqs.append(seq)
            self.received += 1
            if self.received == group.expected:
                group.stream_complete()
            pos = buf.find(DATA, eol, end)
        group.last_receive_ns = now

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ready is not None:
            self._fail(f"closed before the preamble: {exc}")
        elif not self.closing:
            self.group.dropped += 1


async def _open_all(
    group: Group, host: str, port: int, n: int, concurrency: int, timeout: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    errors: Counter[str] = Counter()
    deadline = loop.time() + timeout
    last_ready = 0.0

    async def open_one() -> None:
        nonlocal last_ready
        ready: asyncio.Future[None] = loop.create_future()
        stream = Stream(group, ready)
        try:
            async with sem, asyncio.timeout_at(deadline):
                await loop.create_connection(lambda: stream, host, port)
                await ready
        except (OSError, TimeoutError) as exc:
            errors[f"{type(exc).__name__}: {exc}"[:100]] += 1
            if stream.transport is not None:
                stream.transport.abort()
            return
        group.streams.append(stream)
        last_ready = time.time()

    started = time.time()
    await asyncio.gather(*(open_one() for _ in range(n)))
    return {
        "ok": len(group.streams),
        "failed": n - len(group.streams),
        "errors": dict(errors.most_common(5)),
        "started": started,
        "finished": last_ready or time.time(),
    }


def _results(group: Group) -> dict[str, Any]:
    expected = group.expected
    received = [s.received for s in group.streams]
    return {
        "streams": len(group.streams),
        "expected_each": expected,
        "received_total": sum(received),
        "complete_streams": sum(1 for r in received if r >= expected),
        "missing_total": sum(max(0, expected - r) for r in received),
        "gaps_total": sum(s.gaps for s in group.streams),
        "disorder_total": sum(s.disorder for s in group.streams),
        "dropped": group.dropped,
        "last_receive_ns": group.last_receive_ns,
        "cpu_seconds": time.process_time() - group.cpu_start,
        "latencies_us": group.latencies_us.tobytes(),
        "seqs": group.seqs.tobytes(),
    }


async def _serve(pipe: Connection, host: str, port: int, path: str) -> None:
    loop = asyncio.get_running_loop()
    group: Group | None = None
    pipe.send(("hello",))
    while True:
        cmd = await loop.run_in_executor(None, pipe.recv)
        op = cmd[0]
        if op == "connect":
            _, n, channel, concurrency, timeout, track = cmd
            request = (
                f"GET {path}?channel={channel} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Accept: text/event-stream\r\n\r\n"
            ).encode()
            group = Group(request, track)
            pipe.send(("connected", await _open_all(group, host, port, n, concurrency, timeout)))
        elif op == "expect" and group is not None:
            group.expected = cmd[1]
            group.cpu_start = time.process_time()
            group.complete = 0
            group.all_complete.clear()
            if not group.streams:
                group.all_complete.set()
            pipe.send(("ok",))
        elif op == "collect" and group is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(group.all_complete.wait(), cmd[1])
            pipe.send(("collected", _results(group)))
        elif op == "close":
            if group is not None:
                for stream in group.streams:
                    stream.closing = True
                    if stream.transport is not None:
                        stream.transport.abort()
            await asyncio.sleep(0.1)
            pipe.send(("closed",))
            return
        else:
            pipe.send(("error", f"bad command {op!r}"))


def worker_main(pipe: Connection, host: str, port: int, path: str) -> None:
    """Entry point of a client process (multiprocessing target)."""
    raise_nofile()
    # A bounded run: cyclic garbage is negligible, and a GC pass over
    # thousands of streams would show up as client-side latency.
    gc.disable()
    uvloop.run(_serve(pipe, host, port, path))
