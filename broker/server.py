"""Process lifecycle: start-up, signals, graceful drain, shutdown.

startup: bind listeners -> start ingest and timers (``/readyz`` is 503 until
the first subscription) -> serve. SIGTERM/SIGINT: readiness 503 at once,
every open stream gets ``broker.reconnect`` (``drain``), then the runners are
cleaned up and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket

from aiohttp import web

from broker import control
from broker.admin import admin_app
from broker.app import Broker
from broker.config import Config, Listen
from broker.http import public_app

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096


def bind(address: Listen) -> socket.socket:
    """A listening socket for ``address`` (TCP or Unix)."""
    if address.path is not None:
        if os.path.exists(address.path):
            os.unlink(address.path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address.path)
    else:
        assert address.host is not None and address.port is not None
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class Server:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.broker = Broker(cfg)
        self._runners: list[web.AppRunner] = []
        self._stop = asyncio.Event()
        self._signals = 0

    async def startup(self) -> None:
        cfg = self.cfg
        await self.broker.start()
        apps = [(public_app(self.broker), cfg.server.listen_address)]
        if cfg.admin.listen_address is not None:
            apps.append((admin_app(self.broker), cfg.admin.listen_address))
        for app, address in apps:
            runner = web.AppRunner(
                app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
            )
            await runner.setup()
            self._runners.append(runner)
            # aiohttp calls listen() again with its own backlog (128 by default).
            site = web.SockSite(runner, bind(address), shutdown_timeout=1.0, backlog=LISTEN_BACKLOG)
            await site.start()
        log.info(
            "listening on %s (admin %s), mode %s, auth %s",
            cfg.server.listen,
            cfg.admin.listen or "disabled",
            cfg.ingest.mode,
            cfg.auth.mode,
        )
        # Everything allocated so far lives for the whole run: keep it out of
        # every future GC pass (a full pass over many streams stalls the loop).
        gc.collect()
        gc.freeze()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("signal %s: draining", signal.Signals(signum).name)
        self._stop.set()

    async def main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def shutdown(self) -> None:
        broker = self.broker
        broker.draining = True
        hub = broker.hub
        retry = self.cfg.sse.retry_ms
        if hub.connections:
            log.info("closing %d streams with broker.reconnect (drain)", len(hub.connections))
        hub.close_all("drain", control.reconnect_frame("drain", control.jitter(retry), hub.head))
        await asyncio.sleep(0)  # let stream handlers finish their responses
        for runner in reversed(self._runners):
            await runner.cleanup()
        await broker.stop()

    async def run(self) -> None:
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()
        log.info("stopped")


def run(cfg: Config) -> None:
    """Run the broker until a signal stops it (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(Server(cfg).run())
