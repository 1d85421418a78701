"""Connection limits, CORS and revocation end to end (real broker, real Redis, real HTTP).

Limits: the excess gets 429 JSON with ``Retry-After`` (plain clients) or a 200
with a jittered ``retry:`` and one ``broker.reconnect`` (``limit``) for an
EventSource; closing a stream frees its slot; per-IP counting believes
``X-Forwarded-For`` only from ``server.trusted_proxies``. CORS: allowed
origins (exact and ``https://*.example.com``) get credentials-enabled headers
on every response, look-alikes get none. Revocation: ``POST /admin/disconnect``
closes exactly the streams it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from conftest import BrokerProcess, StartBroker
from helpers import bearer, envelope, eventually, fence, get, publish, stream
from sse_client import SSEClient, SSEStream

SECRET = "limits-test-secret-" + "0123456789abcdef" * 4


def token(user: str | None = "u1", tenant: str | None = None, channels: Any = ("*",)) -> str:
    claims: dict[str, Any] = {"exp": int(time.time()) + 300, "channels": list(channels)}
    if user is not None:
        claims["sub"] = user
    if tenant is not None:
        claims["tenant"] = tenant
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def refused_429(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
    status, body, resp_headers = await get(http, url, headers)
    assert status == 429, body
    assert body["error"] == "too_many_connections"
    assert "limits.max_connections" in body["message"]
    assert int(resp_headers["Retry-After"]) >= 1
    assert resp_headers["Content-Type"].startswith("application/json")


async def soft_refusal(broker: BrokerProcess, url: str, headers: dict[str, str]) -> SSEStream:
    """An EventSource refused retryably: 200, ``retry:``, one ``broker.reconnect``, closed."""
    async with SSEClient.connect(url, headers=headers) as s:
        assert s.status == 200, await s.text()
        assert s.headers["Content-Type"].startswith("text/event-stream")
        assert await s.wait_closed(timeout=5)
        assert [e.type for e in s.pending] == ["broker.reconnect"], s.raw
        return s


async def admitted(broker: BrokerProcess, http: aiohttp.ClientSession, url: str, **kw: Any) -> None:
    """Until a plain request for ``url`` is admitted (a slot is freed asynchronously)."""

    async def probe() -> int:
        return (await get(http, url, **kw))[0]

    await eventually(probe, lambda status: status == 200)


# -- limits --------------------------------------------------------------------------------


async def test_max_connections_refuses_the_excess_and_a_close_frees_a_slot(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker("limits.max_connections=2", "sse.retry_ms=2000")
    url = broker.events_url("news")
    async with stream(broker, "news"), stream(broker, "news") as second:
        await refused_429(http, url, {})
        retries = []
        for _ in range(4):
            s = await soft_refusal(broker, url, {})
            data = s.pending[0].json()
            assert data["reason"] == "limit"
            assert 1000 <= data["retry_ms"] <= 3000
            assert s.parser.retry == data["retry_ms"]  # the retry: line is the jittered one
            retries.append(data["retry_ms"])
        assert len(set(retries)) > 1, f"retry is not jittered: {retries}"
        second.disconnect()
        await admitted(broker, http, url)
    refused = await broker.metric(
        "sse_broker_requests_refused_total", {"reason": "too_many_connections"}
    )
    assert refused is not None and refused >= 6


async def test_max_connections_per_tenant(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker(
        "auth.mode=jwt", f"auth.jwt.secret={SECRET}", "limits.max_connections_per_tenant=2"
    )
    url = broker.events_url("news")
    t1 = [bearer(token(f"u{i}", "t1")) for i in range(4)]
    async with stream(broker, "news", headers=t1[0]), stream(broker, "news", headers=t1[1]) as b:
        await refused_429(http, url, t1[2])
        s = await soft_refusal(broker, url, t1[3])
        assert s.pending[0].json()["reason"] == "limit"
        # other tenants and tenant-less identities are not counted against t1
        assert (await get(http, url, bearer(token("u9", "t2"))))[0] == 200
        assert (await get(http, url, bearer(token("u9", None))))[0] == 200
        b.disconnect()
        await admitted(broker, http, url, headers=t1[2])


async def test_max_connections_per_ip_ignores_forwarded_for_from_untrusted_peers(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker("limits.max_connections_per_ip=1")
    url = broker.events_url("news")
    async with stream(broker, "news", headers={"X-Forwarded-For": "198.51.100.1"}):
        # the peer is 127.0.0.1 whatever the client writes
        for xff in ("198.51.100.2", "198.51.100.3, 198.51.100.4", "127.0.0.2"):
            await refused_429(http, url, {"X-Forwarded-For": xff})
        s = await soft_refusal(broker, url, {"X-Forwarded-For": "198.51.100.5"})
        assert s.pending[0].json()["reason"] == "limit"


async def test_max_connections_per_ip_believes_trusted_proxies(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker(
        "limits.max_connections_per_ip=1", "server.trusted_proxies=['127.0.0.1', '10.0.0.0/8']"
    )
    url = broker.events_url("news")
    async with stream(broker, "news", headers={"X-Forwarded-For": "198.51.100.1"}) as one:
        # another client behind the proxy has its own count
        async with stream(broker, "news", headers={"X-Forwarded-For": "198.51.100.2"}):
            pass
        # the same client again, whatever it prepends or whichever trusted hops follow
        for xff in ("198.51.100.1", "6.6.6.6, 198.51.100.1", "198.51.100.1, 10.1.2.3"):
            await refused_429(http, url, {"X-Forwarded-For": xff})
        # no header: the proxy itself is the client
        assert (await get(http, url))[0] == 200
        one.disconnect()
        await admitted(broker, http, url, headers={"X-Forwarded-For": "198.51.100.1"})


async def test_concurrent_connects_do_not_overshoot_a_limit(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker("limits.max_connections_per_ip=3", "limits.max_connections=50")
    url = broker.events_url("news")
    timeout = aiohttp.ClientTimeout(total=10)
    responses = await asyncio.gather(*(http.get(url, timeout=timeout) for _ in range(15)))
    try:
        statuses = sorted(r.status for r in responses)
        assert statuses == [200] * 3 + [429] * 12, statuses
        assert await broker.metric("sse_broker_connections") == 3
    finally:
        for r in responses:
            r.close()


async def test_too_many_channels_is_400_even_for_event_source(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker("limits.max_channels_per_connection=2")
    url = broker.events_url("a", "b", "c")
    status, body, headers = await get(http, url)
    assert (status, body["error"]) == (400, "too_many_channels")
    assert "Retry-After" not in headers
    async with SSEClient.connect(url) as s:
        assert s.status == 400  # not retryable: no soft refusal
    # duplicates count once
    assert (await get(http, broker.events_url("a", "b", "a", "b")))[0] == 200


# -- CORS ----------------------------------------------------------------------------------

ALLOWED = ["https://dash.other.org", "https://app.example.com", "https://a.b.example.com"]
REFUSED = [
    "https://example.com.evil.com",
    "https://evilexample.com",
    "http://app.example.com",
    "https://example.com",
    "https://app.example.com.evil.com",
    "https://dash.other.org.evil.com",
    "http://dash.other.org",
    "https://evil.com",
    "null",
]


@pytest.fixture
async def cors_broker(start_broker: StartBroker) -> BrokerProcess:
    return await start_broker(
        "server.cors_origins=['https://dash.other.org', 'https://*.example.com']",
        "limits.max_channels_per_connection=2",
    )


def assert_cors(headers: Any, origin: str) -> None:
    assert headers.get("Access-Control-Allow-Origin") == origin
    assert headers.get("Access-Control-Allow-Credentials") == "true"
    assert "Origin" in headers.getall("Vary", [])


def assert_no_cors(headers: Any) -> None:
    assert not [k for k in headers if k.lower().startswith("access-control-")], dict(headers)


async def test_cors_allowed_origins_on_streams_errors_and_preflight(
    cors_broker: BrokerProcess, http: aiohttp.ClientSession
) -> None:
    for origin in ALLOWED:
        await check_allowed_origin(cors_broker, http, origin)


async def check_allowed_origin(
    cors_broker: BrokerProcess, http: aiohttp.ClientSession, origin: str
) -> None:
    async with stream(cors_broker, "news", headers={"Origin": origin}) as s:
        assert_cors(s.headers, origin)
    for url, status in [
        (cors_broker.events_url(), 400),
        (cors_broker.events_url("a", "b", "c"), 400),
        (cors_broker.events_url("private-x"), 403),
        (cors_broker.events_url("bad channel"), 400),
    ]:
        got, _, headers = await get(http, url, {"Origin": origin})
        assert got == status
        assert_cors(headers, origin)
    async with http.options(
        cors_broker.events_url("news"),
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id, authorization",
        },
    ) as resp:
        assert resp.status == 204
        assert_cors(resp.headers, origin)
        assert "GET" in resp.headers["Access-Control-Allow-Methods"]
        allowed_headers = resp.headers["Access-Control-Allow-Headers"].lower()
        assert "last-event-id" in allowed_headers and "authorization" in allowed_headers


async def test_cors_look_alike_origins_get_no_cors_headers(
    cors_broker: BrokerProcess, http: aiohttp.ClientSession
) -> None:
    for origin in REFUSED:
        async with stream(cors_broker, "news", headers={"Origin": origin}) as s:
            assert_no_cors(s.headers)
            assert "Origin" in s.headers.getall("Vary", []), "caches must key on Origin"
        _, _, headers = await get(http, cors_broker.events_url("private-x"), {"Origin": origin})
        assert_no_cors(headers)
        async with http.options(
            cors_broker.events_url("news"),
            headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
        ) as resp:
            assert resp.status == 204
            assert_no_cors(resp.headers)
    # no Origin at all (same-origin, curl): nothing either
    async with stream(cors_broker, "news") as s:
        assert_no_cors(s.headers)


async def test_cors_headers_on_soft_refusals(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker(
        "server.cors_origins=['https://*.example.com']", "limits.max_connections=1"
    )
    origin = "https://app.example.com"
    async with stream(broker, "news"):
        s = await soft_refusal(broker, broker.events_url("news"), {"Origin": origin})
        assert_cors(s.headers, origin)
        status, _, headers = await get(http, broker.events_url("news"), {"Origin": origin})
        assert status == 429
        assert_cors(headers, origin)


async def test_no_cors_headers_when_cors_is_off(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker()
    async with stream(broker, "news", headers={"Origin": "https://app.example.com"}) as s:
        assert_no_cors(s.headers)


# -- revocation ----------------------------------------------------------------------------


async def post_disconnect(
    http: aiohttp.ClientSession,
    broker: BrokerProcess,
    body: bytes | Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(
        f"{broker.admin_url}/admin/disconnect",
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
    ) as resp:
        return resp.status, orjson.loads(await resp.read())


async def test_admin_disconnect_closes_exactly_the_named_streams(
    start_broker: StartBroker, http: aiohttp.ClientSession, redis_client: Any
) -> None:
    broker = await start_broker(
        "auth.mode=jwt", f"auth.jwt.secret={SECRET}", "auth.public_channels=['news']"
    )
    who = {
        "42@t1": bearer(token("42", "t1")),
        "42@t2": bearer(token("42", "t2")),
        "43@t1": bearer(token("43", "t1")),
        "44@t2": bearer(token("44", "t2")),
        "anon": {},
    }
    async with contextlib.AsyncExitStack() as stack:
        streams = {
            name: await stack.enter_async_context(stream(broker, "news", headers=headers))
            for name, headers in who.items()
        }
        open_ = set(streams)

        async def revoke(body: Any, n: int, closed: set[str]) -> None:
            status, answer = await post_disconnect(http, broker, body)
            assert (status, answer) == (200, {"disconnected": n}), body
            for name in closed:
                s = streams[name]
                assert await s.wait_closed(timeout=5), name
                [event] = s.pending
                assert event.type == "broker.reconnect"
                assert event.json()["reason"] == "revoked"
                assert event.last_event_id != ""
                s.pending.clear()
            open_.difference_update(closed)
            marker = f"still-open-{len(open_)}"
            await publish(redis_client, "news", envelope(marker))
            for name in open_:
                assert (await streams[name].next_event()).data == marker, name

        await revoke({"user": "42"}, 2, {"42@t1", "42@t2"})
        await revoke({"user": 44, "tenant": "t1"}, 0, set())
        await revoke({"tenant": "t1"}, 1, {"43@t1"})
        await revoke({"user": "44", "tenant": "t2"}, 1, {"44@t2"})
        assert open_ == {"anon"}
    assert await broker.metric("sse_broker_connections_closed_total", {"reason": "revoked"}) == 4


BAD_BODIES = [
    b"",
    b"not json",
    b"[]",
    b'"user"',
    b"{}",
    b'{"user": null, "tenant": null}',
    b'{"user": ""}',
    b'{"user": true}',
    b'{"user": 1.5}',
    b'{"user": ["42"]}',
    b'{"tenant": {}}',
    b'{"tenant": ""}',
    b'{"user": "1"',
]


@pytest.mark.slow
async def test_admin_disconnect_bad_body_is_400_json(
    start_broker: StartBroker, http: aiohttp.ClientSession, redis_client: Any
) -> None:
    broker = await start_broker()
    async with stream(broker, "news") as s:
        for body in BAD_BODIES:
            status, answer = await post_disconnect(http, broker, body)
            assert status == 400, (body, answer)
            assert isinstance(answer["error"], str) and answer["message"], answer
        # nothing was closed by any of them: a disconnect would have queued its
        # broker.reconnect before answering, ahead of a marker published now
        assert await fence(redis_client, "news", s) == [[]]
        assert not s.closed
    assert await broker.get("/healthz") == (200, '{"status":"ok"}')


async def test_admin_disconnect_requires_the_publish_key_when_configured(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker("publish.keys=['admin-key-1', 'admin-key-2']")
    async with stream(broker, "news") as s:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Bearer admin-key-1x"},
            {"Authorization": "Basic admin-key-1"},
            {"Authorization": "admin-key-1"},
        ):
            status, answer = await post_disconnect(http, broker, {"tenant": "t1"}, headers)
            assert status == 401, (headers, answer)
            assert answer["error"] == "unauthorized"
        assert not s.closed
        status, answer = await post_disconnect(
            http, broker, {"tenant": "t1"}, {"Authorization": "Bearer admin-key-2"}
        )
        assert (status, answer) == (200, {"disconnected": 0})


async def test_admin_disconnect_is_not_on_the_public_listener(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker()
    async with http.post(f"{broker.url}/admin/disconnect", data=b'{"user": "1"}') as resp:
        assert resp.status in (404, 405)
