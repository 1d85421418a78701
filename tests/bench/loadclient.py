"""A lean SSE load client: one ``asyncio.Protocol`` per stream over raw sockets (uvloop).

It must never be the bottleneck, so it does the least a client can: send one
HTTP/1.1 GET, wait for the preamble (``: ok``), then scan received bytes for
``data: `` lines. It does not de-chunk: an event's frame always lies inside one
HTTP chunk (both servers write a frame per chunk), so the chunk-size lines
are just lines it skips.

Payloads of tracked streams are ``<seq>:<publish time_ns>``: each stream
checks order (``seq`` must go up by one) and records publish-to-receive
latency in microseconds.

A payload may carry trailing spaces as padding (``int()`` ignores them), so
larger events need no other parsing.

A worker process is driven over a ``multiprocessing`` pipe by
``procs.ClientPool``: ``connect`` -> ``expect`` -> ``collect`` -> ``close``;
every step is bounded by a timeout the parent gives.

Resuming streams (``resume`` -> ``status`` ... -> ``collect_resume`` -> ``close``)
behave like a browser's EventSource: each remembers the last ``id:`` it was
given (events, ``id:``-only heartbeats, ``broker.reconnect``), and when the
server ends the stream it reconnects after the last ``retry:`` with a
``Last-Event-ID`` header. Payloads are ``<seq>[:...]``: across reconnects
each logical stream checks that ``seq`` goes up by one (lost and duplicated
events). They record when each ``broker.reconnect`` arrived and its reason,
and when each connection closed (``time.monotonic_ns``: one clock for every
process of the host).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
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


async def _open_many(
    n: int, concurrency: int, timeout: float, open_one: Callable[[float], Awaitable[str | None]]
) -> dict[str, Any]:
    """Call ``open_one(deadline)`` ``n`` times, ``concurrency`` at once; it opens one
    stream (ready when it returns) and returns None, or why it failed."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    errors: Counter[str] = Counter()
    deadline = loop.time() + timeout
    ok = 0
    last_ready = 0.0

    async def one() -> None:
        nonlocal ok, last_ready
        async with sem:
            error = await open_one(deadline)
        if error is not None:
            errors[error] += 1
            return
        ok += 1
        last_ready = time.time()

    started = time.time()
    await asyncio.gather(*(one() for _ in range(n)))
    return {
        "ok": ok,
        "failed": n - ok,
        "errors": dict(errors.most_common(5)),
        "started": started,
        "finished": last_ready or time.time(),
    }


