"""Re-authorizing open streams: credentials can be revoked while a stream is open.

In ``callback`` and ``laravel`` modes the app decides who may read what, and
its mind can change (a logout, a user removed from a team). Every open stream
of those modes is asked about again every ``auth.recheck_interval_seconds``.
Only a definite "no" ends it — the app denying (401/403/419) or naming
another user or tenant — never a timeout or a backend error: an app outage
must not disconnect every browser.

The calls come at a steady rate, never as a burst: a stream is first due at
a random point in the second half of the interval, and due streams are
checked at most ``ceil(streams / interval)`` per second (so every stream is
checked about once per interval, at most twice that apart) with a bounded
number in flight.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable

from broker.auth import ANONYMOUS, Authenticator, Identity, authorize
from broker.auth.grants import PROTECTED, Grants
from broker.connection import Connection
from broker.errors import BrokerError, Forbidden, Unauthorized
from broker.scheduler import Deadlines, Periodic

log = logging.getLogger(__name__)

# Refusals that are not the app's verdict on these credentials.
NOT_DEFINITE = frozenset({"login_redirect"})


def needs_recheck(mode: str, identity: Identity, channels: tuple[str, ...]) -> bool:
    """Whether a stream's access came from the app and so may be withdrawn by it."""
    if mode == "callback":
        return identity is not ANONYMOUS
    if mode == "laravel":
        return any(c.startswith(PROTECTED) for c in channels)
    return False


async def still_authorized(auth: Authenticator, public: Grants, conn: Connection) -> bool:
    """False only when the app definitely refuses ``conn``'s credentials or
    channels now, or vouches for another user or tenant; True on any doubt."""
    creds = conn.credentials
    if creds is None:
        return True
    try:
        identity = await auth.authenticate(creds, conn.channels)
        authorize(identity, public, conn.channels, anonymous_may_log_in=True)
    except (Unauthorized, Forbidden) as exc:
        return exc.code in NOT_DEFINITE
    except (BrokerError, OSError, TimeoutError) as exc:
        log.debug("re-authorization inconclusive, stream kept: %s", exc)
        return True
    return identity.user == conn.user and identity.tenant == conn.tenant


class Rechecker:
    """Calls ``check(conn)`` for every added connection about once per ``interval``."""

    def __init__(
        self,
        interval: float,
        check: Callable[[Connection], Awaitable[None]],
        *,
        max_in_flight: int,
        tick: float = 1.0,
    ) -> None:
        self.interval = interval
        self.max_in_flight = max_in_flight
        self._check = check
        self._due = Deadlines(self._queue_up)
        self._queue: dict[Connection, None] = {}  # due now, oldest first
        self._members: set[Connection] = set()
        self._in_flight: set[asyncio.Task[None]] = set()
        self.tick = tick
        self._pump = Periodic(tick, self._run)

    def add(self, conn: Connection) -> None:
        self._members.add(conn)
        when = asyncio.get_running_loop().time() + self.interval * random.uniform(0.5, 1.0)
        self._due.add(conn, when, "recheck")

    def remove(self, conn: Connection) -> None:
        if conn not in self._members:
            return
        self._members.discard(conn)
        self._due.forget(conn)
        self._queue.pop(conn, None)

    @property
    def pending(self) -> int:
        """Entries held for streams: due-time heap, queue and checks in flight."""
        return self._due.pending + len(self._queue) + len(self._in_flight)

    def start(self) -> None:
        self._pump.start()

    def stop(self) -> None:
        self._pump.stop()
        self._due.stop()
        self._queue.clear()
        self._members.clear()
        for task in self._in_flight:
            task.cancel()

    def _queue_up(self, conn: Connection, reason: str) -> None:
        self._queue[conn] = None

    def _run(self) -> None:
        budget = min(
            math.ceil(len(self._members) * self.tick / self.interval),
            self.max_in_flight - len(self._in_flight),
        )
        while budget > 0 and self._queue:
            conn = next(iter(self._queue))
            del self._queue[conn]
            if conn.closed:
                continue
            budget -= 1
            task = asyncio.create_task(self._one(conn), name="recheck")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _one(self, conn: Connection) -> None:
        try:
            await self._check(conn)
        except Exception:
            log.exception("re-authorization failed")
        if not conn.closed and conn in self._members:
            self._due.add(conn, asyncio.get_running_loop().time() + self.interval, "recheck")
