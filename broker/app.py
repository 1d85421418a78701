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
import random
import time
from collections.abc import Coroutine
from dataclasses import fields, replace

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from broker import control
from broker.access import Cors, Network
from broker.admission import Admission
from broker.auth import Authenticator
from broker.auth.grants import Grants
from broker.config import Config
from broker.connection import Connection
from broker.envelope import decode_laravel, decode_native, decode_stream
from broker.errors import Rejected
from broker.guard import Guard
from broker.history import History, RetainedState
from broker.hub import Hub, Published
from broker.ingest import CANARY_PREFIX, Dispatcher
from broker.ingest.pubsub import PubSubIngest
from broker.ingest.stream import StreamIngest, stream_seq
from broker.metrics import Metrics, Stats
from broker.policy import Policy
from broker.recheck import Rechecker, still_authorized
from broker.redis_conn import bounded_client, redis_target
from broker.resume import gap_frames
from broker.retained_store import RedisRetained
from broker.scheduler import Deadlines, Periodic, Wheel

log = logging.getLogger(__name__)

CATCH_UP_SECONDS = 2.0
# Re-authorization calls in flight at once: a fraction of what new streams may use.
RECHECK_IN_FLIGHT = 8

# What a reload cannot change under a running process (None: the whole section).
_RESTART_KEYS: dict[str, frozenset[str] | None] = {
    "server": frozenset({"listen", "path", "workers", "header_timeout_seconds"}),
    "admin": None,
    "redis": None,
    "ingest": None,
    "sse": frozenset({"heartbeat_seconds"}),
}


