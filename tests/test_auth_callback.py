"""``auth.mode = "callback"`` end to end: a real aiohttp app in the test process
plays the Laravel app answering ``GET /auth?channel=...``; real broker, real Redis.

What must hold: the browser's credentials and origin reach the app; allowed
answers are cached by credentials only, denials never; identical questions
are asked once; at most ``max_concurrency`` calls are in flight; anything but
a well-formed 200/401/403 fails closed (503, retryable), never open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import BrokerProcess, StartBroker, free_port
from helpers import envelope, eventually, fence, get, publish, serve, stream
from sse_client import SSEClient

# -- the fake app --------------------------------------------------------------------------


@dataclass
class Answer:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    delay: float = 0.0
    location: str | None = None
    content_type: str = "application/json"

    def response(self) -> web.Response:
        headers = {"Location": self.location} if self.location else None
        body = self.body if isinstance(self.body, bytes) else orjson.dumps(self.body)
        if self.body is None:
            body = b""
        return web.Response(
            status=self.status, body=body, content_type=self.content_type, headers=headers
        )


def allow(user: Any = "u1", tenant: Any = None, channels: Any = ("feed",), **more: Any) -> Answer:
    return Answer(body={"user": user, "tenant": tenant, "channels": list(channels), **more})


@dataclass
class Call:
    headers: dict[str, str]
    channels: list[str]
    path: str


@dataclass
class FakeApp:
    """Answers by the ``laravel_session`` cookie (else by Authorization, else ``default``)."""

    url: str = ""
    answers: dict[str, Answer] = field(default_factory=dict)
    default: Answer = field(default_factory=allow)
    calls: list[Call] = field(default_factory=list)
    gate: asyncio.Event | None = None  # when set: every call waits for it

    async def call_count(self) -> int:
        return len(self.calls)

    def calls_for(self, session: str) -> int:
        return sum(
            1 for c in self.calls if f"laravel_session={session}" in c.headers.get("Cookie", "")
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(
            Call(dict(request.headers), request.query.getall("channel", []), request.path)
        )
        key = request.cookies.get("laravel_session") or request.headers.get("Authorization", "")
        answer = self.answers.get(key, self.default)
        if self.gate is not None:
            await self.gate.wait()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        return answer.response()


@pytest.fixture
async def app() -> AsyncIterator[FakeApp]:
    fake = FakeApp()
    web_app = web.Application()
    web_app.router.add_get("/auth", fake.handle)
    web_app.router.add_get("/allow", fake.handle)  # a redirect target that would allow
    async with serve(web_app) as fake.url:
        try:
            yield fake
        finally:
            if fake.gate is not None:
                fake.gate.set()


async def callback_broker(start_broker: StartBroker, app: FakeApp, *sets: str) -> BrokerProcess:
    return await start_broker(
        "auth.mode=callback",
        f"auth.callback.url={app.url}/auth",
        "auth.callback.key=brokerkey",
        *sets,
    )


# -- client helpers ------------------------------------------------------------------------


def session(value: str, **extra: str) -> dict[str, str]:
    cookies = {"laravel_session": value, **extra}
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}


async def soft_refusal(broker: BrokerProcess, headers: dict[str, str], *channels: str) -> Any:
    """An EventSource request refused retryably: 200, one ``broker.reconnect``, closed."""
    async with SSEClient.connect(broker.events_url(*channels), headers=headers) as s:
        assert s.status == 200, await s.text()
        assert await s.wait_closed(timeout=10)
        assert [e.type for e in s.pending] == ["broker.reconnect"], s.raw
        assert s.parser.retry is not None
        return s.pending[0].json()


def assert_retryable_503(status: int, body: Any, headers: Any) -> None:
    assert status == 503, body
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    assert int(headers["Retry-After"]) >= 1


# -- what reaches the app ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("trusted", [True, False])
async def test_app_receives_credentials_and_client_headers(
    start_broker: StartBroker, app: FakeApp, http: aiohttp.ClientSession, trusted: bool
) -> None:
    sets = ["server.trusted_proxies=['127.0.0.1']"] if trusted else []
    broker = await callback_broker(start_broker, app, *sets)
    app.default = allow(channels=["feed", "news"])
    headers = {
        **session("s3ss10n", _ga="GA1.2.3"),
        "Authorization": "Bearer app-token",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Host": "app.example.com",
    }
    assert (await get(http, broker.events_url("feed", "news"), headers))[0] == 200
    [call] = app.calls
    assert call.path == "/auth"
    assert call.channels == ["feed", "news"]
    assert call.headers["Cookie"] == "laravel_session=s3ss10n; _ga=GA1.2.3"
    assert call.headers["Authorization"] == "Bearer app-token"
    assert call.headers["X-SSE-Broker-Key"] == "brokerkey"
    hops = [h.strip() for h in call.headers["X-Forwarded-For"].split(",")]
    if trusted:
        # a trusted proxy's chain, extended with that proxy, as a proxy does
        assert hops == ["203.0.113.9", "127.0.0.1"], hops
        assert call.headers["X-Forwarded-Host"] == "app.example.com"
    else:
        # a client cannot choose the address or host the app sees
        assert hops == ["127.0.0.1"], hops
        assert broker.url is not None
        assert call.headers["X-Forwarded-Host"] == broker.url.removeprefix("http://")


async def test_host_is_forwarded_when_no_proxy_named_one(
    start_broker: StartBroker, app: FakeApp, http: aiohttp.ClientSession
) -> None:
    broker = await callback_broker(start_broker, app)
    assert (await get(http, broker.events_url("feed"), session("s1")))[0] == 200
    [call] = app.calls
    assert broker.url is not None
    assert call.headers["X-Forwarded-Host"] == broker.url.removeprefix("http://")
    assert call.headers["X-Forwarded-For"] == "127.0.0.1"
    assert "Authorization" not in call.headers


# -- caching -------------------------------------------------------------------------------


async def test_allowed_answers_are_cached_by_everything_forwarded(
    start_broker: StartBroker, app: FakeApp, http: aiohttp.ClientSession
) -> None:
    broker = await callback_broker(start_broker, app, "auth.callback.cache_ttl_seconds=30")
    url = broker.events_url("feed")
    assert (await get(http, url, session("A", _ga="1")))[0] == 200
    assert len(app.calls) == 1
    # the very same request: the same answer, from the cache
    assert (await get(http, url, session("A", _ga="1")))[0] == 200
    assert len(app.calls) == 1
    # the app sees the raw Cookie header and may read any cookie in it (and the
    # first of a duplicate, as PHP does): another header is another question
    for headers in (
        session("A", _ga="2"),
        {"Cookie": "_ga=1; laravel_session=A"},
        {"Cookie": "laravel_session=X; laravel_session=A; _ga=1"},
        {**session("A", _ga="1"), "Host": "other.example"},
        {**session("B", _ga="1")},
        {**session("A", _ga="1"), "Authorization": "Bearer x"},
    ):
        assert (await get(http, url, headers))[0] == 200
    assert len(app.calls) == 7
    assert await broker.metric("sse_broker_auth_backend_calls_total", {"result": "cache_hit"}) == 1


@pytest.mark.slow
async def test_cache_lifetime_is_min_of_answer_ttl_and_cache_ttl(
    start_broker: StartBroker, app: FakeApp, http: aiohttp.ClientSession
) -> None:
    broker = await callback_broker(start_broker, app, "auth.callback.cache_ttl_seconds=5")
    app.answers = {
        "long": allow(ttl=600),  # capped at cache_ttl_seconds = 5
        "short": allow(ttl=1.5),
        "zero": allow(ttl=0),  # not cached at all
        "negative": allow(ttl=-5),  # nonsense: not cached
        "missing": allow(),  # cache_ttl_seconds
    }
    url = broker.events_url("feed")

    async def ask_all(names: Sequence[str]) -> dict[str, int]:
        for name in names:
            assert (await get(http, url, session(name)))[0] == 200
        return {n: app.calls_for(n) for n in names}

    names = list(app.answers)
    started = time.monotonic()
    await ask_all(names)
    assert await ask_all(names) == {"long": 1, "short": 1, "zero": 2, "negative": 2, "missing": 1}
    assert time.monotonic() - started < 1.5, "too slow to observe the short ttl"
    await asyncio.sleep(max(0.0, started + 2.2 - time.monotonic()))
    assert await ask_all(names) == {"long": 1, "short": 2, "zero": 3, "negative": 3, "missing": 1}
    assert time.monotonic() - started < 5, "too slow to observe cache_ttl_seconds"
    await asyncio.sleep(max(0.0, started + 5.3 - time.monotonic()))
    assert await ask_all(["long", "missing"]) == {"long": 2, "missing": 2}


@pytest.mark.slow
async def test_no_credentials_is_401_without_a_call(
    start_broker: StartBroker, app: FakeApp, http: aiohttp.ClientSession
) -> None:
    broker = await callback_broker(start_broker, app)
    for headers in (
        {},
        {"Cookie": "_ga=GA1.2.3; theme=dark"},  # cookies, but not credential cookies
        {"Authorization": ""},
    ):
        status, body, resp_headers = await get(http, broker.events_url("feed"), headers)
        assert status == 401, (headers, body)
        assert body["error"] == "credentials_required"
        assert "WWW-Authenticate" in resp_headers
    assert app.calls == []


@pytest.mark.slow
async def test_denials_are_not_cached(
    start_broker: StartBroker, app: FakeApp, http: aiohttp.ClientSession
) -> None:
    broker = await callback_broker(start_broker, app)
    app.answers = {"out": Answer(401, {"message": "log in"}), "no": Answer(403, {})}
    url = broker.events_url("feed")
    for _ in range(3):
        status, body, _ = await get(http, url, session("out"))
        assert (status, body["error"]) == (401, "denied")
        status, body, _ = await get(http, url, session("no"))
        assert (status, body["error"]) == (403, "denied")
    assert (app.calls_for("out"), app.calls_for("no")) == (3, 3)
    # EventSource clients get the hard status too: retrying would not help
    async with SSEClient.connect(url, headers=session("no")) as s:
        assert s.status == 403
    # once the app allows, the next request is allowed at once
    app.answers["out"] = allow()
    assert (await get(http, url, session("out")))[0] == 200
    assert await broker.metric("sse_broker_auth_failures_total", {"reason": "denied"}) == 7


async def test_a_cached_identity_is_asked_again_for_channels_it_lacks(
    start_broker: StartBroker, app: FakeApp, http: aiohttp.ClientSession
) -> None:
    broker = await callback_broker(start_broker, app)
    app.default = allow(channels=["feed"])
    assert (await get(http, broker.events_url("feed"), session("A")))[0] == 200
    status, body, _ = await get(http, broker.events_url("feed", "billing"), session("A"))
    assert status == 403 and "'billing'" in body["message"], body
    assert [c.channels for c in app.calls] == [["feed"], ["feed", "billing"]]


# -- coalescing and the concurrency cap ----------------------------------------------------


async def test_identical_concurrent_requests_are_coalesced(
    start_broker: StartBroker, app: FakeApp, http: aiohttp.ClientSession
) -> None:
    broker = await callback_broker(start_broker, app)
    app.gate = asyncio.Event()
    url = broker.events_url("feed")
    tasks = [asyncio.create_task(get(http, url, session("same"))) for _ in range(20)]
    try:
        await eventually(
            lambda: broker.metric("sse_broker_auth_backend_calls_total", {"result": "coalesced"}),
            lambda v: v == 19,
        )
        assert len(app.calls) == 1
    finally:
        app.gate.set()
    results = await asyncio.gather(*tasks)
    assert [r[0] for r in results] == [200] * 20
    assert len(app.calls) == 1


async def test_max_concurrency_sheds_the_excess_retryably(
    start_broker: StartBroker, app: FakeApp, http: aiohttp.ClientSession
) -> None:
    broker = await callback_broker(start_broker, app, "auth.callback.max_concurrency=2")
    app.gate = asyncio.Event()
    url = broker.events_url("feed")
    in_flight = [asyncio.create_task(get(http, url, session(f"s{i}"))) for i in range(2)]
    try:
        await eventually(app.call_count, lambda n: n == 2)
        # plain clients: 503 JSON with Retry-After
        for i in range(2, 6):
            status, body, headers = await get(http, url, session(f"s{i}"))
            assert_retryable_503(status, body, headers)
            assert body["error"] == "auth_saturated"
        # EventSource clients: 200, broker.reconnect (auth_unavailable), closed
        data = await soft_refusal(broker, session("s9"), "feed")
        assert data["reason"] == "auth_unavailable" and data["retry_ms"] >= 0
        # a question already in flight is joined, not refused
        joined = asyncio.create_task(get(http, url, session("s0")))
        await eventually(
            lambda: broker.metric("sse_broker_auth_backend_calls_total", {"result": "coalesced"}),
            lambda v: v == 1,
        )
        assert len(app.calls) == 2  # the refused ones never reached the app
    finally:
        app.gate.set()
    assert [r[0] for r in await asyncio.gather(*in_flight, joined)] == [200, 200, 200]
    # capacity is back
    assert (await get(http, url, session("s7")))[0] == 200


# -- failing closed ------------------------------------------------------------------------

FAILURES: dict[str, Answer] = {
    "timeout": Answer(delay=3.0, body={"user": "u1", "channels": ["feed"]}),
    "500": Answer(500, {"user": "u1", "channels": ["feed"]}),
    "502": Answer(502, b"bad gateway", content_type="text/plain"),
    "503": Answer(503, {}),
    "302_to_allow": Answer(302, location="/allow"),
    "301_to_allow": Answer(301, location="/allow"),
    "307_to_allow": Answer(307, location="/allow"),
    "204": Answer(204),
    "404": Answer(404, {}),
    "400": Answer(400, {}),
    "429": Answer(429, {}),
    "419": Answer(419, {}),
    "200_html": Answer(200, b"<html>login</html>", content_type="text/html"),
    "200_empty": Answer(200, b""),
    "200_truncated": Answer(200, b'{"user": "u1", "channels": ["feed"'),
    "200_array": Answer(200, [{"user": "u1", "channels": ["feed"]}]),
    "200_string": Answer(200, "allowed"),
    "200_true": Answer(200, True),
    "200_channels_string": Answer(200, {"user": "u1", "channels": "feed"}),
    "200_channels_ints": Answer(200, {"user": "u1", "channels": [1]}),
    "200_channels_null_item": Answer(200, {"user": "u1", "channels": ["feed", None]}),
    "200_user_float": Answer(200, {"user": 1.5, "channels": ["feed"]}),
    "200_user_object": Answer(200, {"user": {"id": 1}, "channels": ["feed"]}),
    "200_user_bool": Answer(200, {"user": True, "channels": ["feed"]}),
    "200_tenant_list": Answer(200, {"user": "u1", "tenant": ["t1"], "channels": ["feed"]}),
}


@pytest.mark.slow
async def test_backend_failures_fail_closed(
    start_broker: StartBroker, app: FakeApp, http: aiohttp.ClientSession
) -> None:
    broker = await callback_broker(start_broker, app, "auth.callback.timeout_seconds=0.5")
    app.answers = dict(FAILURES)
    app.default = Answer(500, {})  # a path without a session must not allow either
    url = broker.events_url("feed")
    for name in FAILURES:
        for attempt in range(2):  # failures are not cached: asked again each time
            status, body, headers = await get(http, url, session(name))
            assert status != 200, (name, body)
            assert_retryable_503(status, body, headers)
            assert body["error"] == "auth_unavailable", (name, body)
            assert app.calls_for(name) == attempt + 1, name
        data = await soft_refusal(broker, session(name), "feed")
        assert data["reason"] == "auth_unavailable", name
    assert all(c.path == "/auth" for c in app.calls), "a redirect was followed"
    assert broker.returncode is None
    assert (await broker.get("/healthz", admin=False))[0] == 200


async def test_unreachable_app_fails_closed_without_revealing_its_address(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    broker = await start_broker(
        "auth.mode=callback", f"auth.callback.url=http://127.0.0.1:{port}/internal/auth"
    )
    status, body, headers = await get(http, broker.events_url("feed"), session("s1"))
    assert_retryable_503(status, body, headers)
    assert (await soft_refusal(broker, session("s1"), "feed"))["reason"] == "auth_unavailable"
    # anyone with any cookie gets this answer: it must not map the internal network
    assert str(port) not in body["message"] and "/internal/auth" not in body["message"], body


# -- the answer's identity filters events --------------------------------------------------


@pytest.mark.slow
async def test_user_and_tenant_from_the_answer_filter_events(
    start_broker: StartBroker, app: FakeApp, redis_client: Any, http: aiohttp.ClientSession
) -> None:
    broker = await callback_broker(start_broker, app, "auth.grants=['user.{user}']")
    app.answers = {
        "alice": allow(user="u1", tenant="t1", channels=["feed"]),
        "bob": allow(user=2, tenant=7, channels=["feed"]),
    }
    async with (
        stream(broker, "feed", "user.u1", headers=session("alice")) as alice,
        stream(broker, "feed", "user.2", headers=session("bob")) as bob,
    ):
        items = [
            ("feed", envelope("t1 only", tenant="t1")),
            ("feed", envelope("bob only", users=[2])),
            ("feed", envelope("alice in t1", users=["u1"], tenant="t1")),
            ("feed", envelope("bob in 7", users=["2"], tenant=7)),
            ("feed", envelope("alice in t2", users=["u1"], tenant="t2")),
            ("user.u1", envelope("u1 channel")),
            ("user.2", envelope("2 channel")),
            ("feed", envelope("everyone")),
        ]
        for channel, item in items:
            await publish(redis_client, channel, item)
        got_alice = [e.data for e in await alice.events(4)]
        got_bob = [e.data for e in await bob.events(4)]
        assert got_alice == ["t1 only", "alice in t1", "u1 channel", "everyone"]
        assert got_bob == ["bob only", "bob in 7", "2 channel", "everyone"]
        # a marker for everyone on "feed", published after every item above
        assert await fence(redis_client, "feed", alice, bob) == [[], []]
    # the answer's grants (plus config grants) are all there is
    status, body, _ = await get(http, broker.events_url("user.2"), session("alice"))
    assert status == 403 and "'user.2'" in body["message"]
