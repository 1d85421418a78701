"""Stream mode (``ingest.mode = "stream"``): XADD in, stream ids out, exact resume anywhere.

Real redis-server, real broker processes. Publishers are simulated the way the
design tells PHP apps to publish: ``XADD sse:stream MINID ~ <now - ttl> * channel
C data D [event E] [tenant T] [users U] [retain K]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from conftest import REPO_ROOT, BrokerProcess, RedisServer, StartBroker
from helpers import eventually, fence_stream
from sse_client import SSEClient, SSEEvent, SSEStream

from broker.config import config_warnings, load_config
from broker.retained_store import _CAS

STREAM_MODE = "ingest.mode=stream"
STREAM = "sse:stream"
TTL_MS = 300_000
STREAM_ID_RE = re.compile(r"^\d+-\d+$")


# -- helpers -------------------------------------------------------------------


async def xadd(
    redis: aioredis.Redis,
    channel: str | None,
    data: str | None,
    *,
    trim: bool = True,
    **fields: str,
) -> str:
    """Publish one stream entry as a PHP app would; returns its id.

    ``channel``/``data`` None leave the field out (malformed entries).
    ``trim=False`` adds without ``MINID ~`` (the stream stays intact).
    """
    entry: dict[str, str] = {}
    if channel is not None:
        entry["channel"] = channel
    if data is not None:
        entry["data"] = data
    entry.update(fields)
    if trim:
        min_id = int(time.time() * 1000) - TTL_MS
        raw = await redis.xadd(STREAM, entry, minid=min_id, approximate=True)
    else:
        raw = await redis.xadd(STREAM, entry)
    return raw.decode()


@contextlib.asynccontextmanager
async def stream(
    broker: BrokerProcess, *channels: str, last_event_id: str | None = None
) -> AsyncIterator[SSEStream]:
    """An open stream, returned once registered (its preamble arrived)."""
    async with SSEClient.connect(broker.events_url(*channels), last_event_id=last_event_id) as s:
        assert s.status == 200, await s.text()
        await s.wait_for(lambda st: bool(st.parser.comments), what="the preamble")
        yield s


async def read_up_to(broker: BrokerProcess, head: str, timeout: float = 5.0) -> None:
    """Until ``broker``'s reader handled the entry ``head`` (a fresh stream ends on the head)."""

    async def probe() -> str:
        async with stream(broker, "probe.head") as s:
            await s.wait_for(lambda st: st.parser.last_event_id != "", timeout=3)
            return s.parser.last_event_id

    await eventually(probe, lambda got: got == head, timeout=timeout)


@contextlib.asynccontextmanager
async def fresh(broker: BrokerProcess, *channels: str, head: str) -> AsyncIterator[SSEStream]:
    """A fresh stream (no Last-Event-ID), returned once its snapshot ended on ``head``.

    The broker is first given the time to read ``head``, so that the snapshot
    (not a live event) is what ends on it.
    """
    await read_up_to(broker, head)
    async with stream(broker, *channels) as s:
        await s.wait_for(
            lambda st: st.parser.last_event_id == head, timeout=3, what=f"the head id {head}"
        )
        yield s


def triples(events: list[SSEEvent]) -> list[tuple[str, str, str]]:
    return [(e.type, e.data, e.last_event_id) for e in events]


async def resets(broker: BrokerProcess, reason: str) -> float:
    return await broker.metric("sse_broker_resets_total", {"reason": reason}) or 0


async def xread_client_ids(redis: aioredis.Redis) -> set[int]:
    """Ids of the Redis connections blocked in (or last running) XREAD: the brokers' readers."""
    return {int(c["id"]) for c in await redis.client_list() if c.get("cmd") == "xread"}


# -- delivery --------------------------------------------------------------------


