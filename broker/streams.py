"""Open streams over their lifetime: registered, visited, ended on purpose.

A stream joins the hub (paused) at :meth:`Streams.register` and leaves it at
:meth:`Streams.unregister`; in between, shared timers look after it — the
heartbeat wheel (which also enforces write deadlines), its deadlines (a
token's expiry, the recycle age) and the periodic re-authorization — and it
can be ended on purpose (revoked, recycled, expired) with a
``broker.reconnect`` naming why. No task per stream: every one of these is a
timer shared by all streams.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from broker import control
from broker.config import Config
from broker.connection import Connection
from broker.hub import Hub
from broker.metrics import Stats
from broker.policy import Policy
from broker.recheck import Rechecker, still_authorized
from broker.scheduler import Deadlines, Wheel

log = logging.getLogger(__name__)

# Re-authorization calls in flight at once: a fraction of what new streams may use.
RECHECK_IN_FLIGHT = 8


class Streams:
    def __init__(self, hub: Hub, stats: Stats, policy: Callable[[], Policy]) -> None:
        self.hub = hub
        self.stats = stats
        self.policy = policy  # the current policy (a reload replaces it)
        cfg = policy().cfg
        self.heartbeats = Wheel(cfg.sse.heartbeat_seconds, hub.visit)
        self.deadlines = Deadlines(self.end)
        self.rechecker = Rechecker(
            float(cfg.auth.recheck_interval_seconds or 600),
            self._recheck,
            max_in_flight=RECHECK_IN_FLIGHT,
        )

    @property
    def cfg(self) -> Config:
        return self.policy().cfg

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
        cfg = self.cfg
        if expires_at is not None:
            # At the same instant admission stops accepting the token (exp +
            # leeway): earlier, a reconnect with that token would be admitted
            # and ended again at once, over and over.
            expires_at += cfg.auth.jwt.leeway_seconds
            self.deadlines.add(conn, loop.time() + (expires_at - time.time()), "token_expired")
        age = cfg.sse.max_connection_age_seconds
        if age:
            # +-10% so streams opened together (after a deploy) do not all recycle together
            self.deadlines.add(conn, loop.time() + age * random.uniform(0.9, 1.1), "recycle")
        return self.hub.seq, self.hub.head

    def unregister(self, conn: Connection) -> None:
        self.heartbeats.remove(conn)
        self.rechecker.remove(conn)
        self.deadlines.forget(conn)
        self.hub.remove(conn)

    def end(self, conn: Connection, reason: str) -> None:
        """End ``conn`` now with ``broker.reconnect`` (``reason``, a jittered retry)."""
        retry = control.jitter(self.cfg.sse.retry_ms)
        self.hub.end(conn, reason, control.reconnect_frame(reason, retry, self.hub.head))

    async def _recheck(self, conn: Connection) -> None:
        """Shared timer: end ``conn`` if the app no longer lets it in (callback, laravel)."""
        policy = self.policy()
        if policy.cfg.auth.recheck_interval_seconds and not await still_authorized(
            policy.auth, policy.public, conn
        ):
            self.stats.auth_failures["revoked"] += 1
            self.end(conn, "revoked")

    def disconnect(self, *, user: str | None, tenant: str | None) -> int:
        """Close the streams of a user and/or tenant now (logout, revoked tenant)."""
        doomed = [
            c
            for c in self.hub.connections
            if (user is None or c.user == user) and (tenant is None or c.tenant == tenant)
        ]
        for conn in doomed:
            self.end(conn, "revoked")
        return len(doomed)

    def revoke_unverified(self) -> int:
        """After a reload: end the streams whose JWT key is no longer trusted."""
        auth = self.policy().auth
        revoked = [
            c
            for c in self.hub.connections
            if c.auth_key is not None and not auth.verifies(c.auth_key)
        ]
        for conn in revoked:
            self.end(conn, "revoked")
        return len(revoked)

    def configure(self, cfg: Config) -> None:
        self.rechecker.interval = float(cfg.auth.recheck_interval_seconds or 600)

    @property
    def timed(self) -> int:
        """Entries in the deadline and re-authorization timers."""
        return self.deadlines.pending + self.rechecker.pending

    def start(self) -> None:
        self.heartbeats.start()
        self.rechecker.start()

    def stop(self) -> None:
        self.heartbeats.stop()
        self.rechecker.stop()
        self.deadlines.stop()
