"""Bridge mode end to end: Laravel's stock PUBLISH in, exact resume on any process.

A fleet of broker processes on one real Redis, publishers using plain
PUBLISH in Laravel's format, clients that reconnect to a random process each
time their stream is recycled: every client must end with exactly the events
of its channels, in order, once — and with the leader SIGKILLed mid-run, any
difference must be covered by an honest ``broker.reset``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from conftest import BrokerProcess, RedisServer, StartBroker
from helpers import eventually, stream
from sse_client import SSEClient, SSEStreamClosed

PREFIX = "laravel_database_"
STREAM_KEY = "sse:stream"


def laravel(n: int, event: str = "App\\Events\\Tick", socket: str | None = None) -> bytes:
    return orjson.dumps({"event": event, "data": {"n": n}, "socket": socket})


async def start_fleet(start_broker: StartBroker, n: int, *sets: str) -> list[BrokerProcess]:
    fleet = [
        await start_broker(
            "ingest.mode=bridge",
            "ingest.format=laravel",
            f"ingest.prefix={PREFIX}",
            *sets,
        )
        for _ in range(n)
    ]
    await wait_leader(fleet)
    return fleet


async def leaders(fleet: list[BrokerProcess]) -> list[BrokerProcess]:
    held = []
    for b in fleet:
        try:
            if await b.metric("sse_broker_bridge_leader") == 1:
                held.append(b)
        except OSError:
            pass  # killed: leads nothing
    return held


async def wait_leader(fleet: list[BrokerProcess], timeout: float = 15) -> BrokerProcess:
    found = await eventually(lambda: leaders(fleet), lambda held: len(held) == 1, timeout=timeout)
    return found[0]


@dataclass
class Follower:
    """A browser-like client: on every end of its stream it reconnects, with its
    last event id, to a process picked at random."""

    fleet: list[BrokerProcess]
    channels: tuple[str, ...]
    numbers: list[int] = field(default_factory=list)
    resets: list[str] = field(default_factory=list)
    connects: int = 0
    last_id: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> Follower:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self.done.is_set():
            alive = [b for b in self.fleet if b.returncode is None]
            broker = random.choice(alive)
            try:
                async with SSEClient.connect(
                    broker.events_url(*self.channels), last_event_id=self.last_id
                ) as s:
                    if s.status != 200:
                        await asyncio.sleep(0.05)
                        continue
                    self.connects += 1
                    while not self.done.is_set():
                        event = await s.next_event(timeout=30)
                        self.last_id = s.parser.last_event_id or self.last_id
                        if event.type == "broker.reset":
                            self.resets.append(event.json()["reason"])
                        elif event.type == "broker.reconnect":
                            break
                        elif event.type == "App\\Events\\Tick":
                            n = event.json()["n"]
                            if n < 0:
                                self.done.set()
                            else:
                                self.numbers.append(n)
            except (SSEStreamClosed, OSError, TimeoutError):
                pass
            await asyncio.sleep(random.uniform(0.01, 0.1))

    async def stop(self) -> None:
        self.done.set()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def publish_load(
    redis: aioredis.Redis, channels: list[str], rate: int, seconds: float
) -> dict[str, list[int]]:
    """PUBLISH ``rate`` events/s round-robin over ``channels``; each event's number
    is global. Returns the numbers published per channel (acknowledged by Redis)."""
    sent: dict[str, list[int]] = {c: [] for c in channels}
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = int(rate * seconds)
    n = 0
    while n < total:
        due = start + n / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        burst = min(total - n, max(1, int((loop.time() - start) * rate) - n + 1))
        pipe = redis.pipeline(transaction=False)
        for k in range(n, n + burst):
            channel = channels[k % len(channels)]
            _ = pipe.publish(PREFIX + channel, laravel(k))
            sent[channel].append(k)
        await pipe.execute()
        n += burst
    return sent


def tally(f: Follower, wanted: list[int]) -> tuple[int, int]:
    """(lost, duplicated) of a follower against the numbers of its channels."""
    got = Counter(f.numbers)
    lost = sum(1 for n in wanted if n not in got)
    duplicated = sum(c - 1 for c in got.values() if c > 1)
    return lost, duplicated


async def run_fleet(
    start_broker: StartBroker,
    redis_server: RedisServer,
    *,
    kill_leader_after: float | None,
) -> tuple[list[Follower], dict[str, list[int]], list[BrokerProcess]]:
    fleet = await start_fleet(
        start_broker,
        3,
        "sse.max_connection_age_seconds=10",
        "sse.retry_ms=100",
        "limits.max_pending_connections_per_ip=0",
    )
    channels = [f"orders.{i}" for i in range(64)]
    followers = [
        Follower(fleet, tuple(channels[i::16])).start() for i in range(16)
    ]  # 16 clients x 4 channels
    redis = redis_server.client()
    try:
        await eventually(
            lambda: asyncio.sleep(0, sum(f.connects for f in followers)),
            lambda n: n >= len(followers),
        )
        load = asyncio.create_task(publish_load(redis, channels, 500, 24))
        if kill_leader_after is not None:
            await asyncio.sleep(kill_leader_after)
            leader = await wait_leader(fleet)
            leader.signal(signal.SIGKILL)
            await wait_leader(fleet, timeout=20)
        sent = await load
        # the end marker on every channel: each follower stops once it has one
        for channel in channels:
            await redis.publish(PREFIX + channel, laravel(-1))
        await eventually(
            lambda: asyncio.sleep(0, [f.done.is_set() for f in followers]),
            all,
            timeout=30,
        )
    finally:
        for f in followers:
            await f.stop()
        await redis.aclose()
    return followers, sent, fleet


@pytest.mark.slow
async def test_a_fleet_resumes_every_client_exactly_on_any_process(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    followers, sent, fleet = await run_fleet(start_broker, redis_server, kill_leader_after=None)
    assert sum(len(v) for v in sent.values()) == 12_000
    for f in followers:
        wanted = sorted(n for c in f.channels for n in sent[c])
        assert f.resets == [], f.resets
        assert f.numbers == wanted, tally(f, wanted)
    assert min(f.connects for f in followers) >= 3, "recycled and resumed, more than once"
    for b in fleet:
        assert b.returncode is None
        assert await b.metric("sse_broker_bridge_holes_total") == 0


@pytest.mark.slow
async def test_a_killed_leader_is_replaced_and_every_difference_is_a_reset(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    followers, sent, fleet = await run_fleet(start_broker, redis_server, kill_leader_after=8)
    lost = duplicated = resets = 0
    for f in followers:
        wanted = sorted(n for c in f.channels for n in sent[c])
        f_lost, f_dup = tally(f, wanted)
        lost, duplicated, resets = lost + f_lost, duplicated + f_dup, resets + len(f.resets)
        assert f.numbers == sorted(set(f.numbers)), "in order, never twice"
        if f_lost:
            assert f.resets and set(f.resets) == {"outage"}, (f_lost, f.resets)
    print(f"\nleader SIGKILLed: lost {lost}, duplicated {duplicated}, resets {resets}")
    assert duplicated == 0
    takeovers = [await b.metric("sse_broker_bridge_takeovers_total") for b in fleet[1:]]
    assert takeovers


async def test_pubsub_messages_become_stream_entries_with_everything_the_decoders_need(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    """One broker: Laravel's fields (event, data, socket) and the native envelope's
    audience all survive the trip through the stream; toOthers() still holds."""
    (broker,) = await start_fleet(start_broker, 1)
    redis = redis_server.client()
    try:
        async with (
            stream(broker, "orders.1", socket_id="123.456") as mine,
            stream(broker, "orders.1") as other,
        ):
            await redis.publish(PREFIX + "orders.1", laravel(1, socket="123.456"))
            await redis.publish(PREFIX + "orders.1", laravel(2))
            got = await other.events(2)
            assert [e.json()["n"] for e in got] == [1, 2]
            mine_got = await mine.next_event()
            assert mine_got.json()["n"] == 2, "toOthers(): not back to the sender's tab"
        entries = await redis.xrange(STREAM_KEY)
        fields = [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
        assert [f["channel"] for f in fields] == ["orders.1", "orders.1"]
        assert fields[0]["socket"] == "123.456" and "socket" not in fields[1]
        assert all(len(f["digest"]) == 16 for f in fields)
        assert [e[0].decode() for e in entries] == [e.last_event_id for e in got], "stream ids"
    finally:
        await redis.aclose()


async def test_http_and_cli_publish_go_through_the_holder_as_pubsub_messages(
    start_broker: StartBroker, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """In bridge mode POST /publish and ``sse-broker publish`` PUBLISH (the same path
    and order as the app's messages): the events reach clients with stream ids, the
    answer names no stream ids (the holder appends them, later), and the stream holds
    them once each."""
    (broker,) = await start_fleet(start_broker, 1, "publish.keys=['k']")
    redis = redis_server.client()
    try:
        async with stream(broker, "orders.1") as s:
            async with http.post(
                f"{broker.admin_url}/publish",
                json={"channel": "orders.1", "event": "App\\Events\\Tick", "data": {"n": 7}},
                headers={"Authorization": "Bearer k"},
            ) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
            assert answer == {"published": 1, "ids": []}
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "broker",
                "publish",
                "orders.1",
                '{"n": 8}',
                "--event",
                "App\\Events\\Tick",
                *("--set", f"redis.url={redis_server.url}"),
                *("--set", "ingest.mode=bridge"),
                *("--set", "ingest.format=laravel"),
                *("--set", f"ingest.prefix={PREFIX}"),
            )
            assert await cli.wait() == 0
            got = await s.events(2)
            assert [e.json()["n"] for e in got] == [7, 8]
        entries = await redis.xrange(STREAM_KEY)
        assert [e[0].decode() for e in entries] == [e.last_event_id for e in got]
    finally:
        await redis.aclose()
