"""The fixtures themselves: a real redis-server we can stop and restart, and the
broker launcher, proved here against a stand-in process (``broker_argv`` is
overridden in this module) so it is known to work before the broker exists."""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis.asyncio as aioredis
from helpers import envelope, metric_value, parse_metrics, publish
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

if TYPE_CHECKING:
    from conftest import BrokerProcess, RedisServer, StartBroker

# -- redis_server ------------------------------------------------------------------


async def test_redis_server_answers_ping(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert await redis_server.client().ping() is True


async def test_redis_server_stop_then_start_on_the_same_port(redis_server: RedisServer) -> None:
    port = redis_server.port
    client = redis_server.client(retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)
    await client.set("k", "v")

    redis_server.stop()
    assert not redis_server.running
    with pytest.raises(RedisConnectionError):
        await client.ping()

    redis_server.start()
    assert redis_server.port == port
    assert await redis_server.client().ping() is True
    assert await redis_server.client().get("k") is None  # --save '': nothing survives


async def test_publish_prefixes_the_channel_and_encodes_json(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    pubsub = redis_client.pubsub()
    await pubsub.subscribe("sse:news")
    try:
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        assert await publish(redis_client, "news", envelope({"a": 1}, event="up")) == 1
        assert await publish(redis_client, "news", "hello") == 1
        received = [await pubsub.get_message(timeout=1) for _ in range(2)]
        assert [m["data"] for m in received if m] == [
            b'{"data":{"a":1},"event":"up"}',
            b"hello",
        ]
    finally:
        await pubsub.aclose()


# -- metrics parsing ----------------------------------------------------------------

METRICS = textwrap.dedent(
    """\
    # HELP sse_broker_connections Open streams.
    # TYPE sse_broker_connections gauge
    sse_broker_connections 3.0
    # TYPE sse_broker_events_rejected_total counter
    sse_broker_events_rejected_total{reason="invalid"} 2.0
    sse_broker_events_rejected_total{reason="too_large"} 1.0
    sse_broker_events_rejected_created{reason="invalid"} 1.7e+09
    sse_broker_odd{path="a\\"b\\\\c\\n",le="+Inf",} +Inf 1700000000000
    """
)


def test_metric_value_matches_labels_and_sums_the_rest() -> None:
    assert metric_value(METRICS, "sse_broker_connections") == 3.0
    assert metric_value(METRICS, "sse_broker_events_rejected_total", {"reason": "invalid"}) == 2.0
    assert metric_value(METRICS, "sse_broker_events_rejected_total") == 3.0
    assert metric_value(METRICS, "sse_broker_events_rejected_total", {"reason": "x"}) is None
    assert metric_value(METRICS, "sse_broker_missing") is None
    odd = [s for s in parse_metrics(METRICS) if s.name == "sse_broker_odd"]
    assert odd[0].labels == {"path": 'a"b\\c\n', "le": "+Inf"}
    assert odd[0].value == float("inf")


# -- start_broker, against a stand-in ---------------------------------------------

FAKE_BROKER = """
import asyncio, os, signal, sys, time
from aiohttp import web

args = sys.argv[1:]
assert args[0] == "serve", args
sets, config = {}, None
for flag, value in zip(args[1::2], args[2::2]):
    if flag == "--set":
        key, _, val = value.partition("=")
        sets[key] = val
    elif flag == "--config":
        config = value
print("sets", sets, flush=True)
print("env", sorted(k for k in os.environ if k.startswith("SSE_BROKER_")), flush=True)
if config:
    print("config", open(config).read().strip(), flush=True)
if "fake.crash" in sets:
    sys.exit("crash requested")
started = time.monotonic()
METRICS = (
    "sse_broker_connections 2.0\\n"
    'sse_broker_connections_closed_total{reason="drain"} 4.0\\n'
)

async def health(request):
    return web.Response(text="ok")

async def ready(request):
    ok = "fake.never_ready" not in sets and time.monotonic() - started > 0.3
    return web.Response(text="ready" if ok else "starting", status=200 if ok else 503)

async def metrics(request):
    return web.Response(text=METRICS)

async def main():
    admin = web.Application()
    admin.router.add_get("/healthz", health)
    admin.router.add_get("/readyz", ready)
    admin.router.add_get("/metrics", metrics)
    public = web.Application()
    public.router.add_get("/healthz", health)
    runners = []
    for app, key in ((admin, "admin.listen"), (public, "server.listen")):
        runner = web.AppRunner(app)
        await runner.setup()
        host, _, port = sets[key].rpartition(":")
        await web.TCPSite(runner, host, int(port)).start()
        runners.append(runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: print("reloaded", flush=True))
    await stop.wait()
    for runner in runners:
        await runner.cleanup()

asyncio.run(main())
"""


@pytest.fixture
def broker_argv(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_broker.py"
    script.write_text(FAKE_BROKER)
    return [sys.executable, str(script)]


@pytest.mark.slow
async def test_start_broker_waits_for_readiness_and_exposes_the_process(
    start_broker: StartBroker, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSE_BROKER_LOG_LEVEL", "leaked")
    broker = await start_broker(
        "sse.retry_ms=500",
        env={"SSE_BROKER_SSE_HEARTBEAT_SECONDS": "1"},
        config_text='[log]\nlevel = "debug"\n',
    )
    status, _ = await broker.get("/readyz")
    assert status == 200
    assert broker.url is not None
    assert broker.events_url("a", "b", token="t", last_event_id=["1-2"]) == (
        f"{broker.url}/events?channel=a&channel=b&token=t&last_event_id=1-2"
    )
    assert await broker.get("/healthz", admin=False) == (200, "ok")
    assert await broker.metric("sse_broker_connections") == 2.0
    assert await broker.metric("sse_broker_connections_closed_total", {"reason": "drain"}) == 4.0

    log = broker.log_text()
    assert f"'redis.url': '{redis_server.url}'" in log
    assert "'sse.retry_ms': '500'" in log
    assert "env ['SSE_BROKER_SSE_HEARTBEAT_SECONDS']" in log  # the outer env does not leak
    assert 'config [log]\nlevel = "debug"' in log

    broker.signal(signal.SIGHUP)
    broker.terminate()
    assert await broker.wait_exit(5) == 0
    assert "reloaded" in broker.log_text()


@pytest.mark.slow
async def test_later_sets_override_the_fixture_defaults(start_broker: StartBroker) -> None:
    broker = await start_broker("server.path=/sse", "redis.url=redis://127.0.0.1:1/0")
    assert broker.events_url("x").endswith("/sse?channel=x")
    assert "'redis.url': 'redis://127.0.0.1:1/0'" in broker.log_text()


@pytest.mark.slow
async def test_wait_ready_false_only_needs_healthz(start_broker: StartBroker) -> None:
    broker: BrokerProcess = await start_broker("fake.never_ready=1", wait_ready=False)
    assert (await broker.get("/readyz"))[0] == 503
    with pytest.raises(pytest.fail.Exception, match=r"did not answer 200 within 0\.3s"):
        await broker.wait_ready(timeout=0.3)


async def test_start_broker_fails_with_the_log_when_the_process_exits(
    start_broker: StartBroker,
) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"(?s)exited with code 1.*crash requested"):
        await start_broker("fake.crash=1")


async def test_wait_exit_times_out_with_the_log(start_broker: StartBroker) -> None:
    broker = await start_broker(wait_ready=None)
    with pytest.raises(TimeoutError, match="still running"):
        await broker.wait_exit(0.1)
    broker.kill()
    assert await broker.wait_exit(5) == -signal.SIGKILL
