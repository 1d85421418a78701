"""Bridge mode at its edges: hole markers, ids of the other mode, the documented
ACL, check-config, and a graceful handover under load.

Real redis-server, real broker processes, clients that read streams as a
browser does. What is asserted is what a client or an operator sees: events
and their ids, ``broker.reset`` and its reason, ``/metrics``, the log, the
exit of ``check-config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import shlex
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from conftest import LOOPBACK, REPO_ROOT, BrokerProcess, RedisServer, StartBroker
from helpers import envelope, eventually, fence, fence_stream, publish, stream
from sse_client import SSEEvent, SSEStream
from test_bridge import PREFIX, laravel, publish_load, start_fleet, wait_leader
from test_cli import run_cli

from broker.ingest.stream import StreamIngest
from broker.redis_conn import RedisTarget

STREAM_KEY = "sse:stream"
PUBSUB_ID = re.compile(r"p[0-9]+-[0-9]+")
STREAM_ID = re.compile(r"[0-9]+-[0-9]+")


# -- helpers -------------------------------------------------------------------------


async def start_in(start_broker: StartBroker, mode: str, *sets: str) -> BrokerProcess:
    """A broker reading ``mode`` (native format, prefix ``sse:``)."""
    return await start_broker(f"ingest.mode={mode}", *sets)


class Feed:
    """How an app publishes in a mode: XADD in stream mode, PUBLISH in bridge mode."""

    def __init__(self, redis: aioredis.Redis, mode: str) -> None:
        self.redis = redis
        self.mode = mode

    async def send(self, channel: str, data: str) -> None:
        if self.mode == "stream":
            await self.redis.xadd(STREAM_KEY, {"channel": channel, "data": data})
        else:
            await publish(self.redis, channel, envelope(data))

    async def fence(self, channel: str, *streams: SSEStream) -> list[list[SSEEvent]]:
        if self.mode == "stream":
            return await fence_stream(self.redis, channel, *streams)
        return await fence(self.redis, channel, *streams)


def seen(events: list[SSEEvent]) -> list[tuple[str, str]]:
    """(type, data) of events; a reset shows as its reason."""
    return [(e.type, e.json()["reason"] if e.type == "broker.reset" else e.data) for e in events]


async def news_after(redis: aioredis.Redis, id: str) -> list[str]:
    """The data of the stream's entries on channel ``news`` after ``id``."""
    entries: list[Any] = await redis.xrange(STREAM_KEY, min="(" + id)
    return [f[b"data"].decode() for _, f in entries if f.get(b"channel") == b"news"]


async def resets(broker: BrokerProcess, reason: str) -> float:
    return await broker.metric("sse_broker_resets_total", {"reason": reason}) or 0


async def reset_first(s: SSEStream, reason: str) -> SSEEvent:
    """The stream's first event, which must be ``broker.reset`` for ``reason``."""
    event = await s.next_event()
    assert (event.type, event.json()["reason"]) == ("broker.reset", reason), event
    return event


