"""``auth.mode = "laravel"`` and ``ingest.format = "laravel"`` against a REAL Laravel
8.83 app (``tests/laravel_app`` under ``php -S``, see ``tests/laravel_real.py``).

The stock answers of Laravel's Redis broadcaster must open streams: ``true`` for
a private channel, ``{"channel_data": {"user_id", "user_info"}}`` for a presence
channel; its 403 must refuse. And a 2xx that is not such an answer must never
open a channel (issue 10, finding 2): a catch-all HTML page, an empty 204,
``false``, ``{}``, ``{"auth": 5}``, an empty ``user_id``, and ``true`` for a
presence channel (what Laravel itself answers when a presence callback returns
``true`` instead of member info). Those are refused as the app being
unavailable: a retryable 503 ``auth_unavailable``, for an EventSource a 200
carrying one ``broker.reconnect`` and nothing of the channel.

Events come from ``broadcast(new ...)`` in the app (phpredis, Laravel's prefix
``laravel_database_``), never from the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import pytest
from conftest import BrokerProcess, RedisServer, StartBroker
from helpers import get, stream
from laravel_real import REDIS_PREFIX, LaravelApp, browser
from sse_client import SSEClient, SSEStream

ORDER_SHIPPED = "App\\Events\\OrderShipped"  # no broadcastAs(): the class name


@pytest.fixture
async def app(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[LaravelApp]:
    laravel = await LaravelApp.start(redis_server, tmp_path / "laravel")
    try:
        yield laravel
    finally:
        await laravel.stop()
        print(f"\n--- php -S {laravel.url} log ---\n{laravel.log_text()}")


async def laravel_broker(
    start_broker: StartBroker, app: LaravelApp, path: str = "/broadcasting/auth"
) -> BrokerProcess:
    return await start_broker(
        "auth.mode=laravel",
        f"auth.laravel.url={app.url}{path}",
        "ingest.format=laravel",
        f"ingest.prefix={REDIS_PREFIX}",
    )


async def backend_calls(broker: BrokerProcess, result: str) -> float:
    return await broker.metric("sse_broker_auth_backend_calls_total", {"result": result}) or 0


# -- what the app answers (no broker): the premises of the tests below ----------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "channel", "status", "content_type", "body"),
    [
        # Laravel's RedisBroadcaster: json_encode(true) returned as a string, so
        # Content-Type is text/html, not application/json.
        ("/broadcasting/auth", "private-orders.1", 200, "text/html", b"true"),
        (
            "/broadcasting/auth",
            "presence-room.1",
            200,
            "text/html",
            b'{"channel_data":{"user_id":1,"user_info":{"id":1,"name":"User 1"}}}',
        ),
        ("/broadcasting/auth", "presence-lobby", 200, "text/html", b"true"),
        ("/broadcasting/auth", "private-orders.2", 403, "application/json", None),
        ("/app/broadcasting/auth", "private-orders.1", 200, "text/html", None),
        ("/hostile/no-content", "private-orders.1", 204, None, b""),
        ("/hostile/false", "private-orders.1", 200, "application/json", b"false"),
        ("/hostile/empty-object", "private-orders.1", 200, "application/json", b"{}"),
        ("/hostile/auth-not-a-string", "private-orders.1", 200, "application/json", b'{"auth":5}'),
        (
            "/hostile/empty-user-id",
            "presence-room.1",
            200,
            "application/json",
            b'{"channel_data":{"user_id":"","user_info":{"name":"nobody"}}}',
        ),
    ],
)
async def test_the_real_app_answers_the_broker_s_question_as_the_tests_assume(
    app: LaravelApp,
    path: str,
    channel: str,
    status: int,
    content_type: str | None,
    body: bytes | None,
) -> None:
    cookies = await app.login(1)
    # exactly what the broker sends (tests/test_laravel_auth.py checks that it does)
    headers = {
        **browser(cookies),
        "X-XSRF-TOKEN": unquote(cookies["XSRF-TOKEN"]),
        "X-Requested-With": "XMLHttpRequest",
        "Accept": "application/json",
    }
    form = {"channel_name": channel, "socket_id": "0.0"}
    async with app.http.post(app.url + path, data=form, headers=headers) as resp:
        got = await resp.read()
        assert resp.status == status, got[:2000]
        if content_type is not None:
            assert resp.content_type == content_type
        if body is not None:
            assert got == body
        elif path.startswith("/app/"):
            assert got.startswith(b"<!doctype html>")


# -- Laravel's stock answers --------------------------------------------------------------


@pytest.mark.slow
async def test_stock_true_answer_opens_a_private_channel_that_laravel_broadcasts_reach(
    start_broker: StartBroker, app: LaravelApp
) -> None:
    broker = await laravel_broker(start_broker, app)
    async with stream(broker, "private-orders.1", headers=browser(await app.login(1))) as s:
        await app.get("/orders/1/ship")  # broadcast(new OrderShipped(1, 'shipped'))
        [event] = await s.events(1)
    assert (event.type, event.json()) == (ORDER_SHIPPED, {"orderId": 1, "status": "shipped"})
    assert await backend_calls(broker, "allowed") == 1


@pytest.mark.slow
async def test_laravel_s_403_for_another_user_s_channel_is_a_403_naming_it(
    start_broker: StartBroker, app: LaravelApp, http: aiohttp.ClientSession
) -> None:
    broker = await laravel_broker(start_broker, app)
    headers = browser(await app.login(1))
    status, body, _ = await get(http, broker.events_url("private-orders.2"), headers)
    assert status == 403, body
    assert body["error"] == "channel_forbidden"
    assert "private-orders.2" in body["message"]
    # an EventSource gets the same hard refusal
    async with SSEClient.connect(broker.events_url("private-orders.2"), headers=headers) as s:
        assert s.status == 403
        assert (await s.json())["error"] == "channel_forbidden"


@pytest.mark.slow
async def test_a_guest_session_is_refused_with_laravel_s_403(
    start_broker: StartBroker, app: LaravelApp, http: aiohttp.ClientSession
) -> None:
    # A session that never logged in: Laravel 8's broadcaster answers 403, not 401.
    broker = await laravel_broker(start_broker, app)
    headers = browser(await app.guest())
    status, body, _ = await get(http, broker.events_url("private-orders.1"), headers)
    assert status == 403, body
    assert body["error"] == "channel_forbidden"


@pytest.mark.slow
async def test_stock_presence_answer_opens_the_stream_and_makes_its_user_the_streams(
    start_broker: StartBroker, app: LaravelApp, http: aiohttp.ClientSession
) -> None:
    broker = await laravel_broker(start_broker, app)
    async with stream(broker, "presence-room.1", headers=browser(await app.login(3))) as s:
        await app.get("/presence/room.1/say/hello")
        [event] = await s.events(1)
        assert (event.type, event.json()) == ("room.message", {"text": "hello"})
        # channel_data.user_id (3) is the stream's user: revoking user 1 leaves it
        # open, revoking user 3 closes it
        for user, closed in (("1", 0), ("3", 1)):
            async with http.post(
                f"{broker.admin_url}/admin/disconnect", json={"user": user}
            ) as resp:
                assert (resp.status, await resp.json()) == (200, {"disconnected": closed})
        assert await s.wait_closed()
        assert [(e.type, e.json()["reason"]) for e in s.pending] == [
            ("broker.reconnect", "revoked")
        ]


# -- 2xx answers that allow nothing ---------------------------------------------------------


async def read_refusal(s: SSEStream, app: LaravelApp, trigger: str) -> None:
    """After the response headers: have the app broadcast on the refused channel
    (``trigger``), then on ``news`` (the fence, which the stream also asked for), and
    read until the stream ends or the fence arrives. A refused stream has ended by
    itself; an opened one shows what leaked before the fence."""
    assert s.status == 200, await s.text()
    await app.get(trigger)
    await app.get("/news/fence")
    await s.wait_for(
        lambda st: st.closed or any(e.type == "news" for e in st.pending),
        what="the end of the stream or the fence",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "channel", "trigger"),
    [
        # auth.laravel.url off by a prefix: the app's catch-all route answers its HTML shell
        ("/app/broadcasting/auth", "private-orders.1", "/orders/1/ship"),
        ("/hostile/no-content", "private-orders.1", "/orders/1/ship"),
        ("/hostile/false", "private-orders.1", "/orders/1/ship"),
        ("/hostile/empty-object", "private-orders.1", "/orders/1/ship"),
        ("/hostile/auth-not-a-string", "private-orders.1", "/orders/1/ship"),
        # Laravel's own answer when a presence callback returns true: no channel_data
        ("/broadcasting/auth", "presence-lobby", "/presence/lobby/say/leak"),
        ("/hostile/empty-user-id", "presence-room.1", "/presence/room.1/say/leak"),
    ],
    ids=[
        "catch-all-html-200",
        "empty-204",
        "json-false",
        "object-without-auth-or-channel-data",
        "non-string-auth",
        "true-for-presence",
        "empty-user-id-for-presence",
    ],
)
async def test_an_answer_that_is_not_a_broadcasters_does_not_open_the_channel(
    start_broker: StartBroker,
    app: LaravelApp,
    http: aiohttp.ClientSession,
    path: str,
    channel: str,
    trigger: str,
) -> None:
    """``auth.laravel.url`` = ``path`` of the app, user 1 logged in, asking ``channel``:
    a plain request gets the retryable 503, an EventSource the retryable refusal and
    no event of the channel, while the app really broadcasts on it."""
    broker = await laravel_broker(start_broker, app, path)
    headers = browser(await app.login(1))
    async with SSEClient.connect(broker.events_url(channel, "news"), headers=headers) as s:
        await read_refusal(s, app, trigger)
        got = [(e.type, e.data) for e in s.pending]
        assert s.closed, f"the stream stayed open and received {got}"
        assert [(e.type, e.json()["reason"]) for e in s.pending] == [
            ("broker.reconnect", "auth_unavailable")
        ], got
    status, body, resp_headers = await get(http, broker.events_url(channel), headers)
    assert status == 503, f"a plain request got {status} {body!r}"
    assert isinstance(body, dict), body
    assert body["error"] == "auth_unavailable", body
    assert isinstance(body.get("message"), str), body
    assert int(resp_headers["Retry-After"]) >= 1
    assert await backend_calls(broker, "allowed") == 0
