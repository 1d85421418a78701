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

:class:`Resume` is given exactly what it decides from: the history, the
id scheme (what a ``Last-Event-ID`` names), a source of retained state, and
in stream mode the stream (:class:`StreamLog`); no broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Protocol, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from broker import control, sse
from broker.config import Config
from broker.connection import Connection
from broker.envelope import Published, decode_stream
from broker.errors import Rejected
from broker.history import History, RetainedState
from broker.metrics import Stats
from broker.positions import HOLE, Entry, Scheme, stream_seq
from broker.retained_store import RedisRetained

log = logging.getLogger(__name__)

XRANGE_BATCH = 1000
COUNT_BATCH = 100  # entries per counting call: each holds Redis for about 0.2 ms

# Counts the entries of a range, in Redis: (how many, the last id). The broker
# learns how far back a resume reaches without receiving or parsing a byte of
# it; one call covers at most ARGV[3] entries, so Redis is never blocked long.
_COUNT_RANGE = """
local r = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
if #r == 0 then return {0, ''} end
return {#r, r[#r][1]}
"""


@dataclass(frozen=True)
class StreamLog:
    """The stream behind stream mode, as resume reads it."""

    commands: Callable[[], aioredis.Redis]
    key: str


class StateSource(Protocol):
    """Where retained state comes from (memory, or Redis and memory)."""

    def memory(self, conn: Connection, upto: int) -> list[Published]:
        """What this process holds, visible to ``conn`` at ``upto``."""
        ...

    async def load(self, conn: Connection, upto: int) -> list[Published]:
        """All of it, visible to ``conn`` at ``upto``, in publish order."""
        ...


def _visible(conn: Connection, pub: Published, upto: int) -> bool:
    # Entries past ``upto`` reach the stream live; tombstones only mark deletions.
    return pub.seq <= upto and not pub.event.deletes and conn.may_see(pub.event)


class MemoryState:
    """Pub/sub mode: the retained state this process saw."""

    def __init__(self, retained: RetainedState) -> None:
        self.retained = retained

    def memory(self, conn: Connection, upto: int) -> list[Published]:
        return [
            p for p in self.retained.snapshot(conn.channels, conn.tenant) if _visible(conn, p, upto)
        ]

    async def load(self, conn: Connection, upto: int) -> list[Published]:
        return self.memory(conn, upto)


class StreamState(MemoryState):
    """Stream mode: Redis holds the state from before this process; memory what
    this process read since (possibly not yet written back). Later id wins."""

    def __init__(
        self, retained: RetainedState, stored: RedisRetained, commands: Callable[[], aioredis.Redis]
    ) -> None:
        super().__init__(retained)
        self.stored = stored
        self.commands = commands

    async def load(self, conn: Connection, upto: int) -> list[Published]:
        try:
            stored = await self.stored.load(self.commands(), conn.channels)
        except (RedisError, OSError) as exc:
            log.warning("retained state unavailable from Redis (%s): sending what memory has", exc)
            stored = []
        latest: dict[tuple[str, str | None, str | None], Published] = {}
        for pub in chain(stored, self.retained.snapshot(conn.channels, conn.tenant)):
            event = pub.event
            if event.tenant is not None and event.tenant != conn.tenant:
                continue
            key = (event.channel, event.tenant, event.retain)
            if key not in latest or pub.seq > latest[key].seq:
                latest[key] = pub
        return sorted((p for p in latest.values() if _visible(conn, p, upto)), key=lambda p: p.seq)


