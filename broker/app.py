"""The parts of one broker process, wired together (no HTTP, no signals).

``Broker`` owns the hub, the ingest, history and retained state, the shared
timers and the metrics. The HTTP layer (``http.py``, ``admin.py``) reaches it
through an ``AppKey``; the process lifecycle (``server.py``) starts and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from broker import control, sse
from broker.auth.grants import Grants
from broker.config import Config
from broker.connection import Connection
from broker.envelope import Event, decode_native
from broker.history import History, RetainedState
from broker.hub import Hub, Published
from broker.ingest import Dispatcher
from broker.ingest.pubsub import PubSubIngest
from broker.metrics import Metrics, Stats
from broker.redis_conn import redis_target
from broker.scheduler import Periodic, Wheel

log = logging.getLogger(__name__)


class Broker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stats = Stats()
        self.metrics = Metrics(self.stats, self._gauges)
        self.hub = Hub(
            stats=self.stats, metrics=self.metrics, write_buffer_bytes=cfg.limits.write_buffer_bytes
        )
        self.history = History(
            ttl_seconds=cfg.replay.ttl_seconds,
            max_events=cfg.replay.max_events,
            max_bytes=cfg.replay.max_bytes,
        )
        self.retained = RetainedState(
            max_keys=cfg.replay.max_retained_keys, max_bytes=cfg.replay.max_retained_bytes
        )
        self.heartbeats = Wheel(cfg.sse.heartbeat_seconds, self.hub.heartbeat)
        self.expiry = Periodic(1.0, self.history.expire)
        self.public = Grants.compile(cfg.auth.effective_public_channels)
        self.target = redis_target(cfg.redis)
        self.dispatcher = Dispatcher(
            self.publish,
            stats=self.stats,
            decode=decode_native,
            max_event_bytes=cfg.limits.max_event_bytes,
        )
        self.ingest = PubSubIngest(
            self.target,
            cfg.ingest.prefix,
            self.dispatcher.on_message,
            self._on_ingest_state,
        )
        self.draining = False
        self._ingest_task: asyncio.Task[None] | None = None
        self._ever_subscribed = False
        self._next_refusal_log = 0.0

    # -- events in ----------------------------------------------------------------

    def publish(self, event: Event, position: tuple[int, str] | None = None) -> Published:
        """Fan ``event`` out, then keep it for resumes and, if retained, as state."""
        pub = self.hub.publish(event, position)
        self.history.append(pub)
        if event.retain is not None and not self.retained.apply(pub):
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
        return pub

    # -- streams ------------------------------------------------------------------

    def register(self, conn: Connection) -> int:
        """Subscribe ``conn`` (paused) and return the position it was registered at.

        From here on every live event queues up on the connection; the backlog
        (replay or snapshot) covers exactly the events up to that position.
        """
        self.hub.add(conn)
        self.heartbeats.add(conn)
        return self.hub.seq

    def unregister(self, conn: Connection) -> None:
        self.heartbeats.remove(conn)
        self.hub.remove(conn)

    async def backlog(self, conn: Connection, last_id: str | None, upto: int) -> list[bytes]:
        """The frames ``conn`` gets before live events: missed events on an exact
        resume; otherwise (``broker.reset`` when resuming,) the retained state
        and the head id."""
        head = self.hub.head
        if last_id is not None:
            reason, missed = self._resume(conn.channels, last_id, upto)
            if reason is None:
                frames = [p.frame for p in missed if conn.may_see(p.event)]
                self.stats.replays_served += 1
                self.stats.events_replayed += len(frames)
                conn.last_id = last_id
                return frames
            self.stats.resets[reason] += 1
            return self.reset_frames(conn, reason, head, upto)
        return self._snapshot(conn, head, upto, [])

    def _resume(
        self, channels: tuple[str, ...], last_id: str, upto: int
    ) -> tuple[str | None, list[Published]]:
        epoch, sep, seq_text = last_id.partition("-")
        if not (
            sep
            and epoch.isascii()
            and epoch.isdigit()
            and seq_text.isascii()
            and seq_text.isdigit()
        ):
            return "unknown_id", []
        if epoch != self.hub.epoch:
            return "epoch", []
        seq = int(seq_text)
        if seq > self.hub.seq:
            return "unknown_id", []
        reason = self.history.lost_after(channels, seq)
        if reason is not None:
            return reason, []
        return None, self.history.since(channels, seq, upto)

    def reset_frames(self, conn: Connection, reason: str, head: str, upto: int) -> list[bytes]:
        """``broker.reset`` (carrying the head id), then the retained state."""
        reset = control.reset_frame(reason, head, control.jitter(self.cfg.sse.retry_ms))
        return self._snapshot(conn, head, upto, [reset])

    def _snapshot(self, conn: Connection, head: str, upto: int, frames: list[bytes]) -> list[bytes]:
        state = [
            p.frame
            for p in self.retained.snapshot(conn.channels, conn.tenant)
            if p.seq <= upto and conn.may_see(p.event)
        ]
        frames.extend(state)
        if state or not frames:
            # Retained events carry their own (older) ids: end on the head so
            # the client resumes from here, not from the oldest state entry.
            frames.append(sse.encode_id(head))
        conn.last_id = head
        return frames

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
        # Pub/sub drops whatever was published while we were away: burn a
        # position for the hole so resumes across it reset, and tell every
        # open stream now instead of letting it believe it saw everything.
        head = self.hub.skip()
        self.history.mark_hole(self.hub.seq)
        conns = [c for c in self.hub.connections if not c.closed]
        for conn in conns:
            for frame in self.reset_frames(conn, "outage", head, self.hub.seq):
                self.hub.send(conn, frame)
        self.stats.resets["outage"] += len(conns)
        if conns:
            log.warning(
                "redis subscription restored: sent broker.reset (outage) to %d streams", len(conns)
            )

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
        self.expiry.stop()
        if self._ingest_task is not None:
            self._ingest_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ingest_task
            self._ingest_task = None
