"""Shared timers: one loop timer serves every connection.

A per-connection ``call_later`` costs memory and, worse, fires for all
connections in the same loop iteration after a reconnect storm. The wheel
assigns each connection to one of ``slots`` buckets round-robin and visits a
single bucket per tick, so periodic work (heartbeats) is spread evenly over
the period whatever the number of connections.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Callable

from broker.connection import Connection

log = logging.getLogger(__name__)


class Wheel:
    """Calls ``visit(bucket)`` for one bucket of connections every ``period / slots`` seconds."""

    def __init__(
        self, period: float, visit: Callable[[list[Connection]], None], *, tick: float = 0.1
    ) -> None:
        self.slots = max(1, round(period / tick))
        self.tick = period / self.slots
        self._visit = visit
        self._buckets: list[set[Connection]] = [set() for _ in range(self.slots)]
        self._next_slot = 0
        self._cursor = 0
        self._handle: asyncio.TimerHandle | None = None
        self._running = False

    def add(self, conn: Connection) -> None:
        conn.slot = self._next_slot
        self._next_slot = (self._next_slot + 1) % self.slots
        self._buckets[conn.slot].add(conn)

    def remove(self, conn: Connection) -> None:
        self._buckets[conn.slot].discard(conn)

    def start(self) -> None:
        self._running = True
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(self.tick, self._run, loop.time() + self.tick)

    def stop(self) -> None:
        self._running = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        bucket = self._buckets[self._cursor]
        self._cursor = (self._cursor + 1) % self.slots
        if bucket:
            try:
                self._visit(list(bucket))
            except Exception:  # a bug here must not stop every future heartbeat
                log.exception("shared timer callback failed")
        if not self._running:  # stopped from inside the callback
            return
        # Schedule against the ideal time so the period does not drift with load.
        due = max(due + self.tick, loop.time())
        self._handle = loop.call_at(due, self._run, due)


class Periodic:
    """Calls ``fn()`` every ``interval`` seconds on the loop (one timer, no task)."""

    def __init__(self, interval: float, fn: Callable[[], object]) -> None:
        self.interval = interval
        self._fn = fn
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._run)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        try:
            self._fn()
        except Exception:
            log.exception("periodic task failed")
        if self._handle is not None:
            self.start()


class Deadlines:
    """One loop timer for many per-connection deadlines (token expiry, maximum age).

    A heap ordered by due time; the timer is armed for the earliest entry
    only. Entries of connections that closed meanwhile are skipped when due.
    """

    def __init__(self, fire: Callable[[Connection, str], None]) -> None:
        self._fire = fire
        self._heap: list[tuple[float, int, Connection, str]] = []
        self._counter = 0
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = math.inf
        self._dead = 0  # closed connections whose entries are still in the heap

    def add(self, conn: Connection, when: float, reason: str) -> None:
        """Call ``fire(conn, reason)`` at loop time ``when`` unless ``conn`` closed first."""
        self._counter += 1
        heapq.heappush(self._heap, (when, self._counter, conn, reason))
        if when < self._armed_for:
            self._arm()

    def forget(self, conn: Connection) -> None:
        """``conn`` closed: its entries are dead weight until they come due (up to
        the maximum connection age). Past half the heap, drop them all at once
        (amortized O(1) per closed connection)."""
        self._dead += 1
        # >=: with two entries per stream (expiry and recycling), the last of
        # them closing must empty the heap, not leave it half full of the dead.
        if self._dead * 2 >= len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].closed]
            heapq.heapify(self._heap)
            self._dead = 0

    def _arm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_for = math.inf
        if self._heap:
            self._armed_for = self._heap[0][0]
            self._handle = asyncio.get_running_loop().call_at(self._armed_for, self._run)

    def _run(self) -> None:
        self._handle = None
        now = asyncio.get_running_loop().time()
        while self._heap and self._heap[0][0] <= now:
            _, _, conn, reason = heapq.heappop(self._heap)
            if conn.closed:
                continue
            try:
                self._fire(conn, reason)
            except Exception:
                log.exception("deadline callback failed")
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._heap.clear()
        self._armed_for = math.inf

    @property
    def pending(self) -> int:
        """Entries in the heap, those of closed connections not yet dropped included
        (the memory it holds: ``sse_broker_deadline_entries``)."""
        return len(self._heap)
