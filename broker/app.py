"""The parts of one broker process, wired together (no HTTP, no signals).

``Broker`` owns the hub, the ingest (pub/sub or stream), history and
retained state, the shared timers and the metrics. The HTTP layer
(``http.py``, ``admin.py``) reaches it through an ``AppKey``; the process
lifecycle (``server.py``) starts and stops it. What a stream gets before its
live events (replay, reset, retained state) is decided in ``resume.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker import control
from broker.access import Cors, trusted_networks
from broker.auth.factory import build_authenticator
from broker.auth.grants import Grants
from broker.config import Config
from broker.connection import Connection
from broker.envelope import decode_native, decode_stream
from broker.errors import Rejected, Retryable
from broker.history import History, RetainedState
from broker.hub import Hub, Published
from broker.ingest import Dispatcher
from broker.ingest.pubsub import PubSubIngest
from broker.ingest.stream import StreamIngest, stream_seq
from broker.metrics import Metrics, Stats
from broker.publish import load_publish_keys
from broker.redis_conn import redis_target
from broker.resume import gap_frames
from broker.retained_store import RedisRetained
from broker.scheduler import Deadlines, Periodic, Wheel

log = logging.getLogger(__name__)

CATCH_UP_SECONDS = 2.0


class Broker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stream_mode = cfg.ingest.mode == "stream"
        self.stats = Stats()
        self.metrics = Metrics(self.stats, self._gauges)
        self.history = History(
            ttl_seconds=cfg.replay.ttl_seconds,
            max_events=cfg.replay.max_events,
            max_bytes=cfg.replay.max_bytes,
        )
        self.retained = RetainedState(
            max_keys=cfg.replay.max_retained_keys,
            max_bytes=cfg.replay.max_retained_bytes,
            tombstones=self.stream_mode,
        )
        self.hub = Hub(
            stats=self.stats,
            metrics=self.metrics,
            write_buffer_bytes=cfg.limits.write_buffer_bytes,
            keep=self.history.append,
            retain=self._retain,
        )
        self.heartbeats = Wheel(cfg.sse.heartbeat_seconds, self.hub.heartbeat)
        self.deadlines = Deadlines(self._deadline)
        self.expiry = Periodic(1.0, self.history.expire)
        self.public = Grants.compile(cfg.auth.effective_public_channels)
        self.auth = build_authenticator(cfg, self.stats, self.metrics)
        self.cors = Cors(cfg.server.cors_origins)
        self.trusted = trusted_networks(cfg.server.trusted_proxies)
        self.per_tenant: Counter[str] = Counter()
        self.per_ip: Counter[str] = Counter()
        self.target = redis_target(cfg.redis)
        self.publish_keys = load_publish_keys(cfg)
        self.dispatcher = Dispatcher(
            self.hub.publish,
            stats=self.stats,
            decode=decode_native,
            max_event_bytes=cfg.limits.max_event_bytes,
        )
        self.redis_retained = RedisRetained(cfg.ingest.stream_key)
        self.stream_start = 0  # stream mode: this instance's history begins after it
        self.ingest: PubSubIngest | StreamIngest
        if self.stream_mode:
            self.ingest = StreamIngest(
                lambda: self.target.client(socket_keepalive=True),
                cfg.ingest.stream_key,
                self._on_stream_entry,
                self._on_stream_start,
                self._after_stream_batch,
                self._on_ingest_state,
                self._on_stream_gap,
            )
        else:
            self.ingest = PubSubIngest(
                self.target, cfg.ingest.prefix, self.dispatcher.on_message, self._on_ingest_state
            )
        self._redis: aioredis.Redis | None = None
        self.draining = False
        self._ingest_task: asyncio.Task[None] | None = None
        self._ever_subscribed = False
        self._next_refusal_log = 0.0

    def redis(self) -> aioredis.Redis:
        """The shared command client (publishing, XRANGE, retained state)."""
        if self._redis is None:
            self._redis = self.target.client()
        return self._redis

    # -- events in ----------------------------------------------------------------

    def _retain(self, pub: Published) -> None:
        if self.stream_mode:
            self.redis_retained.add(pub)
        if self.retained.apply(pub):
            return
        event = pub.event
        self.stats.retained_refused += 1
        now = time.monotonic()
        if now >= self._next_refusal_log:
            self._next_refusal_log = now + 10.0
            log.warning(
                "retained state full (replay.max_retained_keys = %d, max_retained_bytes = %d):"
                " key %.100r on channel %s not retained",
                self.retained.max_keys,
                self.retained.max_bytes,
                event.retain,
                event.channel,
            )

    def _on_stream_entry(self, id: str, fields: dict[bytes, bytes]) -> None:
        try:
            event = decode_stream(fields, self.cfg.limits.max_event_bytes)
        except Rejected as exc:
            self.dispatcher.reject(fields.get(b"channel", b"?").decode("utf-8", "replace"), exc)
            return
        seq = stream_seq(id)
        assert seq is not None  # Redis only hands out well-formed ids
        self.hub.publish(event, (seq, id))

    def _on_stream_start(self, last_id: str) -> None:
        seq = stream_seq(last_id)
        assert seq is not None
        self.hub.head, self.hub.seq = last_id, seq
        self.stream_start = seq

    def _on_stream_gap(self, deleted: str) -> None:
        # Entries up to ``deleted`` are gone unread: the head moves there (a
        # position a client can resume from) and everyone before it resets.
        seq = stream_seq(deleted)
        assert seq is not None
        if seq > self.hub.seq:
            self.hub.head, self.hub.seq = deleted, seq
        self._mark_gap("expired")

    async def _after_stream_batch(self) -> None:
        try:
            await self.redis_retained.flush(self.redis())
        except (RedisError, OSError) as exc:
            log.warning("retained state not written to Redis yet (%s); will retry", exc)

    # -- streams ------------------------------------------------------------------

    async def catch_up(self, last_id: str | None) -> None:
        """Stream mode: a client coming from an instance that read further than
        this one waits (briefly) until this reader reached its position, so
        nothing is replayed twice or skipped."""
        if not self.stream_mode or last_id is None:
            return
        seq = stream_seq(last_id)
        if seq is None or seq <= self.hub.seq:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CATCH_UP_SECONDS):
                # A rare path (cross-instance resume), bounded: polling beats
                # a waiter check on every published event.
                while self.hub.seq < seq:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)

    def check_limits(self, tenant: str | None, ip: str) -> None:
        """Raise the retryable 429 when a connection limit is reached (limits are per process)."""
        limits = self.cfg.limits
        hit = None
        if 0 < limits.max_connections <= len(self.hub.connections):
            hit = "limits.max_connections"
        elif tenant and 0 < limits.max_connections_per_tenant <= self.per_tenant[tenant]:
            hit = "limits.max_connections_per_tenant"
        elif ip and 0 < limits.max_connections_per_ip <= self.per_ip[ip]:
            hit = "limits.max_connections_per_ip"
        if hit is not None:
            raise Retryable(
                f"{hit} reached", code="too_many_connections", status=429, reason="limit"
            )

    def register(self, conn: Connection, expires_at: float | None = None) -> tuple[int, str]:
        """Subscribe ``conn`` (paused) and return the position it was registered at.

        From here on every live event queues up on the connection; the backlog
        (replay or snapshot) covers exactly the events up to that position.
        ``expires_at`` (epoch seconds, a token's ``exp``) ends the stream then.
        """
        self.hub.add(conn)
        self.heartbeats.add(conn)
        if conn.tenant:
            self.per_tenant[conn.tenant] += 1
        self.per_ip[conn.remote] += 1
        if expires_at is not None:
            loop = asyncio.get_running_loop()
            self.deadlines.add(conn, loop.time() + (expires_at - time.time()), "token_expired")
        return self.hub.seq, self.hub.head

    def unregister(self, conn: Connection) -> None:
        self.heartbeats.remove(conn)
        self.hub.remove(conn)
        for counter, key in ((self.per_tenant, conn.tenant), (self.per_ip, conn.remote)):
            if key is not None:
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]

    def _deadline(self, conn: Connection, reason: str) -> None:
        retry = control.jitter(self.cfg.sse.retry_ms)
        self.hub.end(conn, reason, control.reconnect_frame(reason, retry, self.hub.head))

    def disconnect(self, *, user: str | None, tenant: str | None) -> int:
        """Close the streams of a user and/or tenant now (logout, revoked tenant)."""
        doomed = [
            c
            for c in self.hub.connections
            if (user is None or c.user == user) and (tenant is None or c.tenant == tenant)
        ]
        for conn in doomed:
            self._deadline(conn, "revoked")
        return len(doomed)

    # -- readiness ----------------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        """None when ready to serve streams, else why not (for /readyz and refusals)."""
        if self.draining:
            return "draining"
        if not self.ingest.subscribed:
            return "redis_unavailable" if self._ever_subscribed else "starting"
        return None

    def _on_ingest_state(self, up: bool) -> None:
        if not up:
            return
        if self._ever_subscribed:
            self.stats.redis_reconnects += 1
            if not self.stream_mode:  # a stream reader reads on: no hole
                self.hub.skip()  # a position standing for the lost events
                self._mark_gap("outage")
        self._ever_subscribed = True

    def _mark_gap(self, reason: str) -> None:
        # Events were lost to this process up to the head (pub/sub: published
        # while we were away; stream: trimmed before we read them). Resumes
        # from before the head reset, and every open stream is told now
        # instead of believing it saw everything.
        head = self.hub.head
        self.history.mark_hole(self.hub.seq)
        conns = [c for c in self.hub.connections if not c.closed]
        for conn in conns:
            for frame in gap_frames(self, conn, reason, head):
                self.hub.send(conn, frame)
        self.stats.resets[reason] += len(conns)
        if conns:
            log.warning("sent broker.reset (%s) to %d open streams", reason, len(conns))

    def _gauges(self) -> dict[str, float]:
        return {
            "connections": len(self.hub.connections),
            "subscriptions": self.hub.subscriptions(),
            "redis_connected": 1.0 if self.ingest.subscribed else 0.0,
            "history_events": self.history.events,
            "history_bytes": self.history.bytes,
            "retained_keys": self.retained.keys,
        }

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._ingest_task = asyncio.create_task(self.ingest.run(), name="ingest")
        self.heartbeats.start()
        self.expiry.start()

    async def stop(self) -> None:
        self.heartbeats.stop()
        self.deadlines.stop()
        await self.auth.close()
        self.expiry.stop()
        if self._ingest_task is not None:
            self._ingest_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ingest_task
            self._ingest_task = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