# -- hole markers ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stream", "bridge"])
async def test_a_hole_marker_resets_every_open_stream_and_every_resume_across_it(
    start_broker: StartBroker, redis_server: RedisServer, mode: str
) -> None:
    redis = redis_server.client()
    feed = Feed(redis, mode)
    # Two processes reading the stream (bridge: the leader and a standby).
    first = await start_in(start_broker, mode)
    if mode == "bridge":
        await wait_leader([first])
    second = await start_in(start_broker, mode)
    async with (
        stream(first, "news") as a,
        stream(first, "news", "other") as b,
        stream(first, "quiet") as quiet,
        stream(second, "news") as c,
    ):
        await feed.send("news", "e1")
        for s in (a, b, c):
            assert seen(await s.events(1)) == [("message", "e1")]
        before = a.parser.last_event_id
        assert c.parser.last_event_id == before and STREAM_ID.fullmatch(before)
        outages = [await resets(first, "outage"), await resets(second, "outage")]

        hole = (await redis.xadd(STREAM_KEY, {"hole": "outage"})).decode()
        for s in (a, b, quiet, c):
            reset = await reset_first(s, "outage")
            assert reset.last_event_id == hole, "the reset's id is the marker's: resume there"
        assert await resets(first, "outage") == outages[0] + 3
        assert await resets(second, "outage") == outages[1] + 1

        # Later events arrive exactly, once, with nothing else in between.
        await feed.send("news", "e2")
        await feed.send("news", "e3")
        for s in (a, b, c):
            assert seen(await s.events(2)) == [("message", "e2"), ("message", "e3")]
        assert await feed.fence("news", a, b, c) == [[], [], []]
        assert await feed.fence("quiet", quiet) == [[]]

    # Resumes on the processes that read the marker (served from their memory),
    # then on one started after it was written (read back from Redis).
    late = await start_in(start_broker, mode)
    if mode == "bridge":
        assert await late.metric("sse_broker_bridge_leader") == 0, "a standby serves too"
    for broker in (first, second, late):
        outage = await resets(broker, "outage")
        async with stream(broker, "news", last_event_id=before) as across:
            await reset_first(across, "outage")
            assert await feed.fence("news", across) == [[]], "nothing replayed after a reset"
        assert await resets(broker, "outage") == outage + 1
        # Since the marker: e2, e3, then the fences published on "news" meanwhile.
        since = await news_after(redis, hole)
        assert since[:2] == ["e2", "e3"], since
        async with stream(broker, "news", last_event_id=hole) as after:
            got = await feed.fence("news", after)
        assert seen(got[0]) == [("message", d) for d in since], "exactly, once, in order"


# -- ids across modes --------------------------------------------------------------------


