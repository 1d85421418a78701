"""``examples/js/sse-client.js`` in a real headless Chromium, against real brokers.

The page is served by a small aiohttp site that also serves ``examples/``. In the
same-origin tests the site is a recording reverse proxy in front of the broker (as
nginx would be): it sees every ``/events`` request the browser makes (URL and
``Last-Event-ID``), every frame the broker sent, can cut a stream (the browser then
reconnects by itself), hold new requests, or answer ``502`` while the broker is down
(the browser then closes the EventSource for good and the client's backoff takes over).
The cross-origin test loads the page from one origin and streams from the broker on
another, allowed by ``server.cors_origins``, with a cookie.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from browser import Browser, Page, browser  # noqa: F401
from conftest import LOOPBACK, RedisServer, StartBroker
from helpers import envelope, eventually, publish, serve
from multidict import MultiDict, MultiDictProxy
from sse_client import SSEEvent, SSEParser

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SECRET = "browser-test-secret-0123456789abcdef0123456789"  # >= 32 bytes for HS256

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>sse-client test</title>
<script src="/examples/js/sse-client.js"></script>
<script>
  // What each client (by name) saw: its events, states, resets and reconnects.
  window.seen = {};
  window.clients = {};
  window.start = (name, opts) => {
    const log = {events: [], states: [], resets: [], reconnects: [], tokens: 0};
    window.seen[name] = log;
    const o = Object.assign({}, opts, {
      onEvent: (type, data, id) => log.events.push({type, data, id}),
      onReset: (info) => log.resets.push(Object.assign({at: Date.now()}, info)),
      onReconnect: (info) => log.reconnects.push(info),
      onState: (state) => log.states.push(state),
    });
    delete o.tokenUrl;
    if (opts.tokenUrl) {
      o.getToken = async () => {
        log.tokens += 1;
        return (await fetch(opts.tokenUrl)).text();
      };
    }
    window.clients[name] = SSEClient(o);
    return window.clients[name].socketId;
  };
</script>
"""


@dataclass
class Forwarded:
    """One ``/events`` request through the proxy: what the browser sent, what it got."""

    path_qs: str
    query: MultiDictProxy[str]
    last_event_id: str | None
    status: int | None = None
    parser: SSEParser = field(default_factory=SSEParser)
    events: list[tuple[float, SSEEvent]] = field(default_factory=list)  # (time.time(), event)
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def control(self, name: str) -> list[tuple[float, SSEEvent]]:
        return [(at, e) for at, e in self.events if e.type == name]

    @property
    def reconnects_only(self) -> bool:
        """A soft refusal: the stream carried one ``broker.reconnect`` and nothing else."""
        return [e.type for _, e in self.events] == ["broker.reconnect"]


