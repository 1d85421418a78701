"""Bridge mode: plain PUBLISH in, a Redis stream out, exact resume on any process.

(Over 400 lines on purpose: the relay's lease, buffer and appends are one state
machine — who holds the lease decides what is appended and what is buffered —
and split apart each half would reach into the other's fields.)

Every process of the fleet reads the stream exactly as in stream mode (the
:class:`~broker.ingest.stream.StreamIngest` half) and listens to pub/sub (the
:class:`Relay` half). One of them — the holder of a lease in Redis — appends
every message it hears to the stream; the others keep the last seconds of
messages in a buffer, to take over without a loss when the holder goes.

- **Fenced appends.** The lease value is ``<fence>:<instance>``, the fence a
  counter incremented at every takeover; each batch is appended by one
  script that first checks the lease still holds this value, on the
  stream's own Redis. A leader paused past its lease appends nothing more.
- **Handover.** Every entry carries a digest of its message (channel and
  payload). Pub/sub delivers messages to every subscriber in the same order,
  so a standby's buffer is the same sequence the leader saw; the new leader
  finds the one place where the stream's last entries' digests match its
  buffer and appends what follows. When it cannot — no place or several
  (repeated payloads), or a buffer that does not reach back far enough — it
  appends a *hole marker* first: every process turns it into
  ``broker.reset`` (``outage``) for open streams and for resumes across it.
- **Trimming.** Appends trim entries older than ``replay.ttl_seconds``, as
  publishers do in stream mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from broker.envelope import DECODERS, encode_stream
from broker.errors import Rejected
from broker.ingest import (
    Backoff,
    Context,
    ReadsEveryChannel,
    Sink,
    Sources,
    raise_if_cancelled,
)
from broker.ingest.pubsub import PubSubIngest
from broker.ingest.stream import StreamIngest
from broker.metrics import Stats
from broker.positions import HOLE, Entry, StreamIds, split_stream_ms

log = logging.getLogger(__name__)

Fields = dict[str, str]

BATCH = 200  # messages per append script call
TAIL = 64  # stream entries read back at a takeover to find the place

# Appends a batch if the lease still holds ARGV[1]; trims by MINID ARGV[2]
# (empty: no trim). Each entry: a field count, then field/value pairs.
_APPEND = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER the bridge lease is held by another process')
end
local ids = {}
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local args = {'XADD', KEYS[1]}
  if ARGV[2] ~= '' then
    args[#args + 1] = 'MINID'
    args[#args + 1] = '~'
    args[#args + 1] = ARGV[2]
  end
  args[#args + 1] = '*'
  for j = i + 1, i + 2 * n do args[#args + 1] = ARGV[j] end
  ids[#ids + 1] = redis.call(unpack(args))
  i = i + 1 + 2 * n
end
return ids
"""

# Takes the lease when nobody holds it: a new fence, the value returned.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local fence = redis.call('INCR', KEYS[2])
local value = fence .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""

