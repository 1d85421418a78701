"""The systemd protocols, spoken directly (no libsystemd): notify and socket activation.

- ``sd_notify``: datagrams to ``$NOTIFY_SOCKET`` (``READY=1`` once listening
  and subscribed, ``STOPPING=1`` when the drain starts, ``WATCHDOG=1`` from
  the event loop every half ``$WATCHDOG_USEC``, ``STATUS=...``).
- Socket activation: ``$LISTEN_FDS`` sockets starting at fd 3, for this
  process only (``$LISTEN_PID``), named by ``$LISTEN_FDNAMES``. A restart
  then refuses no connection: clients wait in the kernel backlog of a socket
  systemd keeps open, instead of the proxy answering 502 (which a browser's
  EventSource treats as final).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``) to the service manager; False if there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:
        log.warning("systemd notify failed: %s", exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between two ``WATCHDOG=1`` (half the configured timeout), if enabled."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def listen_sockets() -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation, by name.

    Names come from ``$LISTEN_FDNAMES`` (``FileDescriptorName=`` in the
    .socket unit); unnamed sockets are ``public`` then ``admin`` in order. The
    variables are removed so that processes started later do not take them
    for their own.
    """
    fds = os.environ.pop("LISTEN_FDS", None)
    pid = os.environ.pop("LISTEN_PID", None)
    names_env = os.environ.pop("LISTEN_FDNAMES", "")
    if not fds or pid != str(os.getpid()):
        return {}
    count = int(fds)
    names = [n for n in names_env.split(":") if n] if names_env else []
    defaults = ["public", "admin"]
    found: dict[str, socket.socket] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        name = (
            names[i]
            if i < len(names) and names[i] not in ("", "unknown")
            else (defaults[i] if i < len(defaults) else f"fd{fd}")
        )
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        found[name] = sock
    log.info("socket activation: %s", ", ".join(f"{n} (fd {s.fileno()})" for n, s in found.items()))
    return found