class Site:
    """Serves the test page and ``examples/``; with ``upstream``, proxies ``/events`` too."""

    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = upstream
        self.requests: list[Forwarded] = []
        self.admit = asyncio.Event()  # cleared: new /events requests wait (recorded already)
        self.admit.set()
        self.token_calls = 0
        self.token_handler: Callable[[int], Awaitable[str]] | None = None
        self.url = ""
        self.port = 0
        self._session: aiohttp.ClientSession | None = None

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def token(self, request: web.Request) -> web.Response:
        self.token_calls += 1
        assert self.token_handler is not None, "the test set no token handler"
        return web.Response(text=await self.token_handler(self.token_calls))

    async def events(self, request: web.Request) -> web.StreamResponse:
        record = Forwarded(
            request.path_qs,
            MultiDictProxy(MultiDict(request.query)),
            request.headers.get("Last-Event-ID"),
        )
        self.requests.append(record)
        try:
            await self.admit.wait()
            return await self._forward(request, record)
        finally:
            record.ended.set()

    async def _forward(self, request: web.Request, record: Forwarded) -> web.StreamResponse:
        headers = {
            name: request.headers[name]
            for name in ("Accept", "Last-Event-ID", "Cache-Control", "Cookie")
            if name in request.headers
        }
        assert self._session is not None and self.upstream is not None
        try:
            upstream = await self._session.get(
                self.upstream + request.path_qs,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None, connect=2),
            )
        except aiohttp.ClientConnectionError:
            # What nginx answers while the broker is down: the EventSource gives up for good.
            record.status = 502
            return web.json_response({"error": "bad_gateway"}, status=502)
        async with upstream:
            record.status = upstream.status
            resp = web.StreamResponse(
                status=upstream.status,
                headers={
                    "Content-Type": upstream.headers.get("Content-Type", "text/plain"),
                    "Cache-Control": "no-cache",
                },
            )
            await resp.prepare(request)
            cut = asyncio.ensure_future(record.cut.wait())
            try:
                while True:
                    read = asyncio.ensure_future(upstream.content.readany())
                    await asyncio.wait({read, cut}, return_when=asyncio.FIRST_COMPLETED)
                    if not read.done():
                        read.cancel()
                        break
                    try:
                        chunk = read.result()
                    except aiohttp.ClientError:
                        break  # the broker died mid-stream
                    if not chunk:
                        break
                    now = time.time()
                    record.events.extend((now, e) for e in record.parser.feed(chunk))
                    await resp.write(chunk)
            finally:
                cut.cancel()
            # a clean end of the body: an EventSource reconnects by itself
            await resp.write_eof()
            return resp

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Site]:
        app = web.Application()
        app.router.add_get("/test/client.html", self.page)
        app.router.add_get("/token", self.token)
        if self.upstream is not None:
            app.router.add_get("/events", self.events)
        app.router.add_static("/examples", EXAMPLES)
        async with serve(app) as self.url, aiohttp.ClientSession() as session:
            self.port = int(self.url.rsplit(":", 1)[1])
            self._session = session
            try:
                yield self
            finally:
                self.admit.set()
                for record in self.requests:
                    record.cut.set()


async def open_page(page: Page, site: Site) -> None:
    await page.navigate(site.url + "/test/client.html")
    assert await page.evaluate("typeof SSEClient") == "function", "sse-client.js did not load"


async def start_client(page: Page, name: str, **opts: Any) -> str:
    """``SSEClient(opts)`` in the page, recorded under ``name``; returns its socket id."""
    socket_id = await page.evaluate(
        f"start({orjson.dumps(name).decode()}, {orjson.dumps(opts).decode()})"
    )
    assert isinstance(socket_id, str)
    return socket_id


async def seen(page: Page, name: str) -> dict[str, Any]:
    value = await page.evaluate(f"seen[{orjson.dumps(name).decode()}]")
    assert isinstance(value, dict)
    return value


def data_of(events: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(e["type"], e["data"]) for e in events]


async def fence(
    page: Page, send: Callable[[dict[str, str]], Awaitable[object]], *names: str
) -> list[list[dict[str, Any]]]:
    """Prove an absence without a sleep: ``send`` publishes ``{"fence": <marker>}`` after
    whatever must not arrive, on a channel and as an event type every client of ``names``
    gets. A stream is delivered in publish order, so once the marker is in, anything
    published before it is in too. Returns each client's events before the marker,
    which must be its last event."""
    marker = f"fence-{time.monotonic_ns()}"
    await send({"fence": marker})
    arrived = " && ".join(
        f"seen[{orjson.dumps(name).decode()}].events.some("
        f"e => e.data && e.data.fence === {orjson.dumps(marker).decode()})"
        for name in names
    )
    await page.wait_for(arrived)
    before = []
    for name in names:
        events = (await seen(page, name))["events"]
        assert events[-1]["data"] == {"fence": marker}, f"{name} got more after the fence: {events}"
        before.append(events[:-1])
    return before


def mint(user: str, channels: list[str], ttl: float) -> str:
    return jwt.encode(
        {"sub": user, "channels": channels, "exp": int(time.time() + ttl)}, SECRET, "HS256"
    )


async def _now(value: Any) -> Any:
    return value


# -- same origin, through the proxy ------------------------------------------------------


