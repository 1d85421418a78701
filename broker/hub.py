"""The fan-out: channel index, audience filter, one encoding per event.

Where an event goes, in order: :meth:`Hub.publish` gives it the next id and
encodes it once (``Published.frame``, plus the same frame as an HTTP chunk);
it then looks up only the subscribers of its channel, filters them by tenant
and user, and appends the *same* bytes object to each one's pending list.
Once per loop iteration :meth:`Hub.flush` writes every dirty connection's
pending frames in a single ``transport.write``. Nothing here awaits a
connection, so one stalled client cannot hold up the others; a client whose
unsent bytes pass ``write_buffer_bytes`` is aborted as a slow consumer.

This module imports no aiohttp: connections are reached only through
:class:`~broker.connection.Connection`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from broker import sse
from broker.config import Config
from broker.connection import Connection
from broker.envelope import Event, Published
from broker.metrics import Metrics, Stats
from broker.positions import SequenceIds

log = logging.getLogger(__name__)

MAX_UNMATCHED_LOGGED = 1000


def new_epoch() -> str:
    """A fresh epoch per process start: ids of an earlier run never look current."""
    return str(time.time_ns() // 1_000_000)


class Hub:
    """Routes published events to the connections that may see them."""

    def __init__(
        self,
        *,
        stats: Stats,
        metrics: Metrics,
        write_buffer_bytes: int,
        write_timeout: float,
        record: Callable[[Published], None],
        retain: Callable[[Published], None],
        release: Callable[[str], None] | None = None,
        epoch: str | None = None,
    ) -> None:
        self.stats = stats
        # Every event goes to ``record`` (the replay history), retained ones to
        # ``retain`` as well: called here, on the hot path, without a layer between.
        self.record = record
        self.retain = retain
        self.release = release  # told when a channel's last stream leaves (the ingest)
        self.metrics = metrics
        self.write_buffer_bytes = write_buffer_bytes
        self.write_timeout = write_timeout
        self.epoch = epoch or new_epoch()
        # Pub/sub ids (positions.SequenceIds), built here per event from their prefix.
        self._id_prefix = SequenceIds(self.epoch).prefix
        self.seq = 0
        self.head = f"{self._id_prefix}0"  # id of the newest event
        self.connections: set[Connection] = set()
        self._by_channel: dict[str, set[Connection]] = {}
        self._dirty: list[Connection] = []
        self._flush_handle: asyncio.Handle | None = None
        self._batch_started: float | None = None
        self._unmatched: set[str] = set()
        # Cached: checked per event that nobody subscribes to.
        self.log_unmatched = log.isEnabledFor(logging.DEBUG)

    def configure(self, cfg: Config) -> None:
        self.write_buffer_bytes = cfg.limits.write_buffer_bytes
        self.write_timeout = cfg.sse.write_timeout_seconds

    # -- membership -------------------------------------------------------------

    def add(self, conn: Connection) -> None:
        """Subscribe ``conn`` to its channels; frames queue up until it is started."""
        self.connections.add(conn)
        for channel in conn.channels:
            self._by_channel.setdefault(channel, set()).add(conn)
        conn.on_finish = self._unsubscribe
        self.stats.connections_opened += 1

    def remove(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self._unsubscribe(conn)
        self.stats.connections_closed[conn.close_reason or "client_closed"] += 1

    def _unsubscribe(self, conn: Connection) -> None:
        # Also called as the stream finishes: from then on no event is queued
        # to it (or counted as delivered), though its handler still holds it.
        for channel in conn.channels:
            subs = self._by_channel.get(channel)
            if subs is not None:
                subs.discard(conn)
                if not subs:
                    del self._by_channel[channel]
                    if self.release is not None:
                        self.release(channel)

    def subscriptions(self) -> int:
        return sum(len(subs) for subs in self._by_channel.values())

    # -- the hot path -----------------------------------------------------------

    def publish(self, event: Event, position: tuple[int, str] | None = None) -> Published:
        """Give ``event`` its id (the next one, or ``position`` from a stream), record
        it (history, retained state) and queue it to every connection that may see it."""
        if position is None:  # pub/sub: one sequence per process across all channels
            self.seq = seq = self.seq + 1
            id = f"{self._id_prefix}{seq}"
        else:
            seq, id = position
            self.seq = seq
        now = time.monotonic()
        pub = Published(event, seq, id, now)
        self.head = id
        self.stats.events_ingested += 1
        self.record(pub)
        if event.retain is not None:
            self.retain(pub)
        subs = self._by_channel.get(event.channel)
        if subs:
            filtered = (
                event.tenant is not None or event.users is not None or event.socket is not None
            )
            delivered = 0
            frame = pub.frame
            as_chunk = pub.chunk
            for conn in subs:
                if filtered and not conn.may_see(event):
                    continue
                pending = conn.pending
                if not pending and not conn.paused:
                    self._dirty.append(conn)
                pending.append(as_chunk if conn.chunked else frame)
                conn.last_id = id
                delivered += 1
            if delivered:
                self.stats.events_delivered += delivered
                if self._batch_started is None:
                    # Publish time: a stream id carries it (ms); pub/sub
                    # messages do not, so their clock starts at ingest.
                    self._batch_started = time.time() if position is None else (seq >> 64) / 1000
                self._schedule_flush()
        elif self.log_unmatched:
            self._note_unmatched(event.channel)
        return pub

    def _note_unmatched(self, channel: str) -> None:
        # A misconfigured prefix or a typo in a channel name shows up here:
        # events arrive, nobody listens. Each name once, and not forever.
        if channel in self._unmatched or len(self._unmatched) >= MAX_UNMATCHED_LOGGED:
            return
        self._unmatched.add(channel)
        log.debug(
            "event on channel %r matches no open stream (channels with streams: %s)",
            channel,
            ", ".join(sorted(self._by_channel)[:20]) or "none",
        )

    def skip(self) -> None:
        """Burn one position to stand for events lost in an outage (a new head)."""
        self.seq += 1
        self.head = f"{self._id_prefix}{self.seq}"

    def send(self, conn: Connection, frame: bytes) -> None:
        """Queue a connection-specific frame (control event, heartbeat) behind its pending ones."""
        if conn.closed:
            return
        if not conn.pending and not conn.paused:
            self._dirty.append(conn)
            self._schedule_flush()
        conn.pending.append(conn.wrap(frame))

    def start(self, conn: Connection) -> None:
        """End ``conn``'s pause: what queued meanwhile is written at the next flush."""
        conn.paused = False
        if conn.pending:
            self._dirty.append(conn)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write each dirty connection's pending frames in one call."""
        self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        if self._batch_started is not None:
            latency = time.time() - self._batch_started
            self.metrics.publish_latency.observe(max(0.0, latency))
            self._batch_started = None
        limit = self.write_buffer_bytes
        for conn in dirty:
            if self._write_pending(conn) > limit:
                log.debug("slow consumer %s: write buffer over %d bytes", conn.remote, limit)
                self.stats.slow_consumers += 1
                conn.finish("slow_consumer", abort=True)

    def _write_pending(self, conn: Connection) -> int:
        """Write ``conn``'s pending frames in one call; its transport's buffered bytes after."""
        pending = conn.pending
        if not pending or conn.paused or conn.closed:
            return 0
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        conn.events_sent += len(pending)
        pending.clear()
        self.stats.bytes_sent += len(data)
        return conn.write_now(data)

    # -- shared timers ------------------------------------------------------------

    def visit(self, conns: list[Connection]) -> None:
        """The shared timer's round: end each of ``conns`` whose unsent bytes have not
        drained for ``write_timeout``, and heartbeat those that wrote nothing since
        the last visit.

        When the head moved since the connection's last frame, the heartbeat is
        ``id: <head>`` (no data, no event fires): the connection has been sent
        everything up to the head that it may see, so a quiet client always
        holds a recent position to resume from.
        """
        head = self.head
        now = time.monotonic()
        for conn in conns:
            if conn.closed:
                continue
            # The write deadline rides on the same visit: unsent bytes that
            # have not drained for write_timeout mean a dead peer.
            if conn.transport.get_write_buffer_size():
                if conn.stuck_since is None:
                    conn.stuck_since = now
                elif now - conn.stuck_since > self.write_timeout:
                    conn.finish("write_timeout", abort=True)
                    continue
            else:
                conn.stuck_since = None
            if conn.wrote or conn.paused or conn.pending:
                conn.wrote = False
                continue
            if conn.last_id != head:
                conn.last_id = head
                frame = sse.encode_id(head)
            else:
                frame = sse.HEARTBEAT
            # Written now, not queued: a heartbeat is not traffic, so it must
            # not make the next visit think the stream was busy.
            data = conn.wrap(frame)
            self.stats.bytes_sent += len(data)
            conn.write_now(data)
            conn.wrote = False

    def end(self, conn: Connection, reason: str, frame: bytes | None = None) -> None:
        """Close ``conn`` on purpose: its pending frames and ``frame`` go out first.

        A paused stream (its backlog still being written by its handler) gets
        neither: bytes written now would land inside the backlog."""
        if frame is not None:
            self.send(conn, frame)
        self._write_pending(conn)
        conn.finish(reason)
