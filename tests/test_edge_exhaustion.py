"""No client can make the broker keep what it should let go (issue 11, findings 1 and 3).

Attacks against real broker processes: a ``Last-Event-ID`` no int() can
parse, a thousand requests failing in every way at once, and concurrent
requests racing past the connection limits while auth or a catch-up awaits.
What must hold: every request gets a clear answer, the log shows no
traceback, and once the clients are gone no index, heap, counter or gauge
holds anything and the process has not grown.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from conftest import BrokerProcess, StartBroker
from helpers import eventually, get, serve, stream
from sse_client import SSEClient, SSEStreamClosed
from test_lifecycle import rss_bytes

# What an idle broker holds once every client is gone.
EMPTY = {
    "sse_broker_connections": 0,
    "sse_broker_subscriptions": 0,
    "sse_broker_admission_slots": 0,
    "sse_broker_deadline_entries": 0,
    "sse_broker_catch_up_waiters": 0,
}


async def holdings(broker: BrokerProcess) -> dict[str, float | None]:
    return {name: await broker.metric(name) for name in EMPTY}


async def assert_holds_nothing(broker: BrokerProcess) -> None:
    await eventually(lambda: holdings(broker), lambda h: h == EMPTY, timeout=10)
    assert "Traceback" not in broker.log_text()


# -- finding 1: a Last-Event-ID no int() can parse ----------------------------------------


@pytest.mark.parametrize("mode", ["pubsub", "stream"])
async def test_a_five_thousand_digit_last_event_id_is_a_reset_not_a_traceback_or_a_leak(
    start_broker: StartBroker, mode: str
) -> None:
    broker = await start_broker(f"ingest.mode={mode}")
    async with stream(broker, "news") as s:
        head = s.parser.last_event_id
    epoch = head.partition("-")[0]
    for crafted in (f"{epoch}-{'9' * 5000}", f"{'9' * 5000}-1", f"{epoch}-1{'0' * 30}"):
        async with SSEClient.connect(broker.events_url("news"), last_event_id=crafted) as s:
            assert s.status == 200, await s.text()
            event = await s.next_event()
            assert event.type == "broker.reset", event
            assert event.json()["reason"] == "unknown_id"
    await assert_holds_nothing(broker)


# -- finding 1: a thousand failures leave nothing behind ----------------------------------


async def raw_request(port: int, head: bytes, *, read: bool = True) -> bytes:
    """Send raw bytes; read what comes back within 0.5 s (or hang up at once)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        if not read:
            return b""
        try:
            async with asyncio.timeout(0.5):
                return await reader.read(4096)
        except TimeoutError:
            return b""
    finally:
        writer.transport.abort()


def failing_requests(epoch: str) -> list[bytes]:
    """One of each way a stream request can fail or be cut short."""
    g = "GET /events?channel=news"
    huge = "x" * 9000
    return [
        b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n",  # no channel: 400
        b"GET /events?channel=bad%20name HTTP/1.1\r\nHost: x\r\n\r\n",  # 400
        (
            "GET /events?" + "&".join(f"channel=c{i}" for i in range(40)) + " HTTP/1.1\r\n\r\n"
        ).encode(),  # too many channels: 400
        b"GET /events?channel=private-x HTTP/1.1\r\nHost: x\r\n\r\n",  # 401
        f"{g} HTTP/1.1\r\nAuthorization: Bearer not.a.jwt\r\n\r\n".encode(),  # 401
        f"{g} HTTP/1.1\r\nLast-Event-ID: {epoch}-{'7' * 5000}\r\n\r\n".encode(),  # reset
        f"{g} HTTP/1.1\r\nLast-Event-ID: \x7f\x80junk\r\n\r\n".encode("latin-1"),  # reset
        f"{g} HTTP/1.1\r\nX-Big: {huge}\r\n\r\n".encode(),  # header too large
        b"POST /events?channel=news HTTP/1.1\r\nContent-Length: 0\r\n\r\n",  # 405
        b"GARBAGE\r\n\r\n",  # unparseable
        b"GET /events?channel=news HTTP/1.1\r\nHost: x\r\n",  # headers never finished
    ]


