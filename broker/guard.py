"""Connections that are not streams yet: a header deadline and a per-address cap.

aiohttp reads request headers with no deadline of its own: the only timer on
a fresh connection is its keep-alive timer (about an hour by default), so a
client that opens sockets and sends nothing, or a byte a minute, holds a file
descriptor each for that long, and one address could hold them all. Here
every connection of a listener goes through its :class:`Guard`:

- **Header deadline.** From ``connection_made`` a loop timer (one
  ``call_later`` per connection, no task) closes the connection unless its
  first request's headers are complete within ``server.header_timeout_seconds``.
  Later requests on a keep-alive connection are bounded by aiohttp's own
  keep-alive timer, set to the same value: an idle keep-alive connection, or
  one whose next request's headers trickle in, is closed that long after its
  last response. (SSE streams never return to keep-alive: they force-close.)
- **Pending cap per address.** A connection counts against its peer address
  (``access.normalize_ip``) from ``connection_made`` until :func:`admitted`
  (the HTTP layer calls it once the connection is a stream) or until it is
  closed, whichever comes first; past ``limits.max_pending_connections_per_ip``
  (read at each connection: a reload applies to the next one) a new
  connection is closed at once, before aiohttp sees it. Peers in
  ``server.trusted_proxies`` (read from the broker likewise) and peers on a
  Unix socket are exempt: behind a proxy every client arrives from it.

Every count taken is given back exactly once (admission or ``connection_lost``),
so the per-address table holds only addresses with a connection pending.

How it plugs into aiohttp, through public seams only: :class:`GuardedRunner`
(an ``AppRunner``; any site) builds a :class:`GuardedServer`, whose protocol
factory makes a :class:`GuardedHandler` (aiohttp's ``RequestHandler`` plus
three slots) per connection, and whose request factory — called as each
request's headers are complete — disarms the deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from broker.access import Network, normalize_ip
from broker.config import Config
from broker.metrics import Stats

log = logging.getLogger(__name__)

REFUSAL_LOG_INTERVAL = 10.0  # seconds: at most one "refusing" line per interval
# Runner arguments that are not the request handler's.
_NOT_HANDLER_ARGS = frozenset({"handle_signals", "shutdown_timeout", "handler_cancellation"})

RequestFactory = Callable[
    [RawRequestMessage, StreamReader, web.RequestHandler, AbstractStreamWriter, asyncio.Task[None]],
    web.BaseRequest,
]


class PendingPolicy(Protocol):
    """Where the cap and the trusted proxies are read, at each new connection
    (the ``Broker``: both follow a reload)."""

    @property
    def cfg(self) -> Config: ...

    @property
    def trusted(self) -> tuple[Network, ...]: ...

    @property
    def stats(self) -> Stats: ...


class Guard:
    """One listener's deadline and pending counts.

    Without a ``policy`` (the admin listeners) only the header deadline applies.
    The counters are plain ints for the metrics: ``closed_slow_headers``
    (connections closed by the header deadline) and ``refused_pending``
    (connections closed at once over the per-address cap).
    """

    def __init__(self, header_timeout: float, policy: PendingPolicy | None = None) -> None:
        self.header_timeout = float(header_timeout)
        self.policy = policy
        self.pending: dict[str, int] = {}  # address -> connections not yet admitted
        self.closed_slow_headers = 0
        self.refused_pending = 0
        self._next_refusal_log = 0.0

    @property
    def pending_connections(self) -> int:
        """Connections counted against an address right now."""
        return sum(self.pending.values())

    def claim(self, transport: asyncio.BaseTransport) -> tuple[bool, str | None]:
        """(accepted, the address now counted for it, or None when not counted)."""
        policy = self.policy
        if policy is None:
            return True, None
        cap = policy.cfg.limits.max_pending_connections_per_ip
        if cap <= 0:
            return True, None
        peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple) or not peer:
            return True, None  # a Unix socket: a local proxy
        address = normalize_ip(str(peer[0]))
        trusted = policy.trusted
        if trusted and _in(address, trusted):
            return True, None
        count = self.pending.get(address, 0)
        if count >= cap:
            self.refused_pending += 1
            policy.stats.requests_refused["pending_per_ip"] += 1
            now = time.monotonic()
            if now >= self._next_refusal_log:
                self._next_refusal_log = now + REFUSAL_LOG_INTERVAL
                log.warning(
                    "closing new connections from %s: %d not yet streams "
                    "(limits.max_pending_connections_per_ip = %d)",
                    address,
                    count,
                    cap,
                )
            return False, None
        self.pending[address] = count + 1
        return True, address

    def release(self, address: str) -> None:
        count = self.pending[address] - 1
        if count:
            self.pending[address] = count
        else:
            del self.pending[address]


def _in(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


class GuardedHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, under a :class:`Guard`."""

    __slots__ = ("_address", "_deadline", "_guard", "_refused")

    def __init__(self, guard: Guard, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._address: str | None = None  # counted against it while not None
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        accepted, self._address = guard.claim(transport)
        if not accepted:
            # Before aiohttp sees it: no task, no timer, nothing to undo.
            self._refused = True
            transport.close()
            return
        super().connection_made(transport)
        # aiohttp arms its keep-alive timer for the first request as well; the
        # deadline below stands in for it (and is counted). aiohttp arms its
        # own again after each response.
        self.keep_alive(True)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(guard.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._deadline = None
        guard = self._guard
        guard.closed_slow_headers += 1
        if guard.policy is not None:
            guard.policy.stats.requests_refused["header_timeout"] += 1
        self.force_close()

    def headers_done(self) -> None:
        """A request's headers are complete (aiohttp is about to handle it)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def admitted(self) -> None:
        """No longer pending: the connection is a stream now."""
        if self._address is not None:
            self._guard.release(self._address)
            self._address = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return  # aiohttp never saw this connection
        self.headers_done()
        self.admitted()
        super().connection_lost(exc)


def admitted(request: web.BaseRequest) -> None:
    """Call once ``request``'s connection is admitted as a stream: it stops
    counting against its address's ``limits.max_pending_connections_per_ip``.
    Safe to call more than once, and on a listener without a guard."""
    protocol = request.protocol
    if isinstance(protocol, GuardedHandler):
        protocol.admitted()


class GuardedServer(web.Server):
    """``web.Server`` making :class:`GuardedHandler` protocols, with the request
    handler, request factory and cancellation mode of the application's own."""

    def __init__(self, base: web.Server, guard: Guard, handler_args: dict[str, Any]) -> None:
        self._guard = guard
        self._handler_args = handler_args
        self._inner_factory: RequestFactory = base.request_factory
        super().__init__(
            base.request_handler,
            request_factory=self._request,
            handler_cancellation=base.handler_cancellation,
            **handler_args,
        )

    def _request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # Called as each request's headers are complete, before its handler runs.
        if isinstance(protocol, GuardedHandler):
            protocol.headers_done()
        return self._inner_factory(message, payload, protocol, writer, task)

    def __call__(self) -> web.RequestHandler:
        return GuardedHandler(
            self._guard, self, loop=asyncio.get_running_loop(), **self._handler_args
        )


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` whose connections go through ``guard``; aiohttp's
    keep-alive timeout is set to the guard's header timeout. Use it with any
    site (``SockSite``, ``TCPSite``, ``UnixSite``)."""

    __slots__ = ("_handler_args", "guard")

    def __init__(self, app: web.Application, guard: Guard, **kwargs: Any) -> None:
        kwargs["keepalive_timeout"] = guard.header_timeout
        super().__init__(app, **kwargs)
        self.guard = guard
        self._handler_args = {k: v for k, v in kwargs.items() if k not in _NOT_HANDLER_ARGS}

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # the application's start-up runs here
        return GuardedServer(base, self.guard, self._handler_args)