@pytest.mark.slow
async def test_several_channels_one_connection_and_exact_resume_after_a_cut(
    browser: Browser,  # noqa: F811
    start_broker: StartBroker,
    redis_client: aioredis.Redis,
) -> None:
    broker = await start_broker("sse.retry_ms=200")
    page = browser.page
    assert page is not None
    expected: list[tuple[str, Any]] = []

    async def send(i: int) -> None:
        channel = ("a", "b", "c")[i % 3]
        event = {"a": "tick", "b": None, "c": "order.shipped"}[channel]
        await publish(redis_client, channel, envelope({"n": i, "ch": channel}, event=event))
        expected.append((event or "message", {"n": i, "ch": channel}))

    async with Site(broker.url).running() as site:
        await open_page(page, site)
        socket_id = await start_client(
            page, "c", url="/events", channels=["a", "b", "c"], eventTypes=["tick", "order.shipped"]
        )
        await page.wait_for("seen.c.states.includes('open')")
        first = site.requests[0]
        assert first.query.getall("channel") == ["a", "b", "c"]
        assert re.fullmatch(r"\d+\.\d+", socket_id), socket_id
        assert first.query["socket_id"] == socket_id, "the client passes socket_id"
        assert "last_event_id" not in first.query and first.last_event_id is None
        assert await broker.metric("sse_broker_connections") == 1, "one stream for 3 channels"

        for i in range(6):
            await send(i)
        await page.wait_for("seen.c.events.length === 6")
        last_id = (await seen(page, "c"))["events"][-1]["id"]
        assert last_id == first.parser.last_event_id

        # Cut the stream; hold the browser's reconnect while events are published.
        site.admit.clear()
        first.cut.set()
        await first.ended.wait()
        await eventually(lambda: _now(len(site.requests)), lambda n: n == 2, timeout=5)
        assert await page.evaluate("seen.c.states.at(-1)") == "reconnecting"
        for i in range(6, 12):
            await send(i)
        site.admit.set()
        await page.wait_for("seen.c.events.length === 12")
        for i in range(12, 15):
            await send(i)
        await page.wait_for("seen.c.events.length === 15")

        async def tick(data: dict[str, str]) -> None:
            await publish(redis_client, "a", envelope(data, event="tick"))

        [events] = await fence(page, tick, "c")  # a duplicate would have come before it
        got = await seen(page, "c")
        assert data_of(events) == expected, "not exactly the published events, in order"
        ids = [e["id"] for e in events]
        assert len(set(ids)) == len(ids) == 15 and all(ids)
        second = site.requests[1]
        assert second.last_event_id == last_id, "the browser resumed with Last-Event-ID"
        assert second.path_qs == first.path_qs, "the browser's own reconnect, same URL"
        assert len(site.requests) == 2
        assert got["states"] == ["connecting", "open", "reconnecting", "open"]
        assert got["resets"] == [] and got["reconnects"] == []
        assert await broker.metric("sse_broker_replays_served_total") == 1
        assert (await broker.metric("sse_broker_resets_total") or 0) == 0


@pytest.mark.slow
async def test_outage_reset_calls_on_reset_after_refetch_after_ms(
    browser: Browser,  # noqa: F811
    start_broker: StartBroker,
    redis_server: RedisServer,
) -> None:
    broker = await start_broker("sse.retry_ms=1000")
    page = browser.page
    assert page is not None
    async with Site(broker.url).running() as site:
        await open_page(page, site)
        await start_client(page, "c", url="/events", channels=["a"], eventTypes=["tick"])
        await page.wait_for("seen.c.states.includes('open')")
        await publish(redis_server.client(), "a", envelope({"n": 1}, event="tick"))
        await page.wait_for("seen.c.events.length === 1")

        # Redis goes away and comes back: what was published meanwhile is lost to the
        # broker, so the open stream gets broker.reset (outage).
        redis_server.stop()
        await broker.wait_not_ready()
        redis_server.start()
        await broker.wait_ready()
        stream = site.requests[0]
        await eventually(lambda: _now(stream.control("broker.reset")), timeout=10)
        sent_at, frame = stream.control("broker.reset")[0]
        info = frame.json()
        assert info["reason"] == "outage"
        resets = await page.wait_for("seen.c.resets.length === 1 && seen.c.resets", timeout=5)
        assert resets[0]["reason"] == "outage"
        assert resets[0]["refetch_after_ms"] == info["refetch_after_ms"]
        waited_ms = resets[0]["at"] - sent_at * 1000
        assert waited_ms >= info["refetch_after_ms"] - 50, (
            f"onReset after {waited_ms:.0f} ms, refetch_after_ms was {info['refetch_after_ms']}"
        )
        assert waited_ms < info["refetch_after_ms"] + 3000

        # the same stream carries on
        await publish(redis_server.client(), "a", envelope({"n": 2}, event="tick"))
        await page.wait_for("seen.c.events.length === 2")
        got = await seen(page, "c")
        assert data_of(got["events"]) == [("tick", {"n": 1}), ("tick", {"n": 2})]
        assert got["states"] == ["connecting", "open"] and len(site.requests) == 1