@pytest.mark.slow
async def test_a_thousand_failing_requests_leave_no_state_and_no_growth(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    broker = await start_broker(
        "auth.mode=jwt",
        "auth.jwt.secret=" + "s" * 40,
        "auth.public_channels=['news']",
        "limits.max_connections_per_ip=20",
        "server.header_timeout_seconds=2",
    )
    assert broker.url is not None
    port = int(broker.url.rsplit(":", 1)[1])
    async with stream(broker, "news") as s:
        epoch = s.parser.last_event_id.partition("-")[0]
    kinds = failing_requests(epoch)
    rng = random.Random(11)

    async def one(i: int) -> None:
        head = kinds[i % len(kinds)]
        # a third of them hang up right after sending: mid-admission, mid-preamble
        await raw_request(port, head, read=rng.random() > 0.33)

    async def round_of(n: int) -> None:
        for start in range(0, n, 50):  # 50 at a time, well past the per-IP limit
            await asyncio.gather(*(one(i) for i in range(start, start + 50)))

    await round_of(200)  # warm-up: allocator pools, caches, code paths
    await assert_holds_nothing(broker)
    before = rss_bytes(broker.pid)
    await round_of(1000)
    await assert_holds_nothing(broker)
    grown = rss_bytes(broker.pid) - before
    assert grown <= 2 * 1024 * 1024, f"RSS grew by {grown / 1024:.0f} KiB"
    # and the broker still serves
    async with stream(broker, "news") as s:
        await redis_client.publish("sse:news", "still fine")
        assert (await s.next_event()).data == "still fine"


# -- finding 3: limits are reserved at the check, not counted at registration -------------


@pytest.fixture
async def gated_app() -> AsyncIterator[tuple[asyncio.Event, str]]:
    """A callback app that holds every call until the gate opens, then allows all."""
    gate = asyncio.Event()

    async def auth(request: web.Request) -> web.Response:
        await gate.wait()
        return web.json_response({"user": "u1", "tenant": "t1", "channels": ["feed"]})

    app = web.Application()
    app.router.add_get("/auth", auth)
    async with serve(app) as url:
        try:
            yield gate, url
        finally:
            gate.set()


async def attempt(broker: BrokerProcess, headers: dict[str, str]) -> tuple[str, Any]:
    """("admitted", the open stream) or (the refusal's reason, None); an admitted
    stream is kept open by the caller."""
    client = SSEClient.connect(broker.events_url("feed"), headers=headers)
    s = await client.__aenter__()
    assert s.status == 200, await s.text()
    try:
        await s.wait_for(lambda st: "ok" in st.parser.comments, what="the preamble")
    except SSEStreamClosed:
        await client.__aexit__(None, None, None)
        [refusal] = s.pending
        assert refusal.type == "broker.reconnect", refusal
        return refusal.json()["reason"], None
    return "admitted", (client, s)


LIMITS = [
    "limits.max_connections",
    "limits.max_connections_per_tenant",
    "limits.max_connections_per_ip",
]


@pytest.mark.parametrize(
    "limit",
    [
        "limits.max_connections",
        "limits.max_connections_per_tenant",
        "limits.max_connections_per_ip",
    ],
)
async def test_fifty_concurrent_requests_admit_exactly_the_limit(
    start_broker: StartBroker, gated_app: tuple[asyncio.Event, str], limit: str
) -> None:
    gate, url = gated_app
    broker = await start_broker("auth.mode=callback", f"auth.callback.url={url}/auth", f"{limit}=2")
    headers = {"Cookie": "laravel_session=same"}  # one coalesced call answers all 50
    tasks = [asyncio.create_task(attempt(broker, headers)) for _ in range(50)]
    await eventually(
        lambda: broker.metric("sse_broker_auth_backend_calls_total", {"result": "coalesced"}),
        lambda n: n == 49,
    )
    gate.set()
    results = await asyncio.gather(*tasks)
    try:
        outcomes = sorted(outcome for outcome, _ in results)
        assert outcomes == ["admitted"] * 2 + ["limit"] * 48, outcomes
    finally:
        for _, held in results:
            if held is not None:
                await held[0].__aexit__(None, None, None)
    await assert_holds_nothing(broker)


async def test_a_stream_mode_catch_up_is_woken_by_the_reader_and_holds_its_slot(
    start_broker: StartBroker, redis_client: aioredis.Redis, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker("ingest.mode=stream", "limits.max_connections_per_ip=1")
    first = (await redis_client.xadd("sse:stream", {"channel": "news", "data": "a"})).decode()
    ms, _, seq = first.partition("-")
    ahead = f"{ms}-{int(seq) + 1}"  # the next entry: not read yet by anyone
    async with SSEClient.connect(broker.events_url("news"), last_event_id=ahead) as waiting:
        # while it waits for the reader, its slot is taken: the limit holds
        await eventually(lambda: broker.metric("sse_broker_catch_up_waiters"), lambda n: n == 1)
        assert (await get(http, broker.events_url("news")))[0] == 429
        await redis_client.xadd("sse:stream", {"channel": "news", "data": "b"}, id=ahead)
        third = await redis_client.xadd("sse:stream", {"channel": "news", "data": "c"})
        event = await waiting.next_event()
        assert (event.data, event.last_event_id) == ("c", third.decode())
    await assert_holds_nothing(broker)
