"""Admin POSTs (``/publish``, ``/admin/disconnect``) accept only ``Content-Type: application/json``.

The attack: the admin listener is reachable from an operator's (or any
visitor's) browser, and ``/admin/disconnect`` needs no key when
``publish.keys`` is unset. A page on another site cannot read the answer, but
it does not need to: a cross-site *form* POST (``text/plain``,
``application/x-www-form-urlencoded``, ``multipart/form-data``) is sent without
a CORS preflight, and a ``text/plain`` form can carry a valid JSON body. Any
other content type is preflighted, and the admin listener grants no preflight.
So every admin POST must say ``application/json`` (parameters and any case
allowed) or gets ``415`` before authentication and before its body is read.
Each refusal below is followed by a fence (an event published afterwards
must be the next thing the stream receives) to prove it changed nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from browser import Browser, Page, browser  # noqa: F401
from conftest import BrokerProcess, StartBroker
from helpers import envelope, publish, serve, stream
from sse_client import SSEStream

SECRET = "admin-api-test-secret-0123456789abcdef0123456789"
KEY = "admin-api-key"
JSON = "application/json"
UNSUPPORTED = "unsupported_media_type"

# (Content-Type, or None for no header at all): what a page on another site can send
# without a preflight, and other near misses.
NOT_JSON: list[str | None] = [
    "text/plain",
    "text/plain;charset=UTF-8",  # a browser's fetch() with a string body
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "text/json",
    "application/jsonx",
    "application/json-patch+json",
    "application/x-json",
    "json",
    "",
    None,
]


def token(user: str) -> str:
    claims = {"sub": user, "exp": int(time.time()) + 300, "channels": ["news"]}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def admin_post(
    http: aiohttp.ClientSession,
    broker: BrokerProcess,
    path: str,
    body: bytes,
    content_type: str | None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """POST raw ``body`` to the admin listener with exactly this ``Content-Type``."""
    sent = dict(headers or {})
    if content_type is not None:
        sent["Content-Type"] = content_type
    async with http.post(
        f"{broker.admin_url}{path}",
        data=body,
        headers=sent,
        # aiohttp would otherwise add application/octet-stream for bytes
        skip_auto_headers=() if content_type is not None else ("Content-Type",),
    ) as resp:
        raw = await resp.read()
        assert resp.content_type == JSON, (resp.status, raw)
        return resp.status, orjson.loads(raw)


def assert_415(status: int, answer: Any, content_type: str | None) -> None:
    assert status == 415, (content_type, answer)
    assert answer["error"] == UNSUPPORTED, answer
    assert "Content-Type: application/json" in answer["message"], answer


async def fence(redis: aioredis.Redis, streams: list[SSEStream], marker: str) -> None:
    """Publish ``marker``: it must be the next event of every stream (nothing came before)."""
    await publish(redis, "news", envelope(marker))
    for s in streams:
        event = await s.next_event()
        assert (event.type, event.data) == ("message", marker), s.raw
        assert not s.closed


@contextlib.asynccontextmanager
async def user_streams(broker: BrokerProcess, *users: str) -> AsyncIterator[list[SSEStream]]:
    """One open stream on ``news`` per user (JWT ``sub``), in order."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                stream(broker, "news", headers={"Authorization": f"Bearer {token(u)}"})
            )
            for u in users
        ]


async def jwt_broker(start_broker: StartBroker, *sets: str) -> BrokerProcess:
    return await start_broker("auth.mode=jwt", f"auth.jwt.secret={SECRET}", *sets)


# -- /admin/disconnect ---------------------------------------------------------------------


