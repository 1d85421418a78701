"""The parts of one broker process, wired together (no HTTP, no signals).

``Broker`` owns the hub, the ingest, the shared timers and the metrics. The
HTTP layer (``http.py``, ``admin.py``) reaches it through an ``AppKey``; the
process lifecycle (``server.py``) starts and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from broker import control
from broker.auth.grants import Grants
from broker.config import Config
from broker.envelope import decode_native
from broker.hub import Hub
from broker.ingest import Dispatcher
from broker.ingest.pubsub import PubSubIngest
from broker.metrics import Metrics, Stats
from broker.redis_conn import redis_target
from broker.scheduler import Wheel

log = logging.getLogger(__name__)


class Broker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stats = Stats()
        self.metrics = Metrics(self.stats, self._gauges)
        self.hub = Hub(
            stats=self.stats, metrics=self.metrics, write_buffer_bytes=cfg.limits.write_buffer_bytes
        )
        self.heartbeats = Wheel(cfg.sse.heartbeat_seconds, self.hub.heartbeat)
        self.public = Grants.compile(cfg.auth.effective_public_channels)
        self.dispatcher = Dispatcher(
            self.hub.publish,
            stats=self.stats,
            decode=decode_native,
            max_event_bytes=cfg.limits.max_event_bytes,
        )
        self.ingest = PubSubIngest(
            redis_target(cfg.redis),
            cfg.ingest.prefix,
            self.dispatcher.on_message,
            self._on_ingest_state,
        )
        self.draining = False
        self._ingest_task: asyncio.Task[None] | None = None
        self._ever_subscribed = False

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
            self._mark_outage()
        self._ever_subscribed = True

    def _mark_outage(self) -> None:
        # Pub/sub drops whatever was published while we were away: tell every
        # open stream instead of letting it believe it saw everything.
        head = self.hub.head
        retry = self.cfg.sse.retry_ms
        for conn in list(self.hub.connections):
            self.hub.send(conn, control.reset_frame("outage", head, control.jitter(retry)))
        if self.hub.connections:
            log.warning(
                "redis subscription restored: sent broker.reset (outage) to %d streams",
                len(self.hub.connections),
            )

    def _gauges(self) -> dict[str, float]:
        return {
            "connections": len(self.hub.connections),
            "subscriptions": self.hub.subscriptions(),
            "redis_connected": 1.0 if self.ingest.subscribed else 0.0,
        }

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._ingest_task = asyncio.create_task(self.ingest.run(), name="ingest")
        self.heartbeats.start()

    async def stop(self) -> None:
        self.heartbeats.stop()
        if self._ingest_task is not None:
            self._ingest_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ingest_task
            self._ingest_task = None
