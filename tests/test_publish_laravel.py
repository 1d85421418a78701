"""Publishing with ``ingest.format = "laravel"``: ``POST /publish`` and ``sse-broker publish``
write what the Laravel ingest reads, so a targeted event stays targeted.

The attack (issue 10, finding 8): both publishers wrote the native envelope, which
the Laravel decoder read without its ``tenant``/``users``, so an event meant for
one user reached every subscriber of the channel, its data JSON-encoded twice.
Real broker processes, a real redis-server, JWT identities minted here; absence
is proven with a fence: a broadcast marker published afterwards reaches the
bystander, and nothing before it did.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from conftest import REPO_ROOT, BrokerProcess, RedisServer, StartBroker
from helpers import stream
from sse_client import SSEEvent, SSEStream

from broker.config import IngestConfig
from broker.envelope import decode_laravel, decode_stream, encode_laravel
from broker.errors import BadRequest
from broker.publish import parse_items

SECRET = "publish-laravel-test-secret-0123456789abcdef"
KEY = "publish-key"
PREFIX = "laravel_database_"
CHANNEL = "orders"
# user -> tenant
USERS = {"A": "acme", "B": "globex"}


def laravel_config(redis_server: RedisServer, *extra: str) -> str:
    lines = [
        "[redis]",
        f'url = "{redis_server.url}"',
        "[ingest]",
        'format = "laravel"',
        f'prefix = "{PREFIX}"',
        "[auth]",
        'mode = "jwt"',
        f'grants = ["{CHANNEL}"]',
        "[auth.jwt]",
        f'secret = "{SECRET}"',
        "[publish]",
        f'keys = ["{KEY}"]',
        *extra,
    ]
    return "\n".join(lines) + "\n"


async def laravel_broker(
    start_broker: StartBroker, redis_server: RedisServer, *extra: str
) -> BrokerProcess:
    return await start_broker(config_text=laravel_config(redis_server, *extra))


def token(user: str) -> str:
    claims = {"sub": user, "tenant": USERS[user], "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@asynccontextmanager
async def streams(broker: BrokerProcess, *users: str) -> AsyncIterator[list[SSEStream]]:
    """One registered stream of ``CHANNEL`` per user."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(stream(broker, CHANNEL, token=token(u))) for u in users
        ]


async def post(http: aiohttp.ClientSession, broker: BrokerProcess, body: Any) -> None:
    async with http.post(
        f"{broker.admin_url}/publish",
        data=io.BytesIO(orjson.dumps(body)),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    ) as resp:
        answer = await resp.text()
        assert (resp.status, orjson.loads(answer)) == (200, {"published": 1, "ids": []}), answer


