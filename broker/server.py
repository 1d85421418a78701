"""Process lifecycle: start-up, signals, graceful drain, shutdown.

startup: signal handlers -> start ingest and timers (``/readyz`` is 503
until the first subscription) -> bind listeners -> serve. SIGTERM/SIGINT:
readiness 503 and refusals at once, open streams get ``broker.reconnect``
(``drain``) spread over ``shutdown.drain_seconds``, then the runners are
cleaned up and the process exits 0; a second signal exits at once. SIGHUP
re-reads the configuration and applies what can change without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import socket
from collections.abc import Callable

from aiohttp import web

from broker import control, systemd
from broker.admin import admin_app
from broker.app import Broker
from broker.config import Config, Listen
from broker.errors import BrokerError
from broker.guard import Guard, GuardedRunner
from broker.http import public_app
from broker.lifecycle import LISTEN_BACKLOG, Signals, bind
from broker.logs import setup_logging
from broker.scheduler import Periodic

log = logging.getLogger(__name__)

DRAIN_TICK = 0.05  # seconds between two slices of drained streams
INHERITED_WAIT_SECONDS = 5.0


class Server:
    """One broker process: ``startup`` -> ``main_loop`` -> ``shutdown``.

    ``load`` re-reads the configuration on SIGHUP (file again; the
    environment and ``--set`` flags of the start still apply).
    """

    def __init__(
        self,
        cfg: Config,
        load: Callable[[], Config] | None = None,
        *,
        sockets: dict[str, socket.socket] | None = None,
        admin_path: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.load = load
        # Inherited listening sockets (socket activation, or a worker's from its
        # supervisor) and, for a worker, the private Unix socket of its admin.
        self.sockets = sockets or {}
        self.admin_path = admin_path
        self.broker = Broker(cfg)
        # Connections that are not streams yet: a header deadline on both
        # listeners, the per-address cap on the public one only.
        timeout = cfg.server.header_timeout_seconds
        self.guard = Guard(timeout, self.broker)
        self.broker.edge = self.guard
        self.admin_guard = Guard(timeout)
        self._runners: list[web.AppRunner] = []
        self._stop = asyncio.Event()
        self._signals = Signals(self._on_stop_signal, self._on_reload_signal)
        self._tasks: set[asyncio.Task[None]] = set()
        interval = systemd.watchdog_interval()
        self.watchdog = Periodic(interval, self._pet) if interval else None

    def _pet(self) -> None:
        # From the event loop itself: a wedged loop stops petting and systemd restarts us.
        systemd.notify("WATCHDOG=1")

    def listeners(self) -> list[tuple[web.Application, socket.socket]]:
        cfg = self.cfg
        public = self.sockets.get("public") or bind(cfg.server.listen_address)
        apps = [(public_app(self.broker), public)]
        if self.admin_path is not None:
            apps.append((admin_app(self.broker), bind(Listen(None, None, self.admin_path))))
        elif "admin" in self.sockets:
            apps.append((admin_app(self.broker), self.sockets["admin"]))
        elif cfg.admin.listen_address is not None:
            apps.append((admin_app(self.broker), bind(cfg.admin.listen_address)))
        return apps

    async def _ready_when_subscribed(self) -> None:
        await self.broker.health.first_up.wait()
        systemd.notify("READY=1", "STATUS=listening and subscribed")

    async def startup(self) -> None:
        cfg = self.cfg
        self._signals.install()
        await self.broker.start()
        listeners = self.listeners()
        # Admin first (public last): health checks answer while we wait below.
        for app, sock in reversed(listeners):
            if app is listeners[0][0] and "public" in self.sockets:
                # An inherited socket (socket activation) keeps clients in the
                # kernel backlog while we are away: keep them there until the
                # subscription is up, rather than answering "not ready".
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(INHERITED_WAIT_SECONDS):
                        await self.broker.health.first_up.wait()
            guard = self.guard if app is listeners[0][0] else self.admin_guard
            runner = GuardedRunner(
                app, guard, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
            )
            await runner.setup()
            self._runners.append(runner)
            # aiohttp calls listen() again with its own backlog (128 by default).
            site = web.SockSite(runner, sock, shutdown_timeout=1.0, backlog=LISTEN_BACKLOG)
            await site.start()
        public = self.sockets.get("public")
        log.info(
            "listening on %s (admin %s), mode %s, auth %s",
            f"inherited socket {public.getsockname()!r}" if public else cfg.server.listen,
            self.admin_path or cfg.admin.listen or "disabled",
            cfg.ingest.mode,
            cfg.auth.mode,
        )
        task = asyncio.create_task(self._ready_when_subscribed())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.watchdog is not None:
            self.watchdog.start()
        # Everything allocated so far lives for the whole run: keep it out of
        # every future GC pass (a full pass over many streams stalls the loop).
        gc.collect()
        gc.freeze()

    def _on_stop_signal(self, name: str) -> None:
        log.info("signal %s: draining (a second signal exits at once)", name)
        self._stop.set()

    def _on_reload_signal(self) -> None:
        if self.load is None:
            log.warning("SIGHUP: no configuration source to reload from")
            return
        try:
            new = self.load()
            restart = self.broker.apply(new)
        except BrokerError as exc:
            log.error("SIGHUP: new configuration rejected, keeping the old one: %s", exc.message)
            return
        self.cfg = self.broker.cfg
        setup_logging(new.log.level, new.log.format)
        self.broker.hub.log_unmatched = logging.getLogger("broker.hub").isEnabledFor(logging.DEBUG)
        log.info("SIGHUP: configuration reloaded (new streams use it; open streams stay)")
        if restart:
            log.warning("SIGHUP: changes to %s need a restart to apply", ", ".join(restart))

    async def main_loop(self) -> None:
        await self._stop.wait()

    async def drain(self) -> None:
        """Readiness 503 and refusals at once; then every open stream gets
        ``broker.reconnect`` (``drain``), the closes spread evenly over
        ``shutdown.drain_seconds`` so the clients' reconnects do not land on
        the next instance all in the same instant."""
        broker = self.broker
        broker.draining = True
        systemd.notify("STOPPING=1", "STATUS=draining")
        hub = broker.hub
        conns = list(hub.connections)
        random.shuffle(conns)
        window = self.cfg.shutdown.drain_seconds
        if conns:
            log.info("draining %d streams over %ss", len(conns), window)
        retry = self.cfg.sse.retry_ms
        loop = asyncio.get_running_loop()
        begin = loop.time()
        for i, conn in enumerate(conns):
            # Evenly over the window, on a fixed schedule (the closes' own work
            # must not stretch it), in slices of at least DRAIN_TICK.
            delay = begin + window * i / len(conns) - loop.time()
            if delay >= DRAIN_TICK:
                await asyncio.sleep(delay)
            if not conn.closed:
                frame = control.reconnect_frame("drain", control.jitter(retry), hub.head)
                hub.end(conn, "drain", frame)
        # Let the stream handlers end their responses before the runners go.
        for _ in range(20):
            if not hub.connections:
                break
            await asyncio.sleep(DRAIN_TICK)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.drain()
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.broker.stop()
        if self.watchdog is not None:
            self.watchdog.stop()

    async def run(self) -> None:
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()
            self._signals.restore()
        log.info("stopped")


def run(
    cfg: Config,
    load: Callable[[], Config] | None = None,
    *,
    sockets: dict[str, socket.socket] | None = None,
    admin_path: str | None = None,
) -> None:
    """Run one broker process until a signal stops it (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(Server(cfg, load, sockets=sockets, admin_path=admin_path).run())
