"""What a broker process and the workers' supervisor share: listening sockets
and the signals that stop and reload them.

Both ``server.py`` (one broker) and ``workers.py`` (N brokers under one
supervisor) use these; neither imports the other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable

from broker.config import Listen

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def bind(address: Listen) -> socket.socket:
    """A listening socket for ``address`` (TCP or Unix)."""
    if address.path is not None:
        if os.path.exists(address.path):
            os.unlink(address.path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address.path)
        # Reachable by the proxy's user whatever our umask (systemd's UMask=0027
        # would shut nginx out); who may get there is up to the directory.
        os.chmod(address.path, 0o666)
    else:
        assert address.host is not None and address.port is not None
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class Signals:
    """SIGTERM/SIGINT stop the process, SIGHUP reloads it.

    The first stop signal calls ``on_stop(name)``, which starts a graceful
    drain. A second one, during that drain, exits at once: ``on_exit()``
    (what must not outlive us, e.g. worker processes), the log flushed, then
    ``os._exit(1)`` — an operator who asks twice does not wait for the drain.
    """

    def __init__(
        self,
        on_stop: Callable[[str], None],
        on_reload: Callable[[], None],
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self._on_stop = on_stop
        self._on_reload = on_reload
        self._on_exit = on_exit
        self.stops = 0  # stop signals received

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)

    def restore(self) -> None:
        """Back to the default handlers (the loop may outlive this process's run)."""
        loop = asyncio.get_running_loop()
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _stop(self, signum: int) -> None:
        self.stops += 1
        name = signal.Signals(signum).name
        if self.stops == 1:
            self._on_stop(name)
            return
        log.warning("second signal %s: exiting now", name)
        if self._on_exit is not None:
            self._on_exit()
        logging.shutdown()
        os._exit(1)
