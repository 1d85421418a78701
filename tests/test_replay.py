"""Replay history, resets and retained state end to end (real redis-server, real brokers).

Every test reads streams as a browser does (``SSEClient``) and compares what a
resuming client got with what an always-connected client saw: exact resumes
must yield exactly the missed events it may see, in order, then live ones;
anything else must start with ``broker.reset``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import BrokerProcess, RedisServer, StartBroker
from helpers import encode_payload, envelope, eventually, fence, publish
from sse_client import SSEClient, SSEEvent, SSEParser, SSEStream

PREAMBLE = b"retry: 3000\n: ok\n\n"
ID_RE = re.compile(r"^p(\d+)-(\d+)$")


# -- helpers ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_stream(
    broker: BrokerProcess,
    *channels: str,
    last_event_id: str | None = None,
    query_id: str | None = None,
) -> AsyncIterator[SSEStream]:
    """A 200 stream, returned once its preamble arrived (it is registered from then on)."""
    params = {} if query_id is None else {"last_event_id": query_id}
    url = broker.events_url(*channels, **params)
    async with SSEClient.connect(url, last_event_id=last_event_id) as s:
        assert s.status == 200, await s.text()
        await s.wait_for(lambda st: "ok" in st.parser.comments, what="the preamble")
        yield s


async def publish_many(
    redis: aioredis.Redis, items: Sequence[tuple[str, Any]], *, prefix: str = "sse:"
) -> None:
    """One pipelined round trip of ``PUBLISH`` commands, in order."""
    pipe = redis.pipeline(transaction=False)
    for channel, payload in items:
        pipe.publish(prefix + channel, encode_payload(payload))
    await pipe.execute()


async def wait_ingested(broker: BrokerProcess, n: int, timeout: float = 15.0) -> None:
    await eventually(
        lambda: broker.metric("sse_broker_events_ingested_total"),
        lambda v: v == n,
        timeout=timeout,
    )


def seq_of(event_id: str) -> tuple[int, int]:
    match = ID_RE.match(event_id)
    assert match, f"event id {event_id!r} is not p<epoch>-<seq>"
    return int(match.group(1)), int(match.group(2))


def pairs(events: Sequence[SSEEvent]) -> list[tuple[str, str, str]]:
    return [(e.type, e.data, e.last_event_id) for e in events]


async def metric0(broker: BrokerProcess, name: str, labels: dict[str, str] | None = None) -> float:
    return await broker.metric(name, labels) or 0.0


# -- 1. exact resume -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "how", ["header", "query", "header_wins_over_bad_query", "header_wins_over_older_query"]
)
async def test_resume_gets_exactly_the_missed_events_in_order_then_live(
    broker: BrokerProcess, redis_client: aioredis.Redis, how: str
) -> None:
    async with open_stream(broker, "a", "b", "c") as observer:
        async with open_stream(broker, "a", "b") as first:
            await publish(redis_client, "a", "a0")
            await publish(redis_client, "a", "a1")
            a0, a1 = await first.events(2)
        # the first client is gone, positioned at a1
        for channel, data in [("a", "a2"), ("c", "c1"), ("b", "b1"), ("c", "c2"), ("a", "a3")]:
            await publish(redis_client, channel, data)
        seen = {e.data: e for e in await observer.events(7)}

    header, query = {
        "header": (a1.last_event_id, None),
        "query": (None, a1.last_event_id),
        "header_wins_over_bad_query": (a1.last_event_id, "not-an-id"),
        "header_wins_over_older_query": (a1.last_event_id, a0.last_event_id),
    }[how]
    async with open_stream(broker, "a", "b", last_event_id=header, query_id=query) as resumed:
        missed = await resumed.events(3)
        assert pairs(missed) == pairs([seen["a2"], seen["b1"], seen["a3"]])
        await publish(redis_client, "b", "live")
        live = await resumed.next_event()
        assert live.data == "live"
        assert seq_of(live.last_event_id)[1] == seq_of(seen["a3"].last_event_id)[1] + 1
        # nothing else: no reset, no duplicate, no id-only block
        assert resumed.raw == PREAMBLE + b"".join(
            f"id: {e.last_event_id}\ndata: {e.data}\n\n".encode() for e in [*missed, live]
        )
    assert await broker.metric("sse_broker_replays_served_total") == 1
    assert await metric0(broker, "sse_broker_resets_total") == 0


# -- 2. the replay/live boundary under load --------------------------------------------


@pytest.mark.slow
async def test_resume_during_a_publish_burst_has_no_gap_and_no_duplicate(
    broker: BrokerProcess, redis_client: aioredis.Redis
) -> None:
    rng = random.Random(7)
    channels = ("x", "y")
    bursts, per_burst = 40, 75  # 3,000 events, 2,000 of them on x and y
    async with open_stream(broker, *channels) as always:
        async with open_stream(broker, *channels) as a:
            await publish_many(redis_client, [(channels[i % 2], f"pre{i}") for i in range(20)])
            pre = await a.events(20)
        start_id = pre[-1].last_event_id

        async def publisher() -> None:
            for burst in range(bursts):
                items = [(("x", "y", "z")[i % 3], f"b{burst}.{i}") for i in range(per_burst)]
                await publish_many(redis_client, items)
                await asyncio.sleep(0.02)

        task = asyncio.create_task(publisher())
        got: list[SSEEvent] = []
        last = start_id
        sessions_during_burst = 0
        try:
            # reconnect again and again while the burst runs, each time from the
            # last id the client parsed, keeping everything it received
            while not task.done():
                async with open_stream(broker, *channels, last_event_id=last) as a:
                    sessions_during_burst += 1
                    want = rng.randint(1, 60)
                    with contextlib.suppress(TimeoutError):
                        await a.wait_for(lambda st, n=want: st.parser.dispatched >= n, timeout=0.3)
                    got.extend(a.pending)
                    # like a browser, keep the previous id when this session set none
                    last = a.parser.last_event_id or last
            await task
        finally:
            task.cancel()
        expected = 20 + bursts * per_burst * 2 // 3
        reference = (await always.events(expected, timeout=20))[20:]
        async with open_stream(broker, *channels, last_event_id=last) as a:
            # the rest of the burst and then nothing more: all that comes before a
            # marker published after the burst (a replay is written before live events)
            [rest] = await fence(redis_client, channels[0], a, timeout=10)
            got.extend(rest)

    assert sessions_during_burst >= 3, "the burst ended before the client could resume into it"
    assert all(e.type == "message" for e in got), [e for e in got if e.type != "message"][:3]
    seqs = [seq_of(e.last_event_id)[1] for e in got]
    assert len(seqs) == len(set(seqs)), "an event was delivered twice"
    assert pairs(got) == pairs(reference)


# -- 3. audience -----------------------------------------------------------------------


async def test_resume_replays_only_events_the_stream_may_see(
    broker: BrokerProcess, redis_client: aioredis.Redis
) -> None:
    async with open_stream(broker, "news") as first:
        await publish(redis_client, "news", "before")
        before = await first.next_event()
    for payload in [
        envelope("acme only", tenant="acme"),
        envelope("public 1"),
        envelope("bob only", users=["bob"]),
        envelope("tenant 7, users 1", tenant=7, users=[1]),
        envelope("public 2", event="update"),
    ]:
        await publish(redis_client, "news", payload)
    await wait_ingested(broker, 6)
    assert await broker.metric("sse_broker_history_events") == 6
    async with open_stream(broker, "news", last_event_id=before.last_event_id) as resumed:
        one, two = await resumed.events(2)
        await publish(redis_client, "news", "live")
        assert (await resumed.next_event()).data == "live"
        assert not resumed.pending
    assert (one.type, one.data) == ("message", "public 1")
    assert (two.type, two.data) == ("update", "public 2")
    assert b"only" not in resumed.raw and b"tenant 7" not in resumed.raw
    assert await broker.metric("sse_broker_events_replayed_total") == 2


# -- 4. resets -------------------------------------------------------------------------


@pytest.mark.slow
async def test_unusable_positions_get_broker_reset_with_the_reason_never_a_400(
    start_broker: StartBroker, redis_client: aioredis.Redis, http: aiohttp.ClientSession
) -> None:
    old = await start_broker("replay.max_events=5")
    async with open_stream(old, "r") as s:
        await publish(redis_client, "r", "from the old process")
        old_id = (await s.next_event()).last_event_id
    old.terminate()
    assert await old.wait_exit() == 0

    broker = await start_broker("replay.max_events=5")
    async with open_stream(broker, "r", "e") as observer:
        await publish_many(redis_client, [("e", f"e{i}") for i in range(20)])
        flood = await observer.events(20)
    head = flood[-1].last_event_id
    epoch, head_seq = seq_of(head)
    assert epoch != seq_of(old_id)[0]

    cases = [
        ("garbage", "r", "unknown_id"),
        ("12-abc", "r", "unknown_id"),
        ("-5", "r", "unknown_id"),
        ("١٢-٣", "r", "unknown_id"),  # non-ASCII digits
        (f"p{epoch}-{head_seq + 1}", "r", "unknown_id"),  # a future seq
        (f"p{epoch}-{head_seq + 10**6}", "r", "unknown_id"),
        (f"{epoch}-{head_seq}", "r", "unknown_id"),  # a stream id (another mode): no position
        (old_id, "r", "epoch"),
        (flood[0].last_event_id, "e", "expired"),  # events after it were evicted
        (flood[10].last_event_id, "e", "expired"),
    ]
    for i, (position, channel, reason) in enumerate(cases):
        via_query = i % 2 == 1
        kwargs = {"query_id": position} if via_query else {"last_event_id": position}
        async with open_stream(broker, channel, **kwargs) as s:
            reset = await s.next_event()
            assert reset.type == "broker.reset", (position, s.raw)
            body = reset.json()
            assert body["reason"] == reason, position
            assert isinstance(body["refetch_after_ms"], int) and body["refetch_after_ms"] >= 0
            # the reset carries the head: the client's cursor moved to a usable position
            assert reset.last_event_id == head
            assert s.parser.last_event_id == head
            assert not s.pending
        # a plain client (no Accept: text/event-stream) gets a 200 stream too, never a 400
        async with http.get(broker.events_url(channel, last_event_id=position)) as resp:
            assert resp.status == 200
            async with asyncio.timeout(5):
                await resp.content.readuntil(b"event: broker.reset\n")

    # the reset's id is a good position: resuming from it is exact
    async with open_stream(broker, "r", "e", last_event_id=head) as s:
        await publish(redis_client, "e", "next")
        assert (await s.next_event()).data == "next"
    counts = {"unknown_id": 14, "epoch": 2, "expired": 4}
    for reason, n in counts.items():
        assert await broker.metric("sse_broker_resets_total", {"reason": reason}) == n, reason
    assert await broker.metric("sse_broker_replays_served_total") == 1
    assert await metric0(broker, "sse_broker_resets_total", {"reason": "outage"}) == 0


# -- 5. fairness -----------------------------------------------------------------------


async def test_quiet_channel_resumes_exactly_however_old_its_position(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    broker = await start_broker("replay.max_events=100")
    async with open_stream(broker, "quiet") as first:
        await publish(redis_client, "quiet", "q1")
        q1 = await first.next_event()
    await publish(redis_client, "quiet", "q2")
    # within the bounds
    await publish_many(redis_client, [("noisy", f"n{i}") for i in range(50)])
    await wait_ingested(broker, 52)
    async with open_stream(broker, "quiet", last_event_id=q1.last_event_id) as s:
        q2 = await s.next_event()
        assert q2.data == "q2"
        assert not s.pending

    # far beyond the bounds: the noisy channel holds the most, so it evicts only itself
    await publish_many(redis_client, [("noisy", f"m{i}") for i in range(500)])
    await publish(redis_client, "quiet", "q3")
    await wait_ingested(broker, 553)
    assert await broker.metric("sse_broker_history_events") == 100
    for position, expected in [(q2.last_event_id, ["q3"]), (q1.last_event_id, ["q2", "q3", "l0"])]:
        async with open_stream(broker, "quiet", last_event_id=position) as s:
            got = await s.events(len(expected))
            assert [e.data for e in got] == expected
            assert all(e.type == "message" for e in got)
            await publish(redis_client, "quiet", "l0" if len(expected) == 1 else "l1")
            assert (await s.next_event()).data == ("l0" if len(expected) == 1 else "l1")
            assert not s.pending
    # the bound really was hit: the noisy channel's old position is gone
    async with open_stream(broker, "noisy", last_event_id=q1.last_event_id) as s:
        reset = await s.next_event()
        assert (reset.type, reset.json()["reason"]) == ("broker.reset", "expired")
    assert await broker.metric("sse_broker_resets_total") == 1
    assert await broker.metric("sse_broker_replays_served_total") == 3


# -- 6. outage -------------------------------------------------------------------------


@pytest.mark.slow
async def test_resume_across_a_redis_outage_resets_then_the_resets_id_resumes_exactly(
    broker: BrokerProcess, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with open_stream(broker, "news") as first:
        await publish(redis_client, "news", "before")
        before = await first.next_event()
    # the client is away (keeping its id) while Redis goes down and comes back
    redis_server.stop()
    await broker.wait_not_ready()
    redis_server.start()
    await broker.wait_ready()
    client = redis_server.client()

    async with open_stream(broker, "news", last_event_id=before.last_event_id) as s:
        reset = await s.next_event()
        assert reset.type == "broker.reset"
        assert reset.json()["reason"] == "outage"
        assert seq_of(reset.last_event_id)[1] > seq_of(before.last_event_id)[1]
        await publish(client, "news", "after")
        after = await s.next_event()
        assert after.data == "after"
    assert await broker.metric("sse_broker_resets_total", {"reason": "outage"}) == 1

    # resuming from the reset's own id (or anything later) is exact: no second reset
    async with open_stream(broker, "news", last_event_id=reset.last_event_id) as s:
        await publish(client, "news", "live 1")
        got = await s.events(2)
    async with open_stream(broker, "news", last_event_id=after.last_event_id) as s:
        await publish(client, "news", "live 2")
        got += await s.events(2)
    assert pairs(got[:2]) == pairs([after, got[2]])
    assert [e.data for e in got[2:]] == ["live 1", "live 2"]
    assert await broker.metric("sse_broker_resets_total") == 1
    assert await broker.metric("sse_broker_replays_served_total") == 2


# -- 7. retained state -----------------------------------------------------------------


@pytest.mark.slow
async def test_retained_state_first_on_fresh_and_reset_streams_never_on_exact_resumes(
    broker: BrokerProcess, redis_client: aioredis.Redis
) -> None:
    async with open_stream(broker, "st") as observer:
        for payload in [
            envelope({"v": "acme"}, retain="status", tenant="acme"),
            envelope({"v": 1}, retain="status"),
            envelope({"v": 2}, retain="status"),
            envelope("temporary", retain="tmp"),
            envelope(None, retain="tmp"),  # deletes "tmp"
        ]:
            await publish(redis_client, "st", payload)
        _, v2, _, deleted = await observer.events(4)
    assert (v2.data, deleted.data) == ('{"v":2}', "null")
    head = deleted.last_event_id

    # a fresh stream: the latest value of each key it may see, then the head id, then live
    async with open_stream(broker, "st") as fresh:
        await fresh.wait_for(lambda st: st.parser.last_event_id == head, what="the head id")
        assert fresh.raw == (
            PREAMBLE + f'id: {v2.last_event_id}\ndata: {{"v":2}}\n\nid: {head}\n\n'.encode()
        )
        state = await fresh.next_event()
        assert (state.data, state.last_event_id) == ('{"v":2}', v2.last_event_id)
        await publish(redis_client, "st", envelope({"v": 3}, retain="status"))
        v3 = await fresh.next_event()
        assert v3.data == '{"v":3}'
        assert not fresh.pending

    # an exact resume gets the missed events, not the state again
    async with open_stream(broker, "st", last_event_id=v3.last_event_id) as exact:
        await publish(redis_client, "st", "live")
        live = await exact.next_event()
        assert live.data == "live"
        assert exact.raw == PREAMBLE + f"id: {live.last_event_id}\ndata: live\n\n".encode()
    async with open_stream(broker, "st", last_event_id=head) as exact:
        assert (await exact.next_event()).data == '{"v":3}'
        assert (await exact.next_event()).data == "live"
        assert await fence(redis_client, "st", exact) == [[]]
        newest = exact.parser.last_event_id  # the fence's marker, now the head

    # a reset: broker.reset, then the state, then the head, then live
    async with open_stream(broker, "st", last_event_id="not-an-id") as reset:
        first, state = await reset.events(2)
        assert (first.type, first.json()["reason"]) == ("broker.reset", "unknown_id")
        assert first.last_event_id == newest
        assert (state.data, state.last_event_id) == ('{"v":3}', v3.last_event_id)
        await reset.wait_for(lambda st: st.parser.last_event_id == newest)
        await publish(redis_client, "st", "after the reset")
        assert (await reset.next_event()).data == "after the reset"
        assert not reset.pending
    for stream in (fresh, reset):
        assert b"acme" not in stream.raw and b"temporary" not in stream.raw
    assert await broker.metric("sse_broker_retained_keys") == 2  # st/status and acme's


# -- 8. bounds under a flood -----------------------------------------------------------


@pytest.mark.slow
async def test_history_stays_within_its_bounds_under_a_flood(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    max_bytes = 2_000_000
    broker = await start_broker("replay.max_events=1000", f"replay.max_bytes={max_bytes}")
    sizes_seen: list[tuple[float, float]] = []

    async def sample() -> None:
        events = await broker.metric("sse_broker_history_events")
        size = await broker.metric("sse_broker_history_bytes")
        assert events is not None and size is not None
        sizes_seen.append((events, size))

    # 10,000 small events (the count binds), then 10,000 of 3 KB (the bytes bind)
    for phase, payload in enumerate(["s", "b" * 3000]):
        for batch in range(10):
            channels = ["f1", "f2", "f3", f"other{batch}"]
            await publish_many(
                redis_client, [(channels[i % 4], f"{payload}{i}") for i in range(1000)]
            )
            await sample()
        await wait_ingested(broker, 10_000 * (phase + 1))
        await sample()
        events, size = sizes_seen[-1]
        if phase == 0:
            assert events == 1000
        else:
            assert max_bytes - 7_000 < size <= max_bytes
    assert all(e <= 1000 and b <= max_bytes for e, b in sizes_seen), sizes_seen

    # and it still serves
    async with open_stream(broker, "f1") as s:
        await publish(redis_client, "f1", "still here")
        assert (await s.next_event()).data == "still here"
    status, _ = await broker.get("/readyz")
    assert status == 200


# -- 9. a big replay to a slow reader --------------------------------------------------


async def _slow_read(
    resp: aiohttp.ClientResponse, parser: SSEParser, until: int, events: list[SSEEvent]
) -> None:
    """Read in small pieces with pauses (a client on a slow link) until ``until`` events."""
    while len(events) < until:
        try:
            piece = await resp.content.read(16384)
        except aiohttp.ClientPayloadError as exc:
            pytest.fail(f"the broker aborted the stream after {len(events)} events: {exc!r}")
        assert piece, f"stream ended after {len(events)} events"
        events.extend(parser.feed(piece))
        await asyncio.sleep(0.001)


@pytest.mark.slow
@pytest.mark.parametrize("live", [False, True], ids=["replay_only", "with_live_and_heartbeats"])
async def test_replay_bigger_than_the_socket_buffers_is_paced_not_a_slow_consumer(
    start_broker: StartBroker, redis_client: aioredis.Redis, live: bool
) -> None:
    n, size = 1200, 10_000  # 12 MB of frames: far more than the kernel's socket buffers hold
    broker = await start_broker(
        "limits.write_buffer_bytes=65536",
        "replay.max_bytes=67108864",
        "replay.max_events=10000",
        "limits.max_event_bytes=65536",
        *(["sse.heartbeat_seconds=1"] if live else []),
    )
    async with open_stream(broker, "bulk") as s:
        start = s.parser.last_event_id
    await publish_many(redis_client, [("bulk", f"{i:06d}" + "x" * size) for i in range(n)])
    await wait_ingested(broker, n)

    parser = SSEParser()
    events: list[SSEEvent] = []
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            broker.events_url("bulk"),
            headers={"Accept": "text/event-stream", "Last-Event-ID": start},
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp,
    ):
        assert resp.status == 200
        began = time.monotonic()
        if live:
            # events published (and heartbeats due) while the replay is on its way
            await _slow_read(resp, parser, 300, events)
            for i in range(3):
                await publish(redis_client, "bulk", f"live{i}")
                await _slow_read(resp, parser, 300 * (i + 2), events)
        await _slow_read(resp, parser, n + (3 if live else 0), events)
        elapsed = time.monotonic() - began
        assert [e.data[:6] for e in events[:n]] == [f"{i:06d}" for i in range(n)]
        assert [e.data for e in events[n:]] == (["live0", "live1", "live2"] if live else [])
        # the stream is still open and live
        await publish(redis_client, "bulk", "after the replay")
        await _slow_read(resp, parser, len(events) + 1, events)
        assert events[-1].data == "after the replay"
    assert elapsed > 0.3, "the client was not slow: nothing was paced"
    closed = await metric0(
        broker, "sse_broker_connections_closed_total", {"reason": "slow_consumer"}
    )
    assert closed == 0, broker.log_text()[-2000:]


async def test_live_events_outgrowing_the_buffer_during_a_replay_make_a_counted_slow_consumer(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    n, size = 300, 10_000  # a 3 MB replay: far more than the socket buffers below hold
    broker = await start_broker(
        "limits.write_buffer_bytes=65536",
        "limits.max_event_bytes=65536",
        "sse.heartbeat_seconds=3600",
    )
    async with open_stream(broker, "bulk") as s:
        start = s.parser.last_event_id
    await publish_many(redis_client, [("bulk", "x" * size) for _ in range(n)])
    await wait_ingested(broker, n)

    host, port = broker.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # no autotuning to megabytes
    sock.connect((host, int(port)))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=16384)
    try:
        writer.write(
            b"GET /events?channel=bulk HTTP/1.1\r\nHost: broker\r\n"
            b"Accept: text/event-stream\r\nLast-Event-ID: " + start.encode() + b"\r\n\r\n"
        )
        # The preamble arrived: the stream is registered (paused) and its replay
        # is being written, which stalls while this client reads nothing.
        await asyncio.wait_for(reader.readuntil(b": ok\n\n"), 5)
        await publish_many(redis_client, [("bulk", "live" + "y" * size) for _ in range(10)])
        await wait_ingested(broker, n + 10)
        # 100 KB of live events queued behind the replay, over the 64 KB limit:
        # the next batch the client takes ends the stream as a slow consumer.
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(15):
                while await reader.read(65536):
                    pass
    finally:
        writer.close()
    closed = {"reason": "slow_consumer"}
    assert await metric0(broker, "sse_broker_connections_closed_total", closed) == 1
    assert await metric0(broker, "sse_broker_slow_consumer_closes_total") == 1


# -- 10. metrics -----------------------------------------------------------------------


async def test_replay_metrics_count_exact_resumes_and_replayed_events(
    broker: BrokerProcess, redis_client: aioredis.Redis
) -> None:
    async with open_stream(broker, "m") as s:
        await publish(redis_client, "m", "0")
        position = (await s.next_event()).last_event_id
    assert await metric0(broker, "sse_broker_replays_served_total") == 0
    await publish_many(redis_client, [("m", str(i)) for i in (1, 2, 3)])
    await publish(redis_client, "m", envelope("not for anonymous", tenant="t"))
    await wait_ingested(broker, 5)
    async with open_stream(broker, "m", last_event_id=position) as s:
        got = await s.events(3)
        position = got[-1].last_event_id
    await publish_many(redis_client, [("m", str(i)) for i in (4, 5)])
    await wait_ingested(broker, 7)
    async with open_stream(broker, "m", last_event_id=position) as s:
        assert [e.data for e in await s.events(2)] == ["4", "5"]
    async with open_stream(broker, "m", last_event_id=s.parser.last_event_id) as s:
        pass  # exact, nothing missed
    async with open_stream(broker, "m", last_event_id="bogus") as s:
        assert (await s.next_event()).type == "broker.reset"
    assert await broker.metric("sse_broker_replays_served_total") == 3
    assert await broker.metric("sse_broker_events_replayed_total") == 5
    assert await broker.metric("sse_broker_resets_total", {"reason": "unknown_id"}) == 1
