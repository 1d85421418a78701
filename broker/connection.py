"""One open stream's write state: pending frames, coalescing, slow-consumer check.

The hub never awaits a connection. It appends pre-encoded frames to
``pending`` and the hub's flush writes each dirty connection's frames in one
``transport.write`` per loop iteration. A connection whose kernel-side buffer
grows past the limit is a slow consumer and is aborted instead of buffering
without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable

from broker.auth import Credentials
from broker.envelope import Event
from broker.sse import chunk

log = logging.getLogger(__name__)

LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close sends RST


def tune_socket(transport: asyncio.BaseTransport, timeout_s: int, send_buffer: int) -> None:
    """Make a dead peer (a laptop lid closed, a route gone) fail the socket.

    TCP keepalive probes an idle connection; TCP_USER_TIMEOUT errors one whose
    sent data stays unacknowledged for ``timeout_s``. Either way the kernel
    reports the loss, the stream's handler ends and its memory and file
    descriptor come back.

    The kernel send buffer is capped at ``send_buffer`` (``write_buffer_bytes``):
    left to autotuning it grows to megabytes per socket on a fast link, which a
    client that stops reading pins down in kernel memory that the slow-consumer
    check (on the broker's own buffer) does not see.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, timeout_s // 3))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_s * 1000)
    except OSError as exc:  # e.g. the peer is already gone
        log.debug("socket options not set: %s", exc)


class Connection:
    """A subscriber as the hub sees it; the HTTP handler owns its lifetime.

    ``paused`` connections collect frames without writing them: the handler
    registers a stream before writing its preamble (and, later, a replay), so
    nothing published meanwhile is lost, then calls :meth:`start`.
    """

    __slots__ = (
        "auth_key",
        "bytes_sent",
        "channels",
        "chunked",
        "close_reason",
        "credentials",
        "done",
        "events_sent",
        "last_id",
        "on_finish",
        "opened_at",
        "paused",
        "pending",
        "remote",
        "slot",
        "socket_id",
        "stuck_since",
        "tenant",
        "transport",
        "user",
        "wrote",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        *,
        chunked: bool,
        channels: tuple[str, ...],
        user: str | None = None,
        tenant: str | None = None,
        remote: str = "",
        socket_id: str | None = None,
    ) -> None:
        self.transport = transport
        self.chunked = chunked
        self.channels = channels
        self.user = user
        self.tenant = tenant
        self.remote = remote
        self.socket_id = socket_id
        self.pending: list[bytes] = []
        self.paused = True
        self.wrote = False  # anything written since the last heartbeat visit
        self.last_id: str | None = None
        self.slot = 0
        self.stuck_since: float | None = None  # unsent bytes seen since (write deadline)
        self.events_sent = 0
        self.bytes_sent = 0
        self.opened_at = time.monotonic()
        self.close_reason: str | None = None
        # What re-checks this stream's right to stay open: the JWT key that
        # verified its token (a reload that drops the key ends it), or the
        # credentials to ask the app again with (callback and laravel modes).
        self.auth_key: str | None = None
        self.credentials: Credentials | None = None
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # Told once, when the stream ends: the hub stops queueing to it at
        # once, not when its handler gets to unregister it.
        self.on_finish: Callable[[Connection], None] | None = None

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    def may_see(self, event: Event) -> bool:
        """The audience rule, the same for live, replayed and retained events."""
        if event.tenant is not None and event.tenant != self.tenant:
            return False
        if event.socket is not None and event.socket == self.socket_id:
            return False  # Laravel's toOthers(): not back to the tab that caused it
        return event.users is None or (self.user is not None and self.user in event.users)

    def wrap(self, frame: bytes) -> bytes:
        """A connection-specific frame (control events, heartbeats) in this stream's framing."""
        return chunk(frame) if self.chunked else frame

    def wire_size(self, n: int) -> int:
        """What ``n`` bytes of body take on this stream's wire (as :meth:`wrap` frames them)."""
        return n + len(b"%x\r\n\r\n" % n) if self.chunked else n

    def write_now(self, data: bytes) -> int:
        """Write already-framed bytes; returns the transport's buffered byte count."""
        transport = self.transport
        if transport.is_closing():
            self.finish("client_closed")
            return 0
        transport.write(data)
        self.bytes_sent += len(data)
        self.wrote = True
        return transport.get_write_buffer_size()

    def finish(self, reason: str, *, abort: bool = False) -> None:
        """Mark the stream over; the HTTP handler waiting on ``done`` ends the response.

        ``abort`` resets the connection: unsent data is dropped at once, in the
        kernel too (SO_LINGER 0), instead of lingering on a peer that never reads.
        """
        if self.close_reason is not None:
            return
        self.close_reason = reason
        self.pending.clear()
        if self.on_finish is not None:
            self.on_finish(self)
        if abort:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.transport.abort()
        if not self.done.done():
            self.done.set_result(reason)
