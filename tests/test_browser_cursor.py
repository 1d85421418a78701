"""A real browser's EventSource: id-only heartbeats move its cursor and fire nothing.

What the browser believes is observable in two places only: the events it fires
(counted by the page) and the ``Last-Event-ID`` it sends when it reconnects.
So the page talks to the broker through a tiny recording reverse proxy on its
own origin (no CORS involved): the proxy serves the page, forwards ``/events``
to the broker byte for byte, remembers each request's ``Last-Event-ID`` and can
cut a stream, which makes the browser reconnect by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from browser import Browser, browser  # noqa: F401
from conftest import StartBroker
from helpers import eventually, publish, serve
from sse_client import SSEClient, SSEParser

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>sse-broker cursor test</title>
<script>
  // Every event the EventSource fires, whatever its type.
  window.fired = [];
  window.opens = 0;
  window.errors = 0;
  window.connect = (url) => {
    const source = new EventSource(url);
    const record = (e) => window.fired.push({type: e.type, data: e.data, id: e.lastEventId});
    source.onmessage = record;
    for (const name of ["broker.reset", "broker.reconnect", "update"]) {
      source.addEventListener(name, record);
    }
    source.onopen = () => { window.opens += 1; };
    source.onerror = () => { window.errors += 1; };
    window.source = source;
  };
</script>
"""


@dataclass
class Forwarded:
    """One proxied ``/events`` request: what the browser sent and what it was sent."""

    last_event_id: str | None
    parser: SSEParser = field(default_factory=SSEParser)
    raw: bytearray = field(default_factory=bytearray)
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class RecordingProxy:
    """Serves the page and forwards ``/events`` to the broker, recording every request."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: list[Forwarded] = []
        self.url = ""
        self._session: aiohttp.ClientSession | None = None

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def events(self, request: web.Request) -> web.StreamResponse:
        record = Forwarded(request.headers.get("Last-Event-ID"))
        self.requests.append(record)
        headers = {
            name: request.headers[name]
            for name in ("Accept", "Last-Event-ID", "Cache-Control")
            if name in request.headers
        }
        assert self._session is not None
        try:
            async with self._session.get(
                self.upstream + request.path_qs,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
            ) as upstream:
                resp = web.StreamResponse(
                    status=upstream.status,
                    headers={
                        "Content-Type": upstream.headers["Content-Type"],
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
                        chunk = read.result()
                        if not chunk:
                            break
                        record.raw += chunk
                        record.parser.feed(chunk)
                        await resp.write(chunk)
                finally:
                    cut.cancel()
                # a clean end of the body: an EventSource reconnects by itself
                await resp.write_eof()
                return resp
        finally:
            record.ended.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RecordingProxy]:
        app = web.Application()
        app.router.add_get("/page", self.page)
        app.router.add_get("/events", self.events)
        async with serve(app) as self.url, aiohttp.ClientSession() as session:
            self._session = session
            try:
                yield self
            finally:
                for record in self.requests:
                    record.cut.set()


@pytest.mark.slow
async def test_eventsource_last_event_id_advances_on_id_heartbeats_and_no_event_fires(
    browser: Browser,  # noqa: F811
    start_broker: StartBroker,
    redis_client: aioredis.Redis,
) -> None:
    broker = await start_broker("sse.heartbeat_seconds=1", "sse.retry_ms=200")
    page = browser.page
    assert page is not None
    async with RecordingProxy(broker.url or "").running() as proxy:
        await page.navigate(proxy.url + "/page")
        await page.evaluate("window.connect('/events?channel=quiet')")
        await page.wait_for("window.opens === 1")
        first = proxy.requests[0]
        assert first.last_event_id is None, "a fresh EventSource sends no Last-Event-ID"
        # the fresh stream's preamble ends on the head id
        await eventually(lambda: _value(first.parser.last_event_id), timeout=5)
        opened_at = first.parser.last_event_id

        # the head moves on another channel; the quiet stream gets only id-only heartbeats
        async with SSEClient.connect(broker.events_url("busy")) as busy:
            await busy.wait_for(lambda s: "ok" in s.parser.comments)
            for i in range(20):
                await publish(redis_client, "busy", f"busy {i}")
            head = (await busy.events(20))[-1].last_event_id
        assert head != opened_at
        # wait until the heartbeat carrying the new head went through to the browser
        await eventually(lambda: _value(first.parser.last_event_id), lambda v: v == head, timeout=5)

        # cut the stream: the browser reconnects on its own, telling where it stands
        first.cut.set()
        await first.ended.wait()
        await page.wait_for("window.opens === 2")
        second = proxy.requests[1]
        assert second.last_event_id == head, (
            f"the browser resumed from {second.last_event_id!r}, not the head {head!r}"
        )
        assert await page.evaluate("window.fired") == [], "an id-only heartbeat fired an event"
        assert await page.evaluate("window.errors") >= 1  # the reconnect itself
        # on the wire: the opening id block, then heartbeat id blocks, never an event
        assert first.parser.dispatched == 0
        assert first.parser.id_only_updates >= 2
        assert b"data:" not in bytes(first.raw)
        # the resume from the heartbeat's id is exact: nothing replayed, no reset
        assert await broker.metric("sse_broker_replays_served_total") == 1
        assert (await broker.metric("sse_broker_resets_total") or 0) == 0

        # positive control: a real event on the quiet channel does fire, with its own id
        await publish(redis_client, "quiet", "hello")
        fired = await page.wait_for("window.fired.length === 1 && window.fired")
        assert fired[0]["type"] == "message" and fired[0]["data"] == "hello"
        assert fired[0]["id"] == second.parser.last_event_id
        assert fired[0]["id"] != head
        assert len(proxy.requests) == 2


async def _value(value: object) -> object:
    return value