@pytest.mark.slow
async def test_closed_for_good_backs_off_and_resumes_with_last_event_id_query(
    browser: Browser,  # noqa: F811
    start_broker: StartBroker,
    redis_client: aioredis.Redis,
) -> None:
    first_broker = await start_broker("sse.retry_ms=200")
    assert first_broker.url is not None
    port = first_broker.url.rsplit(":", 1)[1]
    page = browser.page
    assert page is not None
    async with Site(first_broker.url).running() as site:
        await open_page(page, site)
        await start_client(
            page,
            "c",
            url="/events",
            channels=["a"],
            eventTypes=["tick"],
            backoff={"initialMs": 200, "maxMs": 800},
        )
        await page.wait_for("seen.c.states.includes('open')")
        for i in range(3):
            await publish(redis_client, "a", envelope({"n": i}, event="tick"))
        await page.wait_for("seen.c.events.length === 3")
        last_id = (await seen(page, "c"))["events"][-1]["id"]

        # The broker dies: the browser's own retry gets 502 from the proxy and closes the
        # EventSource for good; the client reopens with backoff, resuming by query.
        first_broker.kill_group()
        reopened = await eventually(
            lambda: _now([r for r in site.requests if "last_event_id" in r.query]),
            lambda rs: len(rs) >= 2 and all(r.status == 502 for r in rs),
            timeout=10,
        )
        assert all(r.query["last_event_id"] == last_id for r in reopened)
        assert all(r.last_event_id is None for r in reopened), "a new EventSource sends no header"
        assert await page.evaluate("seen.c.states.at(-1)") == "reconnecting"

        # A new broker on the same port: the next attempt gets through. Its id is from
        # another epoch, so the broker answers with broker.reset and the page refetches.
        await start_broker("sse.retry_ms=200", f"server.listen={LOOPBACK}:{port}")
        await page.wait_for("seen.c.resets.length === 1", timeout=10)
        got = await seen(page, "c")
        assert got["resets"][0]["reason"] == "epoch"
        assert got["states"][-1] == "open"
        # (An attempt may land while the new broker is still subscribing: that one is
        # answered 200 + broker.reconnect "not_ready" and the browser retries by itself,
        # same URL, still no header.)
        [resumed] = [r for r in site.requests if r.control("broker.reset")]
        assert resumed.query["last_event_id"] == last_id and resumed.last_event_id is None
        assert all(
            r.reconnects_only for r in site.requests[1:] if r.status == 200 and r is not resumed
        )
        await publish(redis_client, "a", envelope({"n": 3}, event="tick"))
        await page.wait_for("seen.c.events.length === 4")
        got = await seen(page, "c")
        assert [d["n"] for _, d in data_of(got["events"])] == [0, 1, 2, 3]


