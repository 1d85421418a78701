"""Every plain-PHP example in ``examples/php/`` run with real PHP against a real
redis-server and real broker processes, asserting what browsers receive.

Needs ``php-cli``, ``php-redis`` (phpredis) and ``php-predis`` from Debian: a
missing one FAILS these tests (with the apt-get command), it never skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from conftest import REPO_ROOT, BrokerProcess, RedisServer, StartBroker, free_port
from helpers import fence, fence_stream
from sse_client import SSEClient, SSEEvent, SSEStream

EXAMPLES = REPO_ROOT / "examples/php"
PHP_PACKAGES = "php-cli php-redis php-predis"
SECRET = "php-examples-test-secret-0123456789abcdef"
STREAM_ID_RE = re.compile(r"^\d+-\d+$")


# -- running PHP ----------------------------------------------------------------------------------


def require_php(*, predis: bool = False) -> str:
    """The php binary (with phpredis, and predis when asked); FAILS when missing."""
    hint = f"apt-get install {PHP_PACKAGES}"
    php = shutil.which("php")
    if php is None:
        pytest.fail(f"php is not installed: these tests run real PHP ({hint})", pytrace=False)
    probe = subprocess.run(
        [php, "-r", 'exit(extension_loaded("redis") ? 0 : 1);'], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.fail(f"phpredis is not loaded in {php} ({hint})", pytrace=False)
    if predis:
        probe = subprocess.run(
            [
                php,
                "-r",
                'require "Predis/autoload.php"; exit(class_exists("Predis\\\\Client") ? 0 : 1);',
            ],
            capture_output=True,
            check=False,
        )
        if probe.returncode != 0:
            pytest.fail(f"predis is not installed ({hint})", pytrace=False)
    return php


async def run_php(
    script: str, *args: str, env: dict[str, str], expect_rc: int = 0, predis: bool = False
) -> str:
    """``php examples/php/<script> args`` with ``env`` added; its stdout."""
    proc = await asyncio.create_subprocess_exec(
        require_php(predis=predis),
        str(EXAMPLES / script),
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == expect_rc, (
        f"php {script} {' '.join(args)} exited {proc.returncode}\n"
        f"stdout: {out.decode(errors='replace')}\nstderr: {err.decode(errors='replace')}"
    )
    return out.decode()


def redis_env(redis_server: RedisServer, **more: str) -> dict[str, str]:
    return {"REDIS_HOST": redis_server.host, "REDIS_PORT": str(redis_server.port), **more}


# -- the broker side ------------------------------------------------------------------------------


def token(user: str, tenant: str | None, *channels: str) -> str:
    claims: dict[str, Any] = {"sub": user, "channels": list(channels), "exp": time.time() + 600}
    if tenant is not None:
        claims["tenant"] = tenant
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def jwt_broker(start_broker: StartBroker, *sets: str) -> BrokerProcess:
    return await start_broker("auth.mode=jwt", f"auth.jwt.secret={SECRET}", *sets)


@contextlib.asynccontextmanager
async def stream(
    broker: BrokerProcess, *channels: str, token: str, last_event_id: str | None = None
) -> AsyncIterator[SSEStream]:
    """An open stream, returned once registered (its preamble arrived)."""
    url = broker.events_url(*channels, token=token)
    async with SSEClient.connect(url, last_event_id=last_event_id) as s:
        assert s.status == 200, await s.text()
        await s.wait_for(lambda st: bool(st.parser.comments), what="the preamble")
        yield s


def typed(events: list[SSEEvent]) -> list[tuple[str, Any]]:
    return [(e.type, e.json()) for e in events]


STATUS = ("order.status", {"id": 42, "status": "shipped"})
NOTE = ("order.note", {"id": 42, "text": "Your parcel left the warehouse ✓"})


async def check_order_events(
    broker: BrokerProcess,
    publish: Any,
    redis: Any,
    *,
    stream_mode: bool,
    status: tuple[str, Any] = STATUS,
) -> list[SSEEvent]:
    """Streams of three identities; ``publish()`` runs the PHP example; each stream gets
    what its tenant and user may see. Returns user 7's events.

    ``redis`` publishes the fence that proves nothing more came: an entry of
    ``sse:stream`` when ``stream_mode`` (it stays there, after the example's), else
    a PUBLISH."""
    async with (
        stream(broker, "orders", token=token("7", "acme", "orders")) as ada,
        stream(broker, "orders", token=token("8", "acme", "orders")) as bob,
        stream(broker, "orders", token=token("7", "globex", "orders")) as other_tenant,
    ):
        await publish()
        got = await ada.events(2)
        assert typed(got) == [status, NOTE]  # tenant acme, user 7: both
        assert typed(await bob.events(1)) == [status]  # not among "users"
        # the marker has no tenant and no users: every stream gets it, after whatever
        # the example published (another tenant's stream: nothing before it)
        fence_for = fence_stream if stream_mode else fence
        assert await fence_for(redis, "orders", ada, bob, other_tenant) == [[], [], []]
    # the status was retained: a page opened later gets it first
    async with stream(broker, "orders", token=token("8", "acme", "orders")) as late:
        assert typed(await late.events(1)) == [status]
    return got


# -- phpredis: native and stream ------------------------------------------------------------------


@pytest.mark.slow
async def test_publish_native_with_phpredis(
    start_broker: StartBroker, redis_server: RedisServer, redis_client: Any
) -> None:
    broker = await jwt_broker(start_broker)
    out: list[str] = []

    async def publish() -> None:
        env = redis_env(redis_server, SSE_TENANT="acme", SSE_USERS="7")
        out.append(await run_php("publish_native.php", "42", env=env))

    carrier = {"id": 42, "status": "shipped", "carrier": "DHL/Express"}
    await check_order_events(
        broker, publish, redis_client, stream_mode=False, status=("order.status", carrier)
    )
    assert out == ["published order 42 to sse:orders (1 subscriber(s))\n"]


async def test_publish_native_honours_a_custom_prefix(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    broker = await jwt_broker(start_broker, "ingest.prefix='app:sse:'")
    async with stream(broker, "orders", token=token("7", "acme", "orders")) as s:
        env = redis_env(redis_server, SSE_PREFIX="app:sse:")
        out = await run_php("publish_native.php", "5", env=env)
        assert "to app:sse:orders (1 subscriber(s))" in out
        assert [e.type for e in await s.events(2)] == ["order.status", "order.note"]


@pytest.mark.slow
async def test_publish_stream_with_phpredis(
    start_broker: StartBroker, redis_server: RedisServer, redis_client: Any
) -> None:
    broker = await jwt_broker(start_broker, "ingest.mode=stream")
    ids: list[str] = []

    async def publish() -> None:
        env = redis_env(redis_server, SSE_TENANT="acme", SSE_USERS="7")
        ids.extend((await run_php("publish_stream.php", "42", env=env)).split())

    got = await check_order_events(broker, publish, redis_client, stream_mode=True)
    assert all(STREAM_ID_RE.match(i) for i in ids), ids
    assert [e.last_event_id for e in got] == ids  # the stream ids are the event ids
    # the example's entries, then only the fence's marker
    *entries, (_, marker) = await redis_client.xrange("sse:stream")
    assert [e[0].decode() for e in entries] == ids
    assert marker[b"channel"] == b"orders" and marker[b"data"].startswith(b"fence-")
    assert entries[1][1][b"users"] == b"[7]"  # a JSON array, as the broker wants it


async def test_publish_stream_trims_by_min_id(
    start_broker: StartBroker, redis_server: RedisServer, redis_client: Any
) -> None:
    # an entry older than the TTL is trimmed as PHP adds (MINID ~: whole
    # macro nodes only, so fill one first)
    old = int(time.time() * 1000) - 3_600_000
    pipe = redis_client.pipeline(transaction=False)
    for i in range(200):
        pipe.xadd("sse:stream", {"channel": "orders", "data": "old"}, id=f"{old}-{i}")
    await pipe.execute()
    await run_php("publish_stream.php", env=redis_env(redis_server, SSE_TTL_SECONDS="60"))
    remaining = await redis_client.xrange("sse:stream")
    assert [e[1][b"data"] for e in remaining if e[1][b"data"] == b"old"] == []
    assert len(remaining) == 2


# -- predis ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["native", "stream"])
async def test_publish_with_predis(
    start_broker: StartBroker, redis_server: RedisServer, redis_client: Any, mode: str
) -> None:
    require_php(predis=True)
    broker = await jwt_broker(start_broker, *(["ingest.mode=stream"] if mode == "stream" else []))
    out: list[str] = []

    async def publish() -> None:
        env = redis_env(redis_server, SSE_TENANT="acme", SSE_USERS="7")
        out.append(await run_php("publish_predis.php", mode, "42", env=env, predis=True))

    got = await check_order_events(broker, publish, redis_client, stream_mode=mode == "stream")
    if mode == "stream":
        assert out[0].split() == [e.last_event_id for e in got]
    else:
        assert out == ["published order 42 to sse:orders (1 subscriber(s))\n"]


# -- HTTP publish ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pubsub", "stream"])
async def test_publish_http(start_broker: StartBroker, mode: str) -> None:
    broker = await jwt_broker(start_broker, "publish.keys=['php-key']", f"ingest.mode={mode}")
    assert broker.admin_url is not None
    env = {"SSE_ADMIN_URL": broker.admin_url, "SSE_PUBLISH_KEY": "php-key", "SSE_TENANT": "acme"}
    async with stream(broker, "orders", token=token("7", "acme", "orders")) as s:
        answer = orjson.loads(await run_php("publish_http.php", "42", env=env))
        got = await s.events(2)
    assert typed(got) == [STATUS, NOTE]
    assert answer["published"] == 2
    if mode == "stream":
        assert answer["ids"] == [e.last_event_id for e in got]
    else:
        assert answer["ids"] == []


async def test_publish_http_reports_a_refusal(start_broker: StartBroker) -> None:
    broker = await jwt_broker(start_broker, "publish.keys=['php-key']")
    assert broker.admin_url is not None
    env = {"SSE_ADMIN_URL": broker.admin_url, "SSE_PUBLISH_KEY": "wrong"}
    out = await run_php("publish_http.php", env=env, expect_rc=1)
    assert orjson.loads(out)["error"]  # the broker's JSON error body
    down = {"SSE_ADMIN_URL": f"http://127.0.0.1:{free_port()}", "SSE_PUBLISH_KEY": "k"}
    await run_php("publish_http.php", env=down, expect_rc=1)


# -- JWT minted by PHP -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_jwt_minted_by_php_is_accepted_and_grants_what_it_says(
    start_broker: StartBroker, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    broker = await jwt_broker(start_broker)
    minted = (
        await run_php(
            "mint_jwt.php", "7", "acme", "orders.acme.*", "user.7",
            env={"SSE_JWT_SECRET": SECRET, "SSE_JWT_TTL": "120"},
        )
    ).strip()  # fmt: skip
    header = jwt.get_unverified_header(minted)
    assert header == {"alg": "HS256", "typ": "JWT"}
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "7" and claims["tenant"] == "acme"
    assert claims["channels"] == ["orders.acme.*", "user.7"]
    assert 110 <= claims["exp"] - time.time() <= 121

    url = broker.events_url("orders.acme.1", "user.7", token=minted)
    async with SSEClient.connect(url) as s:
        assert s.status == 200, await s.text()
        await s.wait_for(lambda st: bool(st.parser.comments), what="the preamble")
        env = redis_env(redis_server)
        await run_php("publish_native.php", env=env)  # tenant acme on "orders": not subscribed
        # the tenant filter applies to what the token's grants open
        client = redis_server.client()
        await client.publish("sse:orders.acme.1", orjson.dumps({"data": 1, "tenant": "acme"}))
        await client.publish("sse:orders.acme.1", orjson.dumps({"data": 2, "tenant": "globex"}))
        await client.publish("sse:user.7", orjson.dumps({"data": 3}))
        assert [e.data for e in await s.events(2)] == ["1", "3"]
        assert await fence(client, "user.7", s) == [[]]
    # not granted: 403 naming the channel; another secret: 401
    async with http.get(broker.events_url("orders.globex.1", token=minted)) as resp:
        assert resp.status == 403
        assert "orders.globex.1" in (await resp.json())["message"]
    forged = (
        await run_php("mint_jwt.php", "7", "acme", "*", env={"SSE_JWT_SECRET": "x" * 40})
    ).strip()
    async with http.get(broker.events_url("orders.acme.1", token=forged)) as resp:
        assert resp.status == 401


async def test_jwt_minted_by_php_with_a_kid_for_rotation(
    start_broker: StartBroker, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    secrets = tmp_path / "jwt.secrets"
    secrets.write_text(f"old {'o' * 40}\nnew {SECRET}\n")
    broker = await start_broker("auth.mode=jwt", f"auth.jwt.secret_file='{secrets}'")
    minted = (
        await run_php(
            "mint_jwt.php", "7", "", "news",
            env={"SSE_JWT_SECRET": SECRET, "SSE_JWT_KID": "new"},
        )
    ).strip()  # fmt: skip
    assert jwt.get_unverified_header(minted)["kid"] == "new"
    assert "tenant" not in jwt.decode(minted, SECRET, algorithms=["HS256"])
    async with http.get(broker.events_url("news", token=minted)) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"


async def test_mint_jwt_without_a_secret_is_a_usage_error() -> None:
    await run_php("mint_jwt.php", "7", env={"SSE_JWT_SECRET": ""}, expect_rc=2)


# -- the callback endpoint in plain PHP (php -S) ---------------------------------------------------


@contextlib.contextmanager
def php_server(sessions: Path, key: str) -> Iterator[str]:
    """``php -S`` serving examples/php/sse_auth.php; yields its base URL."""
    php = require_php()
    port = free_port()
    log = (sessions.parent / "php-server.log").open("wb")
    proc = subprocess.Popen(
        [php, "-d", f"session.save_path={sessions}", "-S", f"127.0.0.1:{port}",
         str(EXAMPLES / "sse_auth.php")],
        env={**os.environ, "SSE_BROKER_KEY": key},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            assert proc.poll() is None, (sessions.parent / "php-server.log").read_text()
            assert time.monotonic() < deadline, "php -S did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def php_session(sessions: Path, session_id: str, values: dict[str, str]) -> None:
    """Store a PHP session the way the app's login would (real PHP sessions)."""
    assign = "".join(f"$_SESSION[{orjson.dumps(k).decode()}] = {orjson.dumps(v).decode()};"
                     for k, v in values.items())  # fmt: skip
    code = (
        f"session_save_path({orjson.dumps(str(sessions)).decode()});"
        f"session_id({orjson.dumps(session_id).decode()});"
        f"session_start(); {assign} session_write_close();"
    )
    subprocess.run([require_php(), "-r", code], check=True, capture_output=True)


async def test_callback_endpoint_in_plain_php(
    start_broker: StartBroker,
    redis_server: RedisServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    php_session(sessions, "adasession01", {"user_id": "7", "tenant": "acme"})
    php_session(sessions, "guestsession1", {"cart": "3 items"})  # not logged in
    with php_server(sessions, "broker-key") as base:
        broker = await start_broker(
            "auth.mode=callback",
            f"auth.callback.url={base}/sse/auth",
            "auth.callback.key=broker-key",
            "auth.callback.credential_cookies=['PHPSESSID']",
        )
        ada = {"Cookie": "PHPSESSID=adasession01"}
        url = broker.events_url("orders.acme.1", "user.7")
        async with SSEClient.connect(url, headers=ada) as s:
            assert s.status == 200, await s.text()
            await s.wait_for(lambda st: bool(st.parser.comments), what="the preamble")
            client = redis_server.client()
            await client.publish("sse:orders.acme.1", orjson.dumps({"data": "a", "tenant": "acme"}))
            await client.publish("sse:user.7", orjson.dumps({"data": "b"}))
            assert [e.data for e in await s.events(2)] == ["a", "b"]

        async def status(url: str, headers: dict[str, str]) -> int:
            async with http.get(url, headers=headers) as resp:
                return resp.status

        assert await status(broker.events_url("orders.globex.1"), ada) == 403
        assert await status(url, {"Cookie": "PHPSESSID=guestsession1"}) == 401
        assert await status(url, {"Cookie": "PHPSESSID=nosuchsession"}) == 401
        assert await status(url, {}) == 401
        # the endpoint refuses callers without the broker's key
        async with http.get(f"{base}/sse/auth?channel=x", headers=ada) as resp:
            assert resp.status == 403
        async with http.get(
            f"{base}/sse/auth?channel=x",
            headers={**ada, "X-SSE-Broker-Key": "broker-key"},
        ) as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "user": "7",
                "tenant": "acme",
                "channels": ["orders.acme.*", "user.7"],
                "ttl": 60,
            }
