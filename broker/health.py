"""Is the ingest reading? One state, told by the ingest and its liveness checks.

::

    STARTING --connected--> UP --lost--> DOWN --connected--> UP
                            UP --unreachable--> UNREACHABLE --reachable--> UP
                            UP --stalled--> STALLED --moving--> UP

A liveness check that reaches Redis again clears only what a liveness check
set (UNREACHABLE): a reader that lost its connection is back only when it
says so. A stalled ingest is rebuilt on purpose, so losing its connection
keeps it STALLED.

Readiness follows the state: STARTING "starting", DOWN "redis_unavailable",
STALLED "ingest_stalled" (from the stall until the rebuilt ingest proves it
moves: a fresh subscription is not yet proof). A reconnect is counted once
per outage, whoever noticed it first (the ingest, or the liveness check when
the reader rides a short outage out on redis-py's retries).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable

from broker.metrics import Stats

log = logging.getLogger(__name__)


class State(enum.Enum):
    STARTING = enum.auto()
    UP = enum.auto()
    DOWN = enum.auto()  # the ingest lost its connection
    UNREACHABLE = enum.auto()  # a liveness check cannot reach Redis
    STALLED = enum.auto()


# What /readyz and refusals say in each state but UP.
_REASONS = {
    State.STARTING: "starting",
    State.DOWN: "redis_unavailable",
    State.UNREACHABLE: "redis_unavailable",
    State.STALLED: "ingest_stalled",
}


class Health:
    def __init__(self, stats: Stats, rebuild: Callable[[], None]) -> None:
        self.stats = stats
        self._rebuild = rebuild  # drop the ingest's connection and start a fresh one
        self.state = State.STARTING
        self.first_up = asyncio.Event()  # set at the first subscription (READY=1)

    def reason(self) -> str | None:
        """Why streams cannot be served now, or None."""
        return _REASONS.get(self.state)

    @property
    def reading(self) -> bool:
        """Connected to Redis (moving or not): the redis_connected gauge."""
        return self.state is State.UP or self.state is State.STALLED

    def connected(self, up: bool) -> bool:
        """The ingest is reading (again) / lost its connection. Returns True when
        this ends an earlier loss (pub/sub: what was published meanwhile is gone)."""
        state = self.state
        if not up:
            if state is State.UP or state is State.UNREACHABLE:
                self.state = State.DOWN
            return False
        if state is State.STARTING:
            self.state = State.UP
            self.first_up.set()
            return False
        if state is State.UP:
            return False
        if state is not State.STALLED:
            self.state = State.UP
        self.stats.redis_reconnects += 1
        return True

    def reachable(self, up: bool, detail: str = "") -> None:
        if not up:
            if self.state is State.UP:
                log.warning("redis unreachable from the liveness check: %s", detail)
                self.state = State.UNREACHABLE
        elif self.state is State.UNREACHABLE:
            log.info("redis reachable again")
            self.stats.redis_reconnects += 1
            self.state = State.UP

    def stalled(self, why: str) -> None:
        log.warning("ingest stalled: %s; resubscribing", why)
        self.state = State.STALLED
        self._rebuild()

    def moving(self) -> None:
        if self.state is State.STALLED:
            log.info("ingest moving again")
            self.state = State.UP
