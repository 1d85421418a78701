"""The parts of one broker process, wired together (no HTTP, no signals).

``Broker`` builds the parts and runs their lifecycle; each part does one job:

- ``ingest`` (:mod:`broker.ingest`, one module per mode) reads Redis and
  reports to ``intake`` (:mod:`broker.intake`), the one decode path into
  ``hub`` (:mod:`broker.hub`, the fan-out), which records into ``history``
  and ``retained``;
- ``health`` (:mod:`broker.health`) is the ingest's state, and readiness;
- ``resume`` (:mod:`broker.resume`) decides what a stream gets before its
  live events;
- ``admission`` (:mod:`broker.admission`) reserves a stream's share of the
  limits; ``streams`` (:mod:`broker.streams`) looks after open streams;
- ``policy`` (:mod:`broker.policy`) is what a reload replaces, whole.

The HTTP layer (``http.py``, ``admin.py``) reaches the parts through an
``AppKey``; the process lifecycle (``server.py``) starts and stops them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import fields, replace

import redis.asyncio as aioredis

from broker.access import Cors, Network
from broker.admission import Admission
from broker.auth import Authenticator
from broker.auth.grants import Grants
from broker.config import Config
from broker.envelope import DECODERS
from broker.guard import Guard
from broker.health import Health
from broker.history import History, RetainedState
from broker.hub import Hub, new_epoch
from broker.ingest import Context, build
from broker.intake import Intake, Retainer
from broker.metrics import Metrics, Stats
from broker.policy import Policy
from broker.redis_conn import bounded_client, redis_target
from broker.resume import MemoryState, Resume, StateSource, StreamLog, StreamState
from broker.retained_store import RedisRetained
from broker.scheduler import Periodic
from broker.streams import Streams

log = logging.getLogger(__name__)

STOP_SECONDS = 5.0  # how long a cancelled ingest may take to end

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
        self.stats = Stats()
        self.metrics = Metrics(self.stats, self._gauges)
        self.policy = Policy.build(cfg, self.stats, self.metrics)
        self.target = redis_target(cfg.redis)
        self._redis: aioredis.Redis | None = None
        self.history = History(
            ttl_seconds=cfg.replay.ttl_seconds,
            max_events=cfg.replay.max_events,
            max_bytes=cfg.replay.max_bytes,
        )
        epoch = new_epoch()
        self.ingest = build(Context(cfg, self.target, self.redis, epoch, self.stats))
        stored = RedisRetained(self.ingest.stream_key) if self.ingest.stream_key else None
        self.retained = RetainedState(
            max_keys=cfg.replay.max_retained_keys,
            max_bytes=cfg.replay.max_retained_bytes,
            stats=self.stats,
            tombstones=stored is not None,
        )
        self.hub = Hub(
            stats=self.stats,
            metrics=self.metrics,
            write_buffer_bytes=cfg.limits.write_buffer_bytes,
            write_timeout=cfg.sse.write_timeout_seconds,
            record=self.history.append,
            retain=Retainer(self.retained, stored),
            release=self.ingest.release,
            epoch=epoch,
        )
        state: StateSource = (
            StreamState(self.retained, stored, self.redis)
            if stored is not None
            else MemoryState(self.retained)
        )
        self.resume = Resume(
            history=self.history,
            scheme=self.ingest.scheme,
            state=state,
            stats=self.stats,
            settings=lambda: self.cfg,
            stream=StreamLog(self.redis, self.ingest.stream_key)
            if self.ingest.stream_key
            else None,
        )
        self.health = Health(self.stats, self.restart_ingest)
        self.intake = Intake(
            hub=self.hub,
            history=self.history,
            health=self.health,
            resume=self.resume,
            stats=self.stats,
            decode=DECODERS[cfg.ingest.format],
            max_event_bytes=cfg.limits.max_event_bytes,
            stored=stored,
            commands=self.redis,
        )
        self.admission = Admission(cfg.limits, cfg.replay.max_concurrent_scans)
        self.streams = Streams(self.hub, self.stats, lambda: self.policy)
        self.edge: Guard | None = None  # the public listener's guard (server.py)
        self.expiry = Periodic(1.0, self.history.expire)
        self.watchdog = Periodic(float(cfg.ingest.canary_interval_seconds or 1), self._check)
        self.draining = False
        self._ingest_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

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
        """The shared command client (publishing, XRANGE, retained state, canaries)."""
        if self._redis is None:
            self._redis = bounded_client(self.target, self.cfg.redis.max_connections)
        return self._redis

    def not_ready_reason(self) -> str | None:
        """None when ready to serve streams, else why not (for /readyz and refusals)."""
        return "draining" if self.draining else self.health.reason()

    # -- the ingest ---------------------------------------------------------------

    def _check(self) -> None:
        """Shared timer: is the ingest still moving? (A subscription can wedge
        silently while Redis answers PINGs.)"""
        if self.cfg.ingest.canary_interval_seconds:
            self._spawn(self.ingest.check(self.intake))

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def restart_ingest(self) -> None:
        """Drop the subscription/reader and build a fresh one (the ingest's own
        reconnect path: outage handling included)."""
        old = self._ingest_task
        self._ingest_task = asyncio.create_task(self._run_ingest(old), name="ingest")

    async def _run_ingest(self, old: asyncio.Task[None] | None) -> None:
        # The old run ends before the new one starts: the same reader object
        # must never read twice at once (events would be delivered twice).
        if old is not None:
            await _finish(old)
        await self.ingest.run(self.intake)

    def _gauges(self) -> dict[str, float]:
        return {
            "connections": len(self.hub.connections),
            "subscriptions": self.hub.subscriptions(),
            "redis_connected": 1.0 if self.ingest.subscribed and self.health.reading else 0.0,
            "ingest_stalled": 1.0 if self.health.reason() == "ingest_stalled" else 0.0,
            "history_events": self.history.events,
            "history_bytes": self.history.bytes,
            "retained_keys": self.retained.keys,
            "admission_slots": self.admission.total,
            "deadline_entries": self.streams.timed,
            "catch_up_waiters": len(self.intake.catching_up),
            "pending_connections": self.edge.pending_connections if self.edge else 0,
            **self.ingest.gauges(),
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
        for part in (
            self.hub,
            self.history,
            self.retained,
            self.intake,
            self.admission,
            self.streams,
        ):
            part.configure(merged)
        self._spawn(old_auth.close())
        # A key taken out of the config is a key no longer trusted: streams
        # it let in end now, not at their token's expiry.
        revoked = self.streams.revoke_unverified()
        if revoked:
            log.warning("reload: %d streams ended, their JWT key is gone", revoked)
        return restart

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self.restart_ingest()
        self.streams.start()
        self.expiry.start()
        self.watchdog.start()

    async def stop(self) -> None:
        self.watchdog.stop()
        for task in list(self._tasks):
            task.cancel()
        self.streams.stop()
        await self.auth.close()
        self.expiry.stop()
        # Given up first (a bridge's lease): the fleet need not wait for it to expire.
        await self.ingest.close()
        if self._ingest_task is not None:
            await _finish(self._ingest_task)
            self._ingest_task = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


async def _finish(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end, at most STOP_SECONDS (a task that
    outlives that is logged, not waited for forever). The caller's own
    cancellation still propagates."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=STOP_SECONDS)
    if not done:
        log.error("the ingest did not stop within %.0f s of being cancelled", STOP_SECONDS)
