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
import socket
from collections.abc import Callable
from typing import cast

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.ingest import (
    CANARY_PREFIX,
    Backoff,
    Context,
    ReadsEveryChannel,
    Sink,
    raise_if_cancelled,
)
from broker.positions import SequenceIds
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
    def __init__(
        self,
        prefix_len: int,
        on_message: Callable[[str, bytes], None],
        on_canary: Callable[[str, bytes], None],
        on_subscribed: Callable[[], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader()
        self._prefix_len = prefix_len
        self._names: dict[bytes, str] = {}
        self._paused = False
        self._on_message = on_message
        self._on_canary = on_canary
        self._on_subscribed = on_subscribed
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
                    if channel.startswith(CANARY_PREFIX):
                        # Never cached, so looked at only here, off the hot path.
                        self._on_canary(channel, reply[3])
                        continue
                on_message(channel, reply[3])
            else:
                self._control(reply)
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._drain)

    def _name(self, raw: bytes) -> str:
        # Channel names repeat: decode each once (bounded, in case they do not).
        name = raw[self._prefix_len :].decode("utf-8", "replace")
        if name.startswith(CANARY_PREFIX):
            return name
        if len(self._names) >= MAX_CACHED_NAMES:
            self._names.clear()
        self._names[raw] = name
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
            # Told here, before the messages that followed the confirmation
            # in the same read are handed on: they come after the gap.
            self._on_subscribed()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(
                exc or ConnectionResetError("redis closed the connection")
            )
        if not self.lost.done():
            self.lost.set_result(exc)


class PubSubIngest(ReadsEveryChannel):
    """Keeps one PSUBSCRIBE alive forever, reconnecting with capped, jittered backoff.

    The sink hears ``connected(True)`` each time the subscription is
    (re)established and ``connected(False)`` each time it is lost; between a
    loss and the next subscription, anything published is gone for this
    process, so a resubscription reports a gap on every channel.

    Liveness: a canary on a channel of this process's own (``!canary!<epoch>``,
    outside the channel charset) is published each check and must come back
    before the next; a subscription can wedge silently while Redis answers.
    """

    stream_key = None

    def __init__(
        self,
        target: RedisTarget,
        prefix: str,
        epoch: str,
        commands: Callable[[], aioredis.Redis],
        *,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target = target
        self.prefix = prefix
        self.scheme = SequenceIds(epoch)
        self.canary_channel = f"{CANARY_PREFIX}{epoch}"
        self._commands = commands
        self._connect_timeout = connect_timeout
        self._canary_pending: str | None = None
        self._canary_count = 0
        self._sink: Sink | None = None
        self._held = False  # a subscription existed before (across rebuilds too)
        self.subscribed = False

    async def _connect(self, sink: Sink) -> _Subscriber:
        loop = asyncio.get_running_loop()
        prefix_len = len(self.prefix.encode())

        def factory() -> _Subscriber:
            return _Subscriber(
                prefix_len, sink.message, self._canary_arrived, lambda: self._subscribed(sink)
            )

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

    async def run(self, sink: Sink) -> None:
        """Subscribe, and resubscribe after every failure, until cancelled."""
        self._sink = sink
        backoff = Backoff()
        while True:
            raise_if_cancelled()
            proto: _Subscriber | None = None
            try:
                proto = await asyncio.wait_for(self._connect(sink), self._connect_timeout)
                backoff.reset()
                log.info("subscribed to %s on %s", pattern_for(self.prefix), self.target.describe())
                reason = await proto.lost
                log.warning("redis %s: subscription lost (%s)", self.target.describe(), reason)
            except (OSError, TimeoutError, RedisReplyError, RedisError) as exc:
                # RedisError: e.g. Sentinel knowing no master for a moment mid-failover.
                log.warning(
                    "redis %s: subscribe failed (%s); retrying in about %.1fs",
                    self.target.describe(),
                    str(exc) or type(exc).__name__,
                    backoff.current,
                )
            except Exception:  # the ingest must outlive any surprise: log it, retry
                log.exception("redis %s: subscribe failed unexpectedly", self.target.describe())
            finally:
                if proto is not None and proto.transport is not None:
                    proto.transport.close()
                if self.subscribed:
                    self.subscribed = False
                    self._canary_pending = None
                    sink.connected(False)
            await backoff.wait()

    def _subscribed(self, sink: Sink) -> None:
        self.subscribed = True
        sink.connected(True)
        if self._held:  # a new subscription: what was published meanwhile is gone
            sink.gap("outage")
        self._held = True

    # -- liveness -------------------------------------------------------------------

    async def check(self, sink: Sink) -> None:
        if not self.subscribed:
            return
        if self._canary_pending is not None:  # the last canary never came back
            self._canary_pending = None
            sink.stalled("the canary published one interval ago never came back")
            return
        self._canary_count += 1
        self._canary_pending = token = str(self._canary_count)
        try:
            receivers = await self._commands().publish(self.prefix + self.canary_channel, token)
        except (RedisError, OSError):
            self._canary_pending = None  # Redis itself is away: the subscription will notice
            return
        if receivers == 0 and self._canary_pending == token:
            self._canary_pending = None
            sink.stalled("Redis knows no subscription of this broker")

    def _canary_arrived(self, channel: str, payload: bytes) -> None:
        if channel != self.canary_channel:
            return  # another broker's canary
        if payload.decode(errors="replace") == self._canary_pending:
            self._canary_pending = None
            if self._sink is not None:
                self._sink.moving()


def build(context: Context) -> PubSubIngest:
    return PubSubIngest(context.target, context.cfg.ingest.prefix, context.epoch, context.commands)
