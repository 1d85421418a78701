"""Core streaming: Redis pub/sub in, multiplexed SSE out (real redis-server, real broker)."""

from __future__ import annotations

import asyncio
import re
import signal

import aiohttp
import orjson
import pytest
from conftest import BrokerProcess, RedisServer, StartBroker
from helpers import envelope, eventually, fence, publish, stream
from sse_client import SSEClient

ID_RE = re.compile(r"^p(\d+)-(\d+)$")


def seq_of(event_id: str) -> tuple[int, int]:
    match = ID_RE.match(event_id)
    assert match, f"event id {event_id!r} is not p<epoch>-<seq>"
    return int(match.group(1)), int(match.group(2))


async def test_stream_headers_and_preamble_flushed_at_once(broker: BrokerProcess) -> None:
    async with stream(broker, "news") as s:
        assert s.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert s.headers["Cache-Control"] == "no-cache, no-transform"
        assert s.headers["X-Accel-Buffering"] == "no"
        # the preamble, then the head id: even a client that never receives
        # an event holds a position to resume from
        assert re.fullmatch(rb"retry: 3000\n: ok\n\nid: p\d+-0\n\n", s.raw), s.raw
        assert s.parser.retry == 3000


async def test_native_envelope_and_raw_text(broker: BrokerProcess, redis_client) -> None:
    async with stream(broker, "news") as s:
        await publish(redis_client, "news", envelope({"id": 7, "name": "x"}, event="updated"))
        await publish(redis_client, "news", "hello from redis-cli")
        await publish(redis_client, "news", envelope("a string payload"))
        first, second, third = await s.events(3)
    assert (first.type, first.json()) == ("updated", {"id": 7, "name": "x"})
    assert first.data == '{"id":7,"name":"x"}'  # compact JSON
    assert (second.type, second.data) == ("message", "hello from redis-cli")
    assert (third.type, third.data) == ("message", "a string payload")
    assert seq_of(second.last_event_id)[1] == seq_of(first.last_event_id)[1] + 1


async def test_multiline_data_round_trips(broker: BrokerProcess, redis_client) -> None:
    async with stream(broker, "news") as s:
        await publish(redis_client, "news", envelope("line 1\nline 2\r\nline 3\n\nline 5"))
        await publish(redis_client, "news", "raw\nmulti")
        event, raw = await s.events(2)
    assert event.data == "line 1\nline 2\nline 3\n\nline 5"
    assert raw.data == "raw\nmulti"
    assert b"data: line 1\ndata: line 2\ndata: line 3\ndata: \ndata: line 5\n\n" in s.raw


async def test_one_connection_multiplexes_channels_in_publish_order(
    broker: BrokerProcess, redis_client
) -> None:
    async with stream(broker, "a", "b") as s:
        for i, channel in enumerate(["a", "c", "b", "a", "c", "b"]):
            await publish(redis_client, channel, envelope({"channel": channel, "i": i}))
        await publish(redis_client, "a", envelope("end"))
        got = await s.events(5)
    assert [e.data for e in got[:4]] == [
        '{"channel":"a","i":0}',
        '{"channel":"b","i":2}',
        '{"channel":"a","i":3}',
        '{"channel":"b","i":5}',
    ]
    assert got[4].data == "end"
    assert not s.pending


@pytest.mark.slow
async def test_channels_are_isolated(broker: BrokerProcess, redis_client) -> None:
    async with stream(broker, "left") as left, stream(broker, "right") as right:
        await publish(redis_client, "left", "L1")
        await publish(redis_client, "right", "R1")
        await publish(redis_client, "left", "L2")
        assert [e.data for e in await left.events(2)] == ["L1", "L2"]
        assert [e.data for e in await right.events(1)] == ["R1"]
        # nothing else arrives on either: each is fenced on its own channel, after
        # all three publishes (one ingest: a crossed event would come first)
        assert await fence(redis_client, "left", left) == [[]]
        assert await fence(redis_client, "right", right) == [[]]


async def test_thousand_rapid_events_arrive_complete_and_in_order(
    broker: BrokerProcess, redis_client
) -> None:
    async with stream(broker, "x", "y") as s:
        pipe = redis_client.pipeline(transaction=False)
        for i in range(1000):
            pipe.publish("sse:" + ("x" if i % 3 else "y"), orjson.dumps({"data": i}))
        await pipe.execute()
        got = await s.events(1000, timeout=15)
    assert [int(e.data) for e in got] == list(range(1000))
    ids = [seq_of(e.last_event_id) for e in got]
    assert len({epoch for epoch, _ in ids}) == 1, "one epoch per process"
    seqs = [seq for _, seq in ids]
    assert seqs == list(range(seqs[0], seqs[0] + 1000)), "one sequence across channels"


