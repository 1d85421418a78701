"""Getting events out of Redis and into the hub.

An ingest reads Redis and calls :meth:`Dispatcher.on_message` for each
message; the dispatcher decodes it (rejecting what is invalid) and hands the
event to the hub. The hub never knows which ingest is running.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from broker.envelope import Event
from broker.errors import Rejected
from broker.metrics import Stats

log = logging.getLogger(__name__)

Decoder = Callable[[str, bytes, int], Event]

# Reserved channel names for readiness canaries: "!" is outside the channel
# charset, so no client can subscribe to one and no event can be published on one.
CANARY_PREFIX = "!canary!"


class Dispatcher:
    """Decode, validate and publish one inbound message; never raises."""

    def __init__(
        self,
        publish: Callable[[Event], object],
        *,
        stats: Stats,
        decode: Decoder,
        max_event_bytes: int,
        on_canary: Callable[[str, bytes], None] | None = None,
        log_interval: float = 10.0,
    ) -> None:
        self._publish = publish
        self._on_canary = on_canary
        self._decode = decode
        self._stats = stats
        self.max_event_bytes = max_event_bytes
        self._log_interval = log_interval
        self._next_log = 0.0
        self._suppressed = 0

    def on_message(self, channel: str, payload: bytes) -> None:
        try:
            event = self._decode(channel, payload, self.max_event_bytes)
        except Rejected as exc:
            # Canaries use a name no client can subscribe to; looked at only
            # here, off the hot path.
            if channel.startswith(CANARY_PREFIX):
                if self._on_canary is not None:
                    self._on_canary(channel, payload)
                return
            self.reject(channel, exc)
            return
        self._publish(event)

    def reject(self, channel: str, exc: Rejected) -> None:
        self._stats.events_rejected[exc.code] += 1
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
