"""What a stream gets before its live events: replay, reset, retained state.

- Fresh connection (no Last-Event-ID): the retained state of its channels,
  then ``id: <head>``, so even a client that never receives an event holds a
  position to resume from.
- Exact resume: exactly the events it missed and may see, in order.
- Otherwise: ``broker.reset`` (reason, jittered ``refetch_after_ms``,
  ``id: <head>``), then the retained state and the head id again.

Pub/sub mode decides from the process's history alone. Stream mode serves
from memory when this instance's history covers the position, else from
XRANGE, and resets only when the stream lost entries after the position
(``max-deleted-entry-id``).
"""

from __future__ import annotations

import asyncio
import logging
from itertools import chain
from typing import TYPE_CHECKING, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from broker import control, sse
from broker.connection import Connection
from broker.envelope import decode_stream
from broker.errors import Rejected
from broker.hub import Published
from broker.ids import split_event_id
from broker.ingest.stream import Entry, stream_seq

if TYPE_CHECKING:
    from broker.app import Broker

log = logging.getLogger(__name__)

XRANGE_BATCH = 1000
COUNT_BATCH = 200  # entries per counting call: each holds Redis for well under 1 ms

# Counts the entries of a range, in Redis: (how many, the last id). The broker
# learns how far back a resume reaches without receiving or parsing a byte of
# it; one call covers at most ARGV[3] entries, so Redis is never blocked long.
_COUNT_RANGE = """
local r = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
if #r == 0 then return {0, ''} end
return {#r, r[#r][1]}
"""


async def backlog(
    broker: Broker, conn: Connection, last_id: str | None, position: tuple[int, str]
) -> list[bytes]:
    """The frames ``conn`` gets before live events, for a stream registered at ``position``."""
    upto, head = position
    frames: list[bytes] = []
    if last_id is not None:
        try:
            reason, missed = await _resume(broker, conn.channels, last_id, upto, head)
        except (RedisError, OSError) as exc:
            # History in Redis cannot be read now: say so (a reset), do not fail.
            log.warning("resume from Redis failed (%s): sending broker.reset", exc)
            reason, missed = "outage", []
        if reason is None:
            frames = [p.frame for p in missed if conn.may_see(p.event)]
            broker.stats.replays_served += 1
            broker.stats.events_replayed += len(frames)
            conn.last_id = last_id
            return frames
        broker.stats.resets[reason] += 1
        frames.append(control.reset_frame(reason, head, control.jitter(broker.cfg.sse.retry_ms)))
    return _with_state(conn, head, frames, await _state(broker, conn, upto))


def gap_frames(broker: Broker, conn: Connection, reason: str, head: str) -> list[bytes]:
    """For an open stream after events were lost: ``broker.reset``, then the retained
    state this process holds in memory."""
    reset = control.reset_frame(reason, head, control.jitter(broker.cfg.sse.retry_ms))
    return _with_state(conn, head, [reset], _memory_state(broker, conn, broker.hub.seq))


def _with_state(
    conn: Connection, head: str, frames: list[bytes], state: list[Published]
) -> list[bytes]:
    frames.extend(p.frame for p in state)
    if state or not frames:
        # Retained events carry their own (older) ids: end on the head so the
        # client resumes from here, not from the oldest state entry.
        frames.append(sse.encode_id(head))
    conn.last_id = head
    return frames


def _visible(conn: Connection, pub: Published, upto: int) -> bool:
    # Entries past ``upto`` reach the stream live; tombstones only mark deletions.
    return pub.seq <= upto and not pub.event.deletes and conn.may_see(pub.event)


def _memory_state(broker: Broker, conn: Connection, upto: int) -> list[Published]:
    return [
        p for p in broker.retained.snapshot(conn.channels, conn.tenant) if _visible(conn, p, upto)
    ]


async def _state(broker: Broker, conn: Connection, upto: int) -> list[Published]:
    if not broker.stream_mode:
        return _memory_state(broker, conn, upto)
    # Redis holds the state from before this process; memory what this
    # process read since (possibly not yet written back). Later id wins.
    try:
        stored = await broker.redis_retained.load(broker.redis(), conn.channels)
    except (RedisError, OSError) as exc:
        log.warning("retained state unavailable from Redis (%s): sending what memory has", exc)
        stored = []
    latest: dict[tuple[str, str | None, str | None], Published] = {}
    for pub in chain(stored, broker.retained.snapshot(conn.channels, conn.tenant)):
        event = pub.event
        if event.tenant is not None and event.tenant != conn.tenant:
            continue
        key = (event.channel, event.tenant, event.retain)
        if key not in latest or pub.seq > latest[key].seq:
            latest[key] = pub
    return sorted((p for p in latest.values() if _visible(conn, p, upto)), key=lambda p: p.seq)


def needs_scan(broker: Broker, channels: tuple[str, ...], last_id: str | None) -> bool:
    """Whether resuming from ``last_id`` would read the stream from Redis (stream
    mode, a position older than this instance's memory): decided before the
    response starts, so that a resume past ``replay.max_concurrent_scans`` can
    get the retryable refusal instead of a stream."""
    if not broker.stream_mode or last_id is None:
        return False
    seq = stream_seq(last_id)
    if seq is None or seq > broker.hub.seq:
        return False  # unknown, or ahead: a catch-up, then memory
    return seq < broker.stream_start or broker.history.lost_after(channels, seq) is not None