# Renews (ARGV[2] > 0) or gives up (ARGV[2] == 0) the lease if still ours.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1
"""


def digest(channel: str, payload: bytes) -> str:
    """What identifies a message across processes (its channel and bytes)."""
    return hashlib.blake2b(channel.encode() + b"\0" + payload, digest_size=8).hexdigest()


class Buffered:
    __slots__ = ("at", "digest", "fields", "size")

    def __init__(self, digest: str, fields: Fields, at: float, size: int) -> None:
        self.digest = digest
        self.fields = fields
        self.at = at
        self.size = size


def place(tail: list[str], buffer: list[str]) -> list[int]:
    """Where in ``buffer`` (digests, oldest first) the stream's ``tail`` (digests,
    newest first) ends: every index ``p`` with ``buffer[p - j] == tail[j]`` for
    each ``j`` the two overlap."""
    found = []
    for p in range(len(buffer) - 1, -1, -1):
        if buffer[p] != tail[0]:
            continue
        if all(buffer[p - j] == tail[j] for j in range(1, min(len(tail), p + 1))):
            found.append(p)
    return found


class Relay(ReadsEveryChannel):
    """The pub/sub half: listens everywhere, appends where it holds the lease."""

    def __init__(self, context: Context, decode: Callable[[str, bytes, int], Fields]) -> None:
        cfg = context.cfg
        self.cfg = cfg
        self.stats: Stats = context.stats
        self.stream_key = cfg.ingest.stream_key
        self.lease_key = f"{self.stream_key}:bridge:lease"
        self.fence_key = f"{self.stream_key}:bridge:fence"
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{context.epoch}"
        self.lease_ms = int(cfg.ingest.bridge_lease_seconds * 1000)
        self.window = float(cfg.ingest.bridge_buffer_seconds)
        self.max_buffered = cfg.ingest.bridge_buffer_events
        # Bytes too: a flood of large messages must not hold gigabytes. The
        # replay history's bound is the measure of what a broker may keep.
        self.max_buffered_bytes = cfg.replay.max_bytes
        self.buffered_bytes = 0
        self._decode = decode
        self._commands = context.commands
        self.subscription = PubSubIngest(
            context.target, cfg.ingest.prefix, context.epoch, context.commands
        )
        self.buffer: deque[Buffered] = deque()
        self.overflowed = False  # a message left the buffer before its time
        self.since: float | None = None  # listening without a break since (monotonic)
        self.lease: str | None = None  # the lease value while this process leads
        self.pending: list[Fields] = []
        self.pending_since: float | None = None
        self._hole_owed = False
        self._flushing: asyncio.Task[None] | None = None
        self._sink: Sink | None = None
        self._wake = asyncio.Event()  # try for the lease now (just subscribed)
        self._append: AsyncScript | None = None
        self._next_complaint = 0.0
        self._closing = False

    # -- the Ingest interface (the reader half serves clients) --------------------------

    scheme = StreamIds()

    @property
    def subscribed(self) -> bool:
        return self.subscription.subscribed

    async def run(self, sink: Sink) -> None:
        self._sink = sink
        async with asyncio.TaskGroup() as group:
            group.create_task(self.subscription.run(_Listener(self, sink)))
            group.create_task(self._hold_lease())

    async def check(self, sink: Sink) -> None:
        await self.subscription.check(sink)

    def closing(self) -> bool:
        return self._closing

    async def close(self) -> None:
        self._closing = True  # and never take the lease again
        if self.lease is not None:
            try:
                await self._commands().eval(_RENEW, 1, self.lease_key, self.lease, 0)
                log.info("bridge lease given up")
            except (RedisError, OSError):
                pass
            self.lease = None

    def gauges(self) -> dict[str, float]:
        lag = time.monotonic() - self.pending_since if self.pending_since is not None else 0.0
        return {"bridge_leader": 1.0 if self.lease else 0.0, "bridge_lag_seconds": lag}

    # -- messages -------------------------------------------------------------------------

    def heard(self, channel: str, payload: bytes) -> None:
        try:
            fields = self._decode(channel, payload, self.cfg.limits.max_event_bytes)
        except Rejected as exc:
            if self._sink is not None and self.lease is not None:
                self._sink.reject(channel, exc)  # counted once, by the leader
            return
        fields["digest"] = digest(channel, payload)
        now = time.monotonic()
        buffer = self.buffer
        size = len(payload) + len(channel) + 64
        buffer.append(Buffered(fields["digest"], fields, now, size))
        self.buffered_bytes += size
        cutoff = now - self.window
        while buffer and (
            buffer[0].at < cutoff
            or len(buffer) > self.max_buffered
            or self.buffered_bytes > self.max_buffered_bytes
        ):
            if buffer[0].at >= cutoff:
                self.overflowed = True  # left before its time: the buffer has a hole
            self.buffered_bytes -= buffer.popleft().size
        if self.lease is not None:
            self._queue([fields])

    def connected(self, up: bool) -> None:
        # A break in listening: what was published meanwhile is not in the
        # buffer, so it can no longer vouch for a sequence across the break.
        self.buffer.clear()
        self.buffered_bytes = 0
        self.overflowed = False
        self.since = time.monotonic() if up else None
        if up:
            self._wake.set()

    def lost_messages(self) -> None:
        """The subscription came back after a loss: what was published meanwhile is
        lost to every listener; the leader says so in the stream."""
        if self.lease is not None:
            self._hole_owed = True
            self._queue([])

    # -- appending ----------------------------------------------------------------------------

    def _queue(self, entries: list[Fields]) -> None:
        if not self.pending and self.pending_since is None:
            self.pending_since = time.monotonic()
        pending = self.pending
        pending.extend(entries)
        excess = len(pending) - self.max_buffered
        if excess > 0:
            # Redis has not taken appends for a while: what cannot be held is
            # lost, and the stream will say so.
            del pending[:excess]
            self._hole_owed = True
            self._complain(f"{excess} messages dropped: appends are failing")
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="bridge-append")

    def _complain(self, what: str) -> None:
        now = time.monotonic()
        if now >= self._next_complaint:
            self._next_complaint = now + 10.0
            log.warning("bridge: %s", what)

    async def _flush(self) -> None:
        client = self._commands()
        append = self._append
        if append is None:
            append = self._append = client.register_script(_APPEND)
        backoff = Backoff()
        while (self.pending or self._hole_owed) and self.lease is not None:
            raise_if_cancelled()
            batch: list[Fields] = []
            if self._hole_owed:
                batch.append({HOLE.decode(): "outage"})
            batch.extend(self.pending[: BATCH - len(batch)])
            args: list[str | int] = [self.lease, self._min_id()]
            for fields in batch:
                args.append(len(fields))
                for k, v in fields.items():
                    args += (k, v)
            try:
                await append(keys=[self.stream_key, self.lease_key], args=args)
            except ResponseError as exc:
                if "NOTLEADER" in str(exc):
                    self._lost_lease("the lease moved to another process")
                    return
                self._complain(f"append refused by Redis ({exc}); retrying")
                await backoff.wait()
                continue
            except (RedisError, OSError) as exc:
                self._complain(f"append failed ({exc}); retrying")
                await backoff.wait()
                continue
            backoff.reset()
            if self._hole_owed:
                self._hole_owed = False
                self.stats.bridge_holes += 1
                batch = batch[1:]
            del self.pending[: len(batch)]
            self.stats.bridge_appended += len(batch)
        self.pending_since = time.monotonic() if self.pending else None

    def _min_id(self) -> str:
        ttl = self.cfg.replay.ttl_seconds
        return f"{int((time.time() - ttl) * 1000)}-0" if ttl else ""

    # -- the lease ------------------------------------------------------------------------------

    async def _hold_lease(self) -> None:
        period = self.lease_ms / 3000
        while True:
            raise_if_cancelled()
            try:
                if self.lease is None:
                    await self._try_take()
                else:
                    await self._renew()
            except (RedisError, OSError) as exc:
                log.debug("bridge lease: %s", exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await self._wake.wait()

    async def _renew(self) -> None:
        assert self.lease is not None
        ok = await self._commands().eval(_RENEW, 1, self.lease_key, self.lease, self.lease_ms)
        if ok:
            self.stats.bridge_renewals += 1
        else:
            self._lost_lease("its lease expired")

    def _lost_lease(self, why: str) -> None:
        if self.lease is None:
            return
        log.warning("bridge: no longer appending (%s)", why)
        self.lease = None
        self.pending.clear()  # the new leader appends them from its own buffer
        self.pending_since = None
        self._hole_owed = False

    async def _try_take(self) -> None:
        if self.since is None or self.closing():
            return  # not listening (could not append what it does not hear), or stopping
        client = self._commands()
        value = await client.eval(
            _ACQUIRE, 2, self.lease_key, self.fence_key, self.instance, self.lease_ms
        )
        if not value:
            return
        lease = value.decode() if isinstance(value, bytes) else str(value)
        await self._durable(client)
        tail = cast(list[Entry], await client.xrevrange(self.stream_key, "+", "-", count=TAIL))
        try:
            info = await client.xinfo_stream(self.stream_key)
            # The last id ever appended, even when trimming has emptied the stream.
            newest_ms = split_stream_ms(bytes(info["last-generated-id"]).decode())
        except ResponseError:
            newest_ms = 0  # no stream yet
        now_s, now_us = await client.time()
        if self.closing():  # stopping meanwhile: hand the lease straight back
            await client.eval(_RENEW, 1, self.lease_key, lease, 0)
            return
        first = lease.startswith("1:")  # the first lease ever: nobody appended before
        # No await from here on: the buffer is read at one instant, and every
        # message heard after it is queued by ``heard`` once the lease is set.
        entries, hole = self._handover(tail, newest_ms, now_s * 1000 + now_us // 1000, first=first)
        self.stats.bridge_takeovers += 1
        self.lease = lease
        self._hole_owed = hole
        # A takeover that loses nothing is routine (every deploy makes one): the
        # metric counts it; only a hole is worth a warning.
        log.log(
            logging.WARNING if hole else logging.INFO,
            "bridge: took the lease (%s); appending %d buffered messages%s",
            lease,
            len(entries),
            " after a hole marker: streams across it reset" if hole else "",
        )
        self._queue(entries)

    async def _durable(self, client: aioredis.Redis) -> None:
        # The lease (and its fence) reaches a replica before anything is
        # appended under it: a failover right after cannot bring back the old
        # holder's lease.
        info = await client.info("replication")
        replicas = int(info.get("connected_slaves", 0))
        if replicas:
            await client.wait(1, 500)

    def _handover(
        self, tail: list[Entry], newest_ms: int, now_ms: int, *, first: bool = False
    ) -> tuple[list[Fields], bool]:
        """What the new leader appends from its buffer, and whether a hole marker
        must go first (``tail``: the stream's last entries, newest first;
        ``newest_ms``: the time of the last id it ever generated; ``now_ms``:
        Redis's clock; ``first``: the first lease ever taken)."""
        buffered = list(self.buffer)
        digests = [b.digest for b in buffered]
        marks = [f[b"digest"].decode() for _, f in tail if b"digest" in f]
        if marks:
            found = place(marks, digests)
            if found:
                # One place, with the whole tail matched: what follows is exactly
                # what was not appended. Several places (repeated payloads), or a
                # match the buffer only partly reaches back over, cannot prove
                # that: resume after the newest place, behind a hole marker.
                proven = len(found) == 1 and found[0] + 1 >= len(marks)
                return [b.fields for b in buffered[found[0] + 1 :]], not proven
        # No entry of the stream is in the buffer. That is no loss only when the
        # newest entry is older than anything the buffer may hold and the
        # buffer holds everything heard since: then all of it is new.
        if first and newest_ms == 0:
            return [b.fields for b in buffered], False  # the first lease, no stream: nothing before
        heard_for = time.monotonic() - self.since if self.since is not None else 0.0
        whole = heard_for >= self.window and not self.overflowed
        old_enough = now_ms - newest_ms > self.window * 1000
        return [b.fields for b in buffered], not (whole and old_enough)


class _Listener:
    """The relay's sink for its pub/sub subscription: messages go to the relay;
    health goes on to the broker's sink."""

    def __init__(self, relay: Relay, sink: Sink) -> None:
        self._relay = relay
        self._sink = sink
        self.message = relay.heard
        self.reject = sink.reject
        self.reachable = sink.reachable
        self.stalled = sink.stalled
        self.moving = sink.moving

    def connected(self, up: bool) -> None:
        self._relay.connected(up)
        self._sink.connected(up)

    def gap(
        self, reason: str, channels: Collection[str] | None = None, upto: str | None = None
    ) -> None:
        self._relay.lost_messages()

    def entry(self, id: str, fields: dict[bytes, bytes]) -> None:
        raise AssertionError("a pub/sub subscription reads no stream")

    def started(self, id: str) -> None:
        raise AssertionError("a pub/sub subscription reads no stream")

    async def settle(self) -> None:
        return None


class Bridge(Sources):
    """The two halves as one ingest: clients are served from the stream."""

    def __init__(self, reader: StreamIngest, relay: Relay) -> None:
        super().__init__(reader, relay)
        self.relay = relay


def build(context: Context) -> Bridge:
    decode = DECODERS[context.cfg.ingest.format]

    def to_fields(channel: str, payload: bytes, max_bytes: int) -> Fields:
        return encode_stream(decode(channel, payload, max_bytes))

    reader = StreamIngest(context.target, context.cfg.ingest.stream_key)
    return Bridge(reader, Relay(context, to_fields))
