"""Connection lifecycle end to end: recycling, heartbeats, slow consumers, drain,
reload, dead peers, metrics and logs.

Real broker processes receiving real signals, a real redis-server, clients that
read (or stop reading) as browsers and broken laptops do. Timings use the
shortest settings the config allows (``sse.max_connection_age_seconds = 10``,
one-second heartbeats, two-second write deadlines).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from conftest import BrokerProcess, StartBroker
from helpers import bearer, eventually, publish
from sse_client import SSEClient, SSEEvent, SSEStream, SSEStreamClosed

SECRET_A = "lifecycle-secret-A-" + "0123456789abcdef" * 3
SECRET_B = "lifecycle-secret-B-" + "fedcba9876543210" * 3


# -- helpers ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_stream(
    broker: BrokerProcess,
    *channels: str,
    headers: dict[str, str] | None = None,
    last_event_id: str | None = None,
    **params: str,
) -> AsyncIterator[SSEStream]:
    """A 200 stream, returned once its preamble arrived (it is registered from then on)."""
    url = broker.events_url(*channels, **params)
    async with SSEClient.connect(url, headers=headers, last_event_id=last_event_id) as s:
        assert s.status == 200, await s.text()
        await s.wait_for(lambda st: "ok" in st.parser.comments, what="the preamble")
        yield s


async def metric0(broker: BrokerProcess, name: str, labels: dict[str, str] | None = None) -> float:
    return await broker.metric(name, labels) or 0.0


async def closed_by(broker: BrokerProcess, reason: str) -> float:
    return await metric0(broker, "sse_broker_connections_closed_total", {"reason": reason})


def host_port(broker: BrokerProcess) -> tuple[str, int]:
    assert broker.url is not None
    host, _, port = broker.url.removeprefix("http://").rpartition(":")
    return host, int(port)


async def open_raw(
    broker: BrokerProcess, *channels: str, rcvbuf: int | None = None
) -> tuple[socket.socket, bytes]:
    """An HTTP/1.0 stream over a bare non-blocking socket, read only up to its preamble.

    Nothing reads the socket afterwards unless the test calls ``loop.sock_recv``: a
    client that stopped reading. ``rcvbuf`` shrinks its receive window (set before
    connecting), so the broker's unsent bytes pile up after a few KiB instead of MiBs.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    query = "&".join(f"channel={c}" for c in channels)
    try:
        await loop.sock_connect(sock, host_port(broker))
        await loop.sock_sendall(
            sock, f"GET /events?{query} HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        got = b""
        async with asyncio.timeout(5):
            while b": ok\n" not in got:
                chunk = await loop.sock_recv(sock, 65536)
                assert chunk, f"stream closed before its preamble: {got!r}"
                got += chunk
    except BaseException:
        sock.close()
        raise
    assert got.startswith(b"HTTP/1.0 200"), got[:200]
    return sock, got


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def block_of(raw: bytes, event_type: str) -> dict[str, str]:
    """The fields of the first SSE block (in ``raw``) that carries ``event: <event_type>``."""
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = block.decode().split("\n")
        if f"event: {event_type}" in lines:
            return dict(line.split(": ", 1) for line in lines if ": " in line)
    raise AssertionError(f"no {event_type} block in {raw[-500:]!r}")


def mint(secret: str, *, ttl: float = 300, **claims: Any) -> str:
    payload = {"sub": "u1", "exp": int(time.time() + ttl), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


async def status_of(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, str]:
    """(status, JSON body (None for a stream), Retry-After) of a plain GET."""
    async with http.get(url, headers=headers) as resp:
        if resp.content_type == "text/event-stream":
            return resp.status, None, resp.headers.get("Retry-After", "")
        return resp.status, await resp.json(), resp.headers.get("Retry-After", "")


async def soft_refusal(url: str, headers: dict[str, str] | None = None) -> SSEEvent:
    """What an EventSource gets for a retryable refusal: 200, ``retry:``, one
    ``broker.reconnect``, then the end of the stream."""
    async with SSEClient.connect(url, headers=headers) as s:
        assert s.status == 200, await s.text()
        event = await s.next_event()
        assert event.type == "broker.reconnect", event
        assert s.parser.retry is not None
        assert await s.wait_closed()
        assert not s.pending
        return event


async def wait_log(broker: BrokerProcess, text: str, *, count: int = 1, timeout: float = 5) -> str:
    """The log, once ``text`` occurs ``count`` times in it."""
    return await eventually(
        lambda: asyncio.sleep(0, broker.log_text()),
        lambda log: log.count(text) >= count,
        timeout=timeout,
    )


def max_in_window(times: list[float], width: float) -> int:
    """The most of ``times`` falling in any window of ``width`` seconds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# -- recycling ---------------------------------------------------------------------------


@dataclass
class Follower:
    """A client that, like a browser, reconnects with Last-Event-ID whenever its stream ends."""

    data: list[str] = field(default_factory=list)
    controls: list[SSEEvent] = field(default_factory=list)
    recycles: list[dict[str, Any]] = field(default_factory=list)
    connects: int = 0


async def follow(
    broker: BrokerProcess, channel: str, me: Follower, done: Callable[[Follower], bool]
) -> None:
    loop = asyncio.get_running_loop()
    last_id: str | None = None
    while not done(me):
        async with SSEClient.connect(broker.events_url(channel), last_event_id=last_id) as s:
            assert s.status == 200, await s.text()
            opened = loop.time()  # the headers came: the broker registered this stream
            me.connects += 1
            while not done(me):
                try:
                    event = await s.next_event(timeout=0.2)
                except TimeoutError:
                    continue
                except SSEStreamClosed:
                    break
                if event.type == "message":
                    me.data.append(event.data)
                    continue
                me.controls.append(event)
                if event.type == "broker.reconnect":
                    me.recycles.append(
                        {
                            "age": loop.time() - opened,
                            "event": event,
                            "block": block_of(s.raw, "broker.reconnect"),
                            "last_data_id": last_id_of_data(s),
                            "retry": s.parser.retry,
                        }
                    )
            last_id = s.parser.last_event_id
            retry = s.parser.retry or 0
        if not done(me):
            await asyncio.sleep(retry / 1000)  # as a browser does before reconnecting


def last_id_of_data(s: SSEStream) -> str | None:
    """The id of the last data event in the raw stream (the head the client saw)."""
    ids = re.findall(rb"id: (\S+)\ndata: ", s.raw)
    return ids[-1].decode() if ids else None


@pytest.mark.slow
async def test_recycle_reconnects_with_retry_and_head_id_jittered_and_resume_loses_nothing(
    start_broker: StartBroker, redis_client
) -> None:
    """Every stream gets ``broker.reconnect`` (``recycle``) after 10 s +-10%, streams
    opened together are recycled at different moments, and clients resuming with
    Last-Event-ID (all of them, the reference included) miss nothing of a
    continuous publish, none of them gets a reset."""
    age = 10
    n = 12
    broker = await start_broker(
        f"sse.max_connection_age_seconds={age}", "sse.heartbeat_seconds=1", "sse.retry_ms=400"
    )
    published: list[str] = []
    finished = asyncio.Event()

    def done(me: Follower) -> bool:
        return finished.is_set() and len(me.data) >= len(published)

    followers = [Follower() for _ in range(n)]
    tasks = [asyncio.create_task(follow(broker, "r", f, done)) for f in followers]
    await eventually(lambda: broker.metric("sse_broker_connections"), lambda v: v == n)

    async def publisher() -> None:
        i = 0
        while not finished.is_set():
            published.append(str(i))
            await publish(redis_client, "r", str(i))
            i += 1
            await asyncio.sleep(0.02)

    pub = asyncio.create_task(publisher())
    try:
        # every stream is recycled once, and every client is back
        await eventually(
            lambda: closed_by(broker, "recycle"), lambda v: v >= n, timeout=age * 1.1 + 5
        )
        await eventually(
            lambda: asyncio.sleep(0, [f.connects for f in followers]),
            lambda c: all(x == 2 for x in c),
            timeout=5,
        )
        # live events after the resume: every client got some published after all were back
        back = len(published)
        await eventually(
            lambda: asyncio.sleep(0, min(len(f.data) for f in followers)),
            lambda n: n >= back + 20,
            timeout=5,
        )
        finished.set()
        await pub
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)
    finally:
        finished.set()
        for task in [pub, *tasks]:
            task.cancel()

    ages = []
    for f in followers:
        assert len(f.recycles) == 1, f.recycles
        recycle = f.recycles[0]
        event = recycle["event"]
        assert event.json()["reason"] == "recycle"
        ages.append(recycle["age"])
        # retry: (jittered around sse.retry_ms) and id: <head> in the same block
        block = recycle["block"]
        assert int(block["retry"]) == event.json()["retry_ms"] == recycle["retry"]
        assert 200 <= int(block["retry"]) <= 600
        assert block["id"] == event.last_event_id == recycle["last_data_id"]
        assert [e.type for e in f.controls] == ["broker.reconnect"], "no reset on a resume"
        # nothing lost, nothing twice, in order, around the recycle
        assert f.data == published, (len(f.data), len(published))
    assert all(age * 0.9 - 0.1 <= a <= age * 1.1 + 0.3 for a in ages), sorted(ages)
    # opened within a fraction of a second, recycled across the jitter window
    assert max_in_window(ages, 0.05) <= n // 3, sorted(ages)
    assert max(ages) - min(ages) >= 0.3, sorted(ages)
    assert await closed_by(broker, "recycle") == n
    assert await metric0(broker, "sse_broker_resets_total") == 0
    assert await metric0(broker, "sse_broker_replays_served_total") == n


# -- heartbeats ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_heartbeats_of_many_streams_are_spread_over_the_period(
    start_broker: StartBroker,
) -> None:
    """200 idle streams, heartbeat 1 s: the heartbeats of one period arrive spread
    across it, not in one burst."""
    # 200 clients connect at once from one address here
    broker = await start_broker(
        "sse.heartbeat_seconds=1", "limits.max_pending_connections_per_ip=0"
    )
    loop = asyncio.get_running_loop()
    n = 200
    socks = list(await asyncio.gather(*(open_raw(broker, "quiet") for _ in range(n))))
    arrivals: list[list[float]] = [[] for _ in range(n)]

    async def read(i: int, sock: socket.socket) -> None:
        while chunk := await loop.sock_recv(sock, 4096):
            arrivals[i].extend(loop.time() for _ in range(chunk.count(b"\n\n")))

    readers = [asyncio.create_task(read(i, s)) for i, (s, _) in enumerate(socks)]
    try:
        start = loop.time()
        await asyncio.sleep(3.2)
    finally:
        for task in readers:
            task.cancel()
        for sock, _ in socks:
            sock.close()
    # Each stream's first heartbeat after the preambles settled: a single burst
    # would put them all within a few ms; a shared wheel spreads them over the period.
    firsts = []
    for times in arrivals:
        later = [t for t in times if t >= start + 1.0]
        assert later, "every idle stream gets heartbeats"
        firsts.append(later[0])
    assert max_in_window(firsts, 0.01) <= 0.3 * n, sorted(t - start for t in firsts)
    assert max_in_window(firsts, 0.1) <= 0.5 * n
    assert max(firsts) - min(firsts) >= 0.6


@pytest.mark.slow
async def test_idle_stream_gets_a_heartbeat_every_period(start_broker: StartBroker) -> None:
    """sse.heartbeat_seconds is the period of an idle stream's heartbeats (a proxy's
    read timeout is set from it), not a multiple of it."""
    broker = await start_broker("sse.heartbeat_seconds=1")
    loop = asyncio.get_running_loop()
    sock, _ = await open_raw(broker, "idle")
    arrivals: list[float] = []

    async def read() -> None:
        while chunk := await loop.sock_recv(sock, 4096):
            arrivals.extend(loop.time() for _ in range(chunk.count(b"\n\n")))

    reader = asyncio.create_task(read())
    try:
        await asyncio.sleep(4.6)
    finally:
        reader.cancel()
        sock.close()
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) >= 4, f"heartbeats at intervals {gaps} s for sse.heartbeat_seconds = 1"
    assert all(0.7 <= g <= 1.3 for g in gaps), gaps


# -- slow consumers -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_stalled_clients_are_closed_as_slow_consumers_while_fast_one_gets_everything(
    start_broker: StartBroker, redis_client
) -> None:
    """50 clients stop reading while 10 KB events flood: each is closed once its
    unsent bytes pass limits.write_buffer_bytes (counted twice over), the reading
    client gets every event and stays open, and the broker's RSS stays bounded."""
    broker = await start_broker(
        "limits.write_buffer_bytes=65536",
        "replay.max_bytes=2097152",
        "sse.write_timeout_seconds=60",  # the write deadline must not be what fires here
    )
    n_stalled, n_events, size = 50, 1500, 10_000
    stalled = list(
        await asyncio.gather(*(open_raw(broker, "flood", rcvbuf=4096) for _ in range(n_stalled)))
    )
    got: list[str] = []
    try:
        async with open_stream(broker, "flood") as fast:

            async def read_fast() -> None:
                while len(got) < n_events:
                    event = await fast.next_event(timeout=20)
                    got.append(event.data[:6])

            reader = asyncio.create_task(read_fast())
            await eventually(
                lambda: broker.metric("sse_broker_connections"), lambda v: v == n_stalled + 1
            )
            baseline = rss_bytes(broker.pid)
            peak = baseline
            filler = "x" * (size - 6)
            for start in range(0, n_events, 10):
                pipe = redis_client.pipeline(transaction=False)
                for i in range(start, start + 10):
                    pipe.publish("sse:flood", f"{i:06d}{filler}")
                await pipe.execute()
                peak = max(peak, rss_bytes(broker.pid))
                await asyncio.sleep(0.01)
            async with asyncio.timeout(20):
                await reader
            peak = max(peak, rss_bytes(broker.pid))
            assert got == [f"{i:06d}" for i in range(n_events)]
            assert not fast.closed
            assert await metric0(broker, "sse_broker_slow_consumer_closes_total") == n_stalled
            assert await closed_by(broker, "slow_consumer") == n_stalled
            assert await broker.metric("sse_broker_connections") == 1
            assert await closed_by(broker, "write_timeout") == 0
    finally:
        for sock, _ in stalled:
            sock.close()
    # Unbounded buffering would hold ~15 MB per stalled client (~750 MB here).
    growth = peak - baseline
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"


# -- graceful drain -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_sigterm_drains_spread_over_the_window_refuses_new_streams_and_exits_zero(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    """SIGTERM: /readyz 503 at once, new streams get the retryable refusal (JSON 503
    or, for EventSource, 200 + ``broker.reconnect`` ``drain``), each open stream gets
    ``broker.reconnect`` (``drain``) with a jittered ``retry:``, closes spread over
    shutdown.drain_seconds, then exit 0."""
    drain = 2
    n = 40
    broker = await start_broker(f"shutdown.drain_seconds={drain}", "sse.retry_ms=2000")
    loop = asyncio.get_running_loop()
    closes: list[float] = []
    reconnects: list[dict[str, Any]] = []
    opened = asyncio.Event()
    count = 0

    async def hold() -> None:
        nonlocal count
        async with open_stream(broker, "d") as s:
            count += 1
            if count == n:
                opened.set()
            event = await s.next_event(timeout=drain + 5)
            reconnects.append(
                {"event": event, "block": block_of(s.raw, event.type), "retry": s.parser.retry}
            )
            assert await s.wait_closed(timeout=5)
            closes.append(loop.time())
            assert not s.pending

    holders = [asyncio.create_task(hold()) for _ in range(n)]
    await opened.wait()
    sent = loop.time()
    broker.signal(signal.SIGTERM)

    # readiness 503 at once
    while True:
        status, body = await broker.get("/readyz", timeout=1)
        if status == 503:
            break
        assert loop.time() - sent < 0.5, "readiness still 200 after SIGTERM"
    assert orjson.loads(body)["reason"] == "draining"

    # new streams are refused, retryably
    status, doc, retry_after = await status_of(http, broker.events_url("d"))
    assert (status, doc["error"]) == (503, "draining"), doc
    assert int(retry_after) >= 1
    refusal = await soft_refusal(broker.events_url("d"))
    assert refusal.json()["reason"] == "drain"
    status, _ = await broker.get("/readyz", admin=False)
    assert status == 503
    await eventually(lambda: closed_by(broker, "drain"), lambda v: v >= 1)
    assert await closed_by(broker, "drain") < n, "the closes are not all at once"

    async with asyncio.timeout(drain + 5):
        await asyncio.gather(*holders)
    assert await broker.wait_exit(timeout=5) == 0
    assert loop.time() - sent < drain + 3

    for r in reconnects:
        assert r["event"].type == "broker.reconnect"
        assert r["event"].json()["reason"] == "drain"
        assert int(r["block"]["retry"]) == r["retry"] == r["event"].json()["retry_ms"]
        assert "id" in r["block"]
    retries = [r["retry"] for r in reconnects]
    assert len(set(retries)) > n // 2, "retry: is jittered"
    assert all(1000 <= ms <= 3000 for ms in retries), retries
    # spread over most of the window, never all at once
    offsets = sorted(t - sent for t in closes)
    assert offsets[-1] - offsets[0] >= 0.6 * drain, offsets
    assert offsets[-1] <= drain + 1.5, offsets
    assert max_in_window(offsets, 0.2) <= n // 4, offsets
    log = broker.log_text()
    assert len(re.findall(r"stream closed .*reason=drain", log)) == n


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_second_signal_during_drain_exits_at_once(
    start_broker: StartBroker, second: signal.Signals
) -> None:
    broker = await start_broker("shutdown.drain_seconds=30")
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(open_stream(broker, "d")) for _ in range(40)]
        broker.signal(signal.SIGTERM)
        await broker.wait_not_ready(timeout=2)
        await eventually(lambda: closed_by(broker, "drain"), lambda v: v >= 1)
        assert broker.returncode is None, "the first signal drains, it does not exit"
        sent = loop.time()
        broker.signal(second)
        await broker.wait_exit(timeout=2)
        assert loop.time() - sent < 1.0
        # the drain was cut short: some streams never got their reconnect
        ended = [await s.wait_closed(timeout=2) for s in streams]
        assert all(ended)
        drained = sum(1 for s in streams if b"broker.reconnect" in s.raw)
        assert 1 <= drained < len(streams)
    assert "second signal" in broker.log_text()


# -- reload -----------------------------------------------------------------------------


def reload_config(
    *,
    secret: str,
    grants: list[str],
    max_connections: int,
    level: str,
    extra: str = "",
    max_channels: int = 1,
) -> str:
    return f"""
