"""``ingest.format = "laravel"``: what Laravel's Redis broadcaster publishes reaches SSE clients.

Unit table tests of ``decode_laravel``, then integration: real PHP (php-cli +
phpredis) runs ``examples/laravel/tools/broadcast.php`` -- a step-by-step mirror
of ``BroadcastEvent::handle()`` and ``RedisBroadcaster::broadcast()`` that
broadcasts the example event classes of ``examples/laravel/app/Events`` -- into
a real redis-server, read by a real broker process. Private channels are
granted by JWT (public patterns never open ``private-*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from conftest import REPO_ROOT, BrokerProcess, RedisServer, StartBroker
from helpers import eventually, fence
from sse_client import SSEClient, SSEEvent, SSEStream

from broker.envelope import Event, decode_laravel
from broker.errors import Rejected

BROADCAST = REPO_ROOT / "examples/laravel/tools/broadcast.php"
SECRET = "laravel-format-test-secret-0123456789abcdef"
OLD_PREFIX = "laravel_database_"  # config/database.php of older Laravel apps
NEW_PREFIX = "laravel-database-"  # newer skeletons
PHP_PACKAGES = "php-cli php-redis php-predis"
MAX = 262_144


# -- unit: decode_laravel -----------------------------------------------------------------------


def decode(payload: bytes | str, channel: str = "private-orders.1", max_bytes: int = MAX) -> Event:
    raw = payload.encode() if isinstance(payload, str) else payload
    return decode_laravel(channel, raw, max_bytes)


# (what PHP's json_encode() wrote, the data text clients must get, the socket)
ACCEPTED: list[tuple[str, str, str, str | None]] = [
    ("empty PHP array", r'{"event":"E","data":[],"socket":null}', "[]", None),
    ("empty object", r'{"event":"E","data":{},"socket":null}', "{}", None),
    ("no data key", r'{"event":"E"}', "[]", None),
    (
        "nested",
        r'{"event":"E","data":{"order":{"id":1,"items":[{"sku":"A","qty":2},[]],"paid":true,'
        r'"total":12.5,"note":null}},"socket":null}',
        '{"order":{"id":1,"items":[{"sku":"A","qty":2},[]],"paid":true,"total":12.5,"note":null}}',
        None,
    ),
    (
        "escaped slashes and unicode",
        r'{"event":"E","data":{"url":"https:\/\/shop.example\/o\/1","note":"Gr\u00f6\u00dfe '
        r'\ud83d\ude00 \u20ac"},"socket":null}',
        '{"url":"https://shop.example/o/1","note":"Größe 😀 €"}',
        None,
    ),
    (
        "socket at the top level (Laravel pulls it out of data)",
        r'{"event":"E","data":{"id":1},"socket":"123.456"}',
        '{"id":1}',
        "123.456",
    ),
    (
        "socket inside data as well (older Laravel)",
        r'{"event":"E","data":{"id":1,"socket":"123.456"},"socket":"123.456"}',
        '{"id":1}',
        "123.456",
    ),
    (
        "socket only inside data",
        r'{"event":"E","data":{"id":1,"socket":"9.9"}}',
        '{"id":1}',
        "9.9",
    ),
    (
        "null socket inside data, real one beside it",
        r'{"event":"E","data":{"socket":null},"socket":"1.2"}',
        "{}",
        "1.2",
    ),
    ("data a list", r'{"event":"E","data":[1,"a",null],"socket":null}', '[1,"a",null]', None),
    ("data a string", r'{"event":"E","data":"plain","socket":null}', '"plain"', None),
]


@pytest.mark.parametrize(
    ("payload", "data", "socket"),
    [case[1:] for case in ACCEPTED],
    ids=[case[0] for case in ACCEPTED],
)
def test_decode_laravel_accepts(payload: str, data: str, socket: str | None) -> None:
    event = decode(payload)
    assert event.channel == "private-orders.1"
    assert event.event == "E"
    assert event.data == data
    # the same meaning as what PHP encoded (whatever escapes it used), less the socket
    sent = orjson.loads(payload).get("data", [])
    if isinstance(sent, dict):
        sent = {k: v for k, v in sent.items() if k != "socket"}
    assert orjson.loads(event.data) == sent
    assert event.socket == socket
    assert (event.tenant, event.users, event.retain) == (None, None, None)


def test_decode_laravel_keeps_the_class_name_as_the_event_name() -> None:
    event = decode(r'{"event":"App\\Events\\OrderShipped","data":{"orderId":1},"socket":null}')
    assert event.event == "App\\Events\\OrderShipped"
    assert event.data == '{"orderId":1}'


def test_decode_laravel_ignores_native_fields() -> None:
    # tenancy comes from channel grants: a "tenant" or "users" key in a Laravel
    # payload is the app's data, not an audience
    event = decode(r'{"event":"E","data":{"tenant":"acme","users":[1]},"socket":null}')
    assert (event.tenant, event.users) == (None, None)
    assert orjson.loads(event.data) == {"tenant": "acme", "users": [1]}


REJECTED: list[tuple[str, bytes, str]] = [
    ("not JSON", b"hello from redis-cli", "bad_envelope"),
    ("JSON list", b'[{"event":"E","data":{}}]', "bad_envelope"),
    ("JSON string", b'"E"', "bad_envelope"),
    ("JSON number", b"42", "bad_envelope"),
    ("missing event", b'{"data":{"id":1},"socket":null}', "bad_envelope"),
    ("event null", b'{"event":null,"data":{}}', "bad_event"),
    ("event not a string", b'{"event":7,"data":{}}', "bad_event"),
    ("empty event", b'{"event":"","data":{}}', "bad_event"),
    ("event with a newline", b'{"event":"a\\nb","data":{}}', "bad_event"),
    ("reserved event", b'{"event":"broker.reset","data":{}}', "reserved_event"),
    ("socket not a string", b'{"event":"E","data":{},"socket":12}', "bad_envelope"),
    ("socket in data not a string", b'{"event":"E","data":{"socket":["x"]}}', "bad_envelope"),
    ("invalid UTF-8", b'{"event":"E","data":"\xff"}', "bad_envelope"),
]


@pytest.mark.parametrize(
    ("payload", "code"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED]
)
def test_decode_laravel_rejects(payload: bytes, code: str) -> None:
    with pytest.raises(Rejected) as info:
        decode(payload)
    assert info.value.code == code


def test_decode_laravel_rejects_oversize_and_bad_channels() -> None:
    payload = orjson.dumps({"event": "E", "data": {"blob": "x" * 500}, "socket": None})
    assert decode(payload, max_bytes=len(payload)).event == "E"
    with pytest.raises(Rejected) as info:
        decode(payload, max_bytes=len(payload) - 1)
    assert info.value.code == "too_large"
    with pytest.raises(Rejected) as info:
        decode(payload, channel="private orders")
    assert info.value.code == "bad_channel"


# -- real PHP ------------------------------------------------------------------------------------


def require_php() -> str:
    """The php binary with phpredis loaded; FAILS (never skips) when missing."""
    php = shutil.which("php")
    hint = f"apt-get install {PHP_PACKAGES}"
    if php is None:
        pytest.fail(f"php is not installed: these tests run real PHP ({hint})", pytrace=False)
    probe = subprocess.run(
        [php, "-r", 'exit(extension_loaded("redis") ? 0 : 1);'], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.fail(f"phpredis is not loaded in {php} ({hint})", pytrace=False)
    return php


async def php(script: Path, *args: str, env: dict[str, str], expect_rc: int = 0) -> str:
    """Run ``php script args`` (asynchronously: the loop keeps serving); its stdout."""
    proc = await asyncio.create_subprocess_exec(
        require_php(),
        str(script),
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == expect_rc, (
        f"php {script.name} {' '.join(args)} exited {proc.returncode}\n"
        f"stdout: {out.decode(errors='replace')}\nstderr: {err.decode(errors='replace')}"
    )
    return out.decode()


async def broadcast(redis_server: RedisServer, prefix: str, *args: str) -> list[str]:
    """Laravel's broadcast, from PHP; returns the JSON messages it published."""
    out = await php(
        BROADCAST,
        *args,
        env={
            "REDIS_HOST": redis_server.host,
            "REDIS_PORT": str(redis_server.port),
            "REDIS_PREFIX": prefix,
        },
    )
    lines = out.splitlines()
    assert lines, "broadcast.php published nothing"
    messages = []
    for line in lines:
        channel, _, message = line.partition(" ")
        assert channel.startswith(prefix), line
        messages.append(message)
    return messages


