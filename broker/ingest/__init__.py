"""Getting events out of Redis and into the hub: the ingest interface.

An *ingest* (one module per mode: :mod:`~broker.ingest.pubsub`,
:mod:`~broker.ingest.stream`) reads Redis and reports what it reads to a
:class:`Sink`: raw pub/sub messages, raw stream entries, its connection
state, how it is moving, and the events it lost (gaps). The sink decodes
every message through the one path in :mod:`broker.intake` and hands the
event to the hub, so the hub never knows which ingest is running.

Adding an ingest is adding a module with a ``build(context) -> Ingest``
function and naming it in :data:`MODES`.
"""

from __future__ import annotations

import asyncio
import importlib
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from broker.errors import Rejected
from broker.metrics import Stats
from broker.positions import Scheme

if TYPE_CHECKING:  # only for annotations: the ingest modules need none of these at run time
    import redis.asyncio as aioredis

    from broker.config import Config
    from broker.redis_conn import RedisTarget

# Reserved channel names for readiness canaries: "!" is outside the channel
# charset, so no client can subscribe to one and no event can be published on one.
CANARY_PREFIX = "!canary!"

# ``[ingest] mode`` -> the module that builds it.
MODES = {
    "pubsub": "broker.ingest.pubsub",
    "stream": "broker.ingest.stream",
    "bridge": "broker.ingest.bridge",
}


class Sink(Protocol):
    """What an ingest reports to; implemented by :class:`broker.intake.Intake`."""

    def message(self, channel: str, payload: bytes) -> None:
        """A pub/sub message (decoded in the configured format; the next position)."""

    def entry(self, id: str, fields: dict[bytes, bytes]) -> None:
        """A stream entry, its id its position."""

    def reject(self, channel: str, exc: Rejected) -> None:
        """A message an ingest decoded itself was invalid: counted and logged."""

    def started(self, id: str) -> None:
        """A stream reader starts after ``id``: what came before is in Redis only."""

    async def settle(self) -> None:
        """A batch is handled: wake what waits for the reader, write what it owes Redis."""

    def connected(self, up: bool) -> None:
        """Reading (again) / not reading."""

    def reachable(self, up: bool, detail: str = "") -> None:
        """A liveness check's own view of Redis, apart from the reading connection."""

    def stalled(self, why: str) -> None:
        """Connected but not moving: the ingest is rebuilt."""

    def moving(self) -> None:
        """Proof of progress (a canary came back, the reader advanced)."""

    def gap(
        self, reason: str, channels: Collection[str] | None = None, upto: str | None = None
    ) -> None:
        """Events of ``channels`` (None: every channel) were lost to this process,
        up to stream id ``upto`` when the ingest knows it (else up to now)."""


class Ingest(Protocol):
    """One source of events. ``run`` reads until cancelled, reconnecting itself."""

    @property
    def scheme(self) -> Scheme:
        """What this ingest's event ids name."""

    @property
    def stream_key(self) -> str | None:
        """The stream clients resume from; None: this process's memory only."""

    @property
    def subscribed(self) -> bool: ...

    async def run(self, sink: Sink) -> None: ...

    async def check(self, sink: Sink) -> None:
        """One liveness check (shared timer): report ``stalled``/``moving``/``reachable``."""

    async def subscribe(self, channels: Collection[str]) -> None:
        """Make sure ``channels`` are read before a stream on them starts (a no-op
        when every channel is: a pattern subscription, a stream). Awaited for
        every stream, once it is registered with the hub."""

    def release(self, channel: str) -> None:
        """The hub's last stream on ``channel`` left: it need not be read any more."""

    async def close(self) -> None: ...

    def gauges(self) -> dict[str, float]:
        """The ingest's own gauges for /metrics (names without the prefix)."""


class ReadsEveryChannel:
    """The defaults of an ingest that reads every channel at once (a pattern
    subscription, a stream): nothing to do per channel, no gauges of its own."""

    async def subscribe(self, channels: Collection[str]) -> None:
        return None

    def release(self, channel: str) -> None:
        return None

    def gauges(self) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class Context:
    """What an ingest may use: the configuration, Redis (to read, and to write —
    a canary, an append, a gap marker) and this process's epoch."""

    cfg: Config
    target: RedisTarget
    commands: Callable[[], aioredis.Redis]  # the shared command client
    epoch: str
    stats: Stats


def raise_if_cancelled() -> None:
    """Re-raise a cancellation a Redis call swallowed.

    redis-py runs every command under ``asyncio.wait_for`` (its socket
    timeout), and on Python 3.11 ``wait_for`` returns normally when the
    cancellation arrives just as the command completes (fixed in 3.12): a
    loop around Redis calls would read on after its task was cancelled, and a
    stopping broker would never stop. Every such loop calls this each turn.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Backoff:
    """Capped, jittered exponential waits between reconnect attempts."""

    def __init__(self, low: float = 0.1, high: float = 5.0) -> None:
        self.low, self.high = low, high
        self.current = low

    def reset(self) -> None:
        self.current = self.low

    async def wait(self) -> None:
        await asyncio.sleep(self.current * random.uniform(0.5, 1.0))
        self.current = min(self.current * 2, self.high)


def build(context: Context) -> Ingest:
    module = importlib.import_module(MODES[context.cfg.ingest.mode])
    ingest: Ingest = module.build(context)
    return ingest


class Sources:
    """Several ingests read as one (a bridge reads pub/sub and a stream; a cluster
    has a source per node): connected while all are, each checked in turn.

    The first source names the position scheme and the stream.
    """

    def __init__(self, *sources: Ingest) -> None:
        self.sources = sources
        self.scheme = sources[0].scheme
        self.stream_key = sources[0].stream_key

    @property
    def subscribed(self) -> bool:
        return all(s.subscribed for s in self.sources)

    async def run(self, sink: Sink) -> None:
        up = [False] * len(self.sources)
        async with asyncio.TaskGroup() as group:
            for i, source in enumerate(self.sources):
                group.create_task(source.run(_Part(sink, up, i)))

    async def check(self, sink: Sink) -> None:
        for source in self.sources:
            await source.check(sink)

    async def subscribe(self, channels: Collection[str]) -> None:
        for source in self.sources:
            await source.subscribe(channels)

    def release(self, channel: str) -> None:
        for source in self.sources:
            source.release(channel)

    async def close(self) -> None:
        for source in self.sources:
            await source.close()

    def gauges(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for source in self.sources:
            merged.update(source.gauges())
        return merged


class _Part:
    """One source's sink: everything passes through, except that "connected" is
    told once every part is, and "not connected" as soon as one is not."""

    def __init__(self, sink: Sink, up: list[bool], i: int) -> None:
        self._sink, self._up, self._i = sink, up, i
        self.message = sink.message
        self.entry = sink.entry
        self.reject = sink.reject
        self.started = sink.started
        self.settle = sink.settle
        self.reachable = sink.reachable
        self.stalled = sink.stalled
        self.moving = sink.moving
        self.gap = sink.gap

    def connected(self, up: bool) -> None:
        was = all(self._up)
        self._up[self._i] = up
        if all(self._up) != was:
            self._sink.connected(not was)