@pytest.mark.slow
async def test_a_form_post_to_disconnect_is_415_and_closes_nothing(
    start_broker: StartBroker, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    broker = await jwt_broker(start_broker)  # no publish keys: no bearer is asked for
    async with user_streams(broker, "u1", "u2") as (u1, u2):
        for body in (b'{"user":"u1"}', b'{"user":"u1","pad":"="}\r\n'):  # the latter: a form
            for content_type in NOT_JSON:
                status, answer = await admin_post(
                    http, broker, "/admin/disconnect", body, content_type
                )
                assert_415(status, answer, content_type)
        await fence(redis_client, [u1, u2], "after the refused posts")
        assert await broker.metric("sse_broker_connections") == 2

        # The same request as JSON is obeyed (parameters and case do not matter).
        status, answer = await admin_post(
            http, broker, "/admin/disconnect", b'{"user":"u1"}', "Application/JSON; charset=utf-8"
        )
        assert (status, answer) == (200, {"disconnected": 1})
        assert await u1.wait_closed(timeout=5)
        assert [e.type for e in u1.pending] == ["broker.reconnect"]
        await fence(redis_client, [u2], "u2 still open")
    assert await broker.metric("sse_broker_connections_closed_total", {"reason": "revoked"}) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "content_type",
    [
        JSON,
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        " application/json ;charset=UTF-8",
    ],
)
async def test_json_with_parameters_in_any_case_is_accepted(
    start_broker: StartBroker, http: aiohttp.ClientSession, content_type: str
) -> None:
    broker = await start_broker(f"publish.keys=['{KEY}']")
    bearer = {"Authorization": f"Bearer {KEY}"}
    body = orjson.dumps({"channel": "news", "data": 1})
    assert await admin_post(http, broker, "/publish", body, content_type, bearer) == (
        200,
        {"published": 1, "ids": []},
    )
    answer = await admin_post(
        http, broker, "/admin/disconnect", b'{"user": "u1"}', content_type, bearer
    )
    assert answer == (200, {"disconnected": 0})