[auth]
mode = "jwt"
grants = {json.dumps(grants)}
public_channels = ["news"]
query_param = "token"  # SSE_BROKER_AUTH_QUERY_PARAM overrides it, before and after reloads

[auth.jwt]
secret = "{secret}"

[limits]
max_connections = {max_connections}
max_channels_per_connection = {max_channels}

[log]
level = "{level}"
{extra}
"""


async def reload(broker: BrokerProcess, text: str, expect: str) -> str:
    """Rewrite the config file, SIGHUP, and wait for ``expect`` to appear once more in the log."""
    seen = broker.log_text().count(expect)
    broker.write_config(text)
    broker.signal(signal.SIGHUP)
    return await wait_log(broker, expect, count=seen + 1)


async def test_sighup_applies_auth_limits_grants_and_log_level_without_dropping_streams(
    start_broker: StartBroker, redis_client, http: aiohttp.ClientSession
) -> None:
    # The flag wins over the file before and after a reload (env and flags still apply).
    broker = await start_broker(
        "limits.max_channels_per_connection=3",
        env={"SSE_BROKER_AUTH_QUERY_PARAM": "jwt"},
        config_text=reload_config(
            secret=SECRET_A, grants=["news"], max_connections=100, level="info"
        ),
    )
    token_a, token_b = mint(SECRET_A), mint(SECRET_B)
    url = broker.events_url("news", "extra")
    assert (await status_of(http, url, bearer(token_a)))[0] == 403  # "extra" not granted yet
    await publish(redis_client, "nobody-before", "x")  # a debug line, not logged at info

    async with (
        open_stream(broker, "news", headers=bearer(token_a)) as revoked,
        open_stream(broker, "news") as old,  # anonymous: "news" is public
    ):
        await reload(
            broker,
            reload_config(
                secret=SECRET_B, grants=["news", "extra"], max_connections=2, level="debug"
            ),
            "configuration reloaded",
        )
        # the stream whose key was rotated out ends now (issue 10); the other
        # open stream stays and keeps receiving
        event = await revoked.next_event()
        assert (event.type, event.json()["reason"]) == ("broker.reconnect", "revoked")
        await publish(redis_client, "news", "after reload")
        assert (await old.next_event()).data == "after reload"
        # rotated secret: the old token is refused, the new one works; grants widened;
        # two channels still allowed (the --set flag beats the file's 1)
        status, doc, _ = await status_of(http, url, bearer(token_a))
        assert (status, doc["error"]) == (401, "bad_signature"), doc
        # the environment of the start still beats the file: the token is read from ?jwt=
        status, doc, _ = await status_of(http, broker.events_url("news", jwt=token_a))
        assert (status, doc["error"]) == (401, "bad_signature"), doc
        status, doc, _ = await status_of(http, broker.events_url("extra", token=token_b))
        assert (status, doc["error"]) == (401, "credentials_required"), doc
        async with open_stream(broker, "news", "extra", headers=bearer(token_b)) as new:
            # limits.max_connections lowered to 2: a third stream is refused, retryably
            status, doc, retry_after = await status_of(http, url, bearer(token_b))
            assert (status, doc["error"]) == (429, "too_many_connections"), doc
            assert int(retry_after) >= 1
            refusal = await soft_refusal(url, bearer(token_b))
            assert refusal.json()["reason"] == "limit"
            # log level debug
            await publish(redis_client, "nobody-after", "x")
            log = await wait_log(broker, "nobody-after")
            assert re.search(r" DEBUG .*nobody-after", log)
            assert "nobody-before" not in log

            # an invalid file is rejected, naming the key, and the old config stays whole
            bad = reload_config(
                secret=SECRET_A, grants=["news"], max_connections=100, level="info"
            ).replace("max_connections = 100", "max_connections = 100\nwrite_buffer_bytes = 10")
            log = await reload(broker, bad, "new configuration rejected")
            rejected = [line for line in log.splitlines() if "rejected" in line]
            assert " ERROR " in rejected[-1] and "limits.write_buffer_bytes" in rejected[-1]
            assert (await status_of(http, url, bearer(token_a)))[0] == 401
            assert (await status_of(http, url, bearer(token_b)))[0] == 429
            await publish(redis_client, "news", "after rejected reload")
            assert (await old.next_event()).data == "after rejected reload"
            assert (await new.next_event()).data == "after rejected reload"

            # keys a running process cannot change: kept, and the log says a restart is needed
            restart = reload_config(
                secret=SECRET_B,
                grants=["news", "extra"],
                max_connections=2,
                level="debug",
                extra='\n[ingest]\nprefix = "other:"\n\n[sse]\nheartbeat_seconds = 7\n\n'
                '[server]\npath = "/stream"\n',
            )
            log = await reload(broker, restart, "need a restart")
            warning = [line for line in log.splitlines() if "need a restart" in line][-1]
            assert " WARNING " in warning
            for key in ("ingest.prefix", "sse.heartbeat_seconds", "server.path"):
                assert key in warning
            await publish(redis_client, "news", "old prefix still read")
            assert (await old.next_event()).data == "old prefix still read"
            assert (await new.next_event()).data == "old prefix still read"
        assert not old.closed
    assert broker.returncode is None
    assert await closed_by(broker, "client_closed") == 2


# -- dead peers -----------------------------------------------------------------------------


async def flood_until(
    broker: BrokerProcess,
    redis_client: Any,
    reading: SSEStream,
    channel: str,
    stop: Callable[[], Any],
    *,
    batch: int = 40,
    size: int = 4000,
    timeout: float = 20,
) -> int:
    """Publish ``batch`` events of ``size`` bytes at a time, the ``reading`` client taking
    each batch, until ``await stop()`` is true; returns how many were published."""
    payload = "y" * size
    sent = 0
    async with asyncio.timeout(timeout):
        while not await stop():
            pipe = redis_client.pipeline(transaction=False)
            for _ in range(batch):
                pipe.publish(f"sse:{channel}", payload)
            await pipe.execute()
            sent += batch
            assert len(await reading.events(batch, timeout=5)) == batch
            await asyncio.sleep(0.03)
    return sent


@pytest.mark.slow
async def test_client_whose_unsent_bytes_never_drain_is_closed_by_the_write_deadline(
    start_broker: StartBroker, redis_client
) -> None:
    """A client reading a trickle (so its TCP window never stays shut: the kernel has
    nothing to time out) under a flood: its unsent bytes never reach the (huge)
    limits.write_buffer_bytes, they just never drain; after
    sse.write_timeout_seconds, checked on the heartbeat visits, it is closed as
    ``write_timeout``. A client reading everything is untouched."""
    timeout = 2
    broker = await start_broker(
        f"sse.write_timeout_seconds={timeout}",
        "sse.heartbeat_seconds=1",
        "limits.write_buffer_bytes=268435456",
        "replay.max_bytes=4194304",
    )
    loop = asyncio.get_running_loop()
    sock, _ = await open_raw(broker, "slowly", rcvbuf=4096)
    trickled = 0

    async def trickle() -> None:
        nonlocal trickled
        with contextlib.suppress(ConnectionError):
            while chunk := await loop.sock_recv(sock, 2048):
                trickled += len(chunk)
                await asyncio.sleep(0.05)

    trickler = asyncio.create_task(trickle())
    try:
        async with open_stream(broker, "slowly") as reading:
            started = loop.time()
            sent = await flood_until(
                broker,
                redis_client,
                reading,
                "slowly",
                lambda: closed_by(broker, "write_timeout"),
            )
            assert loop.time() - started >= timeout
            assert not reading.closed
            await publish(redis_client, "slowly", "still here")
            assert (await reading.next_event()).data == "still here"
            assert await broker.metric("sse_broker_connections") == 1
            assert await closed_by(broker, "write_timeout") == 1
            assert await closed_by(broker, "client_closed") == 0
            assert await closed_by(broker, "slow_consumer") == 0
            assert await metric0(broker, "sse_broker_slow_consumer_closes_total") == 0
    finally:
        trickler.cancel()
        sock.close()
    assert 0 < trickled < sent * 4000, "the trickling client was far behind"
    assert re.search(r"stream closed .*reason=write_timeout", broker.log_text())


@pytest.mark.slow
async def test_client_that_stops_reading_is_reclaimed_after_the_write_timeout(
    start_broker: StartBroker, redis_client
) -> None:
    """A client that stops reading entirely while data is pending (window shut) is
    closed within about sse.write_timeout_seconds, by the write deadline or by the
    kernel's TCP_USER_TIMEOUT (same value), whichever comes first; never held open,
    never taken for a slow consumer (its bytes stay under the limit)."""
    timeout = 2
    broker = await start_broker(
        f"sse.write_timeout_seconds={timeout}",
        "sse.heartbeat_seconds=1",
        "limits.write_buffer_bytes=268435456",
        "replay.max_bytes=4194304",
    )
    loop = asyncio.get_running_loop()
    sock, _ = await open_raw(broker, "stop", rcvbuf=4096)
    try:
        async with open_stream(broker, "stop") as reading:
            started = loop.time()

            async def gone() -> bool:
                return await broker.metric("sse_broker_connections") == 1

            await flood_until(broker, redis_client, reading, "stop", gone, batch=10)
            closed_after = loop.time() - started
            assert timeout <= closed_after <= timeout + 1 + 3, closed_after
            assert not reading.closed
            dead = await closed_by(broker, "write_timeout") + await closed_by(
                broker, "client_closed"
            )
            assert dead == 1
            assert await closed_by(broker, "slow_consumer") == 0
    finally:
        sock.close()


def ss_lines(*filters: str) -> list[str]:
    """``ss -tnoie state established <filters>``, one joined line per socket."""
    out = subprocess.run(
        ["ss", "-tnoie", "state", "established", *filters],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = out.splitlines()[1:]  # header
    joined: list[str] = []
    for line in lines:
        if line[:1].isspace() and joined:
            joined[-1] += " " + line.strip()
        else:
            joined.append(line.strip())
    return joined


def socket_of_process(pid: int, inode: int) -> socket.socket:
    """A duplicate of process ``pid``'s socket with inode ``inode`` (pidfd_getfd(2))."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target == f"socket:[{inode}]":
            break
    else:
        raise AssertionError(f"pid {pid} holds no socket with inode {inode}")
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(438, pidfd, int(name), 0)  # SYS_pidfd_getfd
        if fd < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd failed")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=fd)