@pytest.mark.slow
async def test_token_expired_gets_a_fresh_token_and_loses_nothing(
    browser: Browser,  # noqa: F811
    start_broker: StartBroker,
    redis_client: aioredis.Redis,
) -> None:
    broker = await start_broker(
        "auth.mode=jwt",
        f"auth.jwt.secret={SECRET}",
        "auth.jwt.leeway_seconds=0",
        "sse.retry_ms=200",
    )
    page = browser.page
    assert page is not None
    release = asyncio.Event()
    tokens: list[str] = []

    async def token_handler(call: int) -> str:
        if call == 1:
            token = mint("u1", ["a", "b"], ttl=2)  # expires while the stream is open
        else:
            await release.wait()  # the test publishes while the page waits for its token
            token = mint("u1", ["a", "b"], ttl=60)
        tokens.append(token)
        return token

    async with Site(broker.url).running() as site:
        site.token_handler = token_handler
        await open_page(page, site)
        await start_client(
            page, "c", url="/events", channels=["a", "b"], eventTypes=["tick"], tokenUrl="/token"
        )
        await page.wait_for("seen.c.states.includes('open')")
        first = site.requests[0]
        assert first.query["token"] == tokens[0]
        for i in range(2):
            await publish(redis_client, "ab"[i], envelope({"n": i}, event="tick"))
        await page.wait_for("seen.c.events.length === 2")

        # At exp the broker ends the stream with broker.reconnect (token_expired); the
        # client closes it at once and asks the page for a fresh token.
        await eventually(lambda: _now(site.token_calls), lambda n: n == 2, timeout=6)
        [(_, frame)] = first.control("broker.reconnect")
        assert frame.json()["reason"] == "token_expired"
        head = frame.last_event_id
        assert head, "broker.reconnect carries id: <head>"
        for i in range(2, 5):
            await publish(redis_client, "ab"[i % 2], envelope({"n": i}, event="tick"))
        release.set()
        await page.wait_for("seen.c.events.length === 5")
        await publish(redis_client, "a", envelope({"n": 5}, event="tick"))
        await page.wait_for("seen.c.events.length === 6")

        async def tick(data: dict[str, str]) -> None:
            await publish(redis_client, "b", envelope(data, event="tick"))

        [events] = await fence(page, tick, "c")  # a duplicate would have come before it
        got = await seen(page, "c")
        assert [d["n"] for _, d in data_of(events)] == list(range(6))
        assert got["reconnects"] == [
            {"reason": "token_expired", "retry_ms": frame.json()["retry_ms"]}
        ]
        assert got["tokens"] == 2
        assert len(site.requests) == 2, "the browser never retried with the expired token"
        second = site.requests[1]
        assert second.query["token"] == tokens[1] != tokens[0]
        assert second.query["last_event_id"] == head
        assert second.last_event_id is None
        assert got["resets"] == []
        assert got["states"] == ["connecting", "open", "reconnecting", "open"]
        assert await broker.metric("sse_broker_replays_served_total") == 1


@pytest.mark.slow
async def test_socket_id_keeps_to_others_events_from_the_sending_tab(
    browser: Browser,  # noqa: F811
    start_broker: StartBroker,
    redis_client: aioredis.Redis,
) -> None:
    """Laravel's ``broadcast(...)->toOthers()``: the tab whose request caused the event
    (its ``X-Socket-ID``, i.e. ``client.socketId``) does not get it; another tab does."""
    broker = await start_broker("ingest.format=laravel", "ingest.prefix=laravel_database_")
    page = browser.page
    assert page is not None
    async with Site(broker.url).running() as site:
        await open_page(page, site)
        sender = await start_client(
            page, "sender", url="/events", channels=["orders"], eventTypes=["OrderShipped"]
        )
        other = await start_client(
            page, "other", url="/events", channels=["orders"], eventTypes=["OrderShipped"]
        )
        assert sender != other
        await page.wait_for(
            "seen.sender.states.includes('open') && seen.other.states.includes('open')"
        )
        assert {r.query["socket_id"] for r in site.requests} == {sender, other}

        async def laravel(payload: dict[str, Any]) -> None:
            await publish(redis_client, "orders", payload, prefix="laravel_database_")

        await laravel({"event": "OrderShipped", "data": {"id": 1}, "socket": sender})
        await laravel(
            {"event": "OrderShipped", "data": {"id": 2, "socket": sender}}
        )  # older Laravel
        await laravel({"event": "OrderShipped", "data": {"id": 3}, "socket": None})
        await page.wait_for("seen.other.events.length === 3 && seen.sender.events.length === 1")
        # for everyone (no socket): once both have it, the sender has all it will get of 1 and 2
        sender_got, other_got = await fence(
            page, lambda data: laravel({"event": "OrderShipped", "data": data}), "sender", "other"
        )
        assert [d["id"] for _, d in data_of(sender_got)] == [3]
        assert [d["id"] for _, d in data_of(other_got)] == [1, 2, 3]


# -- cross origin: the page on one origin, the broker on another ----------------------------


