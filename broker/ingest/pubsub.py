"""Redis pub/sub ingest: one pattern subscription per process.

redis-py's ``PubSub.listen()`` tops out near 30k messages/s and silently
reconnects (losing what was published meanwhile). This ingest speaks RESP
itself over an asyncio protocol and parses with ``hiredis.Reader``, so each
message goes from the socket buffer to the hub in the same callback with no
task switch, and every reconnect is visible to the broker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable
from typing import cast

import hiredis
from redis.exceptions import RedisError

from broker.redis_conn import RedisTarget

log = logging.getLogger(__name__)

MESSAGES_PER_SLICE = 500
MAX_CACHED_NAMES = 10_000

_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def command(*args: str | bytes) -> bytes:
    """Encode one command in RESP (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(out)


def pattern_for(prefix: str) -> str:
    """The PSUBSCRIBE pattern matching every channel under ``prefix`` literally."""
    return prefix.translate(_GLOB_SPECIAL) + "*"


class RedisReplyError(Exception):
    """Redis answered the subscription handshake with an error (bad password, ACL...)."""


class _Subscriber(asyncio.Protocol):
    def __init__(self, prefix_len: int, on_message: Callable[[str, bytes], None]) -> None:
        loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader()
        self._prefix_len = prefix_len
        self._names: dict[bytes, str] = {}
        self._paused = False
        self._on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.subscribed: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        if not self._paused:
            self._drain()

    def _drain(self) -> None:
        """Hand buffered messages to the hub, at most a slice per loop iteration.

        One socket read can hold thousands of messages (and uvloop delivers
        many reads back to back): handled in one go they would freeze the
        loop for seconds under a flood, starving heartbeats, accepts and
        /readyz. Past the slice, reading pauses and the rest follows in the
        next iteration.
        """
        reader = self._reader
        on_message = self._on_message
        names = self._names
        budget = MESSAGES_PER_SLICE
        while budget:
            reply = reader.gets()
            if reply is False:
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return
            budget -= 1
            if type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage":
                raw = reply[2]
                channel = names.get(raw)
                if channel is None:
                    channel = self._name(raw)
                on_message(channel, reply[3])
            else:
                self._control(reply)
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._drain)

    def _name(self, raw: bytes) -> str:
        # Channel names repeat: decode each once (bounded, in case they do not).
        if len(self._names) >= MAX_CACHED_NAMES:
            self._names.clear()
        name = self._names[raw] = raw[self._prefix_len :].decode("utf-8", "replace")
        return name

    def _control(self, reply: object) -> None:
        if isinstance(reply, hiredis.ReplyError):
            err = RedisReplyError(str(reply))
            if not self.subscribed.done():
                self.subscribed.set_exception(err)
            else:
                log.warning("redis pub/sub error: %s", reply)
            if self.transport is not None:
                self.transport.close()
        elif (
            type(reply) is list
            and reply
            and reply[0] == b"psubscribe"
            and not self.subscribed.done()
        ):
            self.subscribed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(
                exc or ConnectionResetError("redis closed the connection")
            )
        if not self.lost.done():
            self.lost.set_result(exc)


class PubSubIngest:
    """Keeps one PSUBSCRIBE alive forever, reconnecting with capped, jittered backoff.

    ``on_state(True)`` is called each time the subscription is (re)established
    and ``on_state(False)`` each time it is lost; between a loss and the next
    subscription, anything published is gone for this process.
    """

    def __init__(
        self,
        target: RedisTarget,
        prefix: str,
        on_message: Callable[[str, bytes], None],
        on_state: Callable[[bool], None],
        *,
        connect_timeout: float = 5.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        self.target = target
        self.prefix = prefix
        self._on_message = on_message
        self._on_state = on_state
        self._connect_timeout = connect_timeout
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self.subscribed = False

    async def _connect(self) -> _Subscriber:
        loop = asyncio.get_running_loop()
        prefix_len = len(self.prefix.encode())

        def factory() -> _Subscriber:
            return _Subscriber(prefix_len, self._on_message)

        t = self.target
        if t.path:
            transport, proto = await loop.create_unix_connection(factory, t.path)
        else:
            host, port = await t.address()  # with Sentinel: the master of the moment
            context = t.ssl_context()
            transport, proto = await loop.create_connection(
                factory, host, port, ssl=context, server_hostname=host if context else None
            )
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        handshake = []
        if t.password is not None:
            handshake.append(
                command("AUTH", t.username, t.password)
                if t.username
                else command("AUTH", t.password)
            )
        handshake.append(command("CLIENT", "SETNAME", "sse-broker-ingest"))
        handshake.append(command("PSUBSCRIBE", pattern_for(self.prefix)))
        transport.write(b"".join(handshake))
        try:
            await proto.subscribed
        except BaseException:
            transport.close()
            raise
        return proto

    async def run(self) -> None:
        """Subscribe, and resubscribe after every failure, until cancelled."""
        backoff = self._backoff_min
        while True:
            try:
                proto = await asyncio.wait_for(self._connect(), self._connect_timeout)
            except (OSError, TimeoutError, RedisReplyError, RedisError) as exc:
                # RedisError: e.g. Sentinel knowing no master for a moment mid-failover.
                log.warning(
                    "redis %s: subscribe failed (%s); retrying in about %.1fs",
                    self.target.describe(),
                    str(exc) or type(exc).__name__,
                    backoff,
                )
            except Exception:  # the ingest must outlive any surprise: log it, retry
                log.exception("redis %s: subscribe failed unexpectedly", self.target.describe())
            else:
                self.subscribed = True
                backoff = self._backoff_min
                log.info("subscribed to %s on %s", pattern_for(self.prefix), self.target.describe())
                self._on_state(True)
                try:
                    reason = await proto.lost
                finally:
                    self.subscribed = False
                    if proto.transport is not None:
                        proto.transport.close()
                    self._on_state(False)
                log.warning("redis %s: subscription lost (%s)", self.target.describe(), reason)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self._backoff_max)