class Broker:
    def __init__(self, cfg: Config) -> None:
        self.stream_mode = cfg.ingest.mode == "stream"
        self.stats = Stats()
        self.metrics = Metrics(self.stats, self._gauges)
        self.policy = Policy.build(cfg, self.stats, self.metrics)
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
            write_timeout=cfg.sse.write_timeout_seconds,
            keep=self.history.append,
            retain=self._retain,
        )
        self.heartbeats = Wheel(cfg.sse.heartbeat_seconds, self.hub.heartbeat)
        self.deadlines = Deadlines(self._deadline)
        self.expiry = Periodic(1.0, self.history.expire)
        self.admission = Admission(cfg.limits, cfg.replay.max_concurrent_scans)
        self.edge: Guard | None = None  # the public listener's guard (server.py)
        self.target = redis_target(cfg.redis)
        self.dispatcher = Dispatcher(
            self.hub.publish,
            stats=self.stats,
            decode=decode_laravel if cfg.ingest.format == "laravel" else decode_native,
            max_event_bytes=cfg.limits.max_event_bytes,
            on_canary=self._on_canary_message,
        )
        self.redis_retained = RedisRetained(cfg.ingest.stream_key)
        self.stream_start = 0  # stream mode: this instance's history begins after it
        self.ingest: PubSubIngest | StreamIngest
        if self.stream_mode:
            self.ingest = StreamIngest(
                # No silent retries: a dead connection must surface at once, so
                # readiness tells the truth and the reader reconnects itself.
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
        self.stalled = False
        self.redis_away = False  # stream mode: the watchdog's probe failed
        self._redis_down = False  # between losing Redis and having it back
        self._probe: aioredis.Redis | None = None
        self.subscribed_once = asyncio.Event()  # set at the first subscription (READY=1)
        self._canary_pending: str | None = None
        self._canary_count = 0
        self._checked_seq = -1
        self._canary_tasks: set[asyncio.Task[None]] = set()
        self._catching_up: list[tuple[int, asyncio.Future[None]]] = []
        self.watchdog = Periodic(float(cfg.ingest.canary_interval_seconds or 1), self._watch)
        self.rechecker = Rechecker(
            float(cfg.auth.recheck_interval_seconds or 600),
            self._recheck,
            max_in_flight=RECHECK_IN_FLIGHT,
        )

    # The current policy's parts (read-only: a reload replaces the policy whole).
    @property
    def cfg(self) -> Config:
        return self.policy.cfg

    @property
    def auth(self) -> Authenticator:
        return self.policy.auth

    @property
    def public(self) -> Grants:
        return self.policy.public

    @property
    def cors(self) -> Cors:
        return self.policy.cors

    @property
    def trusted(self) -> tuple[Network, ...]:
        return self.policy.trusted

    @property
    def publish_keys(self) -> tuple[str, ...]:
        return self.policy.publish_keys

    def redis(self) -> aioredis.Redis:
        """The shared command client (publishing, XRANGE, retained state)."""
        if self._redis is None:
            self._redis = bounded_client(self.target, self.cfg.redis.max_connections)
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
        self._wake_catch_ups()

    async def _after_stream_batch(self) -> None:
        self._wake_catch_ups()
        try:
            await self.redis_retained.flush(self.redis())
        except (RedisError, OSError) as exc:
            log.warning("retained state not written to Redis yet (%s); will retry", exc)

    # -- streams ------------------------------------------------------------------

    async def catch_up(self, last_id: str | None) -> None:
        """Stream mode: a client coming from an instance that read further than
        this one waits (briefly) until this reader reached its position, so
        nothing is replayed twice or skipped. Woken by the reader, not polled."""
        if not self.stream_mode or last_id is None:
            return
        seq = stream_seq(last_id)
        if seq is None or seq <= self.hub.seq:
            return
        if (seq >> 64) > time.time() * 1000 + CATCH_UP_SECONDS * 1000:
            return  # an id from the future: no reader will ever reach it
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (seq, waiter)
        self._catching_up.append(entry)
        try:
            async with asyncio.timeout(CATCH_UP_SECONDS):
                await waiter
        except TimeoutError:
            pass
        finally:
            # Timed out or cancelled (the client left): not woken, so still listed.
            if not waiter.done() or waiter.cancelled():
                waiter.cancel()
                self._catching_up.remove(entry)

    def _wake_catch_ups(self) -> None:
        if not self._catching_up:
            return
        seq = self.hub.seq
        waiting = []
        for entry in self._catching_up:
            if entry[0] <= seq:
                entry[1].set_result(None)
            else:
                waiting.append(entry)
        self._catching_up = waiting

    def register(self, conn: Connection, expires_at: float | None = None) -> tuple[int, str]:
        """Subscribe ``conn`` (paused) and return the position it was registered at.

        From here on every live event queues up on the connection; the backlog
        (replay or snapshot) covers exactly the events up to that position.
        ``expires_at`` (epoch seconds, a token's ``exp``) ends the stream then.
        """
        self.hub.add(conn)
        self.heartbeats.add(conn)
        if conn.credentials is not None:
            self.rechecker.add(conn)
        loop = asyncio.get_running_loop()
        if expires_at is not None:
            # At the same instant admission stops accepting the token (exp +
            # leeway): earlier, a reconnect with that token would be admitted
            # and ended again at once, over and over.
            expires_at += self.cfg.auth.jwt.leeway_seconds
            self.deadlines.add(conn, loop.time() + (expires_at - time.time()), "token_expired")
        age = self.cfg.sse.max_connection_age_seconds
        if age:
            # +-10% so streams opened together (after a deploy) do not all recycle together
            self.deadlines.add(conn, loop.time() + age * random.uniform(0.9, 1.1), "recycle")
        return self.hub.seq, self.hub.head

    def unregister(self, conn: Connection) -> None:
        self.heartbeats.remove(conn)
        self.rechecker.remove(conn)
        self.deadlines.forget(conn)
        self.hub.remove(conn)

    def _deadline(self, conn: Connection, reason: str) -> None:
        retry = control.jitter(self.cfg.sse.retry_ms)
        self.hub.end(conn, reason, control.reconnect_frame(reason, retry, self.hub.head))

    async def _recheck(self, conn: Connection) -> None:
        """Shared timer: end ``conn`` if the app no longer lets it in (callback, laravel)."""
        if self.cfg.auth.recheck_interval_seconds and not await still_authorized(
            self.auth, self.public, conn
        ):
            self.stats.auth_failures["revoked"] += 1
            self._deadline(conn, "revoked")

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
        if not self.ingest.subscribed or self.redis_away:
            return "redis_unavailable" if self._ever_subscribed else "starting"
        if self.stalled:
            return "ingest_stalled"
        return None

    # -- ingest health -------------------------------------------------------------

    @property
    def canary_channel(self) -> str:
        # "!" is outside the channel charset: no client can ever subscribe to
        # it, and it is this process's own (another broker ignores it).
        return f"{CANARY_PREFIX}{self.hub.epoch}"

    def _watch(self) -> None:
        """Shared timer: is the ingest still moving? (A subscription can wedge
        silently while Redis answers PINGs.)"""
        if not self.cfg.ingest.canary_interval_seconds or not self.ingest.subscribed:
            self._canary_pending = None
            return
        if self.stream_mode:
            self._spawn(self._check_stream())
            return
        if self._canary_pending is not None:  # the last canary never came back
            self._stall("the canary published one interval ago never came back")
            return
        self._canary_count += 1
        self._canary_pending = token = str(self._canary_count)
        self._spawn(self._send_canary(token))

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coro)
        self._canary_tasks.add(task)
        task.add_done_callback(self._canary_tasks.discard)

    async def _send_canary(self, token: str) -> None:
        try:
            receivers = await self.redis().publish(
                self.cfg.ingest.prefix + self.canary_channel, token
            )
        except (RedisError, OSError):
            self._canary_pending = None  # Redis itself is away: the ingest will notice
            return
        if receivers == 0 and self._canary_pending == token:
            self._stall("Redis knows no subscription of this broker")

    def _on_canary_message(self, channel: str, payload: bytes) -> None:
        if channel != self.canary_channel:
            return  # another broker's canary
        if payload.decode(errors="replace") == self._canary_pending:
            self._canary_pending = None
            if self.stalled:
                log.info("ingest moving again: canary received")
                self.stalled = False

    async def _check_stream(self) -> None:
        # Its own client, without redis-py's silent retries: a dead Redis shows
        # here within one interval, while the blocked reader may not notice for
        # seconds (its retries are what keeps it reading on without a hole).
        if self._probe is None:
            self._probe = self.target.client(
                retry=Retry(NoBackoff(), 0), socket_timeout=2.0, socket_connect_timeout=1.0
            )
        try:
            info = await self._probe.xinfo_stream(self.cfg.ingest.stream_key)
        except ResponseError:
            info = None  # Redis answers; there is just no stream (yet)
        except (RedisError, OSError, TimeoutError) as exc:
            if not self.redis_away:
                log.warning("redis unreachable from the stream watchdog: %s", exc)
            self.redis_away = True
            self._redis_seen(False)
            return
        if self.redis_away:
            log.info("redis reachable again")
        self.redis_away = False
        self._redis_seen(True)
        if info is None:
            return
        last = stream_seq(bytes(info["last-generated-id"]).decode()) or 0
        position = self.hub.seq
        if last > position and position == self._checked_seq:
            self._stall(f"stream reader stuck at {self.hub.head} while the stream moved on")
        elif self.stalled and position != self._checked_seq:
            log.info("stream reader moving again")
            self.stalled = False
        self._checked_seq = position

    def _stall(self, why: str) -> None:
        log.warning("ingest stalled: %s; resubscribing", why)
        self.stalled = True
        self._canary_pending = None
        self.restart_ingest()

    def restart_ingest(self) -> None:
        """Drop the subscription/reader and build a fresh one (the ingest's own
        reconnect path: outage handling included)."""
        if self._ingest_task is not None:
            self._ingest_task.cancel()
        self._ingest_task = asyncio.create_task(self.ingest.run(), name="ingest")

    def _redis_seen(self, up: bool) -> None:
        """Count a reconnect once per outage, whoever noticed it (the ingest, or in
        stream mode the watchdog: the reader's client may ride out a short one)."""
        if up and self._redis_down:
            self.stats.redis_reconnects += 1
        self._redis_down = not up

    def _on_ingest_state(self, up: bool) -> None:
        if not up:
            self._checked_seq = -1  # progress is judged afresh after the outage
            self._redis_seen(False)
            return
        self.redis_away = False  # the ingest just made a round trip
        self._redis_seen(True)
        self.subscribed_once.set()
        if self._ever_subscribed and not self.stream_mode:  # a stream reader reads on
            self.hub.skip()  # a position standing for the events lost meanwhile
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
            "redis_connected": 1.0 if self.ingest.subscribed and not self.redis_away else 0.0,
            "ingest_stalled": 1.0 if self.stalled else 0.0,
            "history_events": self.history.events,
            "history_bytes": self.history.bytes,
            "retained_keys": self.retained.keys,
            "admission_slots": self.admission.total,
            "deadline_entries": len(self.deadlines) + self.rechecker.pending,
            "catch_up_waiters": len(self._catching_up),
            "pending_connections": self.edge.pending_connections if self.edge else 0,
        }

    # -- reload (SIGHUP) ---------------------------------------------------------------

    def apply(self, new: Config) -> list[str]:
        """Take ``new`` for everything that can change under open streams: auth
        keys and mode, grants, public channels, CORS, trusted proxies, limits,
        publish keys, history bounds, retry and ages of new streams, log level.
        Returns the changed keys that need a restart (listeners, Redis, ingest,
        heartbeat period); those keep their old values. Raises (keeping the
        old configuration whole) when the new one cannot be applied."""
        old = self.cfg
        restart = [
            f"{section}.{f.name}"
            for section, names in _RESTART_KEYS.items()
            for f in fields(getattr(old, section))
            if (names is None or f.name in names)
            and getattr(getattr(old, section), f.name) != getattr(getattr(new, section), f.name)
        ]
        merged = replace(
            new,
            server=replace(
                new.server,
                listen=old.server.listen,
                path=old.server.path,
                workers=old.server.workers,
                header_timeout_seconds=old.server.header_timeout_seconds,
            ),
            admin=old.admin,
            redis=old.redis,
            ingest=old.ingest,
            sse=replace(new.sse, heartbeat_seconds=old.sse.heartbeat_seconds),
        )
        # Build everything that can fail first, then swap: all or nothing.
        policy = Policy.build(merged, self.stats, self.metrics)
        old_auth = self.auth
        self.policy = policy
        auth = policy.auth
        self.hub.write_buffer_bytes = merged.limits.write_buffer_bytes
        self.hub.write_timeout = merged.sse.write_timeout_seconds
        self.history.ttl = merged.replay.ttl_seconds
        self.history.max_events = merged.replay.max_events
        self.history.max_bytes = merged.replay.max_bytes
        self.retained.max_keys = merged.replay.max_retained_keys
        self.retained.max_bytes = merged.replay.max_retained_bytes
        self.dispatcher.max_event_bytes = merged.limits.max_event_bytes
        self.admission.limits = merged.limits
        self.admission.max_scans = merged.replay.max_concurrent_scans
        self.rechecker.interval = float(merged.auth.recheck_interval_seconds or 600)
        self._spawn(old_auth.close())
        # A key taken out of the config is a key no longer trusted: streams
        # it let in end now, not at their token's expiry.
        revoked = [
            c
            for c in self.hub.connections
            if c.auth_key is not None and not auth.verifies(c.auth_key)
        ]
        for conn in revoked:
            self._deadline(conn, "revoked")
        if revoked:
            log.warning("reload: %d streams ended, their JWT key is gone", len(revoked))
        return restart

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._ingest_task = asyncio.create_task(self.ingest.run(), name="ingest")
        self.heartbeats.start()
        self.rechecker.start()
        self.expiry.start()
        self.watchdog.start()

    async def stop(self) -> None:
        self.watchdog.stop()
        for task in list(self._canary_tasks):
            task.cancel()
        self.heartbeats.stop()
        self.rechecker.stop()
        self.deadlines.stop()
        await self.auth.close()
        self.expiry.stop()
        if self._ingest_task is not None:
            self._ingest_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ingest_task
            self._ingest_task = None
        for client in (self._redis, self._probe):
            if client is not None:
                await client.aclose()
        self._redis = self._probe = None