async def test_accepted_sockets_have_keepalive_and_tcp_user_timeout(
    start_broker: StartBroker,
) -> None:
    """The broker's side of a stream: keepalive armed (``ss`` shows its timer) and
    TCP_USER_TIMEOUT = sse.write_timeout_seconds, read off the broker's own socket."""
    if shutil.which("ss") is None:
        pytest.fail("iproute2's ss is not installed (apt-get install iproute2)", pytrace=False)
    broker = await start_broker("sse.write_timeout_seconds=5", "sse.heartbeat_seconds=60")
    _, port = host_port(broker)
    async with open_stream(broker, "ka") as s:
        client_port = s.response.connection.transport.get_extra_info("sockname")[1]
        # idle (the preamble acknowledged): the keepalive timer runs
        lines = await eventually(
            lambda: asyncio.sleep(0, ss_lines(f"( sport = :{port} and dport = :{client_port} )")),
            lambda lines: len(lines) == 1 and "timer:(keepalive," in lines[0],
        )
        timer = re.search(r"timer:\(keepalive,([\d.]+)(m?s|sec|min)?,\d+\)", lines[0])
        assert timer, lines[0]
        assert float(timer.group(1)) <= 5
        inode = int(re.search(r"ino:(\d+)", lines[0]).group(1))
        dup = socket_of_process(broker.pid, inode)
        with dup:
            assert dup.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
            assert dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) >= 1
            assert dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 5000
        assert not s.closed