@pytest.mark.slow
async def test_stream_entries_are_delivered_with_the_stream_id_as_event_id(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    before = await xadd(redis_client, "news", "published before the broker started")
    broker = await start_broker(STREAM_MODE)
    # a fresh stream's position is the stream's last entry: it resumes from there
    async with fresh(broker, "news", head=before) as s:
        assert not s.pending
        a = await xadd(redis_client, "news", '{"id": 7,  "name": "x"}', event="updated")
        await xadd(redis_client, "elsewhere", "not subscribed")
        b = await xadd(redis_client, "news", "plain text")
        c = await xadd(redis_client, "news", "line 1\nline 2\r\nline 3\n\nline 5")
        got = await s.events(3)
        assert await fence_stream(redis_client, "news", s) == [[]]
    assert triples(got) == [
        ("updated", '{"id": 7,  "name": "x"}', a),  # data verbatim, not re-encoded
        ("message", "plain text", b),
        ("message", "line 1\nline 2\nline 3\n\nline 5", c),
    ]
    assert all(STREAM_ID_RE.match(e.last_event_id) for e in got)
    assert f'id: {a}\nevent: updated\ndata: {{"id": 7,  "name": "x"}}\n\n'.encode() in s.raw
    multi = f"id: {c}\ndata: line 1\ndata: line 2\ndata: line 3\ndata: \ndata: line 5\n\n"
    assert multi.encode() in s.raw


@pytest.mark.slow
async def test_rejected_stream_entries_are_counted_and_not_delivered(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    broker = await start_broker(STREAM_MODE, "limits.max_event_bytes=250")
    bad = [
        ("bad_channel", None, "1", {}),  # no channel field
        ("bad_channel", "bad channel", "1", {}),
        ("bad_channel", "x" * 201, "1", {}),
        ("bad_data", "news", None, {}),
        ("reserved_event", "news", "1", {"event": "broker.reset"}),
        ("bad_event", "news", "1", {"event": "a\ndata: injected"}),
        ("bad_users", "news", "1", {"users": "bob"}),  # not JSON
        ("bad_users", "news", "1", {"users": '"bob"'}),  # JSON, not an array
        ("bad_users", "news", "1", {"users": "[]"}),
        ("retain_with_users", "news", "1", {"users": '["bob"]', "retain": "k"}),
        ("too_large", "news", "x" * 300, {}),
    ]
    async with stream(broker, "news") as s:
        for _, channel, data, fields in bad:
            await xadd(redis_client, channel, data, **fields)
        good = await xadd(redis_client, "news", "still fine")
        event = await s.next_event()
        assert (event.data, event.last_event_id) == ("still fine", good)
        assert await fence_stream(redis_client, "news", s) == [[]]
    expected: dict[str, int] = {}
    for reason, *_ in bad:
        expected[reason] = expected.get(reason, 0) + 1
    for reason, count in expected.items():
        got = await broker.metric("sse_broker_events_rejected_total", {"reason": reason})
        assert got == count, reason
    # the good entry and the fence's marker
    assert await broker.metric("sse_broker_events_ingested_total") == 2
    status, _ = await broker.get("/readyz")
    assert status == 200


# -- resume ------------------------------------------------------------------------


@pytest.mark.slow
async def test_resume_after_a_restart_replays_the_missed_entries_from_the_stream(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    first = await start_broker(STREAM_MODE)
    async with stream(first, "news") as s:
        e1 = await xadd(redis_client, "news", "e1")
        await xadd(redis_client, "other", "o1")
        e2 = await xadd(redis_client, "news", "e2")
        got = await s.events(2)
        assert [e.last_event_id for e in got] == [e1, e2]
        last = s.parser.last_event_id
        first.kill()
        await first.wait_exit()
    assert last == e2

    # published while no broker runs: only the stream has them
    m1 = await xadd(redis_client, "news", "m1")
    await xadd(redis_client, "other", "o2")
    await xadd(redis_client, "news", "for acme only", tenant="acme")
    await xadd(redis_client, "news", "for bob only", users='["bob"]')
    m2 = await xadd(redis_client, "news", '{"n": 2}', event="updated")
    await xadd(redis_client, "news", "rejected", event="broker.nope")
    m3 = await xadd(redis_client, "news", "m3\nsecond line")

    second = await start_broker(STREAM_MODE)
    async with stream(second, "news", last_event_id=last) as s:
        missed = await s.events(3)
        live = await xadd(redis_client, "news", "live")
        after = await s.next_event()
        assert await fence_stream(redis_client, "news", s) == [[]]
    assert triples(missed) == [
        ("message", "m1", m1),
        ("updated", '{"n": 2}', m2),
        ("message", "m3\nsecond line", m3),
    ]
    assert (after.data, after.last_event_id) == ("live", live)
    assert await second.metric("sse_broker_replays_served_total") == 1
    assert await resets(second, "expired") + await resets(second, "unknown_id") == 0


@pytest.mark.slow
async def test_resume_after_a_restart_on_an_emptied_stream_is_exact(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    first = await start_broker(STREAM_MODE)
    async with stream(first, "news") as s:
        await xadd(redis_client, "news", "e1")
        seen = await xadd(redis_client, "news", "e2")
        await s.events(2)
    first.kill()
    await first.wait_exit()
    # trimmed to nothing (e.g. XTRIM by a cleanup job): the stream still knows its last id
    await redis_client.xtrim(STREAM, maxlen=0, approximate=False)
    info = await redis_client.xinfo_stream(STREAM)
    assert info["last-generated-id"].decode() == seen

    second = await start_broker(STREAM_MODE)
    # the client saw everything there was: nothing is lost, nothing to replay
    async with stream(second, "news", last_event_id=seen) as s:
        live = await xadd(redis_client, "news", "live")
        event = await s.next_event()
        assert (event.type, event.data, event.last_event_id) == ("message", "live", live), (
            f"expected the live event after an exact (empty) resume from {seen}, got {event}"
        )
        assert await fence_stream(redis_client, "news", s) == [[]]


@pytest.mark.slow
async def test_resume_on_another_instance_is_exact_and_ids_are_the_same_everywhere(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    a = await start_broker(STREAM_MODE)
    b = await start_broker(STREAM_MODE)
    async with stream(a, "news") as on_a, stream(b, "news") as on_b:
        ids = [await xadd(redis_client, "news", f"n{i}") for i in range(1, 4)]
        got_a, got_b = await on_a.events(3), await on_b.events(3)
        # the same entry has the same id on every instance: the stream id
        assert [e.last_event_id for e in got_a] == ids
        assert triples(got_b) == triples(got_a)

        # a client read up to n3 on A; n4, n5 are published while it reconnects
        position = on_a.parser.last_event_id
        on_a.disconnect()
        n4 = await xadd(redis_client, "news", "n4")
        await xadd(redis_client, "other", "x")
        n5 = await xadd(redis_client, "news", "n5")
        await on_b.events(2)  # B has read them too

        async with stream(b, "news", last_event_id=position) as resumed:
            missed = await resumed.events(2)
            n6 = await xadd(redis_client, "news", "n6")
            live = await resumed.next_event()
            assert await fence_stream(redis_client, "news", resumed) == [[]]
    assert triples(missed) == [("message", "n4", n4), ("message", "n5", n5)]
    assert (live.data, live.last_event_id) == ("n6", n6)
    assert await resets(b, "unknown_id") + await resets(b, "expired") == 0


def unread_bytes_at(broker: BrokerProcess) -> int:
    """Bytes that reached ``broker``'s public port on established connections and that
    it has not read yet (``ss`` Recv-Q; a connection not yet accepted counts too)."""
    assert broker.url is not None
    port = broker.url.rsplit(":", 1)[1]
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(line.split()[0]) for line in out.splitlines())


@pytest.mark.slow
async def test_resume_on_a_lagging_instance_waits_until_it_caught_up(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    a = await start_broker(STREAM_MODE)
    b = await start_broker(STREAM_MODE)
    async with stream(a, "news") as on_a, contextlib.AsyncExitStack() as stack:
        b.signal(signal.SIGSTOP)  # B stops reading the stream; A reads on
        try:
            await xadd(redis_client, "news", "n1")
            n2 = await xadd(redis_client, "news", "n2")
            n3 = await xadd(redis_client, "news", "n3")
            await on_a.events(3)
            # the client saw n2 on A and reconnects to B, which has not read n1 yet
            connecting = asyncio.create_task(
                stack.enter_async_context(SSEClient.connect(b.events_url("news"), last_event_id=n2))
            )
            # the request is at B (in its socket, unread) before B runs again
            await eventually(lambda: asyncio.sleep(0, unread_bytes_at(b)), lambda n: n > 0)
        finally:
            b.signal(signal.SIGCONT)
        resumed = await connecting
        assert resumed.status == 200
        first = await resumed.next_event()
        n4 = await xadd(redis_client, "news", "n4")
        second = await resumed.next_event()
        assert await fence_stream(redis_client, "news", resumed) == [[]]
    assert (first.type, first.data, first.last_event_id) == ("message", "n3", n3)
    assert (second.data, second.last_event_id) == ("n4", n4)
    assert await resets(b, "unknown_id") == 0


@pytest.mark.slow
async def test_resume_served_from_memory_needs_no_stream(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    broker = await start_broker(STREAM_MODE)
    async with stream(broker, "news", "sport") as s:
        for i in range(3):
            await xadd(redis_client, "news", f"n{i}")
        await s.events(3)
        position = s.parser.last_event_id
    n3 = await xadd(redis_client, "news", "n3")
    await xadd(redis_client, "other", "not subscribed")
    s1 = await xadd(redis_client, "sport", "s1", event="goal")
    n4 = await xadd(redis_client, "news", "n4")
    await xadd(redis_client, "news", "for acme only", tenant="acme")
    # wait until the broker has read them, then empty the stream: only memory has them
    async with stream(broker, "news", last_event_id=n4) as probe:
        assert not probe.pending
    await redis_client.xtrim(STREAM, maxlen=0, approximate=False)
    assert await redis_client.xlen(STREAM) == 0

    async with stream(broker, "news", "sport", last_event_id=position) as s:
        missed = await s.events(3)
        assert await fence_stream(redis_client, "news", s) == [[]]
    assert triples(missed) == [("message", "n3", n3), ("goal", "s1", s1), ("message", "n4", n4)]
    assert await resets(broker, "expired") == 0


@pytest.mark.slow
@pytest.mark.parametrize("trim", ["maxlen", "minid"])
async def test_resume_older_than_the_stream_holds_resets_expired(
    start_broker: StartBroker, redis_client: aioredis.Redis, trim: str
) -> None:
    # memory keeps the last 4 events (e3..e6, then e4..e6 and the first fence's
    # marker e7); older resumes have to come from the stream
    broker = await start_broker(STREAM_MODE, "replay.max_events=4")
    async with stream(broker, "news") as s:
        ids = [await xadd(redis_client, "news", f"e{i}", trim=False) for i in range(1, 7)]
        await s.events(6)
    head = ids[-1]

    # older than memory, but the stream still has everything: exact, from XRANGE
    async with stream(broker, "news", last_event_id=ids[0]) as s:
        assert [e.last_event_id for e in await s.events(5)] == ids[1:]
        assert await fence_stream(redis_client, "news", s) == [[]]
        # the fence's marker is an entry of "news" like the others: e7
        ids.append(s.parser.last_event_id)

    # a publisher trims as it adds: e1..e3 leave the stream (memory holds e4..e7)
    if trim == "maxlen":
        await redis_client.xtrim(STREAM, maxlen=len(ids) - 3, approximate=False)
    else:
        await redis_client.xtrim(STREAM, minid=ids[3], approximate=False)
    assert [id.decode() for id, _ in await redis_client.xrange(STREAM)] == ids[3:]
    async with stream(broker, "news", last_event_id=ids[2]) as s:
        assert [e.last_event_id for e in await s.events(len(ids) - 3)] == ids[3:]
        assert await fence_stream(redis_client, "news", s) == [[]]
        head = s.parser.last_event_id  # this marker (e8)

    # e3 (and e2) are gone: a client at e2 or e1 cannot be served exactly
    for position in (ids[1], ids[0]):
        async with stream(broker, "news", last_event_id=position) as s:
            reset = await s.next_event()
            assert reset.type == "broker.reset", (
                f"resume from {position} after {trim} trimming: expected broker.reset "
                f"(expired), got {triples([reset, *s.pending])} (e3 = {ids[2]} is lost)"
            )
            assert reset.json()["reason"] == "expired"
            assert reset.json()["refetch_after_ms"] >= 0
            assert reset.last_event_id == head
            assert s.parser.last_event_id == head
            assert await fence_stream(redis_client, "news", s) == [[]]
            live = await xadd(redis_client, "news", "after the reset", trim=False)
            event = await s.next_event()
            assert (event.data, event.last_event_id) == ("after the reset", live)
            head = live
    assert await resets(broker, "expired") == 2


@pytest.mark.slow
async def test_resume_across_a_deleted_entry_resets_expired(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    before = await xadd(redis_client, "news", "e1", trim=False)
    deleted = await xadd(redis_client, "news", "e2", trim=False)
    kept = await xadd(redis_client, "news", "e3", trim=False)
    await redis_client.xdel(STREAM, deleted)
    broker = await start_broker(STREAM_MODE)  # memory starts after e3: XRANGE decides
    async with stream(broker, "news", last_event_id=before) as s:
        reset = await s.next_event()
        assert (reset.type, reset.json()["reason"]) == ("broker.reset", "expired")
        assert reset.last_event_id == kept
    # a client that had seen the deleted entry lost nothing
    async with stream(broker, "news", last_event_id=deleted) as s:
        assert triples(await s.events(1)) == [("message", "e3", kept)]
        assert await fence_stream(redis_client, "news", s) == [[]]


@pytest.mark.parametrize("via", ["header", "query"])
async def test_unusable_resume_ids_reset_unknown_id_never_400(
    start_broker: StartBroker, redis_client: aioredis.Redis, via: str
) -> None:
    broker = await start_broker(STREAM_MODE)
    head = await xadd(redis_client, "news", "n1")
    async with fresh(broker, "news", head=head):
        pass
    # unparseable, and (last) well-formed but beyond anything the stream handed out
    bad_ids = ["garbage", "12", "1-2-3", "-1", "1-x", "99999999999999-0"]
    for bad in bad_ids:
        if via == "header":
            ctx = SSEClient.connect(broker.events_url("news"), last_event_id=bad)
        else:
            ctx = SSEClient.connect(broker.events_url("news", last_event_id=bad))
        async with ctx as s:
            assert s.status == 200, (bad, await s.text())
            reset = await s.next_event(timeout=5)
            assert reset.type == "broker.reset", bad
            assert reset.json()["reason"] == "unknown_id", bad
            assert reset.last_event_id == head, bad
    assert await resets(broker, "unknown_id") == len(bad_ids)


# -- Redis trouble -------------------------------------------------------------------


@pytest.mark.slow
async def test_stream_reader_reads_on_after_its_connection_is_killed(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    broker = await start_broker(STREAM_MODE)
    async with stream(broker, "news") as s:
        n1 = await xadd(redis_client, "news", "n1")
        assert (await s.next_event()).last_event_id == n1
        # the reader is blocked in XREAD between batches
        readers = await eventually(
            lambda: xread_client_ids(redis_client), lambda ids: len(ids) == 1
        )

        # kill every connection of the broker and publish before it can reconnect
        pipe = redis_client.pipeline(transaction=True)
        pipe.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        for name in ("n2", "n3"):
            pipe.xadd(STREAM, {"channel": "news", "data": name})
        killed, n2, n3 = await pipe.execute()
        assert killed >= 1
        await eventually(
            lambda: xread_client_ids(redis_client), lambda ids: bool(ids) and ids != readers
        )
        n4 = await xadd(redis_client, "news", "n4")
        got = await s.events(3)
        assert await fence_stream(redis_client, "news", s) == [[]]
    assert triples(got) == [
        ("message", "n2", n2.decode()),
        ("message", "n3", n3.decode()),
        ("message", "n4", n4),
    ]
    assert await resets(broker, "outage") == 0


@pytest.mark.slow
async def test_stream_reader_reads_on_after_a_redis_restart(
    start_broker: StartBroker, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    broker = await start_broker(STREAM_MODE)
    async with stream(broker, "news") as s:
        n1 = await xadd(redis_client, "news", "n1")
        assert (await s.next_event()).last_event_id == n1
        await redis_client.save()  # this Redis runs without persistence: keep the stream
        redis_server.stop()
        await broker.wait_not_ready()
        redis_server.start()
        client = redis_server.client()
        # published as soon as Redis is back, maybe before the broker reconnected
        n2 = await xadd(client, "news", "n2")
        await broker.wait_ready()
        n3 = await xadd(client, "news", "n3")
        got = await s.events(2)
        assert await fence_stream(client, "news", s) == [[]]
        marker = s.parser.last_event_id
    assert triples(got) == [("message", "n2", n2), ("message", "n3", n3)]
    assert await resets(broker, "outage") == 0
    assert (await broker.metric("sse_broker_redis_reconnects_total") or 0) >= 1
    # and a client that left before the outage resumes across it exactly
    async with stream(broker, "news", last_event_id=n1) as r:
        assert [e.last_event_id for e in await r.events(2)] == [n2, n3]
        # the first fence's marker, published after n3, is one of the missed events too
        [missed] = (await fence_stream(client, "news", r))[0]
        assert missed.last_event_id == marker


# -- retained state ----------------------------------------------------------------


async def retained_hash(redis: aioredis.Redis, channel: str) -> dict[bytes, bytes]:
    return await redis.hgetall(f"{STREAM}:retained:{channel}")


async def wait_retained(redis: aioredis.Redis, channel: str, expected: dict[str, str]) -> None:
    """Until the Redis hash of ``channel`` holds each ``field -> id`` of ``expected``."""

    def holds(found: dict[bytes, bytes]) -> bool:
        return all(
            found.get(f.encode(), b"").split(b" ", 1)[0] == id.encode()
            for f, id in expected.items()
        )

    await eventually(lambda: retained_hash(redis, channel), holds)


@pytest.mark.slow
async def test_fresh_stream_gets_the_latest_retained_value_per_key_then_the_head(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    broker = await start_broker(STREAM_MODE)
    await xadd(redis_client, "state", "v1", retain="k1")
    k2 = await xadd(redis_client, "state", '{"price": 2}', retain="k2", event="price")
    k1 = await xadd(redis_client, "state", "v1 updated", retain="k1")
    k3 = await xadd(redis_client, "state", "v3", retain="k3")
    gone = await xadd(redis_client, "state", "null", retain="k3")  # deletes k3
    acme = await xadd(redis_client, "state", "acme's", retain="k4", tenant="acme")
    other = await xadd(redis_client, "other", "o", retain="k1")
    head = await xadd(redis_client, "state", "not retained")
    await wait_retained(
        redis_client, "state", {"\0k1": k1, "\0k2": k2, "\0k3": gone, "acme\0k4": acme}
    )
    stored = await retained_hash(redis_client, "state")
    assert stored[b"\0k1"] == f"{k1} ".encode() + orjson.dumps(
        {"event": "message", "data": "v1 updated"}
    )
    assert stored[b"\0k3"] == f"{gone} -".encode()  # a tombstone, not a value

    async with fresh(broker, "state", head=head) as s:
        assert triples(s.pending) == [("price", '{"price": 2}', k2), ("message", "v1 updated", k1)]
    async with fresh(broker, "state", "other", head=head) as s:
        assert [e.last_event_id for e in s.pending] == [k2, k1, other]
    # a client resuming exactly gets what it missed (the deletion too), not the snapshot
    async with stream(broker, "state", last_event_id=k1) as s:
        got = await s.events(3)
        assert await fence_stream(redis_client, "state", s) == [[]]
    assert triples(got) == [
        ("message", "v3", k3),
        ("message", "null", gone),
        ("message", "not retained", head),
    ]


@pytest.mark.slow
async def test_retained_state_survives_restarts_and_trimming(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    first = await start_broker(STREAM_MODE)
    k1 = await xadd(redis_client, "state", "v1", retain="k1")
    k2 = await xadd(redis_client, "state", "v2", retain="k2", event="e")
    await wait_retained(redis_client, "state", {"\0k1": k1, "\0k2": k2})
    first.kill()
    await first.wait_exit()
    expected = [("message", "v1", k1), ("e", "v2", k2)]

    second = await start_broker(STREAM_MODE)
    async with fresh(second, "state", head=k2) as s:
        assert triples(s.pending) == expected
    second.kill()
    await second.wait_exit()

    # the publishers trimmed the whole stream away; the state is beside it
    await redis_client.xtrim(STREAM, maxlen=0, approximate=False)
    assert await redis_client.xlen(STREAM) == 0
    third = await start_broker(STREAM_MODE)
    async with fresh(third, "state", head=k2) as s:
        assert triples(s.pending) == expected


@pytest.mark.slow
async def test_retained_state_is_written_with_compare_and_set_on_the_stream_id(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    # the script itself: ids compare as (ms, seq) numbers, a later id wins
    steps = [("5-0", 1), ("4-9", 0), ("5-0", 0), ("5-1", 1), ("10-0", 1), ("9-99", 0)]
    for id, written in steps:
        assert await redis_client.eval(_CAS, 1, "scratch", "f", id, f"v{id}") == written, id
    assert await redis_client.hget("scratch", "f") == b"10-0 v10-0"

    broker = await start_broker(STREAM_MODE)
    old = await xadd(redis_client, "state", "old", retain="k")
    new = await xadd(redis_client, "state", "new", retain="k")
    head = await xadd(redis_client, "state", "not retained")
    await wait_retained(redis_client, "state", {"\0k": new})
    key = f"{STREAM}:retained:state"
    stale = orjson.dumps({"event": "message", "data": "stale"})
    # an instance lagging behind writes the older entry late: a no-op
    assert await redis_client.eval(_CAS, 1, key, "\0k", old, stale) == 0
    assert await redis_client.eval(_CAS, 1, key, "\0k", new, stale) == 0
    assert (await retained_hash(redis_client, "state"))[b"\0k"].startswith(f"{new} ".encode())
    async with fresh(broker, "state", head=head) as s:
        assert triples(s.pending) == [("message", "new", new)]
    # a new instance (state from Redis only) agrees
    other = await start_broker(STREAM_MODE)
    async with fresh(other, "state", head=head) as s:
        assert triples(s.pending) == [("message", "new", new)]


@pytest.mark.slow
async def test_two_instances_converge_on_the_same_retained_state(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    a = await start_broker(STREAM_MODE)
    b = await start_broker(STREAM_MODE)
    async with stream(a, "state") as on_a, stream(b, "state") as on_b:
        # A lags while B reads and writes the newer state
        a.signal(signal.SIGSTOP)
        try:
            await xadd(redis_client, "state", "v1", retain="k")
            v2 = await xadd(redis_client, "state", "v2", retain="k")
            await xadd(redis_client, "state", "x1", retain="x")
            await on_b.events(3)
            await wait_retained(redis_client, "state", {"\0k": v2})
        finally:
            a.signal(signal.SIGCONT)
        await on_a.events(3)
        # now B lags while A reads a deletion and a newer value
        b.signal(signal.SIGSTOP)
        try:
            gone = await xadd(redis_client, "state", "null", retain="x")
            y = await xadd(redis_client, "state", "y1", retain="y", event="why")
            await on_a.events(2)
            await wait_retained(redis_client, "state", {"\0x": gone, "\0y": y})
        finally:
            b.signal(signal.SIGCONT)
        await on_b.events(2)
        # a later batch on each proves the earlier batch's state write is done
        head = await xadd(redis_client, "state", "marker")
        await on_a.next_event()
        await on_b.next_event()

    stored = await retained_hash(redis_client, "state")
    assert {f: v.split(b" ", 1)[0].decode() for f, v in stored.items()} == {
        b"\0k": v2,
        b"\0x": gone,
        b"\0y": y,
    }
    expected = [("message", "v2", v2), ("why", "y1", y)]
    for instance in (a, b):
        async with fresh(instance, "state", head=head) as s:
            assert triples(s.pending) == expected


@pytest.mark.slow
async def test_tenant_retained_state_is_not_served_to_anonymous_streams(
    start_broker: StartBroker, redis_client: aioredis.Redis
) -> None:
    broker = await start_broker(STREAM_MODE)
    acme = await xadd(redis_client, "state", "acme's", retain="k", tenant="acme")
    public = await xadd(redis_client, "state", "everyone's", retain="k")
    other_tenant = await xadd(redis_client, "state", "tenant 42's", retain="k2", tenant="42")
    await wait_retained(
        redis_client, "state", {"acme\0k": acme, "\0k": public, "42\0k2": other_tenant}
    )
    # another instance, serving the state from Redis only
    other = await start_broker(STREAM_MODE)
    head = await xadd(redis_client, "state", "marker")
    for instance in (broker, other):
        async with fresh(instance, "state", head=head) as s:
            assert triples(s.pending) == [("message", "everyone's", public)]


# -- configuration -----------------------------------------------------------------


def test_pubsub_mode_with_several_workers_warns_that_resume_needs_stream_mode() -> None:
    base = load_config(None, env={})
    two = replace(base, server=replace(base.server, workers=2))
    warnings = config_warnings(two)
    matching = [w for w in warnings if "server.workers = 2" in w]
    assert len(matching) == 1, warnings
    assert "ingest.mode = 'pubsub'" in matching[0]
    assert "ingest.mode = 'stream'" in matching[0]  # the way out
    assert not [w for w in config_warnings(base) if "server.workers" in w]

    stream_cfg = load_config(None, env={}, overrides=["ingest.mode=stream"])
    stream_two = replace(stream_cfg, server=replace(stream_cfg.server, workers=2))
    assert not [w for w in config_warnings(stream_two) if "server.workers" in w]


def test_check_config_accepts_stream_mode(tmp_path: Path) -> None:
    path = tmp_path / "stream.toml"
    path.write_text('[ingest]\nmode = "stream"\nstream_key = "app:events"\n')
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("SSE_BROKER_")},
    )
    assert result.returncode == 0, result.stderr
    assert 'mode = "stream"' in result.stdout
    assert 'stream_key = "app:events"' in result.stdout
    assert "server.workers" not in result.stderr
    assert f"{path}: OK" in result.stderr
