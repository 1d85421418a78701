"""What the ingest reports, acted on: the one path from Redis to the hub.

:class:`Intake` is the :class:`~broker.ingest.Sink` every ingest feeds.
Pub/sub messages and stream entries are decoded here (invalid ones counted
and logged, never raised) and handed to :meth:`Hub.publish`; connection and
liveness reports go to :class:`~broker.health.Health`; a gap (events lost to
this process) marks the history and tells every open stream of the channels
it touches, at once, with ``broker.reset``. It also holds what waits for the
stream reader (catch-ups) and what the reader owes Redis (retained state).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.config import Config
from broker.envelope import Event, Published, decode_stream
from broker.errors import Rejected
from broker.health import Health
from broker.history import History, RetainedState
from broker.hub import Hub
from broker.metrics import Stats
from broker.positions import HOLE, stream_seq
from broker.resume import Resume
from broker.retained_store import RedisRetained

log = logging.getLogger(__name__)

Decoder = Callable[[str, bytes, int], Event]

CATCH_UP_SECONDS = 2.0


class Retainer:
    """The hub's hook for every event carrying a retained-state key: kept in
    memory (bounded), and in stream mode queued for Redis."""

    def __init__(self, retained: RetainedState, stored: RedisRetained | None) -> None:
        self.retained = retained
        self.stored = stored
        self._next_refusal_log = 0.0

    def __call__(self, pub: Published) -> None:
        if self.stored is not None:
            self.stored.add(pub)
        if self.retained.apply(pub):
            return
        now = time.monotonic()
        if now >= self._next_refusal_log:
            self._next_refusal_log = now + 10.0
            log.warning(
                "retained state full (replay.max_retained_keys = %d, max_retained_bytes = %d):"
                " key %.100r on channel %s not retained",
                self.retained.max_keys,
                self.retained.max_bytes,
                pub.event.retain,
                pub.event.channel,
            )


class Intake:
    def __init__(
        self,
        *,
        hub: Hub,
        history: History,
        health: Health,
        resume: Resume,
        stats: Stats,
        decode: Decoder,
        max_event_bytes: int,
        stored: RedisRetained | None = None,
        commands: Callable[[], aioredis.Redis] | None = None,
        log_interval: float = 10.0,
    ) -> None:
        self.hub = hub
        self.history = history
        self.health = health
        self.resume = resume
        self.stats = stats
        self._decode = decode
        self.max_event_bytes = max_event_bytes
        self.stored = stored  # stream mode: retained state written back to Redis
        self._commands = commands
        self._log_interval = log_interval
        self._next_log = 0.0
        self._suppressed = 0
        self.catching_up: list[tuple[int, asyncio.Future[None]]] = []

    def configure(self, cfg: Config) -> None:
        self.max_event_bytes = cfg.limits.max_event_bytes

    @property
    def streamed(self) -> bool:
        """Events come from a stream (ids are stream ids), not from pub/sub."""
        return self.resume.stream is not None

    # -- events ---------------------------------------------------------------------

    def message(self, channel: str, payload: bytes) -> None:
        try:
            event = self._decode(channel, payload, self.max_event_bytes)
        except Rejected as exc:
            self.reject(channel, exc)
            return
        self.hub.publish(event)

    def entry(self, id: str, fields: dict[bytes, bytes]) -> None:
        if HOLE in fields:  # events were lost before this entry (a bridge handover)
            self.gap("outage", upto=id)
            return
        try:
            event = decode_stream(fields, self.max_event_bytes)
        except Rejected as exc:
            self.reject(fields.get(b"channel", b"?").decode("utf-8", "replace"), exc)
            return
        seq = stream_seq(id)
        assert seq is not None  # Redis only hands out well-formed ids
        self.hub.publish(event, (seq, id))

    def reject(self, channel: str, exc: Rejected) -> None:
        self.stats.events_rejected[exc.code] += 1
        # A broken publisher can send thousands per second: one line per interval.
        now = time.monotonic()
        if now < self._next_log:
            self._suppressed += 1
            return
        more = (
            f" ({self._suppressed} more rejected since the last report)" if self._suppressed else ""
        )
        log.warning("rejected message on channel %.200r: %s%s", channel, exc.message, more)
        self._suppressed = 0
        self._next_log = now + self._log_interval

    def started(self, id: str) -> None:
        seq = stream_seq(id)
        assert seq is not None
        self.hub.head, self.hub.seq = id, seq
        self.resume.stream_start = seq

    async def settle(self) -> None:
        self._wake_catch_ups()
        if self.stored is None or self._commands is None:
            return
        try:
            await self.stored.flush(self._commands())
        except (RedisError, OSError) as exc:
            log.warning("retained state not written to Redis yet (%s); will retry", exc)

    # -- health ---------------------------------------------------------------------

    def connected(self, up: bool) -> None:
        self.health.connected(up)

    def reachable(self, up: bool, detail: str = "") -> None:
        self.health.reachable(up, detail)

    def stalled(self, why: str) -> None:
        self.health.stalled(why)

    def moving(self) -> None:
        self.health.moving()

    # -- gaps -----------------------------------------------------------------------

    def gap(
        self, reason: str, channels: Collection[str] | None = None, upto: str | None = None
    ) -> None:
        """Events were lost to this process: pub/sub, published while it was away
        (a new position stands for them); a stream, trimmed before it read them
        (the head moves to ``upto``, a position a client can resume from).
        Resumes from before the head reset, and every open stream of the
        channels is told now instead of believing it saw everything."""
        hub = self.hub
        if upto is not None:
            seq = stream_seq(upto)
            assert seq is not None
            if seq > hub.seq:
                hub.head, hub.seq = upto, seq
        elif not self.streamed:
            hub.skip()
        head = hub.head
        self.history.mark_hole(hub.seq, channels)
        touched = None if channels is None else set(channels)
        conns = [
            c
            for c in hub.connections
            if not c.closed and (touched is None or not touched.isdisjoint(c.channels))
        ]
        for conn in conns:
            for frame in self.resume.gap_frames(conn, reason, head, hub.seq):
                hub.send(conn, frame)
        self.stats.resets[reason] += len(conns)
        if conns:
            log.warning("sent broker.reset (%s) to %d open streams", reason, len(conns))
        self._wake_catch_ups()

    # -- catching up with the stream reader ---------------------------------------------

    async def catch_up(self, last_id: str | None) -> None:
        """Stream mode: a client coming from an instance that read further than
        this one waits (briefly) until this reader reached its position, so
        nothing is replayed twice or skipped. Woken by the reader, not polled."""
        if not self.streamed or last_id is None:
            return
        seq = stream_seq(last_id)
        if seq is None or seq <= self.hub.seq:
            return
        if (seq >> 64) > time.time() * 1000 + CATCH_UP_SECONDS * 1000:
            return  # an id from the future: no reader will ever reach it
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (seq, waiter)
        self.catching_up.append(entry)
        try:
            async with asyncio.timeout(CATCH_UP_SECONDS):
                await waiter
        except TimeoutError:
            pass
        finally:
            # Timed out or cancelled (the client left): not woken, so still listed.
            if not waiter.done() or waiter.cancelled():
                waiter.cancel()
                self.catching_up.remove(entry)

    def _wake_catch_ups(self) -> None:
        if not self.catching_up:
            return
        seq = self.hub.seq
        waiting = []
        for entry in self.catching_up:
            if entry[0] <= seq:
                entry[1].set_result(None)
            else:
                waiting.append(entry)
        self.catching_up = waiting