@contextlib.contextmanager
def dropped(port: int) -> Any:
    """iptables: every loopback packet to or from ``port`` vanishes (a peer gone mid-air)."""
    rules = [
        ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
        ["INPUT", "-i", "lo", "-p", "tcp", "--sport", str(port), "-j", "DROP"],
    ]
    added = []
    try:
        for rule in rules:
            subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)


def iptables_usable() -> bool:
    if shutil.which("iptables") is None:
        pytest.fail("iptables is not installed (apt-get install iptables)", pytrace=False)
    probe = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
async def test_half_open_connection_is_reclaimed(start_broker: StartBroker) -> None:
    """A peer that vanishes without a FIN or RST (iptables DROP both ways on its port):
    the broker's heartbeats stay unacknowledged in the kernel, never in its own
    buffer, so only TCP_USER_TIMEOUT can tell; the stream is gone within a few
    seconds instead of TCP's default ~15 minutes of retransmissions."""
    if not iptables_usable():
        # Installed but refused: the machine withholds netfilter (no CAP_NET_ADMIN),
        # which no install can fix. The write deadline and the socket options
        # tests above still cover dead peers there.
        pytest.skip("iptables is installed but not permitted here (needs CAP_NET_ADMIN)")
    timeout = 2
    broker = await start_broker(f"sse.write_timeout_seconds={timeout}", "sse.heartbeat_seconds=1")
    _, port = host_port(broker)
    loop = asyncio.get_running_loop()
    async with open_stream(broker, "gone") as s, open_stream(broker, "alive") as alive:
        client_port = s.response.connection.transport.get_extra_info("sockname")[1]
        with dropped(client_port):
            cut = loop.time()
            await eventually(
                lambda: broker.metric("sse_broker_connections"), lambda v: v == 1, timeout=15
            )
            reclaimed_after = loop.time() - cut
            assert not ss_lines(f"( sport = :{port} and dport = :{client_port} )")
        assert reclaimed_after <= timeout + 1 + 4, reclaimed_after
        assert await alive.wait_comment(timeout=3) is not None  # the other stream lives on
        assert not alive.closed
    assert await closed_by(broker, "write_timeout") == 0, "the kernel noticed, not the deadline"
    assert re.search(r"stream closed .*channels=1 .*reason=", broker.log_text())