@pytest.mark.slow
async def test_the_content_type_is_checked_before_the_key(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker(f"publish.keys=['{KEY}']")
    for path, body in (
        ("/publish", orjson.dumps({"channel": "news", "data": 1})),
        ("/admin/disconnect", b'{"user": "u1"}'),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}"}):
            status, answer = await admin_post(http, broker, path, body, "text/plain", headers)
            assert_415(status, answer, "text/plain")
        # with the right type, the key decides
        status, answer = await admin_post(
            http, broker, path, body, JSON, {"Authorization": "Bearer wrong"}
        )
        assert (status, answer["error"]) == (401, "unauthorized"), path


@pytest.mark.slow
async def test_unknown_admin_paths_and_methods_keep_their_404_and_405(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker()
    async with http.post(
        f"{broker.admin_url}/nope", data=b"x", headers={"Content-Type": "text/plain"}
    ) as resp:
        assert resp.status == 404
    for method in ("GET", "PUT", "OPTIONS"):
        async with http.request(method, f"{broker.admin_url}/admin/disconnect") as resp:
            assert resp.status == 405, method
            assert "Access-Control-Allow-Origin" not in resp.headers


# -- /publish ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_form_post_to_publish_with_a_valid_key_is_415_and_publishes_nothing(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker(f"publish.keys=['{KEY}']")
    bearer = {"Authorization": f"Bearer {KEY}"}
    async with stream(broker, "news") as s:
        for body in (
            orjson.dumps({"channel": "news", "data": "forged"}),
            orjson.dumps([{"channel": "news", "data": "forged", "event": "x"}]),
        ):
            for content_type in NOT_JSON:
                status, answer = await admin_post(
                    http, broker, "/publish", body, content_type, bearer
                )
                assert_415(status, answer, content_type)
        # The fence goes through /publish itself: the first event is the fence.
        fence_body = orjson.dumps({"channel": "news", "data": "the fence"})
        status, answer = await admin_post(http, broker, "/publish", fence_body, JSON, bearer)
        assert (status, answer) == (200, {"published": 1, "ids": []})
        event = await s.next_event()
        assert (event.type, event.data) == ("message", "the fence"), s.raw
    assert await broker.metric("sse_broker_events_ingested_total") == 1


# -- workers: the supervisor's admin listener ---------------------------------------------


@pytest.mark.slow
async def test_the_supervisor_refuses_form_posts_and_forwards_json(
    start_broker: StartBroker, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    supervisor = await jwt_broker(start_broker, "server.workers=2", f"publish.keys=['{KEY}']")
    bearer = {"Authorization": f"Bearer {KEY}"}
    async with user_streams(supervisor, "u1") as (u1,):
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            status, answer = await admin_post(
                http, supervisor, "/admin/disconnect", b'{"user":"u1"}', content_type, bearer
            )
            assert_415(status, answer, content_type)
            status, answer = await admin_post(
                http,
                supervisor,
                "/publish",
                orjson.dumps({"channel": "news", "data": "forged"}),
                content_type,
                bearer,
            )
            assert_415(status, answer, content_type)
        await fence(redis_client, [u1], "after the refused posts")
        # JSON goes through to the workers (which check the type too)
        body = orjson.dumps({"channel": "news", "data": "published"})
        assert await admin_post(http, supervisor, "/publish", body, JSON, bearer) == (
            200,
            {"published": 1, "ids": []},
        )
        assert (await u1.next_event()).data == "published"
        status, answer = await admin_post(
            http, supervisor, "/admin/disconnect", b'{"user":"u1"}', JSON, bearer
        )
        assert (status, answer) == (200, {"disconnected": 1})
        assert await u1.wait_closed(timeout=5)


# -- the real attack: a page on another site, in a real browser ----------------------------

ATTACKER_PAGE = "<!doctype html><meta charset='utf-8'><title>another site</title><body>"

# What the page tries, each without the visitor noticing. Returns what it could see.
ATTACK = """
(async (url) => {
    const body = '{"user":"u1"}';
    const seen = {};
    // fetch() with a string body: text/plain;charset=UTF-8, no preflight, an opaque answer.
    seen.text = (await fetch(url, {method: "POST", mode: "no-cors", body})).type;
    seen.form = (await fetch(url, {
        method: "POST", mode: "no-cors", body,
        headers: {"Content-Type": "application/x-www-form-urlencoded"},
    })).type;
    // no-cors may not set a JSON type: the browser drops the header, text/plain goes out.
    seen.dropped = (await fetch(url, {
        method: "POST", mode: "no-cors", body, headers: {"Content-Type": "application/json"},
    })).type;
    // A JSON POST needs a preflight, which the admin listener does not grant.
    try {
        await fetch(url, {method: "POST", body, headers: {"Content-Type": "application/json"}});
        seen.json = "sent";
    } catch (e) {
        seen.json = e.name;
    }
    return seen;
})
"""

# A text/plain form whose body is JSON: name + "=" + value + CRLF = {"user":"u1","pad":"="}
SUBMIT_FORM = """
((url, enctype) => {
    const form = document.createElement("form");
    form.method = "POST";
    form.action = url;
    form.enctype = enctype;
    const input = document.createElement("input");
    input.name = '{"user":"u1","pad":"';
    input.value = '"}';
    form.appendChild(input);
    document.body.appendChild(form);
    form.submit();
})
"""


async def submit_form(page: Page, url: str, enctype: str) -> Any:
    """Submit a form from the page (a top-level navigation) and return the answer's JSON."""
    loaded = page.browser.expect_event("Page.loadEventFired", page.session_id)
    try:
        await page.evaluate(f"{SUBMIT_FORM}({orjson.dumps(url).decode()}, {enctype!r})")
        await loaded
    finally:
        loaded.cancel()
    return orjson.loads(await page.evaluate("document.body.innerText"))


@pytest.mark.slow
async def test_a_page_on_another_site_cannot_disconnect_a_user(
    browser: Browser,  # noqa: F811
    start_broker: StartBroker,
    redis_client: aioredis.Redis,
) -> None:
    page = browser.page
    assert page is not None
    broker = await jwt_broker(start_broker)  # no publish keys
    url = f"{broker.admin_url}/admin/disconnect"

    async def attacker_page(request: web.Request) -> web.Response:
        return web.Response(text=ATTACKER_PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", attacker_page)
    async with serve(app) as attacker, user_streams(broker, "u1") as (u1,):
        await page.navigate(attacker + "/")
        seen = await page.evaluate(f"{ATTACK}({orjson.dumps(url).decode()})")
        assert seen == {
            "text": "opaque",
            "form": "opaque",
            "dropped": "opaque",
            "json": "TypeError",
        }
        await fence(redis_client, [u1], "after the fetches")
        # The forms' answers are shown in the tab: the broker refused them.
        for enctype in ("text/plain", "application/x-www-form-urlencoded"):
            await page.navigate(attacker + "/")
            answer = await submit_form(page, url, enctype)
            assert answer.get("error") == UNSUPPORTED, (enctype, answer)
        await fence(redis_client, [u1], "after the forms")
    assert await broker.metric("sse_broker_connections_closed_total", {"reason": "revoked"}) is None
