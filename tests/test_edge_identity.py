"""Identities that cannot be forged or confused (issue 10, findings 4-7 and 11).

Each test performs an attack against a real broker process: identity values
that smuggle a placeholder, a separator, a NUL or a newline; a callback cache
asked by another host or with a duplicated cookie; and credentials the app
withdraws while a stream is open. What must hold: the attacker gets a clear
refusal and nothing of another identity's events, the broker's log tells the
truth, and every honest client keeps streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from conftest import BrokerProcess, StartBroker
from helpers import bearer, envelope, eventually, get, publish, serve, stream
from sse_client import SSEClient, SSEStream
from test_stream_mode import STREAM_MODE, read_up_to, triples, xadd

STREAM_JWT = (STREAM_MODE, "auth.grants=['state']", "auth.public_channels=['probe.*']")
SECRET = "edge-identity-secret-" + "0123456789abcdef" * 3


def token(sub: Any = "u1", tenant: Any = None, channels: list[str] | None = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + 300}
    if tenant is not None:
        claims["tenant"] = tenant
    if channels is not None:
        claims["channels"] = channels
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def jwt_broker(start_broker: StartBroker, *sets: str, **kw: Any) -> BrokerProcess:
    return await start_broker("auth.mode=jwt", f"auth.jwt.secret={SECRET}", *sets, **kw)


async def fresh_as(broker: BrokerProcess, channel: str, head: str, tok: str) -> SSEStream:
    """The events a fresh stream with ``tok`` gets before the live ones (ending on ``head``)."""
    await read_up_to(broker, head)
    async with stream(broker, channel, headers=bearer(tok)) as s:
        await s.wait_for(lambda st: st.parser.last_event_id == head, timeout=3, what="the head")
    return s


async def fence(redis: aioredis.Redis, s: SSEStream, channel: str) -> list[str]:
    """Publish a marker on ``channel`` and return the data ``s`` got up to and without it:
    whatever was published before the marker and meant for ``s`` has arrived then."""
    marker = f"fence-{time.monotonic_ns()}"
    await publish(redis, channel, envelope(marker))
    got: list[str] = []
    while True:
        event = await s.next_event()
        if event.data == marker:
            return got
        if not event.data.startswith("fence-"):  # another stream's fence
            got.append(event.data)


# -- finding 4: placeholders expand in one pass; ids cannot cross separators ----------------


async def test_a_user_id_reading_tenant_placeholder_stays_literal(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await jwt_broker(start_broker, "auth.grants=['user.{user}']")
    # user "{tenant}" of tenant "acme" must not be granted acme's user.acme
    status, body, _ = await get(
        http, broker.events_url("user.acme"), bearer(token(sub="{tenant}", tenant="acme"))
    )
    assert status == 403, body
    assert body["error"] == "channel_forbidden"


async def test_dotted_tenant_is_refused_where_it_could_cross_into_another(
    start_broker: StartBroker, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    broker = await jwt_broker(start_broker, "auth.grants=['tenant.{tenant}.*', 'user.{user}']")
    # tenant "a.b" would own tenant.a.b.*, which tenant "a"'s tenant.a.* also matches:
    # a dotted tenant is refused under such a grant, with a reason that says why
    status, body, _ = await get(
        http, broker.events_url("tenant.a.b.orders"), bearer(token(sub="u2", tenant="a.b"))
    )
    assert status == 403, body
    assert body["error"] == "ambiguous_identity"
    assert "'tenant.{tenant}.*'" in body["message"]
    assert await broker.metric("sse_broker_auth_failures_total", {"reason": "ambiguous_identity"})
    # a dotted user id is fine where nothing follows it (user.{user} is exact)
    async with stream(
        broker,
        "user.ada.lovelace@example.com",
        headers=bearer(token(sub="ada.lovelace@example.com")),
    ) as s:
        await publish(redis_client, "user.ada.lovelace@example.com", envelope("hi ada"))
        assert (await s.next_event()).data == "hi ada"
    # and tenant "a" still gets its own channels
    async with stream(broker, "tenant.a.orders", headers=bearer(token(tenant="a"))) as s:
        await publish(redis_client, "tenant.a.orders", envelope("for a"))
        assert (await s.next_event()).data == "for a"


async def test_a_grant_where_a_wildcard_follows_a_placeholder_is_a_config_error(
    start_broker: StartBroker,
) -> None:
    broker = await jwt_broker(start_broker, "auth.grants=['tenant.{tenant}*']", wait_ready=None)
    assert await broker.wait_exit() != 0
    log = broker.log_text()
    assert "auth.grants" in log and "tenant.{tenant}*" in log and "separator" in log


# -- finding 5: identity values are bounded strings without control characters ------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sub", "tenant"),
    [
        ("u1", "acme\x00evil"),
        ("u1\nINFO forged line", "acme"),
        ("u1", "acme\u2028"),
        ("x" * 257, "acme"),
        ("u1", 10**300),
        ("u1", ""),
        (True, "acme"),
    ],
    ids=["nul", "newline", "line-separator", "too-long", "huge-int", "empty", "bool"],
)
async def test_token_with_a_bad_identity_value_is_401(
    start_broker: StartBroker, http: aiohttp.ClientSession, sub: Any, tenant: Any
) -> None:
    broker = await jwt_broker(start_broker, "auth.public_channels=[]", "auth.grants=['feed']")
    status, body, _ = await get(http, broker.events_url("feed"), bearer(token(sub, tenant)))
    assert status == 401, body
    assert body["error"] == "bad_claims"
    assert (await get(http, f"{broker.url}/healthz"))[0] == 200


async def test_a_nul_in_a_stream_tenant_cannot_file_retained_state_under_another_tenant(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    broker = await jwt_broker(start_broker, *STREAM_JWT)
    # "acme\0x" + key "price" was stored as field "acme\0x\0price": read back as
    # tenant "acme", key "x\0price" - acme's streams got the attacker's value
    await xadd(redis_client, "state", "forged", tenant="acme\x00x", retain="price")
    good = await xadd(redis_client, "state", "real", tenant="acme", retain="status")
    rejected = await eventually(
        lambda: broker.metric("sse_broker_events_rejected_total", {"reason": "bad_tenant"}),
        lambda v: bool(v),
    )
    assert rejected == 1
    s = await fresh_as(broker, "state", good, token(tenant="acme"))
    assert triples(s.pending) == [("message", "real", good)]


@pytest.mark.slow
async def test_malformed_retained_entries_in_redis_are_skipped_not_delivered(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    # anyone with write access to Redis can write the hash: read it like inbound data
    first = await jwt_broker(start_broker, *STREAM_JWT)
    good = await xadd(redis_client, "state", "real", retain="k", event="status")
    await eventually(lambda: redis_client.hlen("sse:stream:retained:state"), lambda n: n == 1)
    first.kill()
    await first.wait_exit()
    await redis_client.hset(
        "sse:stream:retained:state",
        mapping={
            b"acme\x00\x00x": f"{good} ".encode() + orjson.dumps({"event": "e", "data": "nul"}),
            b"\n\x00k2": f"{good} ".encode() + orjson.dumps({"event": "e", "data": "newline"}),
            b"\x00k3": f"{good} ".encode() + b"not json",
            b"\x00k4": f"{good} ".encode() + orjson.dumps({"event": "broker.x", "data": "r"}),
            b"\x00k5": f"{good} ".encode() + orjson.dumps({"event": "e", "data": 5}),
            b"\x00k6": b"garbage",
            b"\xff\x00k7": f"{good} ".encode() + orjson.dumps({"event": "e", "data": "utf"}),
        },
    )
    broker = await jwt_broker(start_broker, *STREAM_JWT)
    s = await fresh_as(broker, "state", good, token(tenant="acme"))
    assert triples(s.pending) == [("status", "real", good)]
    assert "skipped 7 malformed retained entries" in broker.log_text()


# -- finding 6: no forged log lines or fields ------------------------------------------------


CLOSE_LINE = re.compile(
    r'stream closed .* user=("(?:[^"\\]|\\.)*"|\S+) tenant=("(?:[^"\\]|\\.)*"|\S+)$'
)


async def test_close_log_quotes_identity_values_so_no_field_can_be_forged(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    broker = await jwt_broker(start_broker, "auth.grants=['feed']")
    sneaky = 'eve tenant=victim "x'
    async with stream(broker, "feed", headers=bearer(token(sneaky, "t1"))):
        pass
    line = await eventually(
        lambda: asyncio.sleep(
            0, [x for x in broker.log_text().splitlines() if "stream closed" in x]
        ),
        bool,
    )
    match = CLOSE_LINE.search(line[0])
    assert match is not None, line
    assert json.loads(match.group(1)) == sneaky
    assert match.group(2) == "t1"


# -- finding 7: the callback cache key covers the host and the raw Cookie header ------------


@dataclass
class HostApp:
    """Picks the tenant by host, and the session cookie as PHP does: the first one."""

    calls: list[dict[str, str]] = field(default_factory=list)
    denied: set[str] = field(default_factory=set)
    failing: set[str] = field(default_factory=set)
    users: dict[str, str] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(dict(request.headers))
        raw = request.headers.get("Cookie", "")
        first: dict[str, str] = {}
        for part in raw.split(";"):
            name, _, value = part.strip().partition("=")
            first.setdefault(name, value)
        sess = first.get("laravel_session", "")
        if sess in self.denied:
            return web.Response(status=401)
        if sess in self.failing:
            return web.Response(status=500)
        host = request.headers.get("X-Forwarded-Host", "").split(":")[0]
        tenant = host.split(".")[0]
        user = self.users.get(sess, sess)
        return web.json_response({"user": user, "tenant": tenant, "channels": ["feed"]})


@pytest.fixture
async def host_app() -> AsyncIterator[tuple[HostApp, str]]:
    fake = HostApp()
    app = web.Application()
    app.router.add_get("/auth", fake.handle)
    async with serve(app) as url:
        yield fake, url


async def callback_broker(start_broker: StartBroker, url: str, *sets: str) -> BrokerProcess:
    return await start_broker("auth.mode=callback", f"auth.callback.url={url}/auth", *sets)


async def test_callback_cache_does_not_give_one_host_another_hosts_identity(
    start_broker: StartBroker, host_app: tuple[HostApp, str], redis_client: aioredis.Redis
) -> None:
    fake, url = host_app
    broker = await callback_broker(start_broker, url, "auth.callback.cache_ttl_seconds=60")
    cookie = {"Cookie": "laravel_session=ada"}
    async with (
        stream(broker, "feed", headers={**cookie, "Host": "alpha.example"}) as alpha,
        stream(broker, "feed", headers={**cookie, "Host": "beta.example"}) as beta,
    ):
        assert len(fake.calls) == 2  # the second host was asked, not served from the cache
        await publish(redis_client, "feed", envelope("alpha only", tenant="alpha"))
        await publish(redis_client, "feed", envelope("beta only", tenant="beta"))
        assert await fence(redis_client, alpha, "feed") == ["alpha only"]
        assert await fence(redis_client, beta, "feed") == ["beta only"]


async def test_callback_cache_keys_on_the_raw_cookie_header_not_the_parsed_one(
    start_broker: StartBroker, host_app: tuple[HostApp, str], redis_client: aioredis.Redis
) -> None:
    fake, url = host_app
    broker = await callback_broker(start_broker, url, "auth.callback.cache_ttl_seconds=60")
    host = {"Host": "acme.example"}
    async with stream(broker, "feed", headers={**host, "Cookie": "laravel_session=bob"}):
        pass
    # aiohttp reads the last of duplicate cookies ("bob", cached), PHP the first ("mallory")
    dup = {**host, "Cookie": "laravel_session=mallory; laravel_session=bob"}
    async with stream(broker, "feed", headers=dup) as s:
        assert len(fake.calls) == 2
        await publish(redis_client, "feed", envelope("for bob", users=["bob"]))
        await publish(redis_client, "feed", envelope("for mallory", users=["mallory"]))
        assert await fence(redis_client, s, "feed") == ["for mallory"]


# -- finding 11: the app's change of mind reaches open streams ------------------------------


@pytest.mark.slow
async def test_open_callback_streams_are_reauthorized_and_only_a_definite_no_ends_them(
    start_broker: StartBroker, host_app: tuple[HostApp, str], redis_client: aioredis.Redis
) -> None:
    fake, url = host_app
    broker = await callback_broker(
        start_broker,
        url,
        "auth.recheck_interval_seconds=10",
        "auth.callback.cache_ttl_seconds=0",
    )
    host = {"Host": "acme.example"}
    async with (
        stream(broker, "feed", headers={**host, "Cookie": "laravel_session=gone"}) as gone,
        stream(broker, "feed", headers={**host, "Cookie": "laravel_session=moved"}) as moved,
        stream(broker, "feed", headers={**host, "Cookie": "laravel_session=flaky"}) as flaky,
        stream(broker, "feed", headers={**host, "Cookie": "laravel_session=fine"}) as fine,
    ):
        fake.denied.add("gone")  # logged out
        fake.users["moved"] = "someone-else"  # the session now belongs to another user
        fake.failing.add("flaky")  # the app errors for this one: not a verdict
        calls_before = len(fake.calls)
        for s in (gone, moved):
            event = await s.next_event(timeout=15)  # first due within 5-10 s
            assert event.type == "broker.reconnect", event
            assert event.json()["reason"] == "revoked"
            assert await s.wait_closed()

        def asked(session: str) -> int:
            return sum(
                f"laravel_session={session}" in c.get("Cookie", "")
                for c in fake.calls[calls_before:]
            )

        await eventually(lambda: asyncio.sleep(0, asked("flaky") * asked("fine")), timeout=15)
        assert await fence(redis_client, flaky, "feed") == []
        assert await fence(redis_client, fine, "feed") == []
    assert await broker.metric("sse_broker_auth_failures_total", {"reason": "revoked"}) == 2


@pytest.mark.slow
async def test_open_laravel_streams_end_on_419_but_not_on_a_redirect_or_an_outage(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    answers: dict[str, web.Response] = {}
    asked: list[str] = []

    async def auth(request: web.Request) -> web.Response:
        sess = request.cookies.get("laravel_session", "")
        asked.append(sess)
        return answers.get(sess) or web.json_response(True)

    app = web.Application()
    app.router.add_post("/broadcasting/auth", auth)
    async with serve(app) as url:
        broker = await start_broker(
            "auth.mode=laravel",
            f"auth.laravel.url={url}/broadcasting/auth",
            "auth.recheck_interval_seconds=10",
            "auth.laravel.cache_ttl_seconds=0",
        )
        ch = "private-orders.1"
        streams = {}
        async with contextlib.AsyncExitStack() as stack:
            for name in ("expired", "redirected", "down"):
                headers = {"Cookie": f"laravel_session={name}"}
                streams[name] = await stack.enter_async_context(stream(broker, ch, headers=headers))
            answers["expired"] = web.Response(status=419)  # session expired (CSRF)
            answers["redirected"] = web.Response(status=302, headers={"Location": "/login"})
            answers["down"] = web.Response(status=503)
            before = len(asked)
            event = await streams["expired"].next_event(timeout=15)
            assert (event.type, event.json()["reason"]) == ("broker.reconnect", "revoked")
            await eventually(
                lambda: asyncio.sleep(0, {"redirected", "down"} <= set(asked[before:])),
                timeout=15,
            )
            await publish(redis_client, ch, envelope("still here"))
            for name in ("redirected", "down"):
                assert (await streams[name].next_event()).data == "still here"


async def test_reload_that_removes_a_jwt_key_ends_the_streams_it_let_in(
    start_broker: StartBroker, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    keep, drop = "k" * 40, "d" * 40
    keys = tmp_path / "jwt.keys"
    keys.write_text(f"kept {keep}\ndropped {drop}\n")
    broker = await start_broker(
        "auth.mode=jwt", f"auth.jwt.secret_file={keys}", "auth.grants=['feed']"
    )

    def signed(secret: str, kid: str) -> dict[str, str]:
        claims = {"sub": kid, "exp": int(time.time()) + 300}
        return bearer(jwt.encode(claims, secret, algorithm="HS256", headers={"kid": kid}))

    async with (
        stream(broker, "feed", headers=signed(keep, "kept")) as kept,
        stream(broker, "feed", headers=signed(drop, "dropped")) as dropped,
    ):
        keys.write_text(f"kept {keep}\n")  # the second key leaked: rotated out
        broker.signal(signal.SIGHUP)
        event = await dropped.next_event(timeout=10)
        assert (event.type, event.json()["reason"]) == ("broker.reconnect", "revoked")
        assert await dropped.wait_closed()
        assert await fence(redis_client, kept, "feed") == []
    # and the dropped key lets nobody in any more
    async with SSEClient.connect(broker.events_url("feed"), headers=signed(drop, "dropped")) as s:
        assert s.status == 401
