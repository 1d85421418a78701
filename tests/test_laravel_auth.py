"""``auth.mode = "laravel"`` against a real HTTP endpoint that behaves like Laravel's
``/broadcasting/auth`` (``Broadcast::routes()`` behind the ``web`` middleware).

The fake app (an aiohttp server in the test process) checks what Laravel
checks: the ``laravel_session`` cookie (unknown: a redirect to /login, as the
``auth`` middleware does), CSRF (``X-XSRF-TOKEN`` must equal the url-decoded
``XSRF-TOKEN`` cookie and the session's token, else 419), the
``X-Requested-With: XMLHttpRequest`` header, the form body (``channel_name``,
``socket_id``), then the channel callbacks of routes/channels.php: ``true`` for
an allowed private channel, ``{"channel_data": {"user_id", "user_info"}}`` for
a presence channel, 403 otherwise. It records every call, and the Host it saw.

Events are published in the native format (``sse:<channel>``) except in the
end-to-end test, which runs the shipped example config
(``examples/laravel/config/sse-broker.toml``) with real PHP broadcasting.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import REPO_ROOT, BrokerProcess, RedisServer, StartBroker, free_port
from helpers import envelope, eventually, fence, get, publish, serve, stream
from sse_client import SSEClient

AUTH_PATH = "/broadcasting/auth"
EXAMPLE_CONFIG = REPO_ROOT / "examples/laravel/config/sse-broker.toml"
BROADCAST = REPO_ROOT / "examples/laravel/tools/broadcast.php"
PHP_PACKAGES = "php-cli php-redis php-predis"


# -- the fake Laravel app --------------------------------------------------------------------------


@dataclass
class Session:
    user_id: int
    name: str
    xsrf: str  # the session's CSRF token (what X-XSRF-TOKEN must carry)
    orders: set[int] = field(default_factory=set)
    tenants: set[str] = field(default_factory=set)  # member of (domain-based tenancy)


@dataclass
class AuthCall:
    headers: dict[str, str]
    form: dict[str, str]
    host: str
    method: str
    content_type: str


@dataclass
class LaravelApp:
    url: str = ""
    sessions: dict[str, Session] = field(default_factory=dict)
    calls: list[AuthCall] = field(default_factory=list)
    unauthenticated: int = 302  # what the auth middleware answers without a session
    status: int | None = None  # force this status (a broken app)
    delay: float = 0.0
    gate: asyncio.Event | None = None  # when set: every call waits for it

    @property
    def auth_url(self) -> str:
        return self.url + AUTH_PATH

    async def handle(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.calls.append(
            AuthCall(
                dict(request.headers), form, request.host, request.method, request.content_type
            )
        )
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status is not None:
            return web.json_response({"message": "Server Error"}, status=self.status)
        # the `auth` middleware
        session = self.sessions.get(request.cookies.get("laravel_session", ""))
        if session is None:
            if self.unauthenticated == 302:
                raise web.HTTPFound("/login")
            return web.json_response({"message": "Unauthenticated."}, status=401)
        # VerifyCsrfToken: the header is the url-decoded XSRF-TOKEN cookie
        header = request.headers.get("X-XSRF-TOKEN")
        if header is None or header != session.xsrf:
            return web.json_response({"message": "CSRF token mismatch."}, status=419)
        if request.headers.get("X-Requested-With") != "XMLHttpRequest":
            return web.json_response({"message": "XHR only"}, status=400)
        channel = form.get("channel_name", "")
        if "socket_id" not in form:
            return web.json_response({"message": "socket_id missing"}, status=422)
        # routes/channels.php
        if channel.startswith("private-orders."):
            order = channel.removeprefix("private-orders.")
            if order.isdigit() and int(order) in session.orders:
                return web.Response(body=b"true", content_type="application/json")
        elif channel.startswith("private-tenant."):
            # domain-based tenancy: the tenant is the request's host
            tenant = request.host.split(".")[0]
            if channel == f"private-tenant.{tenant}" and tenant in session.tenants:
                return web.Response(body=b"true", content_type="application/json")
        elif channel.startswith("presence-chat."):
            return web.json_response(
                {"channel_data": {"user_id": session.user_id, "user_info": {"name": session.name}}}
            )
        elif channel.startswith("presence-room."):
            # Pusher-style: channel_data as a JSON string, the id a string
            data = {"user_id": str(session.user_id), "user_info": {"name": session.name}}
            return web.json_response({"channel_data": orjson.dumps(data).decode()})
        raise web.HTTPForbidden()


ADA = Session(7, "Ada", xsrf="eyJpdiI6IkFkYSJ9+/=", orders={1, 3}, tenants={"acme"})
BOB = Session(8, "Bob", xsrf="eyJpdiI6IkJvYiJ9", orders={1})


@pytest.fixture
async def app() -> AsyncIterator[LaravelApp]:
    fake = LaravelApp(sessions={"s-ada": ADA, "s-bob": BOB})
    web_app = web.Application()
    web_app.router.add_route("*", AUTH_PATH, fake.handle)  # Broadcast::routes(): GET|POST
    async with serve(web_app) as fake.url:
        try:
            yield fake
        finally:
            if fake.gate is not None:
                fake.gate.set()


async def laravel_broker(start_broker: StartBroker, app: LaravelApp, *sets: str) -> BrokerProcess:
    return await start_broker("auth.mode=laravel", f"auth.laravel.url={app.auth_url}", *sets)


# -- the browser side -----------------------------------------------------------------------------


def browser(session: str | None, *, xsrf: str | None = None, **extra: str) -> dict[str, str]:
    """The headers a logged-in browser sends: session + XSRF-TOKEN cookies (url-encoded,
    as Laravel sets it), plus whatever else."""
    cookies: dict[str, str] = {}
    if session is not None:
        cookies["laravel_session"] = session
        known = {"s-ada": ADA, "s-bob": BOB}.get(session)
        token = xsrf if xsrf is not None else (known.xsrf if known else "none")
        cookies["XSRF-TOKEN"] = quote(token, safe="")
    cookies.update(extra)
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}


async def event_source_status(
    broker: BrokerProcess, headers: dict[str, str], *channels: str
) -> tuple[int, Any]:
    """What an EventSource (Accept: text/event-stream) gets: (status, JSON body)."""
    async with SSEClient.connect(broker.events_url(*channels), headers=headers) as s:
        if s.status == 200:
            return 200, s.raw
        return s.status, await s.json()


async def soft_refusal(broker: BrokerProcess, headers: dict[str, str], *channels: str) -> Any:
    """A retryable refusal to an EventSource: 200, one ``broker.reconnect``, closed."""
    async with SSEClient.connect(broker.events_url(*channels), headers=headers) as s:
        assert s.status == 200, await s.text()
        assert await s.wait_closed(timeout=10)
        assert [e.type for e in s.pending] == ["broker.reconnect"], s.raw
        return s.pending[0].json()


async def backend_calls(broker: BrokerProcess, result: str) -> float:
    return await broker.metric("sse_broker_auth_backend_calls_total", {"result": result}) or 0


# -- allowed --------------------------------------------------------------------------------------


async def test_private_channel_is_asked_exactly_as_laravel_expects_and_streams(
    start_broker: StartBroker, app: LaravelApp, redis_client: Any
) -> None:
    broker = await laravel_broker(start_broker, app)
    # real browsers carry all sorts of cookies around the session
    messy = {"_ga": "GA1.2.3", "consent": '{"ads":false,"stats":true}'}
    headers = {**browser("s-ada", **messy), "Host": "shop.example.com"}
    async with stream(
        broker, "private-orders.1", "news", headers=headers, socket_id="1234.5678"
    ) as s:
        await publish(redis_client, "private-orders.1", envelope({"id": 1}, event="order.shipped"))
        await publish(redis_client, "news", envelope("public news"))
        got = await s.events(2)
    assert [(e.type, e.data) for e in got] == [
        ("order.shipped", '{"id":1}'),
        ("message", "public news"),
    ]
    [call] = app.calls  # "news" is public: no call for it
    assert call.method == "POST"
    assert call.content_type == "application/x-www-form-urlencoded"
    assert call.form == {"channel_name": "private-orders.1", "socket_id": "1234.5678"}
    assert call.headers["Cookie"] == headers["Cookie"]  # forwarded whole
    assert call.headers["X-XSRF-TOKEN"] == ADA.xsrf  # url-decoded from the cookie
    assert call.headers["X-Requested-With"] == "XMLHttpRequest"
    assert call.host == "shop.example.com"  # the browser's Host, not the app URL's


async def test_every_protected_channel_is_asked_separately(
    start_broker: StartBroker, app: LaravelApp, http: aiohttp.ClientSession
) -> None:
    broker = await laravel_broker(start_broker, app)
    url = broker.events_url("private-orders.1", "private-orders.3", "presence-chat.5")
    assert (await get(http, url, browser("s-ada")))[0] == 200
    assert sorted(c.form["channel_name"] for c in app.calls) == [
        "presence-chat.5",
        "private-orders.1",
        "private-orders.3",
    ]
    # without ?socket_id= the form still carries one (Laravel requires the field)
    assert all(c.form["socket_id"] for c in app.calls)


@pytest.mark.slow
async def test_presence_answer_makes_its_user_the_streams_user(
    start_broker: StartBroker, app: LaravelApp, redis_client: Any
) -> None:
    broker = await laravel_broker(start_broker, app)
    async with (
        stream(broker, "presence-chat.5", headers=browser("s-ada")) as ada,
        stream(broker, "presence-chat.5", headers=browser("s-bob")) as bob,
    ):
        await publish(redis_client, "presence-chat.5", envelope("for 7", users=[7]))
        await publish(redis_client, "presence-chat.5", envelope("for 8", users=["8"]))
        await publish(redis_client, "presence-chat.5", envelope("for all"))
        assert [e.data for e in await ada.events(2)] == ["for 7", "for all"]
        assert [e.data for e in await bob.events(2)] == ["for 8", "for all"]
        assert await fence(redis_client, "presence-chat.5", ada, bob) == [[], []]
    async with stream(broker, "presence-room.1", headers=browser("s-bob")) as bob:
        await publish(redis_client, "presence-room.1", envelope("for 7", users=[7]))
        await publish(redis_client, "presence-room.1", envelope("for 8", users=[8]))
        assert [e.data for e in await bob.events(1)] == ["for 8"]
        assert await fence(redis_client, "presence-room.1", bob) == [[]]


async def test_public_channels_need_no_session_and_no_call(
    start_broker: StartBroker, app: LaravelApp, http: aiohttp.ClientSession
) -> None:
    broker = await laravel_broker(start_broker, app)
    assert (await get(http, broker.events_url("news", "status.board")))[0] == 200
    assert (await get(http, broker.events_url("orders.1"), browser("s-ada")))[0] == 200
    assert app.calls == []


# -- denied ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "status", "app_status"),
    [
        ("forbidden channel", 403, 403),
        ("CSRF token mismatch", 401, 419),
        ("unknown session, redirect to /login", 401, 302),
        ("unknown session, 401", 401, 401),
    ],
)
async def test_denials_are_401_or_403_never_200_and_never_cached(
    start_broker: StartBroker,
    app: LaravelApp,
    http: aiohttp.ClientSession,
    case: str,
    status: int,
    app_status: int,
) -> None:
    broker = await laravel_broker(start_broker, app)
    channel = "private-orders.1"
    headers = browser("s-ada")
    if case == "forbidden channel":
        channel = "private-orders.2"
    elif case == "CSRF token mismatch":
        headers = browser("s-ada", xsrf="stale-token")
    else:
        headers = browser("s-expired")
        app.unauthenticated = app_status
    got, body, resp_headers = await get(http, broker.events_url(channel), headers)
    assert got == status, body
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    if status == 403:
        assert channel in body["message"]
    else:
        assert resp_headers["WWW-Authenticate"].startswith("Bearer")
    # an EventSource gets the same hard refusal (no retry loop against a denial)
    assert (await event_source_status(broker, headers, channel))[0] == status
    assert len(app.calls) == 2  # the second request asked again: denials are not cached
    assert await backend_calls(broker, "denied") == 2


async def test_no_session_cookie_is_401_without_asking_the_app(
    start_broker: StartBroker, app: LaravelApp, http: aiohttp.ClientSession
) -> None:
    broker = await laravel_broker(start_broker, app)
    for headers in (
        {},
        {"Cookie": "XSRF-TOKEN=abc; _ga=1"},  # cookies, but not the session
        {"Cookie": "laravel_sessionX=s-ada; session=s-ada"},  # other names
    ):
        for channels in (("private-orders.1",), ("news", "presence-chat.5")):
            status, body, _ = await get(http, broker.events_url(*channels), headers)
            assert status == 401, (headers, channels, body)
    assert app.calls == []
    # an Authorization header is a credential too (token-authenticated apps): asked
    status, _, _ = await get(
        http, broker.events_url("private-orders.1"), {"Authorization": "Bearer api-token"}
    )
    assert status == 401  # the fake app has no such session: it redirected
    [call] = app.calls
    assert call.headers["Authorization"] == "Bearer api-token"


# -- cache, coalescing, concurrency ----------------------------------------------------------------


async def test_allowed_answers_are_cached_per_session_and_channel(
    start_broker: StartBroker, app: LaravelApp, http: aiohttp.ClientSession
) -> None:
    broker = await laravel_broker(start_broker, app)
    one = broker.events_url("private-orders.1")
    assert (await get(http, one, browser("s-ada")))[0] == 200
    assert len(app.calls) == 1
    # the very same request: no call
    assert (await get(http, one, browser("s-ada")))[0] == 200
    assert len(app.calls) == 1
    # the app reads the raw Cookie header (any cookie in it, the first of a
    # duplicate): another header is another question
    assert (await get(http, one, browser("s-ada", _ga="2", theme="dark")))[0] == 200
    assert (await get(http, one, browser("s-ada", _ga="3")))[0] == 200
    assert len(app.calls) == 3
    # the same session, another channel: a call for that channel only
    both = broker.events_url("private-orders.1", "private-orders.3")
    assert (await get(http, both, browser("s-ada")))[0] == 200
    assert [c.form["channel_name"] for c in app.calls[3:]] == ["private-orders.3"]
    # another session, the same channel: a call
    assert (await get(http, one, browser("s-bob")))[0] == 200
    assert len(app.calls) == 5
    assert await backend_calls(broker, "cache_hit") == 2


@pytest.mark.slow
async def test_cache_expires_after_cache_ttl_seconds(
    start_broker: StartBroker, app: LaravelApp, http: aiohttp.ClientSession
) -> None:
    broker = await laravel_broker(start_broker, app, "auth.laravel.cache_ttl_seconds=2")
    url = broker.events_url("private-orders.1")
    started = time.monotonic()
    assert (await get(http, url, browser("s-ada")))[0] == 200
    assert (await get(http, url, browser("s-ada")))[0] == 200
    assert len(app.calls) == 1
    await asyncio.sleep(max(0.0, started + 2.3 - time.monotonic()))
    # access revoked meanwhile (the order changed hands): asked again, denied
    app.sessions["s-ada"] = Session(7, "Ada", xsrf=ADA.xsrf, orders=set())
    assert (await get(http, url, browser("s-ada")))[0] == 403
    assert len(app.calls) == 2


async def test_concurrent_identical_questions_are_asked_once(
    start_broker: StartBroker, app: LaravelApp, http: aiohttp.ClientSession
) -> None:
    broker = await laravel_broker(start_broker, app)
    app.gate = asyncio.Event()
    url = broker.events_url("private-orders.1")
    tasks = [asyncio.create_task(get(http, url, browser("s-ada"))) for _ in range(6)]
    await eventually(lambda: backend_calls(broker, "coalesced"), lambda n: n == 5)
    assert len(app.calls) == 1
    app.gate.set()
    assert [r[0] for r in await asyncio.gather(*tasks)] == [200] * 6
    assert len(app.calls) == 1


async def test_max_concurrency_refuses_retryably_beyond_it(
    start_broker: StartBroker, app: LaravelApp, http: aiohttp.ClientSession
) -> None:
    broker = await laravel_broker(start_broker, app, "auth.laravel.max_concurrency=1")
    app.gate = asyncio.Event()
    first = asyncio.create_task(get(http, broker.events_url("private-orders.1"), browser("s-ada")))

    async def calls() -> int:
        return len(app.calls)

    await eventually(calls, lambda n: n == 1)
    # another question while one is in flight: refused, not queued
    status, body, headers = await get(http, broker.events_url("private-orders.1"), browser("s-bob"))
    assert status == 503, body
    assert int(headers["Retry-After"]) >= 1
    info = await soft_refusal(broker, browser("s-bob"), "private-orders.1")
    assert info["reason"] == "auth_unavailable"
    assert await backend_calls(broker, "saturated") == 2
    app.gate.set()
    assert (await first)[0] == 200
    assert len(app.calls) == 1
    # and once the call is done, the next question goes through
    assert (await get(http, broker.events_url("private-orders.1"), browser("s-bob")))[0] == 200


# -- failing closed -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["down", "500", "404", "timeout"])
async def test_app_failures_fail_closed_with_a_retryable_503(
    start_broker: StartBroker, app: LaravelApp, http: aiohttp.ClientSession, failure: str
) -> None:
    sets = ["auth.laravel.timeout_seconds=0.3"]
    if failure == "down":
        sets.append(f"auth.laravel.url=http://127.0.0.1:{free_port()}{AUTH_PATH}")
    elif failure == "timeout":
        app.delay = 2.0
    else:
        app.status = int(failure)  # 404: Broadcast::routes() not registered
    broker = await laravel_broker(start_broker, app, *sets)
    url = broker.events_url("private-orders.1")
    status, body, headers = await get(http, url, browser("s-ada"))
    assert status == 503, body
    assert body["error"] == "auth_unavailable"
    assert int(headers["Retry-After"]) >= 1
    info = await soft_refusal(broker, browser("s-ada"), "private-orders.1")
    assert info["reason"] == "auth_unavailable"
    assert await backend_calls(broker, "error") == 2  # nothing was cached
    # public channels do not depend on the app
    assert (await get(http, broker.events_url("news"), browser("s-ada")))[0] == 200


# -- Host: domain-based tenancy -------------------------------------------------------------------


async def test_host_is_forwarded_so_domain_based_tenancy_works(
    start_broker: StartBroker, app: LaravelApp, http: aiohttp.ClientSession
) -> None:
    broker = await laravel_broker(start_broker, app)
    acme = {**browser("s-ada"), "Host": "acme.example.com"}
    globex = {**browser("s-ada"), "Host": "globex.example.com"}
    assert (await get(http, broker.events_url("private-tenant.acme"), acme))[0] == 200
    assert (await get(http, broker.events_url("private-tenant.globex"), globex))[0] == 403
    assert [c.host for c in app.calls] == ["acme.example.com", "globex.example.com"]
    assert [c.headers["X-Forwarded-Host"] for c in app.calls] == [c.host for c in app.calls]


# -- end to end: the example config, real PHP broadcasting ----------------------------------------


def require_php() -> str:
    """The php binary with phpredis loaded; FAILS (never skips) when missing."""
    php = shutil.which("php")
    hint = f"apt-get install {PHP_PACKAGES}"
    if php is None:
        pytest.fail(f"php is not installed: this test runs real PHP ({hint})", pytrace=False)
    probe = subprocess.run(
        [php, "-r", 'exit(extension_loaded("redis") ? 0 : 1);'], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.fail(f"phpredis is not loaded in {php} ({hint})", pytrace=False)
    return php


async def php_broadcast(redis_server: RedisServer, prefix: str, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        require_php(),
        str(BROADCAST),
        *args,
        env={
            **os.environ,
            "REDIS_HOST": redis_server.host,
            "REDIS_PORT": str(redis_server.port),
            "REDIS_PREFIX": prefix,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, (out, err)


@pytest.mark.slow
async def test_example_config_with_php_broadcasts_end_to_end(
    start_broker: StartBroker, app: LaravelApp, redis_server: RedisServer, redis_client: Any
) -> None:
    require_php()
    # examples/laravel/config/sse-broker.toml as shipped; only the addresses differ
    broker = await start_broker(
        f"auth.laravel.url={app.auth_url}", config_text=EXAMPLE_CONFIG.read_text()
    )
    prefix = "laravel_database_"
    async with (
        stream(broker, "private-orders.1", headers=browser("s-ada"), socket_id="11.11") as tab1,
        stream(broker, "private-orders.1", headers=browser("s-ada"), socket_id="22.22") as tab2,
        stream(broker, "private-orders.1", headers=browser("s-bob")) as bob,
    ):
        assert len(app.calls) == 2  # one per session: Ada's second tab hit the cache
        # broadcast(new OrderShipped(1)) and, from tab 1's request,
        # broadcast(new OrderStatusUpdated(1, 'packed'))->toOthers()
        await php_broadcast(redis_server, prefix, "OrderShipped", "1")
        await php_broadcast(
            redis_server, prefix, "--socket=11.11", "OrderStatusUpdated", "1", "packed"
        )
        await php_broadcast(redis_server, prefix, "OrderStatusUpdated", "1", "delivered")
        expected = [
            ("App\\Events\\OrderShipped", {"orderId": 1, "status": "shipped", "trackingUrl": None}),
            ("order.status", {"id": 1, "status": "packed", "note": ""}),
            ("order.status", {"id": 1, "status": "delivered", "note": ""}),
        ]
        for s in (tab2, bob):
            assert [(e.type, e.json()) for e in await s.events(3)] == expected
        assert [(e.type, e.json()) for e in await tab1.events(2)] == [expected[0], expected[2]]
        # the example config reads the laravel format: the marker is broadcast like one
        before = await fence(
            redis_client,
            "private-orders.1",
            tab1,
            tab2,
            bob,
            payload=lambda marker: {"event": "Fence", "data": {"m": marker}, "socket": None},
            prefix=prefix,
        )
        assert before == [[], [], []]