@pytest.mark.slow
async def test_each_start_has_a_new_epoch(start_broker: StartBroker, redis_client) -> None:
    epochs = []
    for _ in range(2):
        broker = await start_broker()
        async with stream(broker, "e") as s:
            await publish(redis_client, "e", "x")
            epochs.append(seq_of((await s.next_event()).last_event_id)[0])
        broker.terminate()
        assert await broker.wait_exit() == 0
    assert epochs[0] != epochs[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("", 400, "no_channel"),
        ("?channel=", 400, "bad_channel"),
        ("?channel=has%20space", 400, "bad_channel"),
        ("?channel=" + "a" * 201, 400, "bad_channel"),
        ("?channel=a&channel=b&channel=c", 400, "too_many_channels"),
        ("?channel=private-orders.1", 403, "channel_forbidden"),
        ("?channel=presence-room", 403, "channel_forbidden"),
    ],
)
async def test_bad_requests_get_json_errors(
    start_broker: StartBroker, http: aiohttp.ClientSession, query: str, status: int, code: str
) -> None:
    broker = await start_broker("limits.max_channels_per_connection=2")
    for accept in ("application/json", "text/event-stream"):
        async with http.get(f"{broker.url}/events{query}", headers={"Accept": accept}) as resp:
            assert resp.status == status
            body = await resp.json()
        assert body["error"] == code
        assert body["message"]
    if code == "channel_forbidden":
        assert query.split("=", 1)[1] in body["message"]


async def test_events_for_a_tenant_or_users_never_reach_anonymous_streams(
    broker: BrokerProcess, redis_client
) -> None:
    async with stream(broker, "news") as s:
        await publish(redis_client, "news", envelope("for acme", tenant="acme"))
        await publish(redis_client, "news", envelope("for bob", users=["bob"]))
        await publish(redis_client, "news", envelope("for everyone"))
        event = await s.next_event()
        assert event.data == "for everyone"
        assert not s.pending


@pytest.mark.slow
async def test_heartbeats_on_idle_streams_only(start_broker: StartBroker, redis_client) -> None:
    broker = await start_broker("sse.heartbeat_seconds=1")
    async with stream(broker, "idle") as idle, stream(broker, "busy") as busy:

        async def keep_busy() -> None:
            for i in range(40):
                await publish(redis_client, "busy", str(i))
                await asyncio.sleep(0.05)

        feeder = asyncio.create_task(keep_busy())
        await feeder
        got = await busy.events(40)
        assert [e.data for e in got] == [str(i) for i in range(40)]
        # While other channels moved the head, the idle stream's heartbeats
        # were "id: <head>" blocks: its cursor advanced and no event fired.
        await idle.wait_for(lambda st: st.parser.last_event_id == got[-1].last_event_id, 3)
        assert idle.parser.id_only_updates >= 2
        assert not idle.pending
        # Once the head stands still, heartbeats are plain comments.
        assert await idle.wait_comment(timeout=3) == "ok"
        assert await idle.wait_comment(timeout=3) == ""
        assert await idle.wait_comment(timeout=3) == ""
        # a stream that received events all along needed no heartbeat
        assert busy.parser.comments == ["ok"]
        assert not idle.pending