@pytest.mark.slow
async def test_cross_origin_with_credentials_from_an_allowed_origin_only(
    browser: Browser,  # noqa: F811
    start_broker: StartBroker,
    redis_client: aioredis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    page = browser.page
    assert page is not None
    async with Site().running() as allowed, Site().running() as other:
        broker = await start_broker(
            "auth.mode=jwt",
            f"auth.jwt.secret={SECRET}",
            "auth.cookie=sse_token",
            "sse.retry_ms=1000",
            f'server.cors_origins=["{allowed.url}"]',
        )
        events_url = f"{broker.url}/events"
        await open_page(page, allowed)
        # The app set this cookie on its own host (cookies ignore ports: the broker on
        # another port of the same host is same-site, so the browser sends it along).
        token = mint("u1", ["a"], ttl=300)
        await page.evaluate(f"document.cookie = 'sse_token={token}; path=/; SameSite=Lax'")
        await start_client(
            page, "cred", url=events_url, channels=["a"], eventTypes=["tick"], withCredentials=True
        )
        # control: the same page without credentials sends no cookie, so the broker says 401
        await start_client(
            page,
            "anon",
            url=events_url,
            channels=["a"],
            eventTypes=["tick"],
            withCredentials=False,
            backoff={"initialMs": 5000, "maxMs": 5000},
        )
        await page.wait_for("seen.cred.states.includes('open')")
        await publish(redis_client, "a", envelope({"n": 0}, event="tick"))
        await page.wait_for("seen.cred.events.length === 1")

        # The broker ends the stream (revoked, via the admin API): the browser reconnects by
        # itself, cross-origin, with Last-Event-ID; what was published meanwhile is replayed.
        async with http.post(f"{broker.admin_url}/admin/disconnect", json={"user": "u1"}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["disconnected"] == 1
        for i in range(1, 4):
            await publish(redis_client, "a", envelope({"n": i}, event="tick"))
        await page.wait_for("seen.cred.states.filter(s => s === 'open').length === 2", timeout=10)
        await publish(redis_client, "a", envelope({"n": 4}, event="tick"))
        await page.wait_for("seen.cred.events.length === 5")
        cred = await seen(page, "cred")
        assert [d["n"] for _, d in data_of(cred["events"])] == [0, 1, 2, 3, 4]
        assert cred["reconnects"][0]["reason"] == "revoked"
        assert cred["resets"] == []
        assert "last_event_id" not in await page.evaluate("clients.cred.currentUrl"), (
            "the browser reconnected by itself (the client did not have to reopen)"
        )
        assert await broker.metric("sse_broker_replays_served_total") == 1
        anon = await seen(page, "anon")
        assert "open" not in anon["states"] and anon["events"] == []
        assert (await broker.metric("sse_broker_auth_failures_total") or 0) >= 1
        await page.evaluate("clients.anon.close(); clients.cred.close()")
        assert await page.evaluate("seen.cred.states.at(-1) + ' ' + seen.anon.states.at(-1)") == (
            "closed closed"
        )

        # From an origin not in server.cors_origins the browser withholds the stream.
        opened_before = await broker.metric("sse_broker_connections_opened_total") or 0
        await open_page(page, other)
        await start_client(
            page,
            "foreign",
            url=events_url,
            channels=["a"],
            eventTypes=["tick"],
            withCredentials=True,
            backoff={"initialMs": 5000, "maxMs": 5000},
        )
        await eventually(
            lambda: broker.metric("sse_broker_connections_opened_total"),
            lambda n: (n or 0) > opened_before,
            timeout=5,
        )  # the request did reach the broker...
        await publish(redis_client, "a", envelope({"n": 5}, event="tick"))
        # The fence here is the EventSource's error: the browser checks CORS on the
        # response headers and fails the connection then, before any event could be
        # dispatched; after it this EventSource is closed for good (the client backs off
        # for 5 s). Were the origin allowed, the state would be "open" and this times out.
        await page.wait_for("seen.foreign.states.at(-1) === 'reconnecting'")
        foreign = await seen(page, "foreign")
        assert (
            "open" not in foreign["states"] and foreign["events"] == []
        )  # ...the page got nothing
        assert foreign["states"][-1] == "reconnecting"