@pytest.mark.slow
async def test_an_id_of_the_other_mode_resets_unknown_id_then_goes_live(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    """Both brokers hear the same PUBLISHes: the pubsub one hands out ``p<epoch>-<seq>``,
    the bridge one stream ids. Each id, taken to the other kind of broker, resets
    (``unknown_id``, never ``epoch``) and is followed by live events only: so is an
    id forged to look like a position the broker really has (a stream id made of
    the pubsub broker's own epoch and a real sequence; a ``p`` before a real stream
    id), which would replay ``e2`` if it were read as the other kind."""
    redis = redis_server.client()
    pubsub = await start_in(start_broker, "pubsub")
    bridge = await start_in(start_broker, "bridge")
    await wait_leader([bridge])
    async with stream(pubsub, "news") as ps, stream(bridge, "news") as bs:
        await publish(redis, "news", envelope("e1"))
        p1, b1 = await ps.next_event(), await bs.next_event()
        await publish(redis, "news", envelope("e2"))
        assert seen([await ps.next_event(), await bs.next_event()]) == [("message", "e2")] * 2
    pubsub_id, stream_id = p1.last_event_id, b1.last_event_id
    assert PUBSUB_ID.fullmatch(pubsub_id), pubsub_id
    assert STREAM_ID.fullmatch(stream_id), stream_id

    cases = [
        (bridge, pubsub_id),  # a client of the pubsub broker moves to the bridge one
        (bridge, "p" + stream_id),  # would name e1's position were the "p" ignored
        (pubsub, stream_id),  # and the other way round
        (pubsub, pubsub_id[1:]),  # the pubsub broker's epoch and seq, in stream-id form
    ]
    for n, (broker, last_id) in enumerate(cases):
        before = await resets(broker, "unknown_id")
        async with stream(broker, "news", last_event_id=last_id) as s:
            reset = await reset_first(s, "unknown_id")
            kind = STREAM_ID if broker is bridge else PUBSUB_ID
            assert kind.fullmatch(reset.last_event_id), "the reset gives an id of this broker"
            await publish(redis, "news", envelope(f"live-{n}"))
            live = await s.next_event()
            assert seen([live]) == [("message", f"live-{n}")], (last_id, live)
            assert kind.fullmatch(live.last_event_id)
            assert await fence(redis, "news", s) == [[]], "nothing replayed"
        assert await resets(broker, "unknown_id") == before + 1, last_id


# -- the ACL documented for bridge mode ---------------------------------------------------


def documented_acl(heading: str) -> list[str]:
    """The ``ACL SETUSER`` words under the comment line starting ``heading`` in
    docs/operations.md, as an operator would paste them (without ``ACL SETUSER``)."""
    lines = (REPO_ROOT / "docs" / "operations.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    line = next(line for line in lines[start:] if line.startswith("ACL SETUSER "))
    return shlex.split(line)[2:]


def permission_errors(broker: BrokerProcess) -> list[str]:
    """The broker's log lines about a command its Redis user may not run."""
    return [
        line
        for line in broker.log_path.read_text(errors="replace").splitlines()
        if "NOPERM" in line or "no permissions" in line.lower()
    ]


async def acl_denials(admin: aioredis.Redis) -> list[str]:
    """What Redis refused, from ``ACL LOG``: ``<reason> <object> by <user>``."""
    entries: list[dict[str, Any]] = await admin.acl_log()
    return [f"{e['reason']} {e['object']!r} by {e['username']} ({e['context']})" for e in entries]


async def until_serving(broker: BrokerProcess, *, leader: bool) -> None:
    """Until ``/readyz`` is 200 and the leader gauge is as wanted."""

    async def state() -> tuple[int, float | None]:
        status, _ = await broker.get("/readyz")
        return status, await broker.metric("sse_broker_bridge_leader")

    await eventually(state, lambda s: s == (200, float(leader)), timeout=10)


@contextlib.asynccontextmanager
async def as_user(port: int, user: str, password: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host=LOOPBACK, port=port, username=user, password=password)
    try:
        yield client
    finally:
        await client.aclose()


PUBLISH_KEY = "bridge-acl-test-publish-key-0123456789"


@pytest.mark.slow
async def test_the_documented_bridge_acl_is_all_a_fleet_needs(
    start_broker: StartBroker, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """The ``ACL SETUSER`` line of docs/operations.md section 7 for bridge mode,
    pasted as is: a fleet with that user leads, appends, renews, serves resumes
    and retained state from Redis, and takes over from a killed leader, and
    Redis refuses it nothing (``ACL LOG`` stays empty)."""
    words = documented_acl("# bridge mode")
    assert words[0] == "sse" and ">PASSWORD" in words, words
    admin = redis_server.client(decode_responses=True)
    await admin.execute_command(
        "ACL", "SETUSER", *[">broker-pw" if w == ">PASSWORD" else w for w in words]
    )
    # The app's publisher, as the doc says: +publish on the same channels.
    await admin.execute_command(
        "ACL", "SETUSER", "app", "on", ">app-pw", "resetchannels", "&sse:*", "resetkeys",
        "-@all", "+publish",
    )  # fmt: skip
    await admin.execute_command("ACL", "LOG", "RESET")
    sets = (
        f"redis.url=redis://sse:broker-pw@{LOOPBACK}:{redis_server.port}/0",
        "ingest.mode=bridge",
        "ingest.bridge_lease_seconds=1",  # renewed every third of a second
        "ingest.bridge_buffer_seconds=5",
        "ingest.canary_interval_seconds=1",
        f"publish.keys=['{PUBLISH_KEY}']",
    )
    brokers: list[BrokerProcess] = []

    async def start(*sets: str) -> BrokerProcess:
        broker = await start_broker(*sets, wait_ready=False)
        brokers.append(broker)
        return broker

    try:
        first = await start(*sets)
        await until_serving(first, leader=True)
        second = await start(*sets)
        await until_serving(second, leader=False)
        async with as_user(redis_server.port, "app", "app-pw") as app:
            async with stream(first, "news") as s:
                await publish(app, "news", envelope("retained", retain="k"))
                await publish(app, "news", envelope("e1"))
                async with http.post(
                    f"{first.admin_url}/publish",
                    headers={"Authorization": f"Bearer {PUBLISH_KEY}"},
                    json={"channel": "news", "data": "via POST /publish"},
                ) as resp:
                    assert resp.status == 200, await resp.text()
                got = await s.events(3)
            assert seen(got) == [
                ("message", "retained"),
                ("message", "e1"),
                ("message", "via POST /publish"),
            ]
            assert all(STREAM_ID.fullmatch(e.last_event_id) for e in got), got
            entries = await admin.xrange(STREAM_KEY)
            assert [eid for eid, _ in entries] == [e.last_event_id for e in got], "appended"

            renewals = await first.metric("sse_broker_bridge_lease_renewals_total") or 0
            await eventually(
                lambda: first.metric("sse_broker_bridge_lease_renewals_total"),
                lambda n: (n or 0) >= renewals + 3,
                timeout=5,
            )

            first.signal(signal.SIGKILL)
            assert await first.wait_exit() == -signal.SIGKILL
            await until_serving(second, leader=True)
            assert await second.metric("sse_broker_bridge_takeovers_total") == 1
            assert await second.metric("sse_broker_bridge_holes_total") == 0
            async with stream(second, "news", last_event_id=got[-1].last_event_id) as s:
                await publish(app, "news", envelope("e2"))
                assert seen(await s.events(1)) == [("message", "e2")], "the new holder appends"

            # A process started now reads resumes and the retained state back from Redis.
            third = await start(*sets)
            await until_serving(third, leader=False)
            async with stream(third, "news", last_event_id=got[0].last_event_id) as resumed:
                after = await resumed.events(3)
            assert seen(after) == [
                ("message", "e1"),
                ("message", "via POST /publish"),
                ("message", "e2"),
            ]
            async with stream(third, "news") as fresh:
                await publish(app, "news", envelope("e3"))
                state = await fresh.events(2)
            assert seen(state) == [("message", "retained"), ("message", "e3")]
        assert await acl_denials(admin) == []
        for broker in brokers:
            assert permission_errors(broker) == []
    except (AssertionError, TimeoutError) as exc:
        # What Redis refused the broker's user is the finding, whatever failed.
        refused = [line for b in brokers for line in permission_errors(b)][-10:]
        pytest.fail(
            f"{exc}\nRedis refused (ACL LOG): {await acl_denials(admin)}\n" + "\n".join(refused)
        )


# -- check-config ---------------------------------------------------------------------------

BUFFER_WARNING = "is under twice ingest.bridge_lease_seconds"


def test_check_config_warns_when_the_bridge_buffer_is_under_twice_the_lease(
    tmp_path: Path,
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        '[ingest]\nmode = "bridge"\nbridge_lease_seconds = 4\nbridge_buffer_seconds = 7\n'
    )
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert (
        "warning: ingest.bridge_buffer_seconds = 7 is under twice "
        "ingest.bridge_lease_seconds = 4" in result.stderr
    ), result.stderr
    # At twice the lease, no warning.
    result = run_cli("check-config", str(path), "--set", "ingest.bridge_buffer_seconds=8")
    assert result.returncode == 0, result.stderr
    assert BUFFER_WARNING not in result.stderr, result.stderr


def test_check_config_refuses_the_laravel_format_in_stream_mode(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[ingest]\nmode = "stream"\nformat = "laravel"\n')
    result = run_cli("check-config", str(path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "ingest.format" in result.stderr and str(path) in result.stderr, result.stderr
    assert "'pubsub'" in result.stderr and "'bridge'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- graceful handover ------------------------------------------------------------------------


class Reader:
    """Reads one stream (and, once it is drained, its continuation on another
    process with its last id) until the end marker (``n == -1``)."""

    def __init__(self) -> None:
        self.numbers: list[int] = []
        self.resets: list[str] = []
        self.reconnects: list[str] = []
        self.last_id: str | None = None

    async def read(self, s: SSEStream) -> bool:
        """True at the end marker; False when the stream was drained."""
        while True:
            event = await s.next_event(timeout=30)
            self.last_id = s.parser.last_event_id
            if event.type == "broker.reset":
                self.resets.append(event.json()["reason"])
            elif event.type == "broker.reconnect":
                self.reconnects.append(event.json()["reason"])
                return False
            else:
                n = event.json()["n"]
                if n < 0:
                    return True
                self.numbers.append(n)


@pytest.mark.slow
async def test_a_leader_stopped_gracefully_hands_over_without_a_loss(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    """SIGTERM to the lease holder while ~200 events/s are PUBLISHed: it gives its
    lease up on the way out, so the other process leads long before the lease
    could have expired, and appends exactly what the old one did not."""
    lease = 9  # renewed every 3 s; an abandoned lease would hold for 6 s at least
    fleet = await start_fleet(
        start_broker,
        2,
        f"ingest.bridge_lease_seconds={lease}",
        "ingest.bridge_buffer_seconds=30",
        "shutdown.drain_seconds=1",
    )
    leader = await wait_leader(fleet)
    survivor = next(b for b in fleet if b is not leader)
    channels = ["ticks.0", "ticks.1"]
    redis = redis_server.client()
    on_survivor, drained = Reader(), Reader()
    loop = asyncio.get_running_loop()

    async def follow_drained() -> None:
        async with stream(leader, *channels) as s:
            if await drained.read(s):
                return
        async with stream(survivor, *channels, last_event_id=drained.last_id) as s:
            assert await drained.read(s)

    tasks: list[asyncio.Task[Any]] = []
    try:
        async with stream(survivor, *channels) as s:
            load = asyncio.create_task(publish_load(redis, channels, 200, 8))
            readers = [
                asyncio.create_task(on_survivor.read(s)),
                asyncio.create_task(follow_drained()),
            ]
            tasks = [load, *readers]
            await asyncio.sleep(3)
            leader.terminate()
            stopped = loop.time()
            # It gives the lease up as it exits: both well within the lease.
            assert await leader.wait_exit(timeout=lease / 2) == 0
            assert "bridge lease given up" in leader.log_text()
            await eventually(
                lambda: survivor.metric("sse_broker_bridge_leader"),
                lambda v: v == 1,
                timeout=2 * lease,
                interval=0.05,
            )
            took = loop.time() - stopped
            sent = await load
            await redis.publish(PREFIX + channels[-1], laravel(-1))
            await asyncio.gather(*readers)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    wanted = sorted(n for c in channels for n in sent[c])
    assert len(wanted) == 1600
    print(f"\nSIGTERM to the leader: the survivor led {took:.2f} s later (lease {lease} s)")
    assert took < lease / 2, f"took over {took:.2f} s after SIGTERM: the lease was not given up"
    for reader in (on_survivor, drained):
        lost = sorted(set(wanted) - set(reader.numbers))
        assert reader.resets == [], reader.resets
        assert reader.numbers == wanted, (lost[:20], len(reader.numbers) - len(set(reader.numbers)))
    assert drained.reconnects == ["drain"]
    assert await survivor.metric("sse_broker_bridge_takeovers_total") == 1
    assert await survivor.metric("sse_broker_bridge_holes_total") == 0
    entries: list[Any] = await redis.xrange(STREAM_KEY)
    assert not [f for _, f in entries if b"hole" in f], "no hole marker in the stream"
    numbers = [orjson.loads(f[b"data"])["n"] for _, f in entries if b"data" in f]
    assert numbers == [*wanted, -1], "the stream itself holds each message once, in order"


class _Entries:
    """A sink that keeps nothing: the reader's contract, minus the broker."""

    def __init__(self) -> None:
        self.read = 0

    def entry(self, id: str, fields: dict[bytes, bytes]) -> None:
        self.read += 1

    async def settle(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None  # health reports, started, gap


@pytest.mark.slow
async def test_the_stream_reader_stops_when_cancelled_while_entries_flow(
    redis_server: RedisServer,
) -> None:
    """What SIGTERM relies on (every process of a bridge fleet, and stream mode):
    the broker's shutdown cancels the stream reader and waits for it, and only then
    gives the bridge lease up and exits. A reader that outlives its cancellation
    keeps the process (and the lease) alive until systemd's SIGKILL. Cancelled at
    random moments while entries arrive, it must end every time."""
    redis = redis_server.client()
    stop = asyncio.Event()

    async def append() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await redis.xadd(STREAM_KEY, {"channel": "news", "data": str(n)}, maxlen=1000)
            await asyncio.sleep(0.002)

    async def ends_when_cancelled() -> bool:
        reader = StreamIngest(RedisTarget(port=redis_server.port), STREAM_KEY)
        sink = _Entries()
        task = asyncio.create_task(reader.run(sink))
        await eventually(lambda: asyncio.sleep(0, sink.read), lambda n: n > 0)
        await asyncio.sleep(random.uniform(0, 0.02))
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1)
        while not task.done():  # still reading: stop it for good before the next one
            task.cancel()
            await asyncio.wait({task}, timeout=0.05)
        return bool(done)

    writer = asyncio.create_task(append())
    try:
        ended = [await ends_when_cancelled() for _ in range(60)]
    finally:
        stop.set()
        await writer
    assert all(ended), f"{ended.count(False)} of 60 cancelled readers kept reading"