class Resume:
    def __init__(
        self,
        *,
        history: History,
        scheme: Scheme,
        state: StateSource,
        stats: Stats,
        settings: Callable[[], Config],
        stream: StreamLog | None = None,
    ) -> None:
        self.history = history
        self.scheme = scheme
        self.state = state
        self.stats = stats
        self.settings = settings  # the current configuration (a reload replaces it)
        self.stream = stream
        self.stream_start = 0  # stream mode: this instance's history begins after it
        # Resume reads go to Redis one call at a time, however many resumes scan:
        # Redis runs commands in turn, so scans in parallel would finish no sooner,
        # while every live XADD and XREAD would queue behind one call per scan.
        self.lane = asyncio.Lock()

    async def backlog(
        self, conn: Connection, last_id: str | None, position: tuple[int, str]
    ) -> list[bytes]:
        """The frames ``conn`` gets before live events, for a stream registered at ``position``."""
        upto, head = position
        frames: list[bytes] = []
        if last_id is not None:
            try:
                reason, missed = await self._resume(conn.channels, last_id, upto, head)
            except (RedisError, OSError) as exc:
                # History in Redis cannot be read now: say so (a reset), do not fail.
                log.warning("resume from Redis failed (%s): sending broker.reset", exc)
                reason, missed = "outage", []
            if reason is None:
                frames = [p.frame for p in missed if conn.may_see(p.event)]
                self.stats.replays_served += 1
                self.stats.events_replayed += len(frames)
                conn.last_id = last_id
                return frames
            self.stats.resets[reason] += 1
            frames.append(control.reset_frame(reason, head, self._retry()))
        return _with_state(conn, head, frames, await self.state.load(conn, upto))

    def gap_frames(self, conn: Connection, reason: str, head: str, upto: int) -> list[bytes]:
        """For an open stream after events were lost: ``broker.reset``, then the retained
        state this process holds in memory."""
        reset = control.reset_frame(reason, head, self._retry())
        return _with_state(conn, head, [reset], self.state.memory(conn, upto))

    def _retry(self) -> int:
        return control.jitter(self.settings().sse.retry_ms)

    def needs_scan(self, channels: tuple[str, ...], last_id: str | None, head: int) -> bool:
        """Whether resuming from ``last_id`` would read the stream from Redis (stream
        mode, a position older than this instance's memory): decided before the
        response starts, so that a resume past ``replay.max_concurrent_scans`` can
        get the retryable refusal instead of a stream."""
        if self.stream is None or last_id is None:
            return False
        seq = self.scheme.parse(last_id)
        if isinstance(seq, str) or seq > head:
            return False  # unknown, or ahead: a catch-up, then memory
        return self._before_memory(channels, seq)

    def _before_memory(self, channels: tuple[str, ...], seq: int) -> bool:
        return seq < self.stream_start or self.history.lost_after(channels, seq) is not None

    async def _resume(
        self, channels: tuple[str, ...], last_id: str, upto: int, upto_id: str
    ) -> tuple[str | None, list[Published]]:
        """(None, missed events) for an exact resume, else (reset reason, [])."""
        seq = self.scheme.parse(last_id)
        if isinstance(seq, str):
            return seq, []
        if seq > upto:
            return "unknown_id", []
        if self.stream is not None and self._before_memory(channels, seq):
            return await self._from_stream(self.stream, channels, last_id, seq, upto_id)
        reason = self.history.lost_after(channels, seq)
        if reason is not None:
            return reason, []
        return None, self.history.since(channels, seq, upto)

    async def _from_stream(
        self, stream: StreamLog, channels: tuple[str, ...], last_id: str, seq: int, upto_id: str
    ) -> tuple[str | None, list[Published]]:
        """Missed events read back from the stream (older than this instance's memory).

        Bounded by ``replay.max_resume_scan`` entries read (of every channel) and
        by ``replay.max_bytes`` kept. Nothing is decoded until the whole range is
        known to fit: a resume from too long ago costs Redis round trips and
        hiredis parsing, not Python work per entry, and the decoding of one that
        fits yields to the loop every batch, so live clients keep their pace.
        """
        cfg = self.settings()
        client, key = stream.commands(), stream.key
        budget = cfg.replay.max_resume_scan  # entries of every channel, read or skipped
        max_bytes = cfg.replay.max_bytes
        if budget == 0 or await trimmed_after(client, key, last_id, seq):
            return "expired", []
        if not await _within(client, self.lane, key, last_id, upto_id, budget):
            # Further back than a resume may read: the honest reset, not a scan
            # of the whole stream on a client's say-so.
            return "expired", []
        wanted = {c.encode() for c in channels}
        kept: list[Entry] = []
        size = 0
        start = "(" + last_id
        while True:
            count = min(XRANGE_BATCH, budget + 1)
            async with self.lane:
                entries = cast(
                    list[Entry],
                    await client.xrange(key, min=start, max=upto_id, count=count),
                )
            budget -= len(entries)
            if budget < 0:
                return "expired", []  # the stream grew past the bound meanwhile
            for entry in entries:
                fields = entry[1]
                if HOLE in fields:
                    return "outage", []  # events were lost in this range (a bridge handover)
                if fields.get(b"channel") in wanted:
                    kept.append(entry)
                    size += sum(len(k) + len(v) for k, v in fields.items())
            if size > max_bytes:
                return "expired", []  # more than a replay may hold
            if len(entries) < count:
                break
            start = "(" + entries[-1][0].decode()
        return await _decode_entries(kept, max_bytes, cfg.limits.max_event_bytes)


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


async def _within(
    client: aioredis.Redis,
    lane: asyncio.Lock,
    key: str,
    last_id: str,
    upto_id: str,
    budget: int,
) -> bool:
    """Whether at most ``budget`` entries lie after ``last_id`` up to ``upto_id``."""
    start = "(" + last_id
    while True:
        count = min(COUNT_BATCH, budget + 1)
        async with lane:
            n, last = await client.eval(_COUNT_RANGE, 1, key, start, upto_id, count)
        budget -= int(n)
        if budget < 0:
            return False
        if int(n) < count:
            return True
        start = "(" + (last.decode() if isinstance(last, bytes) else str(last))


async def _decode_entries(
    entries: list[Entry], max_bytes: int, max_event_bytes: int
) -> tuple[str | None, list[Published]]:
    missed: list[Published] = []
    size = 0
    for i, (raw_id, fields) in enumerate(entries):
        if i and i % XRANGE_BATCH == 0:
            await asyncio.sleep(0)  # a long replay must not stall live delivery
        try:
            event = decode_stream(fields, max_event_bytes)
        except Rejected:
            continue  # counted when the reader first saw it
        id = raw_id.decode()
        pub = Published(event, stream_seq(id) or 0, id, 0.0)
        missed.append(pub)
        size += len(pub.frame)
        if size > max_bytes:
            return "expired", []  # more than a replay may hold
    return None, missed