@pytest.mark.slow
async def test_readiness_follows_redis_and_open_streams_get_reset(
    broker: BrokerProcess, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with stream(broker, "news") as s:
        redis_server.stop()
        await broker.wait_not_ready()
        status, body = await broker.get("/readyz")
        assert status == 503 and orjson.loads(body)["reason"] == "redis_unavailable"
        assert await broker.metric("sse_broker_redis_connected") == 0

        # new streams are refused while not ready: JSON for plain clients,
        # a 200 with broker.reconnect for EventSource (which would give up on a 503)
        async with http.get(broker.events_url("news")) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"]
            assert (await resp.json())["error"] == "redis_unavailable"
        async with SSEClient.connect(broker.events_url("news")) as refused:
            assert refused.status == 200
            event = await refused.next_event()
            assert event.type == "broker.reconnect"
            assert event.json()["reason"] == "not_ready"
            assert refused.parser.retry is not None
            assert await refused.wait_closed()

        redis_server.start()
        await broker.wait_ready()
        # events published while Redis was away are gone: the stream is told so
        reset = await s.next_event(timeout=5)
        assert reset.type == "broker.reset"
        assert reset.json()["reason"] == "outage"
        assert reset.json()["refetch_after_ms"] >= 0
        client = redis_server.client()
        await publish(client, "news", "after the outage")
        assert (await s.next_event()).data == "after the outage"
        assert await broker.metric("sse_broker_redis_reconnects_total") == 1
        assert await broker.metric("sse_broker_redis_connected") == 1


async def test_not_ready_until_first_subscription(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    redis_server.stop()
    broker = await start_broker(wait_ready=False)
    status, body = await broker.get("/readyz")
    assert (status, orjson.loads(body)["reason"]) == (503, "starting")
    status, _ = await broker.get("/readyz", admin=False)
    assert status == 503
    status, _ = await broker.get("/healthz", admin=False)
    assert status == 200
    redis_server.start()
    await broker.wait_ready()


async def test_rejected_messages_are_counted_and_harm_nobody(
    start_broker: StartBroker, redis_client
) -> None:
    broker = await start_broker("limits.max_event_bytes=100")
    async with stream(broker, "news") as s:
        bad = [
            ("reserved_event", envelope(1, event="broker.reset")),
            ("bad_event", envelope(1, event="a\ndata: injected")),
            ("bad_tenant", envelope(1, tenant=True)),
            ("bad_users", envelope(1, users=[])),
            ("retain_with_users", envelope(1, users=["a"], retain="k")),
            ("too_large", envelope("x" * 200)),
            ("bad_encoding", b"\xff\xfe"),
        ]
        for _, payload in bad:
            await publish(redis_client, "news", payload)
        await redis_client.publish("sse:bad channel", b"x")
        await publish(redis_client, "news", "still fine")
        assert (await s.next_event()).data == "still fine"
        assert not s.pending
    for reason, _ in bad:
        assert await broker.metric("sse_broker_events_rejected_total", {"reason": reason}) == 1
    assert await broker.metric("sse_broker_events_rejected_total", {"reason": "bad_channel"}) == 1
    assert "event names starting 'broker.' are reserved" in broker.log_text()


async def test_metrics_count_streams_events_and_bytes(broker: BrokerProcess, redis_client) -> None:
    async with stream(broker, "m") as a, stream(broker, "m") as b:
        assert await broker.metric("sse_broker_connections") == 2
        await publish(redis_client, "m", "one")
        await a.next_event()
        await b.next_event()
        assert await broker.metric("sse_broker_events_ingested_total") == 1
        assert await broker.metric("sse_broker_events_delivered_total") == 2
        assert (await broker.metric("sse_broker_bytes_sent_total") or 0) > 0
        b.disconnect()
        await eventually(lambda: broker.metric("sse_broker_connections"), lambda v: v == 1)
    await eventually(lambda: broker.metric("sse_broker_connections"), lambda v: v == 0)
    closed = await broker.metric("sse_broker_connections_closed_total", {"reason": "client_closed"})
    assert closed == 2
    assert "stream closed" in broker.log_text()


async def test_bytes_sent_counts_the_preamble_and_the_backlog(
    start_broker: StartBroker, redis_client
) -> None:
    # No heartbeat may land between the reads and the scrape.
    broker = await start_broker("sse.heartbeat_seconds=3600")
    host, port = broker.url.removeprefix("http://").split(":")
    writers: list[asyncio.StreamWriter] = []

    async def open_raw(version: str, last_id: str | None = None) -> asyncio.StreamReader:
        reader, writer = await asyncio.open_connection(host, int(port))
        writers.append(writer)
        resume = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
        writer.write(
            f"GET /events?channel=b HTTP/{version}\r\nHost: broker\r\n"
            f"Accept: text/event-stream\r\n{resume}\r\n".encode()
        )
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # headers: not body bytes
        return reader

    async def until(reader: asyncio.StreamReader, end: bytes) -> bytes:
        return await asyncio.wait_for(reader.readuntil(end), 5)

    try:
        # A fresh HTTP/1.0 stream (no chunk framing): the preamble and the
        # head's id, both written before the stream joins the hub.
        fresh = await open_raw("1.0")
        body = await until(fresh, b": ok\n\n") + await until(fresh, b"\n\n")
        head = re.search(rb"id: (p\d+-0)\n\n$", body)
        assert head, body
        await publish(redis_client, "b", "one")
        await publish(redis_client, "b", "two")
        body += await until(fresh, b"data: one\n\n") + await until(fresh, b"data: two\n\n")
        # A resume over HTTP/1.1: the preamble and both missed events in one
        # chunk, counted with its framing (as the hub counts what it writes).
        resumed = await open_raw("1.1", head[1].decode())
        wire = await until(resumed, b"data: two\n\n\r\n")
        size, _, chunk = wire.partition(b"\r\n")
        assert int(size, 16) == len(chunk) - 2 and chunk.startswith(b"retry: 3000\n: ok\n\n")
        assert await broker.metric("sse_broker_bytes_sent_total") == len(body) + len(wire)
    finally:
        for writer in writers:
            writer.close()


async def test_http10_client_gets_unchunked_frames(broker: BrokerProcess, redis_client) -> None:
    host, port = broker.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /events?channel=old HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.0 200")
        assert b"transfer-encoding" not in head.lower()
        assert await asyncio.wait_for(reader.readuntil(b": ok\n\n"), 5)
        head_block = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        assert re.fullmatch(rb"id: p\d+-0\n\n", head_block)
        await publish(redis_client, "old", "plain")
        frame = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        assert re.fullmatch(rb"id: p\d+-1\ndata: plain\n\n", frame)
    finally:
        writer.close()


async def test_sigterm_drains_streams_with_reconnect_and_exits_zero(
    broker: BrokerProcess,
) -> None:
    async with stream(broker, "d") as s:
        broker.signal(signal.SIGTERM)
        event = await s.next_event()
        assert event.type == "broker.reconnect"
        assert event.json()["reason"] == "drain"
        assert await s.wait_closed()
    assert await broker.wait_exit() == 0