# -- metrics and logs -----------------------------------------------------------------------------


def families(exposition: str) -> dict[str, str]:
    """``# TYPE`` lines: family name -> type. A counter's family is listed under
    both spellings (prometheus-client names it with or without ``_total``)."""
    types: dict[str, str] = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE ") and len(parts := line.split()) == 4:
            types[parts[2]] = parts[3]
            if parts[3] == "counter":
                types[parts[2].removesuffix("_total")] = "counter"
                types[parts[2].removesuffix("_total") + "_total"] = "counter"
    return types


async def test_metric_types_json_logs_one_line_per_stream_none_per_event_no_tokens(
    start_broker: StartBroker, redis_client, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker(
        "auth.mode=jwt",
        f"auth.jwt.secret={SECRET_A}",
        "auth.grants=['m']",
        "log.format=json",
        "log.level=debug",
    )
    query_token = mint(SECRET_A, sub="query-user")
    cookie_token = mint(SECRET_A, sub="cookie-user")
    header_token = mint(SECRET_A, sub="header-user")
    bad_token = mint(SECRET_B, sub="mallory")
    expired_token = mint(SECRET_A, ttl=-3600)

    for token in (bad_token, expired_token):
        status, _, _ = await status_of(http, broker.events_url("m", token=token))
        assert status == 401
    status, _, _ = await status_of(
        http, broker.events_url("m"), {"Cookie": f"sse_token={bad_token}"}
    )
    assert status == 401

    n_events = 1000
    async with contextlib.AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(open_stream(broker, "m", token=query_token)),
            await stack.enter_async_context(open_stream(broker, "m", token=query_token)),
            await stack.enter_async_context(
                open_stream(broker, "m", headers={"Cookie": f"sse_token={cookie_token}"})
            ),
            await stack.enter_async_context(open_stream(broker, "m", headers=bearer(header_token))),
        ]
        lines_before = len(broker.log_text().splitlines())
        pipe = redis_client.pipeline(transaction=False)
        for i in range(n_events):
            pipe.publish("sse:m", str(i))
        await pipe.execute()
        for s in streams:
            assert [e.data for e in await s.events(n_events, timeout=15)] == [
                str(i) for i in range(n_events)
            ]
        assert len(broker.log_text().splitlines()) - lines_before < 20, "no log line per event"
        await publish(redis_client, "nobody", "x")  # a debug line: no stream on that channel
        exposition = await broker.metrics()
    await eventually(lambda: broker.metric("sse_broker_connections"), lambda v: v == 0)
    await wait_log(broker, "stream closed", count=len(streams))
    # The fence: one more event on a channel without streams. Its debug line comes
    # after the "nobody" one (one ingest, in order) and after the close lines already
    # seen; a second close line for a stream would have come with its first.
    await publish(redis_client, "fence", "x")
    log = await wait_log(broker, "channel 'fence' matches no open stream")

    # every line is one JSON object with ts/level/logger/msg
    entries = [orjson.loads(line) for line in log.splitlines()]
    for entry in entries:
        assert isinstance(entry["ts"], float | int) and entry["ts"] > 1e9
        assert entry["level"] in {"debug", "info", "warning", "error", "critical"}
        assert isinstance(entry["logger"], str) and entry["logger"]
        assert isinstance(entry["msg"], str)
    assert any(e["level"] == "debug" and "nobody" in e["msg"] for e in entries)
    # exactly one line per stream at close, with its facts
    closes = [e["msg"] for e in entries if e["msg"].startswith("stream closed")]
    assert len(closes) == len(streams), closes
    assert sum("user=query-user" in c for c in closes) == 2
    assert sum("user=cookie-user" in c for c in closes) == 1
    for c in closes:
        facts = re.search(r"duration=\d+\.\ds frames=(\d+) bytes=(\d+) reason=client_closed", c)
        assert facts, c
        # the 1,000 events (the count includes a few position/heartbeat frames)
        assert 1000 <= int(facts[1]) <= 1005 and int(facts[2]) > 1000 * 10, c
    # never a token, nor the signature of one, nor the secret
    for token in (query_token, cookie_token, header_token, bad_token, expired_token):
        assert token not in log
        assert token.rsplit(".", 1)[1] not in log
    assert SECRET_A not in log

    # types: counters end in _total, the latency histogram is in seconds, gauges
    types = families(exposition)
    samples = [
        line.split("{")[0].split()[0]
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    ]
    for name in samples:
        if name.endswith("_total"):
            assert types.get(name) == "counter", name
        assert name.startswith("sse_broker_"), name
    expected = {
        "sse_broker_connections": "gauge",
        "sse_broker_subscriptions": "gauge",
        "sse_broker_redis_connected": "gauge",
        "sse_broker_ingest_stalled": "gauge",
        "sse_broker_connections_opened": "counter",
        "sse_broker_connections_closed": "counter",
        "sse_broker_events_ingested": "counter",
        "sse_broker_events_delivered": "counter",
        "sse_broker_events_rejected": "counter",
        "sse_broker_bytes_sent": "counter",
        "sse_broker_replays_served": "counter",
        "sse_broker_resets": "counter",
        "sse_broker_slow_consumer_closes": "counter",
        "sse_broker_auth_failures": "counter",
        "sse_broker_redis_reconnects": "counter",
        "sse_broker_publish_to_write_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert types.get(name) == kind, (name, types.get(name))
    auth_backend = [n for n in types if n.startswith("sse_broker_auth_backend")]
    assert auth_backend, "auth backend calls and latency are exported"
    buckets = re.findall(r'sse_broker_publish_to_write_seconds_bucket\{le="([^"]+)"\}', exposition)
    bounds = [float(b) for b in buckets]
    assert bounds[-1] == float("inf") and bounds == sorted(bounds)
    assert 0.0005 <= bounds[0] <= 0.01 and 0.5 <= bounds[-2] <= 60, "bucket bounds in seconds"
    count = float(re.search(r"sse_broker_publish_to_write_seconds_count (\S+)", exposition)[1])
    total = float(re.search(r"sse_broker_publish_to_write_seconds_sum (\S+)", exposition)[1])
    assert count >= 1 and total / count < 1.0, (count, total)

    after = await broker.metrics()
    assert re.search(r'sse_broker_connections_closed_total\{reason="client_closed"\} 4', after)
    assert await metric0(broker, "sse_broker_connections_opened_total") == len(streams)
    assert await metric0(broker, "sse_broker_auth_failures_total") == 3
    assert await metric0(broker, "sse_broker_events_delivered_total") == n_events * len(streams)