def token(*channels: str, user: str = "7") -> str:
    claims: dict[str, Any] = {"sub": user, "channels": list(channels), "exp": time.time() + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def laravel_broker(start_broker: StartBroker, prefix: str, *sets: str) -> BrokerProcess:
    return await start_broker(
        "ingest.format=laravel",
        f"ingest.prefix='{prefix}'",
        "auth.mode=jwt",
        f"auth.jwt.secret={SECRET}",
        *sets,
    )


@contextlib.asynccontextmanager
async def stream(
    broker: BrokerProcess, *channels: str, grant: str = "private-orders.*", **params: str
) -> AsyncIterator[SSEStream]:
    """An open stream, returned once registered (its preamble arrived)."""
    url = broker.events_url(*channels, token=token(grant), **params)
    async with SSEClient.connect(url) as s:
        assert s.status == 200, await s.text()
        await s.wait_for(lambda st: st.parser.last_event_id != "", what="the preamble")
        yield s


async def laravel_fence(
    redis: Any, channel: str, *streams: SSEStream, prefix: str
) -> list[list[SSEEvent]]:
    """:func:`helpers.fence` with the marker broadcast as Laravel would (this broker
    reads the laravel format only): an event whose data holds the marker, no socket."""
    return await fence(
        redis,
        channel,
        *streams,
        payload=lambda marker: {"event": "Fence", "data": {"marker": marker}, "socket": None},
        prefix=prefix,
    )


async def rejected(broker: BrokerProcess, reason: str) -> float:
    return await broker.metric("sse_broker_events_rejected_total", {"reason": reason}) or 0


@pytest.mark.slow
@pytest.mark.parametrize("prefix", [OLD_PREFIX, NEW_PREFIX])
async def test_php_broadcast_reaches_the_private_channel(
    start_broker: StartBroker, redis_server: RedisServer, redis_client: Any, prefix: str
) -> None:
    require_php()
    broker = await laravel_broker(start_broker, prefix)
    async with stream(broker, "private-orders.1") as s, stream(broker, "private-orders.2") as other:
        # broadcast(new OrderShipped(1, 'shipped', 'https://track.example/1?l=de'))
        [sent] = await broadcast(
            redis_server, prefix, "OrderShipped", "1", "shipped", '"https://track.example/1?l=de"'
        )
        assert r"https:\/\/track.example\/1" in sent  # PHP escaped the slashes
        shipped = await s.next_event()
        assert shipped.type == "App\\Events\\OrderShipped"  # no broadcastAs(): the class name
        assert shipped.json() == {
            "orderId": 1,
            "status": "shipped",
            "trackingUrl": "https://track.example/1?l=de",
        }
        assert shipped.data == (
            '{"orderId":1,"status":"shipped","trackingUrl":"https://track.example/1?l=de"}'
        )
        assert b"event: App\\Events\\OrderShipped\n" in s.raw

        # broadcast(new OrderStatusUpdated(1, 'packed', 'Größe L/XL 😀'))
        [sent] = await broadcast(
            redis_server, prefix, "OrderStatusUpdated", "1", "packed", "Größe L/XL 😀"
        )
        assert r"Gr\u00f6\u00dfe L\/XL \ud83d\ude00" in sent  # \uXXXX and surrogate pairs
        status = await s.next_event()
        assert status.type == "order.status"  # broadcastAs()
        assert status.json() == {"id": 1, "status": "packed", "note": "Größe L/XL 😀"}
        assert status.data == '{"id":1,"status":"packed","note":"Größe L/XL 😀"}'
        assert await laravel_fence(redis_client, "private-orders.1", s, prefix=prefix) == [[]]
        # another order's channel: its own fence, published after the fence above (one
        # ingest, in publish order), so a leak from private-orders.1 would come first
        assert await laravel_fence(redis_client, "private-orders.2", other, prefix=prefix) == [[]]


@pytest.mark.slow
async def test_payload_edge_cases_from_php(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    broker = await laravel_broker(start_broker, OLD_PREFIX)
    cases = [
        ("[]", "[]"),  # Broadcast::private('orders.1')->with([]): an empty PHP array
        ("{}", "[]"),  # json_decode('{}', true) is an empty PHP array too
        ('{"a":{"b":[1,{"c":null}],"d":[]},"e":1.5}', '{"a":{"b":[1,{"c":null}],"d":[]},"e":1.5}'),
        ('{"path":"/a/b","html":"<b>&amp;</b>"}', '{"path":"/a/b","html":"<b>&amp;</b>"}'),
    ]
    async with stream(broker, "private-orders.1") as s:
        for payload, _ in cases:
            await broadcast(redis_server, OLD_PREFIX, "--raw", "private-orders.1", "Edge", payload)
        got = await s.events(len(cases))
    assert [(e.type, e.data) for e in got] == [("Edge", data) for _, data in cases]


@pytest.mark.slow
async def test_to_others_skips_only_the_tab_that_caused_it(
    start_broker: StartBroker, redis_server: RedisServer, redis_client: Any
) -> None:
    broker = await laravel_broker(start_broker, NEW_PREFIX)
    async with (
        stream(broker, "private-orders.1", socket_id="111.111") as mine,
        stream(broker, "private-orders.1", socket_id="222.222") as other_tab,
        stream(broker, "private-orders.1") as no_socket,
    ):
        # broadcast(new OrderStatusUpdated(...))->toOthers() from a request with
        # X-Socket-ID: 111.111, in both payload shapes Laravel versions produced
        for shape in ([], ["--socket-in-data"]):
            await broadcast(
                redis_server, NEW_PREFIX, "--socket=111.111", *shape,
                "OrderStatusUpdated", "1", "packed",
            )  # fmt: skip
        # and one to everybody, so "nothing arrived" is not just "not yet"
        await broadcast(redis_server, NEW_PREFIX, "OrderStatusUpdated", "1", "shipped")
        for s in (other_tab, no_socket):
            got = await s.events(3)
            assert [e.json()["status"] for e in got] == ["packed", "packed", "shipped"]
            assert all("socket" not in e.json() for e in got)  # pulled out of data
        [only] = await mine.events(1)
        assert only.json()["status"] == "shipped"
        before = await laravel_fence(redis_client, "private-orders.1", mine, prefix=NEW_PREFIX)
        assert before == [[]]


@pytest.mark.slow
async def test_to_others_holds_for_replayed_events_too(
    start_broker: StartBroker, redis_server: RedisServer, redis_client: Any
) -> None:
    broker = await laravel_broker(start_broker, OLD_PREFIX)
    async with stream(broker, "private-orders.1") as observer:
        async with stream(broker, "private-orders.1", socket_id="111.111") as tab:
            await broadcast(redis_server, OLD_PREFIX, "OrderStatusUpdated", "1", "a")
            [first] = await tab.events(1)
        # the tab is offline (a network drop) while its own request broadcasts
        # with toOthers() and someone else's without
        await broadcast(
            redis_server, OLD_PREFIX, "--socket=111.111", "OrderStatusUpdated", "1", "b"
        )
        await broadcast(redis_server, OLD_PREFIX, "OrderStatusUpdated", "1", "c")
        seen = await observer.events(3)
        assert [e.json()["status"] for e in seen] == ["a", "b", "c"]  # both are in history
    # the browser reconnects to the same URL (same socket_id) with Last-Event-ID
    url = broker.events_url(
        "private-orders.1", token=token("private-orders.*"), socket_id="111.111"
    )
    async with SSEClient.connect(url, last_event_id=first.last_event_id) as s:
        assert s.status == 200, await s.text()
        replayed = await s.next_event()
        assert replayed.json()["status"] == "c"
        assert replayed.last_event_id == seen[2].last_event_id
        assert await laravel_fence(redis_client, "private-orders.1", s, prefix=OLD_PREFIX) == [[]]


async def test_event_class_without_socket_trait_sends_no_socket(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    broker = await laravel_broker(start_broker, OLD_PREFIX)
    async with stream(broker, "private-orders.5", socket_id="1.1") as s:
        # InteractsWithSockets' public $socket is null unless toOthers(): delivered
        [sent] = await broadcast(redis_server, OLD_PREFIX, "--socket-in-data", "OrderShipped", "5")
        assert orjson.loads(sent)["data"]["socket"] is None
        event = await s.next_event()
    assert event.json() == {"orderId": 5, "status": "shipped", "trackingUrl": None}


@pytest.mark.slow
async def test_bad_laravel_messages_are_rejected_and_counted(
    start_broker: StartBroker, redis_server: RedisServer, redis_client: Any
) -> None:
    broker = await laravel_broker(start_broker, OLD_PREFIX)
    async with stream(broker, "private-orders.1") as s:
        # an event named like the broker's control events, from PHP
        await broadcast(redis_server, OLD_PREFIX, "--raw", "private-orders.1", "broker.reset", "{}")
        # what a native-format publisher would send: no "event"
        await redis_client.publish(OLD_PREFIX + "private-orders.1", b'{"data":{"id":1}}')
        await redis_client.publish(OLD_PREFIX + "private-orders.1", b"hello from redis-cli")
        await broadcast(redis_server, OLD_PREFIX, "OrderShipped", "1")
        good = await s.next_event()
        assert good.type == "App\\Events\\OrderShipped"
        assert await laravel_fence(redis_client, "private-orders.1", s, prefix=OLD_PREFIX) == [[]]
    await eventually(lambda: rejected(broker, "reserved_event"), lambda n: n == 1)
    await eventually(lambda: rejected(broker, "bad_envelope"), lambda n: n == 2)
    assert "reserved" in broker.log_text()


@pytest.mark.slow
async def test_prefix_mismatch_delivers_nothing(
    start_broker: StartBroker, redis_server: RedisServer, redis_client: Any
) -> None:
    # the app on a newer skeleton, the broker configured for the older prefix
    broker = await laravel_broker(start_broker, OLD_PREFIX)
    async with stream(broker, "private-orders.1") as s:
        await broadcast(redis_server, NEW_PREFIX, "OrderShipped", "1")
        assert await laravel_fence(redis_client, "private-orders.1", s, prefix=OLD_PREFIX) == [[]]
        await broadcast(redis_server, OLD_PREFIX, "OrderShipped", "1")
        assert (await s.next_event()).type == "App\\Events\\OrderShipped"


async def wait_log(broker: BrokerProcess, text: str, timeout: float = 5.0) -> str:
    async def probe() -> str:
        return broker.log_text()

    return await eventually(probe, lambda log: text in log, timeout=timeout)


@pytest.mark.slow
async def test_debug_log_names_channels_that_no_stream_listens_to(
    start_broker: StartBroker, redis_server: RedisServer, redis_client: Any
) -> None:
    broker = await laravel_broker(start_broker, OLD_PREFIX, "log.level=debug")
    # the page subscribed "orders.1" where Laravel broadcasts on "private-orders.1"
    async with stream(broker, "orders.1", grant="orders.*") as s:
        await broadcast(redis_server, OLD_PREFIX, "OrderShipped", "1")
        log = await wait_log(broker, "'private-orders.1' matches no open stream")
        line = next(x for x in log.splitlines() if "'private-orders.1' matches no open" in x)
        assert "orders.1" in line.split("channels with streams:")[1]
        assert await laravel_fence(redis_client, "orders.1", s, prefix=OLD_PREFIX) == [[]]


async def test_an_empty_prefix_shows_the_apps_real_redis_channel_names(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    # the way docs/laravel.md finds an unknown prefix: subscribe to everything
    # for a moment at debug level, broadcast once, read the log
    broker = await laravel_broker(start_broker, "", "log.level=debug")
    async with stream(broker, "private-orders.1"):
        await broadcast(redis_server, "shop-database-", "OrderShipped", "1")
        await wait_log(broker, "'shop-database-private-orders.1' matches no open stream")


def test_example_broker_config_is_valid() -> None:
    from broker.config import load_config

    path = REPO_ROOT / "examples/laravel/config/sse-broker.toml"
    cfg = load_config(str(path), env={})
    assert cfg.ingest.format == "laravel"
    assert cfg.ingest.mode == "pubsub"
    assert cfg.ingest.prefix == OLD_PREFIX
    assert cfg.auth.mode == "laravel"
    assert cfg.auth.laravel.credential_cookies == ("laravel_session",)


@pytest.mark.slow
async def test_readme_quick_look_without_an_app(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    # examples/laravel/README.md: the example config in jwt mode, a token from
    # `sse-broker token`, tools/broadcast.php
    secret = "dev-secret-at-least-32-bytes-long-xx"
    config = REPO_ROOT / "examples/laravel/config/sse-broker.toml"
    jwt_sets = ["auth.mode=jwt", f"auth.jwt.secret={secret}"]
    broker = await start_broker(*jwt_sets, config_text=config.read_text())
    argv = [sys.executable, "-m", "broker", "token"]
    for item in jwt_sets:
        argv += ["--set", item]
    argv += ["--user", "7", "--channel", "private-orders.*"]
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_BROKER_")}
    minted = subprocess.run(
        argv, capture_output=True, text=True, check=True, cwd=REPO_ROOT, env=clean_env
    )
    url = broker.events_url("private-orders.42", token=minted.stdout.strip())
    async with SSEClient.connect(url) as s:
        assert s.status == 200, await s.text()
        await s.wait_for(lambda st: st.parser.last_event_id != "", what="the preamble")
        await broadcast(redis_server, OLD_PREFIX, "OrderShipped", "42", "shipped")
        event = await s.next_event()
    assert event.type == "App\\Events\\OrderShipped"
    assert event.json() == {"orderId": 42, "status": "shipped", "trackingUrl": None}


def test_example_broker_config_passes_check_config() -> None:
    config = REPO_ROOT / "examples/laravel/config/sse-broker.toml"
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check-config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("SSE_BROKER_")},
    )
    assert result.returncode == 0, result.stderr
    assert 'format = "laravel"' in result.stdout
    assert "warning" not in result.stderr


def test_guide_config_snippet_matches_the_example_config() -> None:
    import re
    import tomllib

    guide = (REPO_ROOT / "docs/laravel.md").read_text()
    example = tomllib.loads((REPO_ROOT / "examples/laravel/config/sse-broker.toml").read_text())
    blocks = re.findall(r"```toml\n(.*?)```", guide, re.S)
    assert blocks, "docs/laravel.md shows the broker config"
    for block in blocks:
        shown = tomllib.loads(block)
        for section, values in shown.items():
            for key, value in values.items():
                if isinstance(value, dict):
                    for sub, subvalue in value.items():
                        assert example[section][key][sub] == subvalue, (section, key, sub)
                else:
                    assert example[section][key] == value, (section, key)
