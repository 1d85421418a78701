"""Clients that never finish a request: the header deadline, idle keep-alive, and
the cap on connections per address that are not streams yet (``broker/guard.py``).

Real broker processes and raw sockets bound to loopback source addresses:
127.0.0.2 is the attacker, 127.0.0.3 a normal client (Linux routes all of
127/8 on ``lo``). The flood runs in a separate process, so the normal client's
latencies are measured by an event loop the attack does not load. Short
settings keep it quick: ``server.header_timeout_seconds = 2``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import resource
import shutil
import socket
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from conftest import REPO_ROOT, BrokerProcess, StartBroker
from helpers import eventually, publish
from sse_client import SSEClient

from broker.config import Config, LimitsConfig
from broker.guard import Guard, GuardedRunner, admitted
from broker.metrics import Stats

ATTACKER = "127.0.0.2"
CLIENT = "127.0.0.3"
OTHER = "127.0.0.4"
TIMEOUT = 2  # server.header_timeout_seconds in these tests
MARGIN = 1.5  # seconds of slack on a 2-core machine running broker, clients and Redis
AT_ONCE = 0.5  # a refusal closes the socket within this (a held one lives TIMEOUT)
PARTIAL = b"GET /events?channel=flood HTTP/1.1\r\nHost: broker\r\nX-Slow: "


@pytest.fixture(autouse=True)
def enough_files() -> None:
    """Thousands of sockets on each side: the soft file limit up to the hard one
    (the brokers spawned by the test inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == resource.RLIM_INFINITY or soft >= 4500, f"open-file limit {soft}"


def host_port(broker: BrokerProcess) -> tuple[str, int]:
    assert broker.url is not None
    host, _, port = broker.url.removeprefix("http://").rpartition(":")
    return host, int(port)


def admin_host_port(broker: BrokerProcess) -> tuple[str, int]:
    assert broker.admin_url is not None
    host, _, port = broker.admin_url.removeprefix("http://").rpartition(":")
    return host, int(port)


# -- raw sockets -----------------------------------------------------------------------


async def connect(
    address: tuple[str, int] | str, source: str | None = None, send: bytes = b""
) -> socket.socket:
    """A connected non-blocking socket (from ``source``, or a Unix socket path) that
    sent ``send`` and nothing more: a request whose headers never complete."""
    loop = asyncio.get_running_loop()
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if source is not None:
            sock.bind((source, 0))
        await loop.sock_connect(sock, address)
        if send:
            await loop.sock_sendall(sock, send)
    except BaseException:
        sock.close()
        raise
    return sock


async def closed_after(sock: socket.socket, within: float) -> float | None:
    """Seconds until the broker closed ``sock`` (EOF or reset), None if it is still
    open after ``within``. Whatever the broker sends before closing is skipped."""
    loop = asyncio.get_running_loop()
    begin = loop.time()
    try:
        async with asyncio.timeout(within):
            while await loop.sock_recv(sock, 65536):
                pass
    except TimeoutError:
        return None
    except OSError:  # reset
        pass
    return loop.time() - begin


async def split_held_refused(
    socks: list[socket.socket], within: float = AT_ONCE
) -> tuple[list[socket.socket], int]:
    """(the sockets still open after ``within``, how many the broker closed by then)."""
    waits = await asyncio.gather(*(closed_after(s, within) for s in socks))
    held = [s for s, w in zip(socks, waits, strict=True) if w is None]
    return held, len(socks) - len(held)


@contextlib.contextmanager
def closing_all(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def open_pending(
    address: tuple[str, int] | str, source: str | None, n: int
) -> list[socket.socket]:
    """``n`` sockets that each sent half a request line, opened one after another."""
    return [await connect(address, source, PARTIAL[:10]) for _ in range(n)]


# -- the normal client's latency ----------------------------------------------------------


async def connect_and_first_event(
    broker: BrokerProcess, redis: aioredis.Redis, channel: str
) -> float:
    """From ``connect()`` (from CLIENT) to the first published event read off the stream."""
    loop = asyncio.get_running_loop()
    host, port = host_port(broker)
    begin = loop.time()
    reader, writer = await asyncio.open_connection(host, port, local_addr=(CLIENT, 0))
    try:
        async with asyncio.timeout(10):
            writer.write(
                f"GET /events?channel={channel} HTTP/1.0\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            got = b""
            while b": ok\n" not in got:  # the preamble: the stream is registered
                chunk = await reader.read(65536)
                assert chunk, f"stream closed before its preamble: {got!r}"
                got += chunk
            assert got.startswith(b"HTTP/1.0 200"), got[:200]
            await publish(redis, channel, "ping")
            while b"\ndata: ping\n" not in got:
                chunk = await reader.read(65536)
                assert chunk, f"stream closed before its event: {got!r}"
                got += chunk
        return loop.time() - begin
    finally:
        writer.close()


async def latencies(
    broker: BrokerProcess, redis: aioredis.Redis, phase: str, n: int, every: float
) -> list[float]:
    """``n`` samples, one started every ``every`` seconds (or right after the previous)."""
    loop = asyncio.get_running_loop()
    begin = loop.time()
    samples = []
    for i in range(n):
        await asyncio.sleep(max(0.0, begin + i * every - loop.time()))
        samples.append(await connect_and_first_event(broker, redis, f"lat-{phase}-{i}"))
    return samples


def p99(samples: list[float]) -> float:
    """Nearest rank: with 200 samples the third largest."""
    return sorted(samples)[math.ceil(0.99 * len(samples)) - 1]


# The flood, in its own process (plain selectors: the attacker's own CPU must not
# be what slows the normal client down on a 2-core machine): ``count`` sockets from
# ``source`` opened evenly over ``spread`` seconds, each sending a request byte by
# byte (one every ``trickle`` seconds) until the broker closes it. Prints "ready",
# then one JSON object: per socket the seconds from its connect to the broker's
# close (null: still open at the end, ``wait`` seconds after the last connect).
FLOOD = r"""
import heapq, json, resource, selectors, socket, sys, time
host, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
count, spread, trickle, wait = int(sys.argv[4]), *map(float, sys.argv[5:8])
partial = sys.argv[8].encode()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
socks, opened, sent, closed_after, errors = {}, {}, {}, [None] * count, []
sends = []  # heap of (when, socket index)

def send_next(i, now):
    byte = partial[sent[i]:sent[i] + 1] or b"a"
    try:
        socks[i].send(byte)
    except OSError:
        return  # reset: the read side reports it
    sent[i] += 1
    heapq.heappush(sends, (now + trickle, i))

def close(i, now):
    closed_after[i] = now - opened[i]
    sel.unregister(socks[i])
    socks.pop(i).close()

print("ready", flush=True)
begin = time.monotonic()
end = begin + spread + wait
started = 0
while True:
    now = time.monotonic()
    if now >= end or (started == count and not socks):
        break
    while started < count and begin + started * spread / count <= now:
        i, started = started, started + 1
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(5)
        try:
            sock.connect((host, port))
        except OSError as exc:
            errors.append(repr(exc))
            sock.close()
            continue
        sock.setblocking(False)
        socks[i], opened[i], sent[i] = sock, time.monotonic(), 0
        sel.register(sock, selectors.EVENT_READ, i)
        send_next(i, now)
    while sends and sends[0][0] <= now:
        _, i = heapq.heappop(sends)
        if i in socks:
            send_next(i, now)
    wake = min(end, sends[0][0] if sends else end)
    if started < count:
        wake = min(wake, begin + started * spread / count)
    for key, _ in sel.select(max(0.0, wake - time.monotonic())):
        i = key.data
        try:
            data = socks[i].recv(4096)
        except OSError:
            data = b""
        if not data:
            close(i, time.monotonic())
for sock in socks.values():
    sock.close()
print(json.dumps({"closed_after": closed_after, "connect_errors": errors}), flush=True)
"""


@contextlib.asynccontextmanager
async def flood(
    broker: BrokerProcess, count: int, spread: float, trickle: float, wait: float
) -> AsyncIterator[asyncio.subprocess.Process]:
    host, port = host_port(broker)
    args = [host, str(port), ATTACKER, str(count), str(spread), str(trickle), str(wait)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FLOOD,
        *args,
        PARTIAL.decode(),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"ready\n"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def flood_round(
    broker: BrokerProcess, redis: aioredis.Redis, cap: int, tag: str
) -> tuple[list[float], list[float]]:
    """One flood of 2,000 slow-header sockets from ATTACKER, checked: (the normal
    client's latencies without it, with it). The baseline brackets the flood
    (before and after it), so load that comes and goes on the machine falls on
    both sides of the comparison alike."""
    n, every = 200, 0.01  # 2 s of samples, as long as the flood's spread
    baseline = await latencies(broker, redis, f"{tag}-before", n // 2, every)
    count, spread = 2000, n * every
    async with flood(broker, count, spread, trickle=0.25, wait=TIMEOUT + MARGIN) as proc:
        attacked = await latencies(broker, redis, f"{tag}-flood", n, every)
        assert proc.stdout is not None
        out = json.loads(await asyncio.wait_for(proc.stdout.read(), spread + TIMEOUT + 15))
    baseline += await latencies(broker, redis, f"{tag}-after", n // 2, every)
    assert not out["connect_errors"], out["connect_errors"][:5]
    closes = out["closed_after"]
    still_open = [c for c in closes if c is None]
    assert not still_open, f"{len(still_open)} of {count} flood sockets still open"
    assert max(closes) <= TIMEOUT + MARGIN, sorted(closes)[-5:]
    by_deadline = [c for c in closes if c >= TIMEOUT - 0.5]
    assert len(by_deadline) >= cap, (len(by_deadline), "held until the header deadline")
    assert len(closes) - len(by_deadline) >= count - 3 * cap, "the rest refused at once"
    return baseline, attacked


# -- the tests ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_slow_header_flood_from_one_address_is_closed_in_time_and_others_stream_unhurt(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    """2,000 sockets from one address trickling a request line byte by byte: every
    one is closed within the header timeout (most at once, over the pending cap),
    while a client on another address connects and gets its first event with a
    p99 at most twice its p99 without the flood, measured in the same run."""
    cap = 64
    broker = await start_broker(
        f"server.header_timeout_seconds={TIMEOUT}",
        f"limits.max_pending_connections_per_ip={cap}",
    )
    await connect_and_first_event(broker, redis_client, "warm-up")
    # A shared 2-core machine hiccups now and then: the best of three rounds, each
    # with its own baseline, is what the broker did (as in test_resume_bounds.py).
    rounds: list[tuple[float, float]] = []
    for r in range(3):
        baseline, attacked = await flood_round(broker, redis_client, cap, f"r{r}")
        base, under = p99(baseline), p99(attacked)
        rounds.append((base, under))
        print(
            f"connect + first event: p50 {statistics.median(baseline) * 1e3:.2f} ms alone, "
            f"{statistics.median(attacked) * 1e3:.2f} ms flooded; "
            f"p99 {base * 1e3:.2f} ms alone, {under * 1e3:.2f} ms flooded"
        )
        if under <= 2 * base:
            break
    figures = [f"{u * 1e3:.1f} ms vs {b * 1e3:.1f} ms" for b, u in rounds]
    assert under <= 2 * base, f"p99 flooded vs alone: {figures}"

    # Nothing is left counted against the attacker: exactly `cap` pending again.
    address = host_port(broker)
    with closing_all(await open_pending(address, ATTACKER, cap)) as socks:
        # all of them (and nothing else) pending at the broker before the one too many
        await eventually(
            lambda: broker.metric("sse_broker_pending_connections"), lambda n: n == cap
        )
        extra = await connect(address, ATTACKER, PARTIAL[:10])
        with closing_all([extra]):
            held, refused = await split_held_refused([*socks, extra])
        assert refused == 1 and extra not in held, (len(held), refused)


@pytest.mark.slow
async def test_idle_keep_alive_and_a_trickled_next_request_are_closed_after_the_timeout(
    start_broker: StartBroker,
) -> None:
    """After a /healthz answer a keep-alive connection that sends nothing, or starts
    its next request and never finishes it, is closed about ``header_timeout`` later;
    the admin listener closes a half-sent request as well."""
    broker = await start_broker(f"server.header_timeout_seconds={TIMEOUT}")
    address = host_port(broker)
    loop = asyncio.get_running_loop()

    async def after_healthz(then: bytes) -> float | None:
        sock = await connect(address, CLIENT, b"GET /healthz HTTP/1.1\r\nHost: b\r\n\r\n")
        with closing_all([sock]):
            got = b""
            while not got.endswith(b"}"):
                chunk = await loop.sock_recv(sock, 4096)
                assert chunk, got
                got += chunk
            assert got.startswith(b"HTTP/1.1 200"), got
            answered = loop.time()
            for byte in then:  # a byte every 0.3 s: the headers never complete in time
                await loop.sock_sendall(sock, bytes([byte]))
                if await closed_after(sock, 0.3) is not None:
                    return loop.time() - answered
            gone = await closed_after(sock, TIMEOUT + MARGIN + 5)
            return None if gone is None else loop.time() - answered

    async def admin_half_request() -> float | None:
        sock = await connect(admin_host_port(broker), CLIENT, b"GET /metrics HTTP/1.1\r\nHo")
        with closing_all([sock]):
            return await closed_after(sock, TIMEOUT + MARGIN + 5)

    idle, trickled, admin = await asyncio.gather(
        after_healthz(b""),
        after_healthz(b"GET /healthz HTTP/1.1\r\nHost: b\r\n"),
        admin_half_request(),
    )
    for what, took in (("idle", idle), ("trickled", trickled), ("admin", admin)):
        assert took is not None, f"{what} connection still open"
        assert TIMEOUT - 0.5 <= took <= TIMEOUT + MARGIN, (what, took)


@pytest.mark.slow
async def test_pending_cap_closes_the_excess_from_one_address_while_another_connects(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    """Over ``limits.max_pending_connections_per_ip`` one address's new connections
    are closed at once; another address still streams and has its own allowance;
    a connection the client closes gives its place back."""
    cap = 10
    broker = await start_broker(
        "server.header_timeout_seconds=6", f"limits.max_pending_connections_per_ip={cap}"
    )
    address = host_port(broker)
    with closing_all(await open_pending(address, ATTACKER, 3 * cap)) as flood_socks:
        held, refused = await split_held_refused(flood_socks)
        assert (len(held), refused) == (cap, 2 * cap)

        latency = await connect_and_first_event(broker, redis_client, "meanwhile")
        assert latency < 2
        with closing_all(await open_pending(address, CLIENT, cap + 1)) as others:
            held_others, refused_others = await split_held_refused(others)
            assert (len(held_others), refused_others) == (cap, 1)

        for sock in held[:4]:  # the client gives up on four
            sock.close()
        # the broker saw them go (and the other address's, closed above)
        await eventually(
            lambda: broker.metric("sse_broker_pending_connections"), lambda n: n == cap - 4
        )
        with closing_all(await open_pending(address, ATTACKER, 5)) as again:
            held_again, refused_again = await split_held_refused(again)
            assert (len(held_again), refused_again) == (4, 1)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for a Unix socket path (tmp_path can pass the 107-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="sse-slow-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("peer", ["trusted proxy", "unix socket"])
async def test_trusted_proxies_and_unix_socket_peers_are_exempt_from_the_cap(
    peer: str, start_broker: StartBroker, short_dir: Path
) -> None:
    """Behind a proxy every client arrives from it: 100 pending connections from a
    peer in ``server.trusted_proxies`` (or on a Unix socket) all stay while the cap
    is 10 — until the header deadline closes them; an untrusted address is capped."""
    cap = 10
    sets = [
        f"server.header_timeout_seconds={TIMEOUT}",
        f"limits.max_pending_connections_per_ip={cap}",
    ]
    target: tuple[str, int] | str
    source: str | None
    if peer == "unix socket":
        target, source = str(short_dir / "b.sock"), None
        broker = await start_broker(*sets, f"server.listen=unix:{target}")
    else:
        broker = await start_broker(*sets, 'server.trusted_proxies=["127.0.0.1"]')
        target, source = host_port(broker), "127.0.0.1"
    loop = asyncio.get_running_loop()
    with closing_all(await open_pending(target, source, 100)) as socks:
        opened = loop.time()
        held, refused = await split_held_refused(socks, 1.0)
        assert (len(held), refused) == (100, 0)
        if peer == "trusted proxy":
            with closing_all(await open_pending(target, ATTACKER, cap + 5)) as capped:
                held_capped, refused_capped = await split_held_refused(capped)
                assert (len(held_capped), refused_capped) == (cap, 5)
        left = TIMEOUT + MARGIN - (loop.time() - opened)
        _, closed = await split_held_refused(socks, max(left, 0.1))
        assert closed == 100, "the header deadline applies to exempt peers too"


@pytest.mark.slow
async def test_streams_stop_counting_as_pending_once_admitted(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    """A stream is no longer a pending connection: an address holds more streams
    than the pending cap, and still has its whole pending allowance."""
    cap = 3
    broker = await start_broker(
        f"server.header_timeout_seconds={TIMEOUT}", f"limits.max_pending_connections_per_ip={cap}"
    )
    connector = aiohttp.TCPConnector(local_addr=(CLIENT, 0), limit=0)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        contextlib.AsyncExitStack() as stack,
    ):
        for i in range(2 * cap):
            s = await stack.enter_async_context(
                SSEClient.connect(broker.events_url(f"many-{i}"), session=session)
            )
            assert s.status == 200
            await s.wait_for(lambda st: "ok" in st.parser.comments, what="the preamble")
        with closing_all(await open_pending(host_port(broker), CLIENT, cap + 1)) as socks:
            held, refused = await split_held_refused(socks)
            assert (len(held), refused) == (cap, 1)


# -- the guard in process: what it counts ----------------------------------------------------


@pytest.mark.slow
async def test_guard_counts_return_to_zero_and_follow_a_reload() -> None:
    """In process, on a stand-in app: admitted connections and closed ones give
    their count back (the table ends empty), the counters count, and a new cap
    applies from the next connection."""
    policy = SimpleNamespace(
        cfg=Config(limits=LimitsConfig(max_pending_connections_per_ip=2)),
        trusted=(),
        stats=Stats(),
    )
    guard = Guard(1, policy)  # type: ignore[arg-type]

    async def stream(request: web.Request) -> web.StreamResponse:
        admitted(request)
        resp = web.StreamResponse()
        resp.force_close()
        await resp.prepare(request)
        await resp.write(b"ok\n")
        await asyncio.sleep(30)
        return resp

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="plain")

    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/plain", plain)
    runner = GuardedRunner(app, guard, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    address = ("127.0.0.1", runner.addresses[0][1])
    loop = asyncio.get_running_loop()
    try:
        pending = await open_pending(address, ATTACKER, 3)
        held, refused = await split_held_refused(pending)
        assert (len(held), refused) == (2, 1)
        assert guard.pending == {ATTACKER: 2} and guard.refused_pending == 1
        assert policy.stats.requests_refused["pending_per_ip"] == 1  # the metric

        streams = []  # one after another, each admitted before the next connects
        for _ in range(3):
            sock = await connect(address, OTHER, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while b"ok\n" not in got:
                got += await loop.sock_recv(sock, 4096)
            streams.append(sock)
        assert guard.pending == {ATTACKER: 2}

        plain = await connect(address, OTHER, b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"plain" in await loop.sock_recv(plain, 4096)
        assert guard.pending == {ATTACKER: 2, OTHER: 1}  # answered, not a stream

        policy.cfg = Config(limits=LimitsConfig(max_pending_connections_per_ip=0))
        with closing_all(await open_pending(address, ATTACKER, 5)) as unlimited:
            held_now, refused_now = await split_held_refused(unlimited, 0.2)
            assert (len(held_now), refused_now) == (5, 0)
            assert guard.pending == {ATTACKER: 2, OTHER: 1}  # uncounted under "unlimited"

        for sock in [*held, plain]:
            assert await closed_after(sock, 2) is not None  # the header deadline / keep-alive
        for sock in [*pending, *streams, plain]:
            sock.close()
        await eventually(lambda: asyncio.sleep(0, guard.pending), lambda p: p == {}, timeout=2)
        assert guard.closed_slow_headers == 2
    finally:
        await runner.cleanup()