async def _open_all(
    group: Group, host: str, port: int, n: int, concurrency: int, timeout: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()

    async def open_one(deadline: float) -> str | None:
        ready: asyncio.Future[None] = loop.create_future()
        stream = Stream(group, ready)
        try:
            async with asyncio.timeout_at(deadline):
                await loop.create_connection(lambda: stream, host, port)
                await ready
        except (OSError, TimeoutError) as exc:
            if stream.transport is not None:
                stream.transport.abort()
            return f"{type(exc).__name__}: {exc}"[:100]
        group.streams.append(stream)
        return None

    return await _open_many(n, concurrency, timeout, open_one)


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


# -- resuming streams (browser-like reconnects) -------------------------------------------

REASONS = (
    "recycle",
    "drain",
    "token_expired",
    "limit",
    "not_ready",
    "auth_unavailable",
    "revoked",
    "other",
)
CONTROL = b"event: broker."
REOPEN_TIMEOUT = 60.0
HEADERS_END = b"\r\n\r\n"


def _last_field(buf: bytes, name: bytes, end: int) -> bytes | None:
    """The value of the last ``name`` field (a line starting with it) in ``buf[:end]``."""
    pos = buf.rfind(name, 0, end)
    while pos > 0 and buf[pos - 1] != 10:  # not at a line start
        pos = buf.rfind(name, 0, pos)
    if pos < 0:
        return None
    eol = buf.find(b"\n", pos, end)
    return buf[pos + len(name) : eol if eol >= 0 else end]


def _reason(buf: bytes, start: int, end: int) -> str:
    pos = buf.find(b'"reason":"', start, end)
    if pos < 0:
        return "other"
    pos += 10
    return buf[pos : buf.find(b'"', pos, end)].decode("latin-1")


class ResumeGroup:
    """The logical streams of one worker and what they share."""

    def __init__(
        self, host: str, port: int, path: str, channel: str, reconnect: bool, retry_ms: int
    ) -> None:
        self.host = host
        self.port = port
        self.base = (
            f"GET {path}?channel={channel} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Accept: text/event-stream\r\n"
        )
        self.reconnect = reconnect
        self.default_retry_ms = retry_ms  # until the server sends a retry: field
        self.subs: list[Sub] = []
        self.stopping = False
        self.open = 0
        self.reconnects: Counter[str] = Counter()  # broker.reconnect received, by reason
        self.resets: Counter[str] = Counter()  # broker.reset received, by reason
        self.reopen_errors: Counter[str] = Counter()  # reconnect attempts that failed
        self.refusals: Counter[str] = Counter()  # reconnects answered with broker.reconnect
        self.unexpected_closes = 0  # closed by the server without broker.reconnect
        self.event_ns = array("q")  # arrival of each broker.reconnect
        self.event_reason = array("b")  # its reason (index in REASONS)
        self.close_ns = array("q")  # end of each live connection
        self.reopen_us = array("q")  # each successful reconnect: attempt to preamble
        self.reopen_done_ns = array("q")  # when it got the preamble
        self.tasks: set[asyncio.Task[None]] = set()
        self.cpu_start = time.process_time()


class Sub:
    """One logical stream: a browser's EventSource across its reconnects."""

    __slots__ = ("conn", "dup", "group", "last_id", "last_seq", "lost", "opens", "retry_ms")

    def __init__(self, group: ResumeGroup) -> None:
        self.group = group
        self.last_id: bytes | None = None
        self.last_seq = 0
        self.lost = 0
        self.dup = 0
        self.opens = 0  # connections that got the preamble (1 + successful reconnects)
        self.retry_ms = group.default_retry_ms
        self.conn: SubConn | None = None

    def request(self) -> bytes:
        extra = b"" if self.last_id is None else b"Last-Event-ID: " + self.last_id + b"\r\n"
        return self.group.base.encode() + extra + b"\r\n"

    async def open(self, timeout: float) -> str | None:
        """One connection attempt up to the preamble; None when live, else why not."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        conn = SubConn(self, ready)
        self.conn = conn
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: conn, self.group.host, self.group.port)
                await ready
        except (OSError, TimeoutError) as exc:
            conn.closing = True
            if conn.transport is not None:
                conn.transport.abort()
            return f"{type(exc).__name__}: {exc}"[:100]
        return None

    def schedule_reopen(self) -> None:
        group = self.group
        if group.stopping or not group.reconnect:
            return
        task = asyncio.get_running_loop().create_task(self._reopen())
        group.tasks.add(task)
        task.add_done_callback(group.tasks.discard)

    async def _reopen(self) -> None:
        group = self.group
        while not group.stopping:
            await asyncio.sleep(self.retry_ms / 1000)
            if group.stopping:
                return
            started = time.monotonic_ns()
            # A browser waits as long as the request is pending: a long bound,
            # so that a slow server is measured (reopen_us), not hammered.
            error = await self.open(REOPEN_TIMEOUT)
            if error is None:
                done = time.monotonic_ns()
                group.reopen_us.append((done - started) // 1000)
                group.reopen_done_ns.append(done)
                return
            group.reopen_errors[error] += 1

    def frames(self, conn: SubConn, buf: bytes, end: int) -> None:
        """Complete blocks ``buf[:end]``: preamble, data seqs, control events, last id."""
        group = self.group
        if conn.ready is not None and buf.find(PREAMBLE_MARK, 0, end) >= 0:
            ready, conn.ready = conn.ready, None
            conn.live = True
            group.open += 1
            self.opens += 1
            if not ready.done():
                ready.set_result(None)
        pos = buf.find(DATA, 0, end)
        while pos >= 0:
            eol = buf.find(b"\n", pos, end)
            if eol > pos + 6 and buf[pos + 6] != 123:  # "{": a control event's JSON
                seq = int(buf[pos + 6 : eol].partition(b":")[0])
                if seq == self.last_seq + 1:
                    self.last_seq = seq
                elif seq > self.last_seq:
                    self.lost += seq - self.last_seq - 1
                    self.last_seq = seq
                else:
                    self.dup += 1
            pos = buf.find(DATA, eol, end)
        pos = buf.find(CONTROL, 0, end)
        if pos >= 0:
            self._control(conn, buf, pos, end)
        last_id = _last_field(buf, b"id: ", end)
        if last_id is not None:
            self.last_id = last_id

    def _control(self, conn: SubConn, buf: bytes, pos: int, end: int) -> None:
        group = self.group
        while pos >= 0:
            eol = buf.find(b"\n", pos, end)
            name = buf[pos + 14 : eol]
            block_end = buf.find(b"\n\n", eol, end)
            reason = _reason(buf, eol, block_end if block_end >= 0 else end)
            if name == b"reconnect":
                now = time.monotonic_ns()
                conn.told = True
                code = REASONS.index(reason) if reason in REASONS else len(REASONS) - 1
                if conn.live:
                    group.reconnects[reason] += 1
                    group.event_ns.append(now)
                    group.event_reason.append(code)
                else:
                    group.refusals[reason] += 1
                retry = _last_field(buf, b"retry: ", end)
                if retry is not None:
                    self.retry_ms = int(retry)
            elif name == b"reset":
                group.resets[reason] += 1
            pos = buf.find(CONTROL, eol, end)


class SubConn(asyncio.Protocol):
    """One TCP connection of a :class:`Sub`."""

    __slots__ = ("closing", "head", "live", "ready", "sub", "tail", "told", "transport")

    def __init__(self, sub: Sub, ready: asyncio.Future[None]) -> None:
        self.sub = sub
        self.ready: asyncio.Future[None] | None = ready
        self.transport: asyncio.Transport | None = None
        self.head: bytes | None = b""  # None once the response headers are through
        self.tail = b""
        self.live = False
        self.told = False  # got broker.reconnect
        self.closing = False  # closed by us

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.sub.request())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            head = self.head + data
            if not head.startswith(b"HTTP/1.1 200"):
                if b"\r\n" in head or len(head) >= 12:
                    self._fail(head.split(b"\r\n", 1)[0].decode("latin-1")[:80])
                else:
                    self.head = head
                return
            mark = head.find(HEADERS_END)
            if mark < 0:
                self.head = head
                return
            self.head = None
            data = head[mark + len(HEADERS_END) :]
        # HTTP chunk lines end in CR and are no SSE field: they are skipped. A
        # block is complete at a blank line (LF LF).
        buf = self.tail + data if self.tail else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.tail = buf
            return
        end += 2
        self.tail = buf[end:]
        self.sub.frames(self, buf, end)

    def _fail(self, why: str) -> None:
        ready, self.ready = self.ready, None
        if ready is not None and not ready.done():
            ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ready is not None:
            reason = "refused" if self.told else "closed before the preamble"
            self._fail(f"{reason}: {exc}")
            return
        if not self.live or self.closing:
            return
        sub = self.sub
        group = sub.group
        group.open -= 1
        group.close_ns.append(time.monotonic_ns())
        if group.stopping:
            return
        if not self.told:
            group.unexpected_closes += 1
        sub.schedule_reopen()


async def _open_resume(
    group: ResumeGroup, n: int, concurrency: int, timeout: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()

    async def open_one(deadline: float) -> str | None:
        sub = Sub(group)
        error = await sub.open(max(0.0, deadline - loop.time()))
        if error is None:
            group.subs.append(sub)
        return error

    return await _open_many(n, concurrency, timeout, open_one)


def _resume_status(group: ResumeGroup) -> dict[str, Any]:
    subs = group.subs
    gens = Counter(s.opens - 1 for s in subs)
    return {
        "streams": len(subs),
        "open": group.open,
        "min_generation": min(gens) if gens else 0,
        "generations": dict(gens),
        "reconnects": dict(group.reconnects),
        "refusals": dict(group.refusals),
        "resets": dict(group.resets),
        "reopen_failures": sum(group.reopen_errors.values()),
        "reopen_errors": dict(group.reopen_errors.most_common(5)),
        "unexpected_closes": group.unexpected_closes,
        "lost": sum(s.lost for s in subs),
        "duplicated": sum(s.dup for s in subs),
        "min_seq": min((s.last_seq for s in subs), default=0),
        "max_seq": max((s.last_seq for s in subs), default=0),
        "cpu_seconds": time.process_time() - group.cpu_start,
    }


def _resume_results(group: ResumeGroup) -> dict[str, Any]:
    return {
        **_resume_status(group),
        "last_seqs": array("q", (s.last_seq for s in group.subs)).tobytes(),
        "event_ns": group.event_ns.tobytes(),
        "event_reason": group.event_reason.tobytes(),
        "close_ns": group.close_ns.tobytes(),
        "reopen_us": group.reopen_us.tobytes(),
        "reopen_done_ns": group.reopen_done_ns.tobytes(),
    }


def _stop_resume(group: ResumeGroup) -> None:
    group.stopping = True
    for task in list(group.tasks):
        task.cancel()
    for sub in group.subs:
        conn = sub.conn
        if conn is not None and conn.transport is not None:
            conn.closing = True
            conn.transport.abort()


async def _serve(pipe: Connection, host: str, port: int, path: str) -> None:
    loop = asyncio.get_running_loop()
    group: Group | None = None
    rgroup: ResumeGroup | None = None
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
        elif op == "resume":
            _, n, channel, concurrency, timeout, reconnect, retry_ms = cmd
            rgroup = ResumeGroup(host, port, path, channel, reconnect, retry_ms)
            pipe.send(("connected", await _open_resume(rgroup, n, concurrency, timeout)))
        elif op == "status" and rgroup is not None:
            pipe.send(("status", _resume_status(rgroup)))
        elif op == "collect_resume" and rgroup is not None:
            pipe.send(("collected", _resume_results(rgroup)))
        elif op == "close":
            if rgroup is not None:
                _stop_resume(rgroup)
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