async def _resume(
    broker: Broker, channels: tuple[str, ...], last_id: str, upto: int, upto_id: str
) -> tuple[str | None, list[Published]]:
    """(None, missed events) for an exact resume, else (reset reason, [])."""
    if broker.stream_mode:
        seq = stream_seq(last_id)
        if seq is None or seq > upto:
            return "unknown_id", []
        if seq >= broker.stream_start and broker.history.lost_after(channels, seq) is None:
            return None, broker.history.since(channels, seq, upto)
        return await _from_stream(broker, channels, last_id, seq, upto_id)
    parts = split_event_id(last_id)
    if parts is None:
        return "unknown_id", []
    epoch, seq = parts
    if str(epoch) != broker.hub.epoch:
        return "epoch", []
    if seq > upto:
        return "unknown_id", []
    reason = broker.history.lost_after(channels, seq)
    if reason is not None:
        return reason, []
    return None, broker.history.since(channels, seq, upto)


async def trimmed_after(client: aioredis.Redis, key: str, last_id: str, seq: int) -> bool:
    """Whether the stream lost entries after ``last_id`` (trimmed or deleted).

    Trimming removes the oldest entries first: while an entry at or before
    the position remains, nothing after it was trimmed. When none remains,
    the position is safe only if the stream never lost an entry at all.
    Entries removed one by one (XDEL) show in ``max-deleted-entry-id``.
    """
    pipe = client.pipeline(transaction=True)
    _ = pipe.xinfo_stream(key)
    _ = pipe.xrevrange(key, last_id, "-", count=1)
    try:
        info, before = await pipe.execute()
    except ResponseError:
        return True  # no stream at all: whatever the client saw is gone
    deleted = info.get("max-deleted-entry-id")
    if deleted is not None and (stream_seq(bytes(deleted).decode()) or 0) > seq:
        return True
    if before:
        return False
    added = info.get("entries-added")
    return added is None or int(added) != int(info["length"])


async def _from_stream(
    broker: Broker, channels: tuple[str, ...], last_id: str, seq: int, upto_id: str
) -> tuple[str | None, list[Published]]:
    """Missed events read back from the stream (older than this instance's memory).

    Bounded by ``replay.max_resume_scan`` entries read (of every channel) and
    by ``replay.max_bytes`` kept. Nothing is decoded until the whole range is
    known to fit: a resume from too long ago costs Redis round trips and
    hiredis parsing, not Python work per entry, and the decoding of one that
    fits yields to the loop every batch, so live clients keep their pace.
    """
    client = broker.redis()
    key = broker.cfg.ingest.stream_key
    budget = broker.cfg.replay.max_resume_scan  # entries of every channel, read or skipped
    max_bytes = broker.cfg.replay.max_bytes
    if budget == 0 or await trimmed_after(client, key, last_id, seq):
        return "expired", []
    if not await _within(client, key, last_id, upto_id, budget):
        # Further back than a resume may read: the honest reset, not a scan
        # of the whole stream on a client's say-so.
        return "expired", []
    wanted = {c.encode() for c in channels}
    kept: list[Entry] = []
    size = 0
    start = "(" + last_id
    while True:
        count = min(XRANGE_BATCH, budget + 1)
        entries = cast(
            list[Entry],
            await client.xrange(key, min=start, max=upto_id, count=count),
        )
        budget -= len(entries)
        if budget < 0:
            return "expired", []  # the stream grew past the bound meanwhile
        for entry in entries:
            fields = entry[1]
            if fields.get(b"channel") in wanted:
                kept.append(entry)
                size += sum(len(k) + len(v) for k, v in fields.items())
        if size > max_bytes:
            return "expired", []  # more than a replay may hold
        if len(entries) < count:
            break
        start = "(" + entries[-1][0].decode()
    return await _decode_entries(broker, kept, max_bytes)


async def _within(
    client: aioredis.Redis, key: str, last_id: str, upto_id: str, budget: int
) -> bool:
    """Whether at most ``budget`` entries lie after ``last_id`` up to ``upto_id``."""
    start = "(" + last_id
    while True:
        count = min(COUNT_BATCH, budget + 1)
        n, last = await client.eval(_COUNT_RANGE, 1, key, start, upto_id, count)
        budget -= int(n)
        if budget < 0:
            return False
        if int(n) < count:
            return True
        start = "(" + (last.decode() if isinstance(last, bytes) else str(last))


async def _decode_entries(
    broker: Broker, entries: list[Entry], max_bytes: int
) -> tuple[str | None, list[Published]]:
    missed: list[Published] = []
    size = 0
    for i, (raw_id, fields) in enumerate(entries):
        if i and i % XRANGE_BATCH == 0:
            await asyncio.sleep(0)  # a long replay must not stall live delivery
        try:
            event = decode_stream(fields, broker.cfg.limits.max_event_bytes)
        except Rejected:
            continue  # counted when the reader first saw it
        id = raw_id.decode()
        pub = Published(event, stream_seq(id) or 0, id, 0.0)
        missed.append(pub)
        size += len(pub.frame)
        if size > max_bytes:
            return "expired", []  # more than a replay may hold
    return None, missed
