"""Redis resilience end to end: restarts under publish load, resets that never lie,
stream mode reading on across outages, and readiness that tells the truth when a
subscription wedges while Redis still answers PINGs.

Real broker processes, a real redis-server restarted mid-stream, and (for the
wedge) a TCP proxy between broker and Redis that silences one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from conftest import BrokerProcess, RedisServer, StartBroker
from helpers import eventually, fence, publish, stream
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis_proxy import RedisProxy
from sse_client import SSEEvent, SSEStream, SSEStreamClosed

STREAM_KEY = "sse:stream"


# -- helpers ---------------------------------------------------------------------------


async def metric0(broker: BrokerProcess, name: str, labels: dict[str, str] | None = None) -> float:
    return await broker.metric(name, labels) or 0.0


async def readiness(broker: BrokerProcess) -> tuple[int, str | None]:
    status, body = await broker.get("/readyz", timeout=2)
    return status, orjson.loads(body).get("reason")


def no_retry_client(port: int) -> aioredis.Redis:
    """A client that fails fast instead of retrying (a retried PUBLISH/XADD could run
    twice, which would look like a duplicate delivery)."""
    return aioredis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))


@dataclass
class Collector:
    """Reads a stream in the background, keeping every event."""

    stream: SSEStream
    events: list[SSEEvent] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> Collector:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        with contextlib.suppress(SSEStreamClosed):  # the test closed it, or the assertions tell
            while True:
                with contextlib.suppress(TimeoutError):
                    self.events.append(await self.stream.next_event(timeout=1))

    def of_type(self, type: str) -> list[SSEEvent]:
        return [e for e in self.events if e.type == type]

    @property
    def data(self) -> list[str]:
        return [e.data for e in self.events if e.type == "message"]

    async def wait(self, predicate: Callable[[Collector], bool], timeout: float = 10) -> None:
        await eventually(lambda: asyncio.sleep(0, self), predicate, timeout=timeout)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass
class Publisher:
    """Publishes numbered events forever, through outages: each number is either
    acknowledged by Redis or failed (maybe applied, maybe not)."""

    client: aioredis.Redis
    channel: str
    stream: bool = False  # XADD to the stream key instead of PUBLISH
    interval: float = 0.01
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    acked: dict[int, str] = field(default_factory=dict)  # n -> stream id ("" for PUBLISH)
    failed: set[int] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    stopping: bool = False

    def start(self) -> Publisher:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        n = 0
        while not self.stopping:
            async with self.lock:
                try:
                    if self.stream:
                        raw = await self.client.xadd(
                            STREAM_KEY, {"channel": self.channel, "data": str(n)}
                        )
                        self.acked[n] = raw.decode()
                    else:
                        await publish(self.client, self.channel, str(n))
                        self.acked[n] = ""
                except (RedisError, OSError):
                    self.failed.add(n)
            n += 1
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        # A flag, not cancel(): redis-py may turn a cancellation mid-command into a
        # ConnectionError, which the loop above would take for an outage.
        self.stopping = True
        if self.task is not None:
            try:
                await asyncio.wait_for(self.task, 5)
            except TimeoutError:
                self.task.cancel()
                raise


def assert_no_silent_loss(c: Collector, pub: Publisher, *, resets: int) -> None:
    """Events arrive in order, once; every acknowledged event a client did not get
    lies in a gap that a ``broker.reset`` (``outage``) covers."""
    kinds = [(e.type, e) for e in c.events if e.type in ("message", "broker.reset")]
    numbers = [int(e.data) for kind, e in kinds if kind == "message"]
    assert numbers == sorted(set(numbers)), "in order, no duplicates"
    assert not set(numbers) - set(pub.acked) - pub.failed, "only published events"
    reset_events = [e for kind, e in kinds if kind == "broker.reset"]
    assert len(reset_events) == resets, [e.data for e in reset_events]
    for e in reset_events:
        assert e.json()["reason"] == "outage"
    previous, reset_seen = -1, False
    for kind, e in kinds:
        if kind == "broker.reset":
            reset_seen = True
            continue
        n = int(e.data)
        missing = [m for m in range(previous + 1, n) if m in pub.acked]
        if previous >= 0:
            assert not missing or reset_seen, f"events {missing} lost without a reset"
        previous, reset_seen = n, False


# -- Redis restarts, pubsub mode -----------------------------------------------------------


@pytest.mark.slow
async def test_pubsub_survives_redis_restarts_under_load_and_resets_every_stream(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    """Three Redis restarts while a publisher keeps going: readiness and
    sse_broker_redis_connected follow Redis, reconnects are counted, every open
    stream gets ``broker.reset`` (``outage``) after each restoration, nothing
    is lost without one, a resume across the hole resets and one after it is exact."""
    broker = await start_broker(
        "ingest.canary_interval_seconds=1", "sse.heartbeat_seconds=1", "sse.retry_ms=500"
    )
    pub = Publisher(no_retry_client(redis_server.port), "load")
    collectors: list[Collector] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(3):
                s = await stack.enter_async_context(stream(broker, "load", "other"))
                collectors.append(Collector(s).start())
            pub.start()
            await collectors[0].wait(lambda c: len(c.data) >= 20)
            # a client that leaves before the first outage, to resume across it
            async with stream(broker, "load") as early:
                await early.next_event()
                early_id = early.parser.last_event_id

            for k in range(1, 4):
                await asyncio.sleep(0.3)
                redis_server.stop()
                await broker.wait_not_ready(timeout=5)
                assert await readiness(broker) == (503, "redis_unavailable")
                assert await broker.metric("sse_broker_redis_connected") == 0
                assert (await broker.get("/healthz", admin=False))[0] == 200
                loop = asyncio.get_running_loop()
                samples = await sample_readiness(broker, 0.5, loop.time())
                assert all(s[1:] == (503, "redis_unavailable", 0) for s in samples), samples
                redis_server.start()
                await broker.wait_ready(timeout=10)
                assert await broker.metric("sse_broker_redis_connected") == 1
                assert await broker.metric("sse_broker_redis_reconnects_total") == k
                for c in collectors:
                    await c.wait(lambda c, k=k: len(c.of_type("broker.reset")) == k)
                    await c.wait(lambda c: c.events[-1].type == "message")  # live again
                if k == 1:
                    # across the hole: reset, never silence
                    async with stream(broker, "load", last_event_id=early_id) as late:
                        first = await late.next_event()
                        assert first.type == "broker.reset"
                        assert first.json()["reason"] == "outage"
                    # from the reset's id (after the hole): exact, no reset
                    hole_id = collectors[0].of_type("broker.reset")[0].last_event_id
                    async with stream(broker, "load", last_event_id=hole_id) as after:
                        first = await after.next_event()
                        assert first.type == "message", first
            await asyncio.sleep(0.3)
            await pub.stop()
            await publish(redis_server.client(), "load", "-1")  # the end marker
            for c in collectors:
                await c.wait(lambda c: c.data[-1:] == ["-1"])
                c.events.pop()
    finally:
        await pub.stop()
        for c in collectors:
            await c.stop()
        await pub.client.aclose()

    assert broker.returncode is None
    assert len(pub.acked) > 100
    for c in collectors:
        assert_no_silent_loss(c, pub, resets=3)
    assert await metric0(broker, "sse_broker_resets_total", {"reason": "outage"}) == 3 * 3 + 1
    assert await readiness(broker) == (200, None)


# -- Redis restarts, stream mode ------------------------------------------------------------


@pytest.mark.slow
async def test_stream_mode_reads_on_across_outages_without_reset_or_loss(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    """Stream mode under XADD load: two Redis restarts (the data survives: SAVE before
    each stop, loaded from --dir at start) and one kill of every client connection.
    The reader reads on from its last id: every acknowledged entry arrives once, in
    order, with its stream id, no ``broker.reset``; a resume across an outage is exact."""
    broker = await start_broker(
        "ingest.mode=stream", "ingest.canary_interval_seconds=1", "sse.heartbeat_seconds=1"
    )
    admin = redis_server.client()  # retries: its connection may predate a restart
    pub = Publisher(no_retry_client(redis_server.port), "load", stream=True, interval=0.01)
    collectors: list[Collector] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):
                s = await stack.enter_async_context(stream(broker, "load"))
                collectors.append(Collector(s).start())
            pub.start()
            await collectors[0].wait(lambda c: len(c.data) >= 20)
            async with stream(broker, "load") as early:
                seen_early = int((await early.next_event()).data)
                early_id = early.parser.last_event_id

            # The long outage outlasts any client-side retrying: the broker's own
            # reconnect path (read on from the last id) must do the work.
            for how, down in [("restart", 1.0), ("kill", 0), ("restart", 6.0)]:
                await asyncio.sleep(0.3)
                async with pub.lock:  # no XADD in flight: none half-applied
                    before = max(pub.acked)
                    if how == "restart":
                        await admin.save()
                        redis_server.stop()
                    else:
                        await admin.execute_command(
                            "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
                        )
                if how == "restart":
                    await asyncio.sleep(down)
                    redis_server.start()
                # under load again (entries acknowledged after the outage): the reader
                # caught up with what came after it
                await eventually(
                    lambda before=before: asyncio.sleep(0, sum(n > before for n in pub.acked)),
                    lambda after: after >= 10,
                    timeout=15,
                )
                mark = max(pub.acked)
                for c in collectors:
                    await c.wait(lambda c, mark=mark: str(mark) in c.data[-100:], timeout=15)
            # a resume across the outages is exact: the entries after its id, in order
            missed = sorted(n for n in pub.acked if n > seen_early)[:200]
            late = await open_stream_retrying(broker, stack, "load", last_event_id=early_id)
            got = await late.events(len(missed))
            assert [(e.type, int(e.data)) for e in got] == [("message", n) for n in missed]
            await asyncio.sleep(0.3)
            await pub.stop()
            last = max(pub.acked)
            for c in collectors:
                await c.wait(lambda c: c.data[-1:] == [str(last)])
    finally:
        await pub.stop()
        for c in collectors:
            await c.stop()
        await pub.client.aclose()

    assert broker.returncode is None
    expected = sorted(pub.acked)
    assert len(expected) > 100 and pub.failed, "published through the outages"
    for c in collectors:
        assert not c.of_type("broker.reset")
        got = [e for e in c.events if e.type == "message"]
        assert [int(e.data) for e in got] == expected
        assert [e.last_event_id for e in got] == [pub.acked[n] for n in expected]
    assert await metric0(broker, "sse_broker_resets_total") == 0
    assert await metric0(broker, "sse_broker_redis_reconnects_total") >= 1
    await broker.wait_ready()
    assert await broker.metric("sse_broker_redis_connected") == 1


async def open_stream_retrying(
    broker: BrokerProcess,
    stack: contextlib.AsyncExitStack,
    *channels: str,
    last_event_id: str | None = None,
    timeout: float = 10,
) -> SSEStream:
    """Like a browser after a retryable refusal: try again until the stream opens."""
    async with asyncio.timeout(timeout):
        while True:
            await broker.wait_ready()
            try:
                return await stack.enter_async_context(
                    stream(broker, *channels, last_event_id=last_event_id)
                )
            except SSEStreamClosed:  # a refusal raced with the readiness probe
                await asyncio.sleep(0.1)


async def sample_readiness(
    broker: BrokerProcess, seconds: float, started: float
) -> list[tuple[float, int, str | None, float | None]]:
    """(time since ``started``, /readyz status, reason, sse_broker_redis_connected)
    every ~30 ms for ``seconds``."""
    loop = asyncio.get_running_loop()
    samples = []
    end = loop.time() + seconds
    while loop.time() < end:
        status, reason = await readiness(broker)
        connected = await broker.metric("sse_broker_redis_connected")
        samples.append((round(loop.time() - started, 2), status, reason, connected))
        await asyncio.sleep(0.03)
    return samples


@pytest.mark.slow
async def test_stream_mode_readiness_tells_the_truth_while_redis_is_down(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    """Redis stops for 4 s under a stream-mode broker: /readyz turns 503 promptly
    (its XREAD connection is closed at once) and stays 503, with
    sse_broker_redis_connected 0, until Redis is back; one outage, one reconnect."""
    broker = await start_broker("ingest.mode=stream", "ingest.canary_interval_seconds=1")
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.5)
    stopped = loop.time()
    redis_server.stop()
    samples = await sample_readiness(broker, 4.0, stopped)
    redis_server.start()
    await broker.wait_ready(timeout=10)
    down = [s for s in samples if s[1] == 503]
    assert down, f"/readyz said 200 all through a 4 s Redis outage: {samples[::10]}"
    assert down[0][0] <= 2.0, f"noticed only after {down[0][0]} s: {samples[::5]}"
    after = samples[samples.index(down[0]) :]
    lies = [s for s in after if s[1] != 503 or s[3] != 0]
    assert not lies, f"ready/connected while Redis was down: {lies[:5]} of {len(after)} samples"
    assert await broker.metric("sse_broker_redis_connected") == 1
    assert await broker.metric("sse_broker_redis_reconnects_total") == 1


# -- readiness that tells the truth ------------------------------------------------------------


async def poll_until_ready_after_stall(
    broker: BrokerProcess, started: float, timeout: float = 12
) -> tuple[float, float, list[tuple[float, int, str | None]]]:
    """Poll /readyz (every 20 ms) until it said ``ingest_stalled`` and then 200 again.

    Returns (seconds until ``ingest_stalled``, the ingest_stalled gauge read right
    then, every (time, status, reason) seen)."""
    loop = asyncio.get_running_loop()
    seen: list[tuple[float, int, str | None]] = []
    stalled_at: float | None = None
    gauge = -1.0
    async with asyncio.timeout(timeout):
        while True:
            status, reason = await readiness(broker)
            now = loop.time() - started
            seen.append((round(now, 2), status, reason))
            if reason == "ingest_stalled" and stalled_at is None:
                stalled_at = now
                gauge = await metric0(broker, "sse_broker_ingest_stalled")
            if stalled_at is not None and status == 200:
                return stalled_at, gauge, seen
            await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_wedged_subscription_is_detected_by_the_canary_and_resubscribed(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    """The PSUBSCRIBE connection goes silent (a proxy drops what Redis sends on it)
    while Redis answers PINGs on every other connection: within ~2 canary intervals
    /readyz is 503 ``ingest_stalled`` and sse_broker_ingest_stalled is 1; the broker
    subscribes again on a fresh connection, becomes ready, the gauge goes back to 0,
    and open streams get ``broker.reset`` (``outage``): what was published into the
    silence is lost, and they are told."""
    interval = 1
    async with RedisProxy(redis_server.port) as proxy:
        broker = await start_broker(
            f"redis.url={proxy.url}",
            f"ingest.canary_interval_seconds={interval}",
            "sse.heartbeat_seconds=1",
        )
        sub = await proxy.wait_pipe(b"PSUBSCRIBE")
        redis = no_retry_client(redis_server.port)
        via_proxy = no_retry_client(proxy.port)
        try:
            async with stream(broker, "w") as a, stream(broker, "w") as b:
                await publish(redis, "w", "before")
                assert (await a.next_event()).data == "before"
                assert (await b.next_event()).data == "before"
                await asyncio.sleep(interval * 1.5)  # canaries come back: steady state
                assert await readiness(broker) == (200, None)

                loop = asyncio.get_running_loop()
                sub.wedge()
                wedged_at = loop.time()
                await publish(redis, "w", "into the silence")
                assert await via_proxy.ping(), "Redis still answers through the proxy"
                stalled_after, gauge, seen = await poll_until_ready_after_stall(broker, wedged_at)
                assert stalled_after <= 2 * interval + 0.7, seen
                assert gauge == 1, seen
                assert await metric0(broker, "sse_broker_ingest_stalled") == 0
                assert await broker.metric("sse_broker_redis_connected") == 1
                assert await broker.metric("sse_broker_redis_reconnects_total") == 1
                # a new subscription on a new connection; the wedged one was dropped
                await proxy.wait_pipe(b"PSUBSCRIBE", count=2, timeout=1)
                assert sub.closed.is_set() and sub.dropped > 0

                for s in (a, b):
                    reset = await s.next_event()
                    assert reset.type == "broker.reset", reset
                    assert reset.json()["reason"] == "outage"
                await publish(redis, "w", "after")
                for s in (a, b):
                    event = await s.next_event()
                    assert event.data == "after", event
                    assert not s.pending
                assert b"into the silence" not in a.raw
        finally:
            await redis.aclose()
            await via_proxy.aclose()
    log = broker.log_text()
    assert re.search(r"WARNING .*ingest stalled: the canary .* never came back", log)


@pytest.mark.slow
async def test_canary_is_never_delivered_and_cannot_be_requested(
    start_broker: StartBroker,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    """Canaries run through the broker's own ingest every interval, on a reserved
    channel name no client can ask for: a stream on lookalike channels receives
    only real events, a forged canary changes nothing, and a request for a name
    with ``!`` is a 400."""
    broker = await start_broker("ingest.canary_interval_seconds=1")
    watcher = redis_server.client().pubsub()
    await watcher.psubscribe("sse:!canary!*")
    try:
        async with stream(broker, "probe") as probe:
            epoch = probe.parser.last_event_id.split("-")[0].removeprefix("p")
        lookalikes = [
            "canary",
            "_canary_",
            "canary.x",
            f"canary.{epoch}",
            f"canary:{epoch}",
            f"canary-{epoch}",
            f"canary/{epoch}",
            f"{epoch}",
            f"=canary={epoch}",
            "#canary#",
            "@canary@",
        ]
        async with stream(broker, *lookalikes) as s:
            seen: list[str] = []
            async with asyncio.timeout(8):
                while len(seen) < 3:
                    msg = await watcher.get_message(ignore_subscribe_messages=True, timeout=1)
                    if msg is not None:
                        seen.append(msg["channel"].decode())
            assert f"sse:!canary!{epoch}" in seen, seen
            await publish(redis_client, f"!canary!{epoch}", "forged")
            await publish(redis_client, "!canary!1234", "someone else's")
            await publish(redis_client, "canary", "real")
            event = await s.next_event()
            assert (event.type, event.data) == ("message", "real")
            # Nothing after "real" either: a fence published after it comes next.
            assert await fence(redis_client, "canary", s) == [[]]
            assert b"!canary!" not in s.raw and b"forged" not in s.raw
        assert await broker.metric("sse_broker_events_ingested_total") == 2  # real and fence
        assert await metric0(broker, "sse_broker_events_rejected_total") == 0
        assert await metric0(broker, "sse_broker_ingest_stalled") == 0
        assert await readiness(broker) == (200, None)
    finally:
        await watcher.aclose()

    for name in (f"!canary!{epoch}", "!canary!", "a!b"):
        for accept in ("application/json", "text/event-stream"):
            async with http.get(broker.events_url(name), headers={"Accept": accept}) as resp:
                assert resp.status == 400, name
                assert (await resp.json())["error"] == "bad_channel"


@pytest.mark.slow
async def test_stream_mode_wedged_reader_is_detected_by_position_and_restarted(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    """Stream mode: the XREAD connection goes silent while entries keep coming. The
    watchdog sees the stream's last id move while the reader's position does not:
    /readyz 503 ``ingest_stalled``, gauge 1; a fresh reader reads on from the last
    id, the broker is ready again, and clients get every entry, no reset."""
    interval = 1
    async with RedisProxy(redis_server.port) as proxy:
        broker = await start_broker(
            f"redis.url={proxy.url}",
            "ingest.mode=stream",
            f"ingest.canary_interval_seconds={interval}",
            "sse.heartbeat_seconds=1",
        )
        reader = await proxy.wait_pipe(b"XREAD")
        pub = Publisher(no_retry_client(redis_server.port), "w", stream=True, interval=0.05)
        collectors: list[Collector] = []
        try:
            async with stream(broker, "w") as a, stream(broker, "w") as b:
                collectors = [Collector(a).start(), Collector(b).start()]
                pub.start()
                await collectors[0].wait(lambda c: len(c.data) >= 5)
                await asyncio.sleep(interval * 1.5)
                assert await readiness(broker) == (200, None)

                loop = asyncio.get_running_loop()
                reader.wedge()
                wedged_at = loop.time()
                stalled_after, gauge, seen = await poll_until_ready_after_stall(broker, wedged_at)
                assert stalled_after <= 2 * interval + 0.7, seen
                assert gauge == 1, seen
                assert await metric0(broker, "sse_broker_ingest_stalled") == 0
                await proxy.wait_pipe(b"XREAD", count=2, timeout=1)
                assert reader.dropped > 0
                await asyncio.sleep(0.3)
                await pub.stop()
                last = max(pub.acked)
                for c in collectors:
                    await c.wait(lambda c: c.data[-1:] == [str(last)])
        finally:
            await pub.stop()
            for c in collectors:
                await c.stop()
            await pub.client.aclose()

    assert not pub.failed
    expected = sorted(pub.acked)
    for c in collectors:
        assert not c.of_type("broker.reset")
        got = [e for e in c.events if e.type == "message"]
        assert [int(e.data) for e in got] == expected
        assert [e.last_event_id for e in got] == [pub.acked[n] for n in expected]
    assert re.search(r"WARNING .*ingest stalled: stream reader stuck", broker.log_text())