async def cli_publish(broker: BrokerProcess, *args: str) -> None:
    """``sse-broker publish ARGS --config <the broker's config>``, as a subprocess."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "publish",
        *args,
        "--config",
        str(broker.config_path),
        cwd=REPO_ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("SSE_BROKER_")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, (out.decode(), err.decode())
    assert out.decode().startswith(f"published to {args[0]}"), out.decode()


def seen(events: list[SSEEvent]) -> list[tuple[str, str]]:
    return [(e.type, e.data) for e in events]


async def fenced(audience: SSEStream, bystander: SSEStream, marker: str) -> None:
    """The bystander got only the marker; the audience the targeted event intact, then it."""
    assert seen(await bystander.events(1)) == [("marker", marker)]
    assert seen(await audience.events(2)) == [("e", '{"x":1}'), ("marker", marker)]
    assert not audience.pending and not bystander.pending


# -- the attack, through POST /publish and the CLI --------------------------------------------

TARGETS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("users", {"users": ["A"]}, ["--user", "A"]),
    ("tenant", {"tenant": "acme"}, ["--tenant", "acme"]),
]


@pytest.mark.parametrize(("field", "target", "_"), TARGETS, ids=[t[0] for t in TARGETS])
async def test_http_publish_of_a_targeted_event_reaches_only_its_audience(
    start_broker: StartBroker,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    field: str,
    target: dict[str, Any],
    _: list[str],
) -> None:
    broker = await laravel_broker(start_broker, redis_server)
    async with streams(broker, "A", "B") as (a, b):
        await post(http, broker, {"channel": CHANNEL, "event": "e", "data": {"x": 1}, **target})
        await post(http, broker, {"channel": CHANNEL, "event": "marker", "data": field})
        await fenced(a, b, f'"{field}"')


@pytest.mark.slow
@pytest.mark.parametrize(("field", "_", "options"), TARGETS, ids=[t[0] for t in TARGETS])
async def test_cli_publish_of_a_targeted_event_reaches_only_its_audience(
    start_broker: StartBroker,
    redis_server: RedisServer,
    field: str,
    _: dict[str, Any],
    options: list[str],
) -> None:
    broker = await laravel_broker(start_broker, redis_server)
    async with streams(broker, "A", "B") as (a, b):
        await cli_publish(broker, CHANNEL, '{"x": 1}', "--event", "e", *options)
        await cli_publish(broker, CHANNEL, f'"{field}"', "--event", "marker")
        await fenced(a, b, f'"{field}"')


async def test_retained_state_published_for_a_tenant_stays_with_that_tenant(
    start_broker: StartBroker, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    broker = await laravel_broker(start_broker, redis_server)
    state = {"channel": CHANNEL, "event": "e", "tenant": "acme", "retain": True}
    await post(http, broker, {**state, "data": {"x": 1}})
    async with streams(broker, "A", "B") as (a, b):
        # a fresh stream gets its tenant's retained state first, the other tenant none
        await post(http, broker, {"channel": CHANNEL, "event": "marker", "data": "retained"})
        await fenced(a, b, '"retained"')
    await post(http, broker, {**state, "data": None})  # deletes the key
    async with streams(broker, "A") as (a,):
        await post(http, broker, {"channel": CHANNEL, "event": "marker", "data": "deleted"})
        assert seen(await a.events(1)) == [("marker", '"deleted"')]


async def test_stock_laravel_broadcasts_still_reach_every_subscriber(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    # what RedisBroadcaster publishes has no tenant/users: the channel grant decides
    broker = await laravel_broker(start_broker, redis_server)
    client = redis_server.client()
    message = b'{"event":"e","data":{"x":1,"tenant":"acme","users":["A"]},"socket":null}'
    async with streams(broker, "A", "B") as (a, b):
        assert await client.publish(PREFIX + CHANNEL, message) == 1
        for s in (a, b):
            assert seen(await s.events(1)) == [("e", '{"x":1,"tenant":"acme","users":["A"]}')]


async def test_an_event_http_publish_accepts_is_delivered(
    start_broker: StartBroker, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    # The size limit measures the Laravel message actually written, which for a
    # string is larger than the native envelope: what /publish accepts must arrive.
    limit = 1000
    broker = await laravel_broker(
        start_broker, redis_server, "[limits]", f"max_event_bytes = {limit}"
    )
    data = "y" * (limit - 20)
    async with streams(broker, "A") as (a,):
        async with http.post(
            f"{broker.admin_url}/publish",
            data=io.BytesIO(orjson.dumps({"channel": CHANNEL, "data": data})),
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        ) as resp:
            status, body = resp.status, await resp.json()
        if status == 200:
            assert seen(await a.events(1, timeout=2)) == [("message", f'"{data}"')]
        else:
            assert (status, body["error"]) == (400, "too_large")
        assert await broker.metric("sse_broker_events_rejected_total") is None


# -- unit: what is measured against limits.max_event_bytes --------------------------------------


def test_the_size_check_measures_the_message_of_the_configured_format() -> None:
    laravel = IngestConfig(format="laravel")
    short_string = orjson.dumps({"channel": CHANNEL, "data": "y" * 60})
    quoted_object = orjson.dumps({"channel": CHANNEL, "data": {f"k{i}": "v" for i in range(20)}})
    # native {"data":"yyy..."}: 71 bytes; Laravel adds "event":"message" and "socket":null
    [event] = parse_items(short_string, 100)
    assert len(encode_laravel(event)) == 103
    with pytest.raises(BadRequest) as info:
        parse_items(short_string, 100, laravel)
    assert info.value.code == "too_large"
    assert "event of 103 bytes" in info.value.message
    # an object travels unescaped in Laravel's shape: 232 bytes, the native string 282
    [event] = parse_items(quoted_object, 250, laravel)
    assert decode_laravel(CHANNEL, encode_laravel(event), 250) == event
    with pytest.raises(BadRequest):
        parse_items(quoted_object, 250)


def test_the_size_check_in_stream_mode_is_the_stream_readers() -> None:
    stream_mode = IngestConfig(mode="stream")
    body = orjson.dumps({"channel": CHANNEL, "data": "y" * 100, "event": "e", "tenant": "t"})
    # fields data, event, tenant: 4 + 100 + 5 + 1 + 6 + 1 bytes
    [event] = parse_items(body, 117, stream_mode)
    with pytest.raises(BadRequest):
        parse_items(body, 116, stream_mode)
    fields = {b"channel": CHANNEL.encode(), b"data": b"y" * 100, b"event": b"e", b"tenant": b"t"}
    assert decode_stream(fields, 117) == event
